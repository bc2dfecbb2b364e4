"""Triton Bi-WKV kernels against the float64 O(T^2) oracle.

On CPU the kernels run under Triton's interpreter. ``TRITON_INTERPRET`` is read when the kernels are
decorated, i.e. when ``medurwkv.ops.triton_biwkv`` is first imported, so every interpreted check runs in one
subprocess: this file, started with ``--interpret-worker``. That keeps the checks independent of test order
and of whatever else the pytest process imported. The worker prints one JSON line of measured errors, and
the tests below assert on it. The GPU tests at the end run only where CUDA is available.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medurwkv.ops import _use_triton, bi_wkv, bi_wkv_reference, bi_wkv_torch

ROOT = Path(__file__).resolve().parents[1]

# name -> (B, T, C, spatial_decay range, key std, dtype, launch overrides). Shapes are small because the
# interpreter is slow. Between them they cover:
# * T = 1 and 2; T not a multiple of the tile (7, 40, 70, 77, 196);
# * the T-split, forced with a short chunk_len (several chunks, and a ragged last chunk);
# * decays up to +-80 with keys of std 20;
# * the default heuristics (no overrides);
# * bf16 and fp16 inputs.
CASES: dict[str, tuple] = {
    "T1": (2, 1, 3, 5.0, 1.0, "float32", {}),
    "T2": (1, 2, 5, 5.0, 1.0, "float32", {"block_t": 16}),
    "T7_default_config": (2, 7, 3, 20.0, 3.0, "float32", {}),
    "T40_two_tiles": (1, 40, 5, 10.0, 2.0, "float32", {"block_t": 16}),
    "T77_extreme": (1, 77, 4, 80.0, 20.0, "float32", {"block_t": 16}),
    "T196_default_config": (1, 196, 3, 8.0, 1.0, "float32", {}),
    "T70_split": (2, 70, 3, 80.0, 5.0, "float32", {"block_t": 16, "chunk_len": 32}),
    "T77_split_extreme": (1, 77, 3, 80.0, 20.0, "float32", {"block_t": 16, "chunk_len": 16}),
    "bf16": (1, 40, 4, 8.0, 1.0, "bfloat16", {"block_t": 16}),
    "fp16_split": (1, 40, 4, 8.0, 1.0, "float16", {"block_t": 16, "chunk_len": 16}),
}
VALUE_TOL = 1e-5  # max abs error on y for float32 inputs (y is a convex combination of v ~ N(0, 1))
GRAD_RTOL = 1e-4  # max abs gradient error relative to the largest reference gradient of that input
LOWP_RTOL = 2e-2  # bf16/fp16: the output and dk, dv are rounded to the input dtype


def make_inputs(B: int, T: int, C: int, decay: float, k_std: float, seed: int) -> list[torch.Tensor]:
    """w, u, k, v (float32) with spatial_decay spread over [-decay, decay] across channels, then / T."""
    g = torch.Generator().manual_seed(seed)
    sd = torch.linspace(-decay, decay, C) if C > 1 else torch.tensor([decay])
    sf = torch.randn(C, generator=g) * 2
    k = torch.randn(B, T, C, generator=g) * k_std
    v = torch.randn(B, T, C, generator=g)
    return [sd / T, sf / T, k, v]


# ----------------------------------------------------------------------------------------------------------
# interpreter worker (runs in the subprocess)
# ----------------------------------------------------------------------------------------------------------


def _vectorise_interpreter_scan() -> bool:
    """Make the interpreter evaluate ``tl.associative_scan`` as a log-depth (Hillis-Steele) scan on whole
    arrays. Triton's interpreter otherwise calls the combine function once per element from Python, which
    takes minutes for these shapes.

    The combine function is still ours and still applied to the same pairs of partial results. Only the
    association order changes, and the combine is associative; GPU scans use a tree order too. The worker
    checks on a small case that both evaluations agree. Returns False, leaving the slow path in place, if
    this Triton's interpreter is laid out differently."""
    import numpy as np

    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    scan_ops = getattr(interpreter, "ScanOps", None)
    if scan_ops is None or not hasattr(scan_ops, "generic_scan"):
        return False

    def generic_scan(self, inputs):
        axis = self.axis
        cur = [np.array(arg.handle.data) for arg in inputs]
        n = cur[0].shape[axis]
        idx = np.arange(n).reshape([-1 if d == axis else 1 for d in range(cur[0].ndim)])
        shift = 1
        while shift < n:
            # element i takes combine(partial[i - shift], partial[i]); rolled-in lanes (i < shift) are discarded
            lhs = tuple(self.to_tensor(np.roll(c, shift, axis=axis), a.dtype) for c, a in zip(cur, inputs))
            rhs = tuple(self.to_tensor(c, a.dtype) for c, a in zip(cur, inputs))
            with np.errstate(all="ignore"):
                out = self.combine_fn.fn(*lhs, *rhs)
            out = out if isinstance(out, tuple) else (out,)
            cur = [np.where(idx >= shift, o.handle.data, c) for o, c in zip(out, cur)]
            shift *= 2
        return [self.to_tensor(c, a.dtype) for c, a in zip(cur, inputs)]

    scan_ops._elementwise_generic_scan = scan_ops.generic_scan
    scan_ops.generic_scan = generic_scan
    return True


