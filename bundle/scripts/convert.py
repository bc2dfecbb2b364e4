"""Glue for configs/convert.json: official Vision-RWKV checkpoint -> the bundle's encoder weights."""

from __future__ import annotations

from typing import Any, Dict, Optional

from medurwkv.convert import convert


def convert_encoder(
    src: Optional[str], dst: str, in_channels: int = 1, variant: str = "tiny", encoder: str = "adapter"
) -> Dict[str, Any]:
    """Call ``medurwkv.convert.convert`` with the bundle's input channels and encoder kind.

    ``encoder="adapter"`` takes the ADE20K UperNet checkpoint (``upernet_vrwkv_adapter_tiny_512_160k_ade20k.pth``),
    ``encoder="plain"`` an ImageNet one (``vrwkv_t_in1k_224.pth``). The output (``models/pretrained_encoder.pt``
    by default) is a tensor-only state dict of ``MedURWKV.pretrained_module``, an optional cache of the official
    file: train.json's ``network_def`` loads either strictly with ``--pretrained_encoder_path``."""
    if not src:
        raise ValueError(
            "convert.json needs the official checkpoint: python -m monai.bundle run --config_file configs/convert.json "
            "--src /path/to/upernet_vrwkv_adapter_tiny_512_160k_ade20k.pth (or --encoder plain --src vrwkv_t_in1k_224.pth)"
        )
    return convert(src, dst, in_channels=in_channels, variant=variant, encoder=encoder)
