"""Backend choice and the first-launch guard of ``medurwkv.ops.bi_wkv``.

No GPU here: the guard's decisions are tested with CPU tensors admitted to the Triton route
(``dispatch._triton_device`` patched) and the kernels' launchers replaced by stand-ins that fail, compute
wrong values, or compute right ones (the exact PyTorch path). The real kernels go through the same guard in
the interpreter worker of ``test_triton_biwkv.py``.
"""

from __future__ import annotations

import logging

import pytest
import torch

from medurwkv.ops import BiWKVBackendError, bi_wkv, bi_wkv_torch, dispatch

triton_biwkv = pytest.importorskip("medurwkv.ops.triton_biwkv")

B, T, C = 2, 40, 36  # 36 channels: the probe takes the first and last 32, i.e. all, and two channel blocks


def make_inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.linspace(-8.0, 8.0, C) / T
    u = torch.randn(C, generator=g) / T
    k = torch.randn(B, T, C, generator=g) * 2
    v = torch.randn(B, T, C, generator=g)
    return [t.to(dtype) for t in (w, u, k, v)]


def torch_grads(inputs, gy):
    # torch.func: also inside a backward and inside the compiled backward's custom op
    return torch.func.vjp(bi_wkv_torch, *(t.detach() for t in inputs))[1](gy)


class FakeKernels:
    """Stand-ins for ``triton_biwkv._forward`` / ``_backward`` with call counters.

    ``fwd_error`` / ``bwd_error``: raise it. ``fwd_delta``: added to the output. ``bwd_delta``: added to dk."""

    def __init__(self, fwd_error=None, bwd_error=None, fwd_delta=0.0, bwd_delta=0.0):
        self.fwd_error, self.bwd_error = fwd_error, bwd_error
        self.fwd_delta, self.bwd_delta = fwd_delta, bwd_delta
        self.fwd_calls = self.bwd_calls = 0

    def forward(self, w, u, k, v, cfg, save):
        self.fwd_calls += 1
        if self.fwd_error is not None:
            raise self.fwd_error
        y = (bi_wkv_torch(w, u, k, v).float() + self.fwd_delta).to(k.dtype)
        return y, (y.float() if save else None), (torch.zeros_like(y, dtype=torch.float32) if save else None), None

    def backward(self, w, u, k, v, y32, lse, fsumm, gy, cfg):
        self.bwd_calls += 1
        if self.bwd_error is not None:
            raise self.bwd_error
        dw, du, dk, dv = torch_grads((w, u, k, v), gy.to(k.dtype))
        return dw, du, dk + self.bwd_delta, dv


@pytest.fixture
def guard(monkeypatch, caplog):
    """A fresh guard, CPU tensors routed like CUDA ones, no backend in the environment."""
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_triton_device", lambda device: True)
    monkeypatch.setattr(triton_biwkv, "interpreted", lambda: True)
    dispatch._reset_guard()
    caplog.set_level(logging.WARNING, logger=dispatch.__name__)
    yield
    dispatch._reset_guard()


def install(monkeypatch, fake: FakeKernels) -> FakeKernels:
    monkeypatch.setattr(triton_biwkv, "_forward", fake.forward)
    monkeypatch.setattr(triton_biwkv, "_backward", fake.backward)
    return fake


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == dispatch.__name__ and r.levelno == logging.WARNING]


def test_compile_error_falls_back_with_one_warning(guard, monkeypatch, caplog):
    # what Triton 3.x raises when the launcher cannot be built (no C compiler / Python.h)
    err = RuntimeError("Failed to compile /root/.triton/cache/abc/main.c: /usr/include/python3.12/Python.h not found")
    fake = install(monkeypatch, FakeKernels(fwd_error=err))
    w, u, k, v = make_inputs()
    y = bi_wkv(w, u, k, v)
    assert torch.equal(y, bi_wkv_torch(w, u, k, v))
    msgs = warnings_of(caplog)
    assert len(msgs) == 1
    assert "first launch failed: RuntimeError" in msgs[0] and "MEDURWKV_BIWKV_BACKEND=torch" in msgs[0]
    assert "/root" not in msgs[0] and "/usr" not in msgs[0]  # no server paths in logs
    # from then on the PyTorch path, without touching the kernels or warning again
    assert torch.equal(bi_wkv(w, u, k, v), y)
    assert fake.fwd_calls == 1 and len(warnings_of(caplog)) == 1


def test_wrong_forward_result_falls_back(guard, monkeypatch, caplog):
    fake = install(monkeypatch, FakeKernels(fwd_delta=1e-3))  # 10x the float32 tolerance
    w, u, k, v = make_inputs()
    assert torch.equal(bi_wkv(w, u, k, v), bi_wkv_torch(w, u, k, v))
    (msg,) = warnings_of(caplog)
    assert "differs from the float64 PyTorch path" in msg
    bi_wkv(w, u, k, v)
    assert fake.fwd_calls == 1