def _measure(name: str, spec: tuple) -> dict:
    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    B, T, C, decay, k_std, dtype_name, kw = spec
    dtype = getattr(torch, dtype_name)
    w, u, k, v = make_inputs(B, T, C, decay, k_std, seed=list(CASES).index(name))
    k, v = k.to(dtype), v.to(dtype)
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(7))
    # oracle on exactly the (rounded) inputs the kernel sees, float64 autograd for the gradients
    ref_in = [t.detach().double().requires_grad_() for t in (w, u, k, v)]
    ref = bi_wkv_reference(*ref_in)
    ref_grads = torch.autograd.grad((ref * gy.double()).sum(), ref_in)
    tri_in = [t.detach().clone().requires_grad_() for t in (w, u, k, v)]
    y = bi_wkv_triton(*tri_in, **kw)
    grads = torch.autograd.grad((y.float() * gy).sum(), tri_in)
    with torch.no_grad():  # the inference path (no lse, no summaries) must give the same values
        y_nograd = bi_wkv_triton(w, u, k, v, **kw)
    names = ("w", "u", "k", "v")
    return {
        "dtype": str(y.dtype).removeprefix("torch."),
        "grad_dtypes": [str(g.dtype).removeprefix("torch.") for g in grads],
        "finite": bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(g).all()) for g in grads),
        "y_err": (y.double() - ref).abs().max().item(),
        "y_scale": ref.abs().max().item(),
        "nograd_equal": bool(torch.equal(y_nograd, y.detach())),
        "grad_err": {n: (g.double() - r).abs().max().item() for n, g, r in zip(names, grads, ref_grads)},
        "grad_scale": {n: r.abs().max().item() for n, r in zip(names, ref_grads)},
    }


def _scan_patch_check() -> float:
    """Difference between the vectorised and the element-wise interpreter scan on one small case."""
    from triton.runtime import interpreter

    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    w, u, k, v = make_inputs(1, 20, 3, 40.0, 5.0, seed=3)
    fast = bi_wkv_triton(w, u, k, v, block_t=16)
    scan_ops = interpreter.ScanOps
    patched = scan_ops.generic_scan
    scan_ops.generic_scan = scan_ops._elementwise_generic_scan
    try:
        slow = bi_wkv_triton(w, u, k, v, block_t=16)
    finally:
        scan_ops.generic_scan = patched
    return (fast - slow).abs().max().item()


def _mixed_and_strided() -> dict:
    """Mixed k/v dtypes (computed as the PyTorch path computes them) and non-contiguous inputs."""
    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    w, u, k, v = make_inputs(2, 23, 5, 20.0, 3.0, seed=11)
    kb = k.bfloat16()
    mixed = (bi_wkv_triton(w, u, kb, v, block_t=16).double() - bi_wkv_torch(w, u, kb, v).double()).abs().max().item()
    kt = k.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, C) view with T-major strides
    vs = torch.randn(2, 23, 10, generator=torch.Generator().manual_seed(2))[:, :, ::2]  # strided channels
    strided = bi_wkv_triton(w, u, kt, vs, block_t=16)
    ref = bi_wkv_reference(w, u, k, vs.contiguous())
    return {"mixed_dtype_err": mixed, "mixed_dtype": str(bi_wkv_triton(w, u, kb, v).dtype),
            "strided_err": (strided.double() - ref).abs().max().item(),
            "strided_ok": not kt.is_contiguous() and not vs.is_contiguous()}


