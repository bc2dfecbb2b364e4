"""Command line: ``python -m medurwkv <command>`` (``convert``, ``params``, ``export-bundle``)."""

from __future__ import annotations

from typing import Optional


def params(variant: str = "tiny", encoder: str = "adapter", in_channels: int = 1, out_channels: int = 2) -> None:
    """Print the parameter count of Med-URWKV per part (encoder, bottleneck, decoder, head)."""
    from .nets.medurwkv import MedURWKV

    counts = MedURWKV(in_channels, out_channels, variant=variant, encoder=encoder).parameter_count()
    for part, n in counts.items():
        print(f"{part:<11}{n:>12,d}  ({n / 1e6:.2f} M)")


def convert(src: str, dst: str, in_channels: Optional[int] = None, variant: str = "auto", encoder: str = "auto") -> None:
    """Official Vision-RWKV checkpoint SRC -> tensor-only encoder weights DST (.safetensors or .pt), with a report."""
    from .convert import convert as _convert

    _convert(src, dst, in_channels=in_channels, variant=variant, encoder=encoder)


def export_bundle(out: str, weights: Optional[str] = None, bundle: Optional[str] = None, sample_data: Optional[str] = None) -> None:
    """A self-contained copy of the MONAI bundle in OUT for the model zoo (library code in scripts/, WEIGHTS as
    models/model.pt with their sha256 in large_files.yml, sample data in data/)."""
    from .export import export_bundle as _export

    _export(out, weights=weights, bundle=bundle, sample_data=sample_data)


def main() -> None:
    import fire

    fire.Fire({"convert": convert, "params": params, "export-bundle": export_bundle})


if __name__ == "__main__":
    main()
