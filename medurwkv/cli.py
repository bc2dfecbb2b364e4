"""Command line: ``python -m medurwkv <command>`` (``convert``, ``params``, ``export-bundle``, ``datalist``)."""

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


def datalist(out: str, images: str, masks: str, mask_suffix: str = "", split: str = "0.7,0.1,0.2", seed: int = 0) -> None:
    """Pair IMAGES with MASKS (``<name><mask_suffix>.<ext>``), split them and write a MONAI datalist OUT.json.

    ``python -m medurwkv datalist --images DIR --masks DIR [--mask-suffix _mask] [--split 0.7,0.1,0.2 --seed 0] OUT.json``
    Unmatched pairs are refused with their names and nothing is written (``medurwkv.data2d``)."""
    import sys

    from .data2d import DatalistError, build_datalist

    fractions = [float(f) for f in (split.split(",") if isinstance(split, str) else split)]
    try:
        d = build_datalist(images, masks, out, mask_suffix=str(mask_suffix or ""), split=fractions, seed=int(seed))
    except DatalistError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    counts = ", ".join(f"{k} {len(d[k])}" for k in ("training", "validation", "test"))
    print(f"{out}: {counts} (seed {seed})")


def main() -> None:
    import fire

    fire.Fire({"convert": convert, "params": params, "export-bundle": export_bundle, "datalist": datalist})


if __name__ == "__main__":
    main()