def _guard_with_real_kernels() -> dict:
    """The real (interpreted) kernels through ``bi_wkv``'s first-launch guard, CPU tensors admitted: the
    guard must accept them (no false alarm) and hand back exactly the kernels' values and gradients."""
    import logging

    from medurwkv.ops import bi_wkv, dispatch
    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    records: list = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger(dispatch.__name__).addHandler(handler)
    dispatch._triton_device = lambda device: True
    w, u, k, v = make_inputs(2, 40, 36, 30.0, 3.0, seed=12)
    gy = torch.randn(2, 40, 36, generator=torch.Generator().manual_seed(13))
    a = [t.clone().requires_grad_() for t in (w, u, k, v)]
    b = [t.clone().requires_grad_() for t in (w, u, k, v)]
    ya = bi_wkv(*a, backend="auto")
    torch.autograd.backward(ya, gy)
    yb = bi_wkv_triton(*b)
    torch.autograd.backward(yb, gy)
    return {
        "warnings": [r.getMessage() for r in records],
        "disabled": dispatch._GUARD.disabled,
        "forward_ok": len(dispatch._GUARD.forward_ok),
        "backward_ok": len(dispatch._GUARD.backward_ok),
        "same_values": bool(torch.equal(ya, yb)),
        "same_grads": all(bool(torch.equal(x.grad, y.grad)) for x, y in zip(a, b)),
    }


def _compiled_with_real_kernels() -> dict:
    """A compiled (aot_eager) forward and backward through ``bi_wkv`` on the real (interpreted) kernels: the
    compiled backward must hand plain tensors to the kernels (inside torch.func they are wrappers)."""
    from medurwkv.ops import bi_wkv, dispatch
    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    dispatch._triton_device = lambda device: True
    w, u, k, v = make_inputs(2, 20, 5, 10.0, 2.0, seed=14)
    gy = torch.randn(2, 20, 5, generator=torch.Generator().manual_seed(15))
    a = [t.clone().requires_grad_() for t in (w, u, k, v)]
    b = [t.clone().requires_grad_() for t in (w, u, k, v)]
    torch._dynamo.reset()
    ya = torch.compile(lambda *x: bi_wkv(*x, backend="triton") * 2, fullgraph=True, backend="aot_eager")(*a)
    torch.autograd.backward(ya, gy)
    yb = bi_wkv_triton(*b) * 2
    torch.autograd.backward(yb, gy)
    return {
        "y_err": (ya - yb).abs().max().item(),
        "grad_err": max((x.grad - y.grad).abs().max().item() for x, y in zip(a, b)),
        "disabled": dispatch._GUARD.disabled,
    }


def _interpret_worker() -> None:
    torch.set_num_threads(2)
    vectorised = _vectorise_interpreter_scan()
    out: dict = {"vectorised_scan": vectorised, "cases": {}}
    for name, spec in CASES.items():
        out["cases"][name] = _measure(name, spec)
    out["mixed_and_strided"] = _mixed_and_strided()
    out["guard"] = _guard_with_real_kernels()
    out["compiled"] = _compiled_with_real_kernels()
    if vectorised:
        out["scan_patch_diff"] = _scan_patch_check()
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------------------------
# CPU tests (interpreter)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interp() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, __file__, "--interpret-worker"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreter_scan_patch_is_faithful(interp):
    if not interp["vectorised_scan"]:
        pytest.skip("this Triton's interpreter could not be vectorised; the element-wise scan was used")
    assert interp["scan_patch_diff"] <= 1e-6


@pytest.mark.parametrize("name", [n for n, s in CASES.items() if s[5] == "float32"])
def test_float32_values_and_gradients(interp, name):
    r = interp["cases"][name]
    assert r["finite"] and r["dtype"] == "float32"
    assert r["y_err"] <= VALUE_TOL, f"{name}: max abs error {r['y_err']:.3g}"
    assert r["nograd_equal"], "inference path differs from the autograd path"
    for n in ("w", "u", "k", "v"):
        tol = GRAD_RTOL * max(1.0, r["grad_scale"][n])
        assert r["grad_err"][n] <= tol, f"{name}: d{n} error {r['grad_err'][n]:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", [n for n, s in CASES.items() if s[5] != "float32"])
