"""One-time cost of Bi-WKV's first-launch guard (``medurwkv/ops/dispatch.py``), per process and key.

The guard compares the kernels' first forward (and first backward) with the float64 PyTorch path on a probe
(batch 0 / the whole batch, at most 64 channels, at most 2^20 entries). This times those two checks on the
issue's shapes, next to one float32 PyTorch-path forward of the full input (what every call would cost
without the kernels), on the device given. Prints a markdown table; runs from any directory.

    python benchmarks/bench_guard_cost.py --device cpu --threads 2
    python benchmarks/bench_guard_cost.py                  # CUDA when present
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medurwkv.ops import bi_wkv_torch, dispatch  # noqa: E402

SHAPES = [(16, 196, 192), (8, 1024, 768), (2, 13824, 96), (1, 65536, 64)]


def median_ms(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU mode)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}\n")
    print("| B, T, C | forward check ms | backward check ms | float32 torch-path forward ms (full input) |")
    print("|---|---|---|---|")
    for B, T, C in SHAPES:
        g = torch.Generator().manual_seed(0)
        w, u = torch.linspace(-5, 3, C) / T, torch.randn(C, generator=g) / T
        k, v = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
        w, u, k, v = (t.to(device) for t in (w, u, k, v))
        y = bi_wkv_torch(w, u, k, v)
        gy = torch.randn_like(k)
        grads = dispatch._vjp_torch((w, u, k, v), gy)
        fwd = median_ms(lambda: dispatch._check_forward(w, u, k, v, y), device, args.reps)
        bwd = median_ms(lambda: dispatch._check_backward((w, u, k, v), gy, grads), device, args.reps)
        full = median_ms(lambda: bi_wkv_torch(w, u, k, v), device, args.reps)
        print(f"| {B}, {T}, {C} | {fwd:.1f} | {bwd:.1f} | {full:.1f} |", flush=True)


if __name__ == "__main__":
    main()
