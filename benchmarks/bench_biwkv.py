"""Benchmark of the Bi-WKV operator: eager PyTorch path vs Triton kernels, with accuracy checks.

For each size (B, T, C) and each variant it measures:

* forward and forward+backward time in ms: ``triton.testing.do_bench`` on CUDA (median; L2 flushed between
  calls), a median of wall-clock repeats on CPU;
* effective bandwidth, from a minimal-traffic model: the forward reads k, v and writes y (3 tensors); the
  backward reads k, v, y, dy and writes dk, dv (6 more). Element size is the input dtype's;
* peak memory above the inputs (CUDA only) for one forward+backward;
* max abs error of y against the float64 O(T^2) oracle where that fits (``B*T*T*C`` below a limit).
  Elsewhere it is measured against the PyTorch path run in float64 (exact algebra, O(T)).

Variants:

* ``torch``: ``bi_wkv_torch`` eager, float32 (the CPU path of ``bi_wkv``).
* ``torch_chunked``: its range-proof chunked form, used for extreme decays or key ranges.
* ``reference_fp64``: the float64 O(T^2) oracle ``bi_wkv_reference``, where it fits.
* ``triton``: ``bi_wkv_triton`` with the default heuristics.
* ``triton_nosplit``: the same kernels forced onto one chunk. Only run on sizes where the heuristics chose a
  T-split, to show what the split buys.

Usage::

    python benchmarks/bench_biwkv.py                          # CUDA, all sizes and variants
    python benchmarks/bench_biwkv.py --device cpu --threads 2  # PyTorch path only
    python benchmarks/bench_biwkv.py --sizes 2,13824,96 --out /tmp/res

It writes ``bench_biwkv_<device>.json`` and ``.md`` into ``--out`` (default ``$OUT`` or
``benchmarks/results``) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medurwkv.ops.biwkv import bi_wkv_reference, bi_wkv_torch  # noqa: E402

SIZES: list[tuple[int, int, int]] = [
    (16, 196, 192),  # VRWKV-T, 224^2 / 16
    (8, 196, 768),  # VRWKV-B, 224^2
    (8, 1024, 768),  # VRWKV-B, 512^2
    (2, 216, 768),  # 3D 96^3 / 16^3 (UNETR-like)
    (2, 4096, 192),
    (2, 13824, 96),  # 3D 96^3 / 4^3: few rows, long sequence -> T-split
    (1, 16384, 64),
]
ORACLE_LIMIT = {"cuda": 2e10, "cpu": 3e8}  # largest B*T*T*C for the float64 O(T^2) oracle


def make_inputs(B: int, T: int, C: int, device: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Inputs like a VRWKV layer at init: spatial_decay in [-5, 3] ('fancy' init at mid depth),
    spatial_first = log(0.3) + zig-zag 0.5, both divided by T; k, v ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.arange(C, dtype=torch.float64) / max(1, C - 1)
    decay = -5 + 8 * h ** (0.7 + 1.3 * 0.5)
    zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(C)], dtype=torch.float64) * 0.5
    first = math.log(0.3) + zigzag
    k = torch.randn(B, T, C, generator=g)
    v = torch.randn(B, T, C, generator=g)
    w = (decay / T).float()
    u = (first / T).float()
    return [w.to(device), u.to(device), k.to(device, dtype), v.to(device, dtype)]


def time_ms(fn: Callable[[], object], device: str, rep_ms: float) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(25, int(rep_ms / 4)), rep=int(rep_ms), return_mode="median"))
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def variants(device: str) -> dict[str, Callable[..., torch.Tensor]]:
    out: dict[str, Callable[..., torch.Tensor]] = {
        "torch": bi_wkv_torch,
        # the range-proof form that bi_wkv_torch switches to for extreme decays / key ranges
        "torch_chunked": lambda w, u, k, v: bi_wkv_torch(w, u, k, v, method="chunked"),
        # the float64 O(T^2) oracle, timed where it fits (the "reference vs fast path" comparison)
        "reference_fp64": bi_wkv_reference,
    }
    if device == "cuda":
        try:
            from medurwkv.ops.triton_biwkv import bi_wkv_triton
        except Exception as exc:  # report, keep benchmarking the torch path
            print(f"triton kernels unavailable: {exc!r}", file=sys.stderr)
        else:
            out["triton"] = bi_wkv_triton
            out["triton_nosplit"] = lambda w, u, k, v: bi_wkv_triton(w, u, k, v, chunk_len=0)
    return out


def bench_size(B: int, T: int, C: int, device: str, dtype: torch.dtype, rep_ms: float, only: set[str] | None) -> list[dict]:
    w, u, k, v = make_inputs(B, T, C, device, dtype)
    n = B * T * C
    es = k.element_size()
    use_oracle = B * T * T * C <= ORACLE_LIMIT[device]
    with torch.no_grad():
        if use_oracle:
            ref = bi_wkv_reference(w, u, k, v)
        else:
            ref = bi_wkv_torch(w.double(), u.double(), k.double(), v.double())
    todo = {name: fn for name, fn in variants(device).items() if not only or name in only}
    split_cfg = None
    if any(name.startswith("triton") for name in todo):
        from medurwkv.ops.triton_biwkv import launch_config

        split_cfg = launch_config(B, T, C, k.device)
    rows = []
    for name, fn in todo.items():
        if name == "triton_nosplit" and not split_cfg.split:
            continue
        if name == "reference_fp64" and not use_oracle:
            continue
        rec: dict = {"B": B, "T": T, "C": C, "variant": name, "dtype": str(dtype).removeprefix("torch.")}
        if name.startswith("triton") and split_cfg is not None:
            rec["config"] = {**dataclasses.asdict(split_cfg), "n_chunks": 1 if name == "triton_nosplit" else split_cfg.n_chunks}
        try:
            with torch.no_grad():
                y = fn(w, u, k, v)
                rec["max_abs_err"] = (y.double() - ref).abs().max().item()
                rec["err_vs"] = "float64 oracle" if use_oracle else "float64 torch path"
                del y
                rec["fwd_ms"] = time_ms(lambda: fn(w, u, k, v), device, rep_ms)
            ins = [t.clone().requires_grad_() for t in (w, u, k, v)]
            gy = torch.randn_like(k)

            def fwd_bwd() -> None:
                for t in ins:
                    t.grad = None
                fn(*ins).backward(gy)

            rec["fwd_bwd_ms"] = time_ms(fwd_bwd, device, rep_ms)
            rec["fwd_GBps"] = 3 * n * es / rec["fwd_ms"] / 1e6
            rec["fwd_bwd_GBps"] = 9 * n * es / rec["fwd_bwd_ms"] / 1e6
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fwd_bwd()
                torch.cuda.synchronize()
                rec["peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            del ins, gy
        except Exception as exc:  # e.g. out of memory: record and go on
            rec["error"] = repr(exc)[:300]
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def tune(sizes: list[tuple[int, int, int]], dtype: torch.dtype, rep_ms: float, out: Path, device: str = "cuda") -> None:
    """Time the Triton kernels over a small grid of launch overrides (tile length, warps, chunk length)
    per size, to check the heuristics in :func:`medurwkv.ops.triton_biwkv.launch_config`. Writes bench_biwkv_tune.json."""
    from medurwkv.ops.triton_biwkv import bi_wkv_triton, launch_config

    # (block_t, num_warps, chunk_len); None = heuristic, chunk_len 0 = no T-split
    grid = [(None, None, None)] + [(bt, nw, None) for bt in (32, 64) for nw in (4, 8)]
    grid += [(None, None, cl) for cl in (0, 128, 512)]
    rows = []
    for B, T, C in sizes:
        w, u, k, v = make_inputs(B, T, C, device, dtype)
        gy = torch.randn_like(k)
        for bt, nw, cl in grid:
            kw = {"block_t": bt, "num_warps": nw, "chunk_len": cl}
            cfg = launch_config(B, T, C, k.device, **kw)
            rec: dict = {"B": B, "T": T, "C": C, **kw, "config": dataclasses.asdict(cfg)}
            try:
                with torch.no_grad():
                    rec["fwd_ms"] = time_ms(lambda: bi_wkv_triton(w, u, k, v, **kw), device, rep_ms)
                ins = [t.clone().requires_grad_() for t in (w, u, k, v)]

                def fwd_bwd() -> None:
                    for t in ins:
                        t.grad = None
                    bi_wkv_triton(*ins, **kw).backward(gy)

                rec["fwd_bwd_ms"] = time_ms(fwd_bwd, device, rep_ms)
            except Exception as exc:
                rec["error"] = repr(exc)[:300]
            rows.append(rec)
            print(json.dumps(rec), flush=True)
            # rewritten after every record, so a run cut short by a time limit still leaves its results
            (out / "bench_biwkv_tune.json").write_text(json.dumps(rows, indent=1))


def fmt(x: object, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "–"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Bi-WKV benchmark on {meta['device_name']} ({meta['date']}; torch {meta['torch']}, "
        f"triton {meta.get('triton', '–')}, {meta['threads']} threads)",
        "",
        "| B, T, C | variant | fwd ms | fwd+bwd ms | fwd ms / torch fwd ms | fwd GB/s | fwd+bwd GB/s | peak MiB | max abs err (vs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    torch_fwd = {(r["B"], r["T"], r["C"]): r.get("fwd_ms") for r in rows if r["variant"] == "torch"}
    for r in rows:
        base = torch_fwd.get((r["B"], r["T"], r["C"]))
        ratio = r["fwd_ms"] / base if base and isinstance(r.get("fwd_ms"), float) else None
        err = f"{fmt(r.get('max_abs_err'), '.1e')} ({r.get('err_vs', '–')})"
        if "error" in r:
            err = f"failed: {r['error'][:80]}"
        lines.append(
            f"| {r['B']}, {r['T']}, {r['C']} | {r['variant']} | {fmt(r.get('fwd_ms'), '.3f')} | "
            f"{fmt(r.get('fwd_bwd_ms'), '.3f')} | {fmt(ratio, '.2f')} | {fmt(r.get('fwd_GBps'), '.3g')} | {fmt(r.get('fwd_bwd_GBps'), '.3g')} | "
            f"{fmt(r.get('peak_MiB'), '.1f')} | {err} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU mode)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--sizes", nargs="*", default=None, help="B,T,C triples (default: the standard list)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of torch,torch_chunked,reference_fp64,triton,triton_nosplit")
    ap.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement (default 200 CUDA, 1000 CPU)")
    ap.add_argument("--tune", action="store_true", help="CUDA: time a grid of Triton launch overrides instead")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available; use --device cpu")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sizes = [tuple(int(x) for x in s.split(",")) for s in args.sizes] if args.sizes else SIZES
    only = set(args.variants.split(",")) if args.variants else None
    rep_ms = args.rep_ms or (200.0 if args.device == "cuda" else 1000.0)

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tune:
        if args.device != "cuda":
            ap.error("--tune needs CUDA")
        tune(sizes, dtype, rep_ms, out)
        return

    stem = f"bench_biwkv_{args.device}" + ("" if args.dtype == "float32" else f"_{args.dtype}")
    rows: list[dict] = []
    for B, T, C in sizes:
        rows.extend(bench_size(B, T, C, args.device, dtype, rep_ms, only))
        # rewritten after every size, so a run cut short by a time limit still leaves its results
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        table = markdown(rows, meta)
        (out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