def test_low_precision_inputs(interp, name):
    # float32 accumulation: the only errors left are the input dtype's rounding of y, dk and dv
    r = interp["cases"][name]
    dtype = CASES[name][5]
    assert r["finite"] and r["dtype"] == dtype
    assert r["grad_dtypes"] == ["float32", "float32", dtype, dtype]
    assert r["y_err"] <= LOWP_RTOL * max(1.0, r["y_scale"])
    for n in ("w", "u", "k", "v"):
        assert r["grad_err"][n] <= LOWP_RTOL * max(1.0, r["grad_scale"][n]), f"{name}: d{n}"


def test_mixed_dtypes_computed_as_the_torch_path(interp):
    r = interp["mixed_and_strided"]
    # k bf16, v float32: v is not rounded to bf16; only the output's bf16 rounding (<= 2^-8 of |y| <= ~4) is left
    assert r["mixed_dtype"] == "torch.bfloat16"
    assert r["mixed_dtype_err"] <= 2 ** -8 * 4


def test_non_contiguous_inputs(interp):
    r = interp["mixed_and_strided"]
    assert r["strided_ok"] and r["strided_err"] <= VALUE_TOL


def test_guard_accepts_the_real_kernels(interp):
    r = interp["guard"]
    assert r["warnings"] == [] and r["disabled"] is None
    assert r["forward_ok"] == 1 and r["backward_ok"] == 1
    assert r["same_values"] and r["same_grads"]


def test_compiled_forward_and_backward_on_the_real_kernels(interp):
    r = interp["compiled"]
    # the compiled backward recomputes the forward kernel: same kernels, same values
    assert r["disabled"] is None and r["y_err"] == 0.0 and r["grad_err"] <= 1e-6


# ----------------------------------------------------------------------------------------------------------
# dispatch and launch heuristics (no kernels run)
# ----------------------------------------------------------------------------------------------------------


def test_cpu_tensors_use_the_torch_path():
    assert not _use_triton(torch.device("cpu"), torch.float32)
    w, u, k, v = make_inputs(2, 9, 4, 5.0, 1.0, seed=0)
    assert torch.equal(bi_wkv(w, u, k, v), bi_wkv_torch(w, u, k, v))


def test_cuda_tensors_would_use_triton():
    # the decision needs no GPU: a device object is enough
    pytest.importorskip("triton")
    assert _use_triton(torch.device("cuda"), torch.float32)
    assert _use_triton(torch.device("cuda", 0), torch.bfloat16)
    assert not _use_triton(torch.device("cuda"), torch.float64)  # float64 stays exact in float64


def test_launch_heuristics():
    pytest.importorskip("triton")
    from medurwkv.ops.triton_biwkv import launch_config

    dev = torch.device("cpu")  # the heuristics assume 132 SMs off-GPU
    # 3D volume with 4^3 patches: 6 (b, channel-block) rows cannot fill the GPU -> T-split
    cfg = launch_config(2, 13824, 96, dev)
    assert cfg.n_chunks > 1 and cfg.chunk_len % cfg.block_t == 0 and cfg.chunk_len % cfg.block_t_bwd == 0
    assert cfg.n_chunks * cfg.chunk_len >= 13824 > (cfg.n_chunks - 1) * cfg.chunk_len
    # 2D ImageNet sizes: enough rows, short sequences -> no split
    assert launch_config(8, 196, 768, dev).n_chunks == 1
    assert launch_config(16, 196, 192, dev).n_chunks == 1
    # overrides
    assert launch_config(2, 13824, 96, dev, chunk_len=0).n_chunks == 1
    cfg = launch_config(1, 100, 5, dev, block_t=16, chunk_len=32)
    assert (cfg.block_t, cfg.chunk_len, cfg.n_chunks) == (16, 32, 4)
    assert launch_config(1, 1, 1, dev).n_chunks == 1


# compile-only checks of the kernels for sm_90 (every launch configuration): test_triton_launch_configs.py


# ----------------------------------------------------------------------------------------------------------
# GPU tests
# ----------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_CASES = [
    # (B, T, C, decay, k_std, launch overrides)
    (2, 1, 48, 5.0, 1.0, {}),
    (2, 7, 48, 80.0, 20.0, {}),
    (2, 33, 192, 80.0, 20.0, {}),
    (2, 196, 192, 80.0, 5.0, {}),
    (2, 216, 48, 20.0, 20.0, {}),
    (1, 1000, 48, 80.0, 20.0, {}),
    (1, 1000, 48, 80.0, 20.0, {"chunk_len": 128}),
    (2, 777, 96, 30.0, 3.0, {"chunk_len": 64}),
]