def test_correct_kernel_is_kept_and_checked_once(guard, monkeypatch, caplog):
    fake = install(monkeypatch, FakeKernels(fwd_delta=1e-6))  # within tolerance, and recognisable
    checks = []
    real_check = dispatch._check_forward
    monkeypatch.setattr(dispatch, "_check_forward", lambda *a: checks.append(1) or real_check(*a))
    w, u, k, v = make_inputs()
    y = bi_wkv(w, u, k, v)
    assert torch.equal(y, bi_wkv_torch(w, u, k, v) + 1e-6)  # the kernels' output, not the fallback
    bi_wkv(w, u, k, v)
    bi_wkv(w, u, k[:, :20].contiguous(), v[:, :20].contiguous())  # same key: device, dtype, no T-split
    assert fake.fwd_calls == 3 and len(checks) == 1 and not warnings_of(caplog)
    # a new key (T-split forced by a long sequence with one row of programs) is checked again
    wl, ul, kl, vl = (t[:1] if t.dim() == 3 else t for t in make_inputs())
    kl, vl = kl.repeat(1, 8, 1), vl.repeat(1, 8, 1)  # T = 320 with B = 1: the heuristic splits
    assert triton_biwkv.launch_config(1, 8 * T, C, kl.device).split
    bi_wkv(wl, ul, kl, vl)
    assert len(checks) == 2


def test_wrong_gradient_falls_back_on_first_backward(guard, monkeypatch, caplog):
    fake = install(monkeypatch, FakeKernels(bwd_delta=1e-2))
    inputs = make_inputs()
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(3))
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.autograd.backward(bi_wkv(*leaves), gy)
    expected = torch_grads(inputs, gy)
    for got, ref in zip(leaves, expected):
        assert torch.equal(got.grad, ref)  # the PyTorch path's gradients, not the kernel's
    (msg,) = warnings_of(caplog)
    assert "backward's dk differs" in msg
    assert fake.bwd_calls == 1
    bi_wkv(*inputs)
    assert fake.fwd_calls == 1  # switched off for the process


def test_backward_error_falls_back(guard, monkeypatch, caplog):
    install(monkeypatch, FakeKernels(bwd_error=RuntimeError("CUDA error: an illegal memory access")))
    inputs = make_inputs()
    leaves = [t.clone().requires_grad_() for t in inputs]
    bi_wkv(*leaves).square().sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    bi_wkv_torch(*ref_leaves).square().sum().backward()
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-6, atol=1e-7)
    (msg,) = warnings_of(caplog)
    assert "first backward failed: RuntimeError: CUDA error" in msg


def test_correct_gradients_are_kept(guard, monkeypatch, caplog):
    fake = install(monkeypatch, FakeKernels(bwd_delta=1e-7))
    inputs = make_inputs()
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(4))
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.autograd.backward(bi_wkv(*leaves), gy)
        assert torch.equal(leaves[2].grad, torch_grads(inputs, gy)[2] + 1e-7)  # the kernel's dk
    assert fake.bwd_calls == 2 and not warnings_of(caplog)
    assert len(dispatch._GUARD.backward_ok) == 1


@pytest.mark.parametrize("fake", [FakeKernels(fwd_error=RuntimeError("ptxas fatal")), FakeKernels(fwd_delta=1e-3)],
                         ids=["launch_error", "wrong_result"])
def test_forced_triton_raises(guard, monkeypatch, caplog, fake):
    install(monkeypatch, fake)
    with pytest.raises(BiWKVBackendError, match="MEDURWKV_BIWKV_BACKEND=triton"):
        bi_wkv(*make_inputs(), backend="triton")
    assert not warnings_of(caplog) and dispatch._GUARD.disabled is None


def test_forced_triton_raises_on_wrong_gradient(guard, monkeypatch):
    install(monkeypatch, FakeKernels(bwd_delta=1e-2))
    leaves = [t.clone().requires_grad_() for t in make_inputs()]
    y = bi_wkv(*leaves, backend="triton")
    with pytest.raises(BiWKVBackendError, match="backward's dk"):
        y.sum().backward()


