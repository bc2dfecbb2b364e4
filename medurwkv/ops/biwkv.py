"""Bidirectional WKV (Vision-RWKV spatial mix) in plain PyTorch.

For every batch ``b`` and channel ``c`` (``w``, ``u`` already divided by ``T``, exactly as the official
wrapper passes ``spatial_decay / T`` and ``spatial_first / T`` to its kernel)::

    y_t = [sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t]
          / [sum_{i != t} e^{-(|t-i|-1) w + k_i}     + e^{u + k_t}]

Two exact O(T) evaluations are implemented; :func:`bi_wkv_torch` picks one per call:

* ``_bi_wkv_cumsum`` -- the separable prefix-sum form. ``e^{-(t-1-i)w} = e^{w(1-tau_t)} e^{w tau_i}`` with
  centred positions ``tau``, so both directions are four cumulative sums of the same shape as ``k``. It is
  the fastest form but its factors span ``e^{+-|spatial_decay|/2}`` and the keys are shifted by one global
  maximum per (b, c), so it is only used when the decay range plus the key spread is small enough: in
  float32 when that is safe for float32, else in float64 when it is safe there (checked on the data, see
  ``_choose_form``).
* ``_bi_wkv_chunked`` -- range-proof: tokens are grouped in chunks of ``L``; inside a chunk the weights are
  evaluated densely with a per-row maximum, and the chunks exchange (mantissa, log-scale) summaries through
  a dense chunk-to-chunk pass with its own per-row maximum. Every exponent is an exact ``k - d*w`` with
  integer distance ``d`` and the denominator is always >= 1 after scaling, so it neither overflows nor
  underflows for any decay or key range. It is computed in float64: its exponents are rounded values of
  magnitude ~``|spatial_decay|``, so float32 would cost ~``|spatial_decay| * 6e-8`` relative error (9e-6 at
  150); float64 keeps it at the final rounding to float32 whatever the decay.

Both are differentiable through autograd (exact algebra, no approximations). Gradients of ``w`` and ``u``
reach ``spatial_decay`` / ``spatial_first`` through the caller's division by ``T``.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["bi_wkv_torch", "bi_wkv_reference"]

# When ``_bi_wkv_cumsum`` is safe. With D = max|w| (T + 1) (~ max|spatial_decay|) its factors lie within
# e^{+-D/2} and the shifted keys p = e^{k - max k} within [e^{-spread}, 1]:
# * D + spread <= _CUMSUM_SAFE_TOTAL: every intermediate stays far from float32 over/underflow (e^{+-87});
# * D <= _CUMSUM_SAFE_DECAY: only keys below e^{-87 + D/2} can underflow, and their share of any output is
#   below e^{-87 + 2.5 D} <= 1e-10 relative, whatever the key spread.
# * D + spread <= _CUMSUM64_SAFE_TOTAL: the same margin for float64 (e^{+-708}); beyond it the range-proof
#   chunked form runs.
_CUMSUM_SAFE_DECAY = 25.0
_CUMSUM_SAFE_TOTAL = 60.0
_CUMSUM64_SAFE_TOTAL = 600.0
_CHUNK = 32
_NEG = -1.0e30  # finite stand-in for -inf in maxima (keeps autograd free of inf - inf)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_shapes(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"bi_wkv expects k and v of the same shape (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}")
    C = k.shape[-1]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"bi_wkv expects w and u of shape ({C},); got {tuple(w.shape)} and {tuple(u.shape)}")


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    # cumsum of the sequence shifted by one (not inclusive minus own term, which cancels catastrophically
    # when one token dominates)
    x = torch.narrow(x, dim, 0, x.shape[dim] - 1)
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [1, 0]
    return torch.nn.functional.pad(x.cumsum(dim), pad)


def _bi_wkv_cumsum(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Separable prefix-sum form (inputs already in the compute dtype)."""
    T = k.shape[1]
    tau = torch.arange(T, device=k.device, dtype=k.dtype) - (T - 1) / 2.0  # (T,)
    wt = tau[:, None] * w  # (T, C)
    p = torch.exp(k - k.amax(dim=1, keepdim=True).detach())  # (B, T, C), in (0, 1]
    x = torch.stack((p * v, p))  # (2, B, T, C): numerator and denominator share every scan
    left = _exclusive_cumsum(torch.exp(wt) * x, dim=2) * torch.exp(w - wt)
    right = _exclusive_cumsum((torch.exp(-wt) * x).flip(2), dim=2).flip(2) * torch.exp(w + wt)
    num, den = (left + right + torch.exp(u) * x).unbind(0)
    return num / den


