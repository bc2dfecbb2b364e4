"""Benchmark of the token-shift stage of a VRWKV spatial-mix: Q-Shift plus the three token mixes.

Two formulations of the same values (checked against each other to 1e-6 before timing):

* ``pad_cat``: the official code's form, kept here as the peer: four ``F.pad`` slices and a ``cat`` for the
  Q-Shift, then ``x * m + xx * (1 - m)`` per mix ratio (four element-wise passes each);
* ``medurwkv``: ``medurwkv.nets.vrwkv.q_shift`` (one allocation, slice copies) and ``token_mix`` (one shared
  ``x - xx``, one fused ``addcmul`` per ratio).

Sizes: the tokens Med-URWKV-T meets per 256x256 slice (encoder 16x16x192, decoder 64x64x48), and training /
GPU batches (32x14x14x192 at 224, 8x32x32x192 at 512). Times are medians of interleaved repeats (CPU) or
``triton.testing.do_bench`` medians (CUDA), forward only, inference mode.

    python benchmarks/bench_token_shift.py --device cpu --threads 2
    python benchmarks/bench_token_shift.py                  # CUDA when present
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from medurwkv.nets.vrwkv import q_shift, token_mix

SIZES = [(1, 16, 16, 192), (1, 64, 64, 48), (32, 14, 14, 192), (8, 32, 32, 192)]


def pad_cat(x, hw, mk, mv, mr, s=1, gamma=0.25):
    B, T, C = x.shape
    H, W = hw
    g = int(C * gamma)
    g4 = x.reshape(B, H, W, C)
    parts = [
        F.pad(g4[..., 0:g], (0, 0, s, 0))[:, :, :W],
        F.pad(g4[..., g : 2 * g], (0, 0, 0, s))[:, :, s:],
        F.pad(g4[..., 2 * g : 3 * g], (0, 0, 0, 0, s, 0))[:, :H],
        F.pad(g4[..., 3 * g : 4 * g], (0, 0, 0, 0, 0, s))[:, s:],
        g4[..., 4 * g :],
    ]
    xx = torch.cat(parts, dim=-1).reshape(B, T, C)
    return x * mk + xx * (1 - mk), x * mv + xx * (1 - mv), x * mr + xx * (1 - mr)


def medurwkv(x, hw, mk, mv, mr):
    return token_mix(x, q_shift(x, hw), [mk, mv, mr])


def timed(fn, device: str, reps: int) -> dict:
    """Median ms per call for each of the two variants, interleaved on CPU so that drift hits both."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return {name: float(do_bench(f)) for name, f in fn.items()}
    out = {name: [] for name in fn}
    for _ in range(reps):
        for name, f in fn.items():
            n, t = 20, time.perf_counter()
            for _ in range(n):
                f()
            out[name].append((time.perf_counter() - t) / n * 1e3)
    return {name: statistics.median(v) for name, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for B, H, W, C in SIZES:
            x = torch.randn(B, H * W, C, device=args.device)
            m = [torch.rand(1, 1, C, device=args.device) for _ in range(3)]
            err = max(float((a - b).abs().max()) for a, b in zip(pad_cat(x, (H, W), *m), medurwkv(x, (H, W), *m)))
            assert err <= 1e-6, f"the two formulations disagree by {err}"
            ms = timed({"pad_cat": lambda: pad_cat(x, (H, W), *m), "medurwkv": lambda: medurwkv(x, (H, W), *m)},
                       args.device, args.reps)
            rows.append({"B": B, "T": H * W, "C": C, **{f"{k}_ms": v for k, v in ms.items()},
                         "speedup": ms["pad_cat"] / ms["medurwkv"], "max_abs_diff": err})
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({args.threads} threads)"
    lines = [f"Q-Shift + 3 token mixes, {name}, torch {torch.__version__}", "",
             "| B, T, C | pad_cat ms (official form) | medurwkv ms | speed-up | max abs diff |", "|---|---|---|---|---|"]
    lines += [f"| {r['B']}, {r['T']}, {r['C']} | {r['pad_cat_ms']:.3f} | {r['medurwkv_ms']:.3f} | {r['speedup']:.2f}x | "
              f"{r['max_abs_diff']:.1e} |" for r in rows]
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    with open(os.path.join(args.out, f"bench_token_shift_{tag}.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, f"bench_token_shift_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
