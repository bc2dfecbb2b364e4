"""Med-URWKV against MONAI's 2D segmentation networks, measured in one process on one device.

GPU mode (default when CUDA is present): images/s and peak memory with bf16 autocast, inference at
224/batch 32, 512/batch 8 and 1024/batch 2, and the training step (forward, backward, AdamW step) at
224/batch 32 and 1024/batch 2 (``--settings`` picks a subset). CPU mode (``--device cpu``): 2 threads,
256x256 slices, batch 1 forward latency (the per-slice cost of slice-wise 3D inference) and a batch-4
training step.

Every number is printed with its ratio to each peer measured in the same run, and written as JSON and a
markdown table into ``--out`` (default ``$OUT``, else ``benchmarks/results`` beside this script). Runs from
any working directory: the repository root is put on ``sys.path`` from this file's location.

    python benchmarks/bench_models.py --device cpu
    python /path/to/repo/benchmarks/bench_models.py --settings infer224x32 train224x32 --out /tmp/out
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # import this checkout's medurwkv, whatever the working directory

OURS = ("Med-URWKV-T (adapter)", "Med-URWKV-T (plain)", "Med-URWKV-S (adapter)")


def build(name: str, size: int, in_ch: int = 1, out_ch: int = 2) -> nn.Module:
    from monai.networks.nets import UNETR, BasicUNet, FlexibleUNet, SwinUNETR

    from medurwkv.nets.medurwkv import MedURWKV

    if name == "Med-URWKV-T (adapter)":
        return MedURWKV(in_ch, out_ch, variant="tiny", encoder="adapter")
    if name == "Med-URWKV-T (plain)":
        return MedURWKV(in_ch, out_ch, variant="tiny", encoder="plain")
    if name == "Med-URWKV-S (adapter)":
        return MedURWKV(in_ch, out_ch, variant="small", encoder="adapter")
    if name == "SwinUNETR (feature 48)":
        return SwinUNETR(in_channels=in_ch, out_channels=out_ch, feature_size=48, spatial_dims=2)
    if name == "UNETR":
        return UNETR(in_channels=in_ch, out_channels=out_ch, img_size=(size, size), spatial_dims=2)
    if name == "FlexibleUNet (efficientnet-b2)":
        return FlexibleUNet(in_channels=in_ch, out_channels=out_ch, backbone="efficientnet-b2", spatial_dims=2, pretrained=False)
    if name == "BasicUNet":
        return BasicUNet(spatial_dims=2, in_channels=in_ch, out_channels=out_ch)
    raise ValueError(name)


MODELS = (*OURS, "SwinUNETR (feature 48)", "UNETR", "FlexibleUNet (efficientnet-b2)", "BasicUNet")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA: synchronised around each call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(name: str, size: int, batch: int, device: torch.device, train: bool, amp: bool, warmup: int, reps: int) -> Dict[str, float]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(name, size).to(device)
    x = torch.randn(batch, 1, size, size, device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else (lambda: torch.autocast(device.type, enabled=False))
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        target = torch.randint(0, 2, (batch, size, size), device=device)
        loss_fn = nn.CrossEntropyLoss()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with ctx():
                loss = loss_fn(model(x).float(), target)
            loss.backward()
            opt.step()

        ms = _time(step, device, warmup, reps)
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode(), ctx():
                model(x)

        ms = _time(step, device, warmup, reps)
    out = {"ms": ms, "img_per_s": batch * 1e3 / ms, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    if device.type == "cuda":
        out["peak_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
    del model
    return out


def run(device: torch.device, settings: List[Tuple[str, int, int, bool]], amp: bool, warmup: int, reps: int, models: List[str]) -> List[Dict]:
    rows = []
    for label, size, batch, train in settings:
        for name in models:
            try:
                r = measure(name, size, batch, device, train, amp, warmup, reps)
            except torch.OutOfMemoryError:
                r = {"error": "out of memory"}
            except Exception as e:  # a peer that does not support this size: recorded, not fatal
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            rows.append({"setting": label, "model": name, "size": size, "batch": batch, "train": train, **r})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: List[Dict]) -> str:
    """Markdown: per setting, each model's time and its ratio to every peer (>1 means ours is faster)."""
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == setting]
        ok = {r["model"]: r for r in group if "ms" in r}
        peers = [m for m in ok if m not in OURS]
        lines += [f"### {setting}", ""]
        head = "| model | params (M) | ms | img/s | peak GB | " + " | ".join(f"speed-up vs {p}" for p in peers) + " |"
        lines += [head, "|" + "---|" * (5 + len(peers))]
        for r in group:
            if "ms" not in r:
                lines.append(f"| {r['model']} | | {r['error']} | | |" + " |" * len(peers))
                continue
            ratios = " | ".join(f"{ok[p]['ms'] / r['ms']:.2f}x" for p in peers)
            peak = f"{r['peak_GB']:.2f}" if "peak_GB" in r else "-"
            lines.append(f"| {r['model']} | {r['params_M']:.2f} | {r['ms']:.1f} | {r['img_per_s']:.1f} | {peak} | {ratios} |")
        lines.append("")
    return "\n".join(lines)


GPU_SETTINGS = [
    ("inference bf16, 224x224, batch 32", 224, 32, False),
    ("inference bf16, 512x512, batch 8", 512, 8, False),
    ("inference bf16, 1024x1024, batch 2", 1024, 2, False),
    ("training step bf16, 224x224, batch 32", 224, 32, True),
    ("training step bf16, 1024x1024, batch 2", 1024, 2, True),
]


def setting_key(size: int, batch: int, train: bool) -> str:
    return f"{'train' if train else 'infer'}{size}x{batch}"


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), metavar="MODEL")
    ap.add_argument("--settings", nargs="*", default=None,
                    help="GPU subset, e.g. infer224x32 infer1024x2 train224x32 train1024x2 (default: all)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
        settings = [("CPU inference, 256x256, batch 1 (one slice)", 256, 1, False), ("CPU training step, 256x256, batch 4", 256, 4, True)]
        amp, warmup, reps = False, 1, args.reps or 5
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        known = {setting_key(s, b, t): (label, s, b, t) for label, s, b, t in GPU_SETTINGS}
        wanted = args.settings or list(known)
        unknown = [k for k in wanted if k not in known]
        if unknown:
            ap.error(f"unknown settings {unknown}; choose from {list(known)}")
        settings = [known[k] for k in wanted]
        amp, warmup, reps = True, 3, args.reps or 20
    if args.warmup is not None:
        warmup = args.warmup
    rows = run(device, settings, amp, warmup, reps, args.models)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    from medurwkv.ops import dispatch

    # which Bi-WKV implementation the Med-URWKV rows ran: the Triton kernels unless the guard switched them off
    meta["biwkv_backend"] = dispatch.resolve_backend()
    meta["biwkv_triton_disabled"] = dispatch._GUARD.disabled
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_models_{device.type}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    extra = f", triton {meta['triton']}" if "triton" in meta else ""
    guard = f"; Bi-WKV backend {meta['biwkv_backend']}" + (f", Triton switched off: {meta['biwkv_triton_disabled']}" if meta["biwkv_triton_disabled"] else "")
    md = f"Device: {meta['device']}, {meta['date']}, torch {meta['torch']}{extra}{guard}\n\n" + table(rows)
    (out / f"bench_models_{device.type}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
