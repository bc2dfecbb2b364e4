"""Official Vision-RWKV checkpoints -> tensor-only encoder weights for Med-URWKV and the bundle.

``convert(SRC, DST)`` reads an official checkpoint (ImageNet classification ``vrwkv_*_in1k_224.pth`` or the
ADE20K/COCO ViT-Adapter ``upernet_vrwkv_adapter_*``/``mask_rcnn_vrwkv_adapter_*``) without unpickling code,
detects the variant, maps every backbone key onto our model, loads it strictly (so nothing is silently
dropped), and writes the state dict of ``MedURWKV.pretrained_module`` as ``.safetensors`` or as a
``weights_only``-loadable ``.pt`` file, with its sha256.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_weights, save_weights, sha256sum
from .nets.vrwkv import VRWKV_VARIANTS, remap_official_keys

__all__ = ["detect_variant", "convert"]


def detect_variant(state_dict: Dict[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, Any]:
    """Variant (tiny/small/base/large) and encoder kind (plain/adapter) of an official or converted checkpoint."""
    sd = remap_official_keys(state_dict)
    w = sd.get("patch_embed.proj.weight")
    blocks = [k for k in sd if k.startswith("blocks.")]
    if w is None or not blocks:
        raise CheckpointError(f"{source}: not a Vision-RWKV checkpoint (no patch_embed / layers weights; first keys: {', '.join(list(state_dict)[:5])})")
    width, depth = int(w.shape[0]), 1 + max(int(k.split(".")[1]) for k in blocks)
    variant = next((n for n, v in VRWKV_VARIANTS.items() if (v["embed_dim"], v["depth"]) == (width, depth)), None)
    if variant is None:
        raise CheckpointError(f"{source}: a VRWKV of embed_dim={width}, depth={depth} matches no official variant")
    adapter = any(k.startswith(("spm.", "interactions.", "level_embed")) for k in sd)
    return {"variant": variant, "encoder": "adapter" if adapter else "plain", "embed_dim": width, "depth": depth, "in_chans": int(w.shape[1])}


def convert(
    src: str,
    dst: str,
    in_channels: Optional[int] = None,
    variant: str = "auto",
    encoder: str = "auto",
    quiet: bool = False,
) -> Dict[str, Any]:
    """Convert an official Vision-RWKV checkpoint into encoder weights for ``MedURWKV``.

    Args:
        src: official checkpoint (``.pth``; read with ``torch.load(weights_only=True)``) or safetensors.
        dst: output file; ``.safetensors`` or any other suffix for a tensor-only torch file (``.pt``).
        in_channels: input channels of the target network (the RGB stem is adapted with timm's
            ``adapt_input_conv``); default: keep the checkpoint's.
        variant: ``auto`` or one of tiny/small/base/large; must match the checkpoint.
        encoder: ``auto``, ``plain`` or ``adapter``; must match the checkpoint.
        quiet: do not print the report.

    Returns:
        The report: variant, encoder, key counts (source, mapped, ignored by prefix, missing, unexpected),
        output path and sha256.
    """
    src_path = Path(src)
    raw = load_weights(src_path)
    found = detect_variant(raw, str(src_path))
    for name, want in (("variant", variant), ("encoder", encoder)):
        if want != "auto" and want != found[name]:
            raise CheckpointError(f"{src}: checkpoint is {name} {found[name]!r}, but {want!r} was requested")
    in_channels = int(in_channels or found["in_chans"])
    arch = f"vrwkv_adapter_{found['variant']}" if found["encoder"] == "adapter" else f"vrwkv_{found['variant']}"
    kwargs = {} if found["encoder"] == "adapter" else {"num_classes": 0}
    model = timm.create_model(arch, in_chans=in_channels, **kwargs)
    ignored = _ignored_groups(raw, set(model.state_dict()))
    n_loaded = model.load_checkpoint(raw, source=str(src_path))
    state = model.state_dict()
    out = {k: v.detach().clone() for k, v in tqdm(state.items(), desc="collect tensors", unit="tensor", disable=quiet, leave=False)}
    meta = {
        "format": "medurwkv-encoder",
        "architecture": arch,
        "variant": found["variant"],
        "encoder": found["encoder"],
        "in_channels": str(in_channels),
        "source": src_path.name,
        "source_sha256": sha256sum(src_path),
    }
    digest = save_weights(out, dst, metadata=meta)
    report = {
        **{k: found[k] for k in ("variant", "encoder", "embed_dim", "depth")},
        "architecture": arch,
        "in_channels": in_channels,
        "source_tensors": len(raw),
        "mapped": n_loaded,
        "ignored": dict(ignored),
        "missing": 0,  # a strict load succeeded
        "unexpected": 0,
        "output": str(dst),
        "sha256": digest,
        "source_sha256": meta["source_sha256"],
    }
    if not quiet:
        print(format_report(report))
    return report


def _ignored_groups(raw: Dict[str, torch.Tensor], model_keys: set) -> Dict[str, int]:
    """Source tensors that have no place in the encoder (segmentation/detection heads, classifier),
    counted by their top-level prefix."""
    groups: Counter = Counter()
    for k, v in raw.items():
        mapped = remap_official_keys({k: v})
        if not mapped or next(iter(mapped)) not in model_keys:
            groups[k.split(".")[0]] += 1
    return dict(groups)


def format_report(r: Dict[str, Any]) -> str:
    ignored = ", ".join(f"{k}.* ({n})" for k, n in sorted(r["ignored"].items())) or "none"
    return "\n".join(
        [
            f"variant       : {r['variant']} ({r['encoder']} encoder, embed_dim {r['embed_dim']}, depth {r['depth']}) -> {r['architecture']}",
            f"input channels: {r['in_channels']}",
            f"source tensors: {r['source_tensors']}",
            f"mapped        : {r['mapped']}",
            f"ignored       : {ignored}",
            f"missing       : {r['missing']}",
            f"unexpected    : {r['unexpected']}",
            f"output        : {r['output']}",
            f"sha256        : {r['sha256']}",
        ]
    )