def _bi_wkv_chunked(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """Range-proof two-level form (inputs already in the compute dtype)."""
    B, T, C = k.shape
    # shift the keys by their maximum per (b, c): exponents of the dominant tokens are then near 0,
    # where float32 rounds them most finely
    k = k - k.amax(dim=1, keepdim=True).detach()
    L = max(1, min(chunk, T))
    N = -(-T // L)
    pad = N * L - T
    if pad:
        # padded keys carry zero weight (exp(-1e30 - finite) == 0) and padded rows are dropped at the end
        k = torch.nn.functional.pad(k, (0, 0, 0, pad), value=_NEG)
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    k = k.view(B, N, L, C)
    v = v.view(B, N, L, C)
    j = torch.arange(L, device=k.device, dtype=k.dtype)

    # -- inside each chunk: dense L x L logits with a per-row maximum
    dist = (j[:, None] - j[None, :]).abs() - 1  # (L, L), diagonal replaced by the bonus u
    eye = torch.eye(L, dtype=torch.bool, device=k.device)
    bias = torch.where(eye[..., None], u, -dist[..., None] * w)  # (L, L, C)
    z = k[:, :, None, :, :] + bias  # (B, N, L_t, L_i, C)
    # every max-shift below is detached: each one cancels exactly in the final ratio, so treating it as a
    # constant leaves value and gradient unchanged while keeping autograd away from argmax
    mu = z.amax(dim=3).detach()  # (B, N, L, C)
    e = torch.exp(z - mu[:, :, :, None, :])
    num_in = (e * v[:, :, None, :, :]).sum(3)
    den_in = e.sum(3)

    # -- chunk summaries: tokens of chunk m decayed to its right edge (seen from later chunks) and to its
    #    left edge (seen from earlier chunks), each as mantissa * e^{sigma}
    zr = k - (L - 1 - j)[:, None] * w  # (B, N, L, C)
    zl = k - j[:, None] * w
    sr = zr.amax(2, keepdim=True).detach()
    sl = zl.amax(2, keepdim=True).detach()
    er = torch.exp(zr - sr)
    el = torch.exp(zl - sl)
    mr = torch.stack(((er * v).sum(2), er.sum(2)))  # (2, B, N, C)
    ml = torch.stack(((el * v).sum(2), el.sum(2)))
    sr, sl = sr.squeeze(2), sl.squeeze(2)  # (B, N, C)

    # -- chunk-to-chunk: row n gathers chunks m < n (left) and m > n (right), decayed across the gap
    n = torch.arange(N, device=k.device)
    gap_left = (n[:, None] - n[None, :] - 1).to(k.dtype)  # (N_row, N_src); valid where m < n
    mask_left = (n[None, :] < n[:, None])[None, :, :, None]
    mask_right = (n[None, :] > n[:, None])[None, :, :, None]
    lam_l = sr[:, None, :, :] - (L * gap_left)[None, :, :, None] * w  # (B, N, N, C)
    lam_r = sl[:, None, :, :] - (L * -(gap_left + 2))[None, :, :, None] * w  # gap m - n - 1
    big_l = torch.where(mask_left, lam_l, _NEG).amax(2).detach()  # (B, N, C)
    big_r = torch.where(mask_right, lam_r, _NEG).amax(2).detach()
    wl = torch.exp(torch.where(mask_left, lam_l - big_l[:, :, None, :], float("-inf")))
    wr = torch.exp(torch.where(mask_right, lam_r - big_r[:, :, None, :], float("-inf")))
    pl = torch.einsum("bnmc,xbmc->xbnc", wl, mr)  # (2, B, N, C)
    pr = torch.einsum("bnmc,xbmc->xbnc", wr, ml)

    # -- combine per row t = (n, j) with one common scale s_t >= every part's own maximum
    ga = big_l[:, :, None, :] - j[:, None] * w  # (B, N, L, C) log-scale of the left part at row j
    gc = big_r[:, :, None, :] - (L - 1 - j)[:, None] * w
    s = torch.maximum(mu, torch.maximum(ga, gc)).detach()
    fi, fa, fc = torch.exp(mu - s), torch.exp(ga - s), torch.exp(gc - s)
    num = fi * num_in + fa * pl[0][:, :, None, :] + fc * pr[0][:, :, None, :]
    den = fi * den_in + fa * pl[1][:, :, None, :] + fc * pr[1][:, :, None, :]
    y = (num / den).reshape(B, N * L, C)
    return y[:, :T] if pad else y


def _decay_and_spread(w: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    """``D = max|w| (T + 1)`` (~ max|spatial_decay|) and the largest key spread of any (b, c)."""
    with torch.no_grad():
        decay = float(w.abs().amax()) * (k.shape[1] + 1)
        spread = float((k.amax(1) - k.amin(1)).amax()) if k.numel() else 0.0
    return decay, spread


def _cumsum_is_safe(w: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the float32 cumsum form is exact for these inputs."""
    decay, spread = _decay_and_spread(w, k)
    return decay <= _CUMSUM_SAFE_DECAY or decay + spread <= _CUMSUM_SAFE_TOTAL


def _choose_form(w: torch.Tensor, k: torch.Tensor, cdt: torch.dtype) -> tuple[str, torch.dtype]:
    """(form, compute dtype) for ``method="auto"``: the float32 cumsum form when it is safe, else the cumsum
    form in float64 when that is safe, else the range-proof chunked form (always float64)."""
    decay, spread = _decay_and_spread(w, k)
    if cdt == torch.float32 and (decay <= _CUMSUM_SAFE_DECAY or decay + spread <= _CUMSUM_SAFE_TOTAL):
        return "cumsum", torch.float32
    if decay + spread <= _CUMSUM64_SAFE_TOTAL:
        return "cumsum", torch.float64
    return "chunked", torch.float64


def bi_wkv_torch(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Exact Bi-WKV in PyTorch (any device), computed in float32 (float64 if an input is float64).

    Args:
        w: (C,) decay, already divided by T.
        u: (C,) bonus of the token itself, already divided by T.
        k: (B, T, C) keys.
        v: (B, T, C) values.
        method: ``"auto"`` (the float32 cumsum form when it is safe for the data, else the cumsum form in
            float64 when that is safe, else the chunked form), ``"cumsum"`` (in the inputs' compute dtype,
            whatever the range) or ``"chunked"`` (range-proof, computed in float64).

    Returns:
        (B, T, C) tensor in ``k``'s dtype. Inputs of mixed floating dtypes are all computed in the compute
        dtype (float64 if any input is float64, else float32).
    """
    _check_shapes(w, u, k, v)
    if method not in ("auto", "cumsum", "chunked"):
        raise ValueError(f"unknown bi_wkv method {method!r}; use 'auto', 'cumsum' or 'chunked'")
    out_dtype = k.dtype
    cdt = _compute_dtype(w, u, k, v)
    with torch.autocast(device_type=k.device.type, enabled=False):
        if k.shape[1] == 0:
            return v.to(out_dtype, copy=True)
        if method == "auto":
            method, cdt = _choose_form(w, k, cdt)
        elif method == "chunked":
            cdt = torch.float64
        w, u, k, v = (t.to(cdt) for t in (w, u, k, v))
        y = _bi_wkv_cumsum(w, u, k, v) if method == "cumsum" else _bi_wkv_chunked(w, u, k, v)
    return y.to(out_dtype)


def _reference_block(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    T = k.shape[1]
    t = rows.to(torch.float64)
    i = torch.arange(T, dtype=torch.float64, device=k.device)
    dist = (t[:, None] - i[None, :]).abs() - 1  # (R, T)
    self_ = rows[:, None] == torch.arange(T, device=k.device)[None, :]
    bias = torch.where(self_[..., None], u, -dist[..., None] * w)  # (R, T_i, C)
    logits = k[:, None, :, :] + bias  # (B, R, T_i, C)
    return (torch.softmax(logits, dim=2) * v[:, None, :, :]).sum(2)


def bi_wkv_reference(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    max_elements: int = 2**25,
) -> torch.Tensor:
    """Float64 O(T^2) oracle: ``y_t = sum_i softmax_i(L_ti) v_i`` with ``L_ti = k_i - (|t-i|-1) w`` for
    ``i != t`` and ``L_tt = u + k_t``.

    Differentiable (float64 autograd). ``rows`` (1-D token indices) evaluates only those outputs, (B, R, C);
    channels are processed in blocks so that no intermediate holds more than ``max_elements`` numbers.
    Returns float64."""
    _check_shapes(w, u, k, v)
    w, u, k, v = (t.to(torch.float64) for t in (w, u, k, v))
    B, T, C = k.shape
    rows = torch.arange(T, device=k.device) if rows is None else torch.as_tensor(rows, device=k.device).long()
    step = max(1, max_elements // max(1, B * len(rows) * T))
    blocks = [
        _reference_block(w[c : c + step], u[c : c + step], k[..., c : c + step], v[..., c : c + step], rows)
        for c in range(0, C, step)
    ]
    return torch.cat(blocks, dim=-1)
