"""Bi-WKV against the float64 O(T^2) softmax oracle (values, gradients, dtypes, range, determinism)."""

import itertools

import pytest
import torch

from medurwkv.ops import bi_wkv, bi_wkv_reference, bi_wkv_torch
from medurwkv.ops import biwkv as biwkv_mod

TS = (1, 2, 7, 33, 196, 216, 1000)
CS = (1, 48, 192)


def make_inputs(B, T, C, decay, k_std, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # spatial_decay spans [-decay, +decay] across channels (both signs: growth and decay), then / T
    spatial_decay = torch.linspace(-1.0, 1.0, C) * decay if C > 1 else torch.tensor([float(decay)])
    spatial_first = torch.randn(C, generator=g) * 2
    k = torch.randn(B, T, C, generator=g) * k_std
    v = torch.randn(B, T, C, generator=g)
    return (spatial_decay / T).to(dtype), (spatial_first / T).to(dtype), k.to(dtype), v.to(dtype)


def rows_for(T, n=48, seed=0):
    if T <= n:
        return torch.arange(T)
    g = torch.Generator().manual_seed(seed)
    return torch.unique(torch.cat([torch.tensor([0, 1, T // 2, T - 2, T - 1]), torch.randint(0, T, (n,), generator=g)]))


@pytest.mark.parametrize("T,C", list(itertools.product(TS, CS)))
def test_forward_matches_float64_oracle(T, C):
    # every (T, C) with decays up to |150| in both signs and key std 1 and 20
    worst = 0.0
    for decay, k_std in itertools.product((-150.0, -80.0, -7.0, 3.0, 80.0, 150.0), (1.0, 20.0)):
        w, u, k, v = make_inputs(2, T, C, decay, k_std, seed=T * 1000 + C)
        rows = rows_for(T)
        y = bi_wkv(w, u, k, v)
        assert y.dtype == torch.float32 and y.shape == k.shape
        ref = bi_wkv_reference(w, u, k, v, rows=rows)
        err = (y[:, rows].double() - ref).abs().max().item()
        worst = max(worst, err)
    assert worst <= 1e-5, f"max abs error {worst:.3g} for T={T}, C={C}"


@pytest.mark.parametrize("method", ["cumsum", "chunked"])
@pytest.mark.parametrize("T", [1, 7, 33, 196])
def test_each_exact_form(method, T):
    # both internal forms are exact on their own (auto only picks between them)
    w, u, k, v = make_inputs(2, T, 48, decay=20.0, k_std=3.0, seed=T)
    y = bi_wkv_torch(w, u, k, v, method=method)
    assert (y.double() - bi_wkv_reference(w, u, k, v)).abs().max() <= 1e-5


def test_auto_picks_a_safe_form_for_extreme_decay():
    w, u, k, v = make_inputs(1, 196, 8, decay=300.0, k_std=5.0)
    assert not biwkv_mod._cumsum_is_safe(w, k)
    # the float32 cumsum form alone overflows there; auto computes it in float64, finite and exact
    assert not torch.isfinite(bi_wkv_torch(w, u, k, v, method="cumsum")).all()
    assert biwkv_mod._choose_form(w, k, torch.float32) == ("cumsum", torch.float64)
    y = bi_wkv(w, u, k, v)
    assert torch.isfinite(y).all()
    assert (y.double() - bi_wkv_reference(w, u, k, v)).abs().max() <= 1e-5


def test_choose_form():
    f32, f64 = torch.float32, torch.float64
    w, _, k, _ = make_inputs(1, 50, 4, decay=5.0, k_std=1.0)
    assert biwkv_mod._choose_form(w, k, f32) == ("cumsum", f32)
    assert biwkv_mod._choose_form(w, k, f64) == ("cumsum", f64)
    assert biwkv_mod._choose_form(w * 30, k, f32) == ("cumsum", f64)  # |decay| 150
    assert biwkv_mod._choose_form(w * 200, k, f32) == ("chunked", f64)  # |decay| 1000: past float64's range


@pytest.mark.parametrize("decay", [-2000.0, -400.0, -150.0, -120.0, 120.0, 150.0, 400.0, 2000.0])
def test_range_proof_far_beyond_80(decay):
    w, u, k, v = make_inputs(2, 33, 16, decay, k_std=5.0, seed=3)
    k[0, 5] += 40.0  # a key spike
    y = bi_wkv(w, u, k, v)
    assert torch.isfinite(y).all()
    # float64 inside: only the final rounding to float32 is left
    assert (y.double() - bi_wkv_reference(w, u, k, v)).abs().max() <= 1e-6


def test_long_sequence_is_finite_and_matches_sampled_rows():
    w, u, k, v = make_inputs(1, 16384, 8, decay=10.0, k_std=2.0, seed=5)
    y = bi_wkv(w, u, k, v)
    rows = rows_for(16384, n=16)
    assert (y[:, rows].double() - bi_wkv_reference(w, u, k, v, rows=rows)).abs().max() <= 1e-5


def test_single_token_returns_v():
    w, u, k, v = make_inputs(3, 1, 5, decay=10.0, k_std=3.0)
    # y_0 = e^{u+k} v / e^{u+k}: v up to one rounding
    torch.testing.assert_close(bi_wkv(w, u, k, v), v, rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("method", ["auto", "cumsum", "chunked"])
@pytest.mark.parametrize("T,decay,k_std", [(1, 5.0, 1.0), (7, -30.0, 4.0), (33, 80.0, 2.0), (196, 5.0, 20.0), (216, -80.0, 1.0)])
def test_gradients_match_float64_autograd(T, decay, k_std, method):
    w, u, k, v = make_inputs(2, T, 12, decay, k_std, seed=T)
    g = torch.randn(2, T, 12, generator=torch.Generator().manual_seed(1))
    leaves32 = [t.clone().requires_grad_() for t in (w, u, k, v)]
    (bi_wkv_torch(*leaves32, method=method) * g).sum().backward()
    leaves64 = [t.double().requires_grad_() for t in (w, u, k, v)]
    (bi_wkv_reference(*leaves64) * g.double()).sum().backward()
    for name, a, b in zip("wukv", leaves32, leaves64):
        ref = b.grad
        err = (a.grad.double() - ref).abs().max()
        # relative to the gradient's scale (d/du is exactly 0 at T=1: then float32 rounding noise only)
        assert err <= 1e-4 * ref.abs().max() + 1e-6, f"d/d{name}: max abs error {err:.3g}, max |grad| {ref.abs().max():.3g}"


@pytest.mark.parametrize("method,chunk", [("cumsum", None), ("chunked", 32), ("chunked", 4)])
def test_gradcheck_float64(method, chunk):
    # T=11 with chunks of 4: three chunks, the last one padded, so the cross-chunk terms are checked too
    w, u, k, v = (t.double().requires_grad_() for t in make_inputs(2, 11, 3, decay=6.0, k_std=1.5, seed=2))
    fn = (lambda *a: biwkv_mod._bi_wkv_chunked(*a, chunk=chunk)) if chunk else (lambda *a: bi_wkv_torch(*a, method=method))
    assert torch.autograd.gradcheck(fn, (w, u, k, v), eps=1e-6, atol=1e-7)


def test_float64_inputs_are_computed_in_float64():
    w, u, k, v = (t.double() for t in make_inputs(1, 50, 4, decay=8.0, k_std=2.0))
    y = bi_wkv(w, u, k, v)
    assert y.dtype == torch.float64
    assert (y - bi_wkv_reference(w, u, k, v)).abs().max() <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_computed_in_float32(dtype):
    w, u, k, v = make_inputs(2, 196, 48, decay=5.0, k_std=1.0)
    y = bi_wkv(w, u, k.to(dtype), v.to(dtype))
    assert y.dtype == dtype
    ref = bi_wkv_reference(w, u, k, v)
    rel = (y.double() - ref).abs().max() / ref.abs().max()
    assert rel <= 2e-2
    # and exactly what float32 math on the rounded inputs gives (no half-precision arithmetic inside)
    exact = bi_wkv_reference(w, u, k.to(dtype), v.to(dtype)).to(dtype)
    assert (y.double() - exact.double()).abs().max() <= 2 * torch.finfo(dtype).eps * ref.abs().max()


def test_autocast_is_disabled_inside():
    w, u, k, v = make_inputs(2, 33, 16, decay=5.0, k_std=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bi_wkv(w, u, k, v)
    assert y.dtype == torch.float32
    assert (y.double() - bi_wkv_reference(w, u, k, v)).abs().max() <= 1e-5


def test_deterministic():
    w, u, k, v = make_inputs(2, 300, 32, decay=9.0, k_std=3.0)
    leaves = [[t.clone().requires_grad_() for t in (w, u, k, v)] for _ in range(2)]
    outs = []
    for ls in leaves:
        y = bi_wkv(*ls)
        y.square().sum().backward()
        outs.append([y.detach()] + [t.grad for t in ls])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_shape_errors_are_clear():
    w, u, k, v = make_inputs(1, 4, 3, 1.0, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        bi_wkv(w, u, k, v[:, :2])
    with pytest.raises(ValueError, match=r"w and u of shape \(3,\)"):
        bi_wkv(w[:2], u, k, v)
    with pytest.raises(ValueError, match="unknown bi_wkv method"):
        bi_wkv_torch(w, u, k, v, method="fft")