@gpu
@pytest.mark.parametrize("B,T,C,decay,k_std,kw", GPU_CASES)
def test_gpu_values_and_gradients(B, T, C, decay, k_std, kw):
    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    w, u, k, v = (t.cuda() for t in make_inputs(B, T, C, decay, k_std, seed=T + C))
    gy = torch.randn(B, T, C, device="cuda")
    ref_in = [t.double().requires_grad_() for t in (w, u, k, v)]
    ref = bi_wkv_reference(*ref_in)
    ref_grads = torch.autograd.grad((ref * gy.double()).sum(), ref_in)
    tri_in = [t.clone().requires_grad_() for t in (w, u, k, v)]
    y = bi_wkv_triton(*tri_in, **kw)
    grads = torch.autograd.grad((y * gy).sum(), tri_in)
    assert (y.double() - ref).abs().max().item() <= VALUE_TOL
    for n, g, r in zip("wukv", grads, ref_grads):
        assert (g.double() - r).abs().max().item() <= GRAD_RTOL * max(1.0, r.abs().max().item()), n


def _check_against_float64(w, u, k, v, tol, **kw):
    """Values and all four gradients of the kernels against float64 autograd through the PyTorch path
    (exact, O(T)), on the inputs as the kernels see them (already rounded to k's dtype)."""
    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    gy = torch.randn(k.shape, device=k.device, generator=torch.Generator(k.device).manual_seed(9))
    ref_in = [t.detach().double().requires_grad_() for t in (w, u, k, v)]
    ref = bi_wkv_torch(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, gy.double())
    tri_in = [t.detach().clone().requires_grad_() for t in (w, u, k, v)]
    y = bi_wkv_triton(*tri_in, **kw)
    grads = torch.autograd.grad(y, tri_in, gy.to(y.dtype))
    assert y.dtype == k.dtype and all(g.dtype == t.dtype for g, t in zip(grads, tri_in))
    err = (y.double() - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"y: {err:.3g}"
    for n, g, r in zip("wukv", grads, ref_grads):
        gerr = (g.double() - r).abs().max().item()
        assert gerr <= max(tol, GRAD_RTOL) * max(1.0, r.abs().max().item()), f"d{n}: {gerr:.3g}"


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("T", [1, 2, 17])
@pytest.mark.parametrize("C", [1, 3, 16])
def test_gpu_tiny_shapes(C, T, dtype):
    w, u, k, v = (t.cuda() for t in make_inputs(2, T, C, 20.0, 3.0, seed=T * 10 + C))
    dt = getattr(torch, dtype)
    _check_against_float64(w, u, k.to(dt), v.to(dt), VALUE_TOL if dt == torch.float32 else LOWP_RTOL)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_one_long_row(dtype):
    # (1, 65536, 64): two programs' worth of channels, the T-split carries the parallelism
    from medurwkv.ops.triton_biwkv import launch_config

    assert launch_config(1, 65536, 64, torch.device("cuda")).split
    w, u, k, v = (t.cuda() for t in make_inputs(1, 65536, 64, 30.0, 2.0, seed=21))
    dt = getattr(torch, dtype)
    _check_against_float64(w, u, k.to(dt), v.to(dt), VALUE_TOL if dt == torch.float32 else LOWP_RTOL)


@gpu
def test_gpu_non_contiguous_and_mixed_dtypes():
    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    w, u, k, v = (t.cuda() for t in make_inputs(3, 196, 96, 20.0, 3.0, seed=22))
    # leaves whose (B, T, C) views are non-contiguous: T-major keys, every other channel of wider values
    k_tbc = k.transpose(0, 1).contiguous().requires_grad_()
    v_wide = torch.stack([v, torch.zeros_like(v)], dim=3).flatten(2).requires_grad_()
    kt, vs = k_tbc.transpose(0, 1), v_wide[:, :, ::2]
    assert not kt.is_contiguous() and not vs.is_contiguous() and torch.equal(kt, k) and torch.equal(vs, v)
    gy = torch.randn_like(k)
    y = bi_wkv_triton(w, u, kt, vs)
    dk, dv = torch.autograd.grad(y, (k_tbc, v_wide), gy)
    ref_in = [t.double().requires_grad_() for t in (k, v)]
    ref = bi_wkv_torch(w.double(), u.double(), *ref_in)
    rdk, rdv = torch.autograd.grad(ref, ref_in, gy.double())
    assert (y.double() - ref).abs().max().item() <= VALUE_TOL
    assert (dk.transpose(0, 1).double() - rdk).abs().max().item() <= GRAD_RTOL * max(1.0, rdk.abs().max().item())
    assert (dv[:, :, ::2].double() - rdv).abs().max().item() <= GRAD_RTOL * max(1.0, rdv.abs().max().item())
    assert dv[:, :, 1::2].abs().max().item() == 0.0
    # bf16 keys with float32 values: computed as the PyTorch path computes them (v not rounded to bf16)
    y = bi_wkv_triton(w, u, k.bfloat16(), v)
    ref = bi_wkv_torch(w, u, k.bfloat16(), v)
    assert y.dtype == torch.bfloat16 and (y.double() - ref.double()).abs().max().item() <= 2 ** -8 * 4


@gpu
def test_gpu_dispatch_runs_triton_behind_the_guard(caplog):
    import logging

    from medurwkv.ops import dispatch
    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    dispatch._reset_guard()
    caplog.set_level(logging.WARNING, logger=dispatch.__name__)
    w, u, k, v = (t.cuda() for t in make_inputs(2, 50, 64, 5.0, 1.0, seed=1))
    assert _use_triton(k.device, k.dtype)
    assert torch.equal(bi_wkv(w, u, k, v, backend="auto"), bi_wkv_triton(w, u, k, v))
    leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
    bi_wkv(*leaves, backend="auto").sum().backward()
    assert dispatch._GUARD.disabled is None and not [r for r in caplog.records if r.name == dispatch.__name__]
    assert len(dispatch._GUARD.forward_ok) == 1 and len(dispatch._GUARD.backward_ok) == 1


@gpu
def test_gpu_torch_compile_matches_eager():
    w, u, k, v = (t.cuda() for t in make_inputs(4, 196, 192, 8.0, 2.0, seed=23))

    def f(w, u, k, v):
        return bi_wkv(w, u, k, v).square()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    a = [t.clone().requires_grad_() for t in (w, u, k, v)]
    b = [t.clone().requires_grad_() for t in (w, u, k, v)]
    ya, yb = compiled(*a), f(*b)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("chunk_len", [None, 256])
def test_gpu_backward_is_deterministic(chunk_len):
    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    w, u, k, v = (t.cuda() for t in make_inputs(2, 2048, 96, 20.0, 2.0, seed=2))
    gy = torch.randn_like(k)

    def grads():
        ins = [t.clone().requires_grad_() for t in (w, u, k, v)]
        return torch.autograd.grad((bi_wkv_triton(*ins, chunk_len=chunk_len) * gy).sum(), ins)

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_and_autocast(dtype):
    from medurwkv.ops.triton_biwkv import bi_wkv_triton

    w, u, k, v = (t.cuda() for t in make_inputs(2, 196, 192, 8.0, 1.0, seed=4))
    k, v = k.to(dtype), v.to(dtype)
    ref = bi_wkv_reference(w, u, k, v)
    with torch.autocast("cuda", dtype=dtype):
        y = bi_wkv_triton(w, u, k.requires_grad_(), v)
    assert y.dtype == dtype
    assert (y.double() - ref).abs().max().item() <= LOWP_RTOL * max(1.0, ref.abs().max().item())
    y.float().sum().backward()
    assert k.grad is not None and k.grad.dtype == dtype and torch.isfinite(k.grad).all()


@gpu
def test_gpu_long_sequence_split_matches_torch_path():
    # (2, 13824, 96): the 3D regime the T-split exists for; too long for the O(T^2) oracle
    from medurwkv.ops.triton_biwkv import bi_wkv_triton, launch_config

    w, u, k, v = (t.cuda() for t in make_inputs(2, 13824, 96, 20.0, 2.0, seed=5))
    assert launch_config(2, 13824, 96, k.device).n_chunks > 1
    y = bi_wkv_triton(w, u, k, v)
    ref = bi_wkv_torch(w.double(), u.double(), k.double(), v.double())
    assert (y.double() - ref).abs().max().item() <= VALUE_TOL


if __name__ == "__main__" and "--interpret-worker" in sys.argv:
    _interpret_worker()