def test_forced_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setattr(triton_biwkv, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        bi_wkv(*make_inputs(), backend="triton")


def test_cuda_run_without_triton_warns_once(guard, monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    w, u, k, v = make_inputs()
    for _ in range(2):
        assert torch.equal(bi_wkv(w, u, k, v), bi_wkv_torch(w, u, k, v))
    (msg,) = warnings_of(caplog)
    assert "Triton cannot be imported" in msg


def test_forced_torch_never_touches_triton(guard, monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("Triton was touched")

    monkeypatch.setattr(dispatch, "triton_available", boom)
    monkeypatch.setattr(dispatch, "_run_triton", boom)
    w, u, k, v = make_inputs()
    monkeypatch.setenv(dispatch.BACKEND_ENV, "Torch")  # case and spaces do not matter
    assert torch.equal(bi_wkv(w, u, k, v), bi_wkv_torch(w, u, k, v))
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    assert torch.equal(bi_wkv(w, u, k, v, backend=" torch "), bi_wkv_torch(w, u, k, v))  # argument wins


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=r"MEDURWKV_BIWKV_BACKEND='cuda' is not a Bi-WKV backend; use one of auto, torch, triton"):
        bi_wkv(*make_inputs())
    with pytest.raises(ValueError, match=r"backend='fast'"):
        bi_wkv(*make_inputs(), backend="fast")


def test_kernel_limits():
    cpu = torch.device("cpu")

    def limit(b, t, c):
        return triton_biwkv.kernel_limit(b, t, c, triton_biwkv.launch_config(b, t, c, cpu))

    assert limit(8, 1024, 768) is None and limit(65535, 196, 192) is None
    assert limit(1, 2**21 - 1, 1024) is None and "2^31" in limit(1, 2**21, 1024)  # T*C = 2^31
    assert "2^24" in limit(1, 2**24, 1)
    assert "grid axis y" in limit(65536, 196, 192)
    cfg = triton_biwkv.launch_config(1, 2**22, 1, cpu, chunk_len=32)
    assert "grid axis z" in triton_biwkv.kernel_limit(1, 2**22, 1, cfg)


def test_limits_route_to_torch_or_raise(guard, monkeypatch, caplog):
    fake = install(monkeypatch, FakeKernels())
    monkeypatch.setattr(triton_biwkv, "MAX_TOKENS", T)  # make this small input "too long" for the kernels
    w, u, k, v = make_inputs()
    assert torch.equal(bi_wkv(w, u, k, v), bi_wkv_torch(w, u, k, v))
    assert fake.fwd_calls == 0 and not warnings_of(caplog) and dispatch._GUARD.disabled is None
    with pytest.raises(ValueError, match=r"cannot run \(B, T, C\) = \(2, 40, 36\): T = 40 >= 2\^24"):
        bi_wkv(w, u, k, v, backend="triton")


def test_float64_inputs_stay_on_the_torch_path(guard, monkeypatch):
    fake = install(monkeypatch, FakeKernels())
    w, u, k, v = make_inputs()
    y = bi_wkv(w.double(), u, k, v)  # float64 decay: the PyTorch path computes everything in float64
    assert fake.fwd_calls == 0 and y.dtype == torch.float32
    assert torch.equal(y, bi_wkv_torch(w.double(), u, k, v))


def test_mixed_dtypes_reach_the_kernels_as_float32(guard, monkeypatch):
    seen = []
    fake = FakeKernels()
    monkeypatch.setattr(triton_biwkv, "_forward", lambda w, u, k, v, cfg, save: seen.append((k.dtype, v.dtype)) or fake.forward(w, u, k, v, cfg, save))
    w, u, k, v = make_inputs()
    y = bi_wkv(w, u, k.bfloat16(), v)
    assert seen == [(torch.float32, torch.float32)]  # v is not rounded to bf16, as in the PyTorch path
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, bi_wkv_torch(w, u, k.bfloat16(), v))


def test_describe_strips_paths():
    exc = OSError("[Errno 30] Read-only file system: '/home/alice/.triton/cache/x/y.json'\nmore")
    assert dispatch._describe(exc) == "OSError: [Errno 30] Read-only file system: '<path>'"


def test_compiled_training_step_runs_the_guarded_kernels(guard, monkeypatch, caplog):
    # torch.compile's backward of medurwkv::bi_wkv recomputes through torch.func: the Triton route (here the
    # stand-in kernels) must work there too, with the guard's backward check
    fake = install(monkeypatch, FakeKernels(fwd_delta=1e-6))
    inputs = make_inputs()
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: bi_wkv(*a) * 2, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = compiled(*leaves)
    torch.autograd.backward(y, gy)
    assert torch.equal(y, (bi_wkv_torch(*inputs) + 1e-6) * 2)
    for got, ref in zip(leaves, torch_grads(inputs, 2 * gy)):
        torch.testing.assert_close(got.grad, ref, rtol=1e-6, atol=1e-6)
    assert fake.fwd_calls == 2 and fake.bwd_calls == 1  # forward, and the backward's recomputation
    assert len(dispatch._GUARD.backward_ok) == 1 and not warnings_of(caplog)
