"""Bi-WKV as Triton kernels (forward and backward) for CUDA tensors.

This is the same operator as :func:`medurwkv.ops.biwkv.bi_wkv_torch`, with ``w`` and ``u`` already divided
by ``T``::

    y_t = [sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t]
          / [sum_{i != t} e^{-(|t-i|-1) w + k_i}     + e^{u + k_t}]

Numerical scheme
----------------
The decay is folded into each token's log-weight. For a row ``t``::

    e^{-(t-1-i) w + k_i} = e^{k_i + w i} * e^{-w (t-1)}       (i < t, "left frame")
    e^{-(i-t-1) w + k_i} = e^{k_i - w i} * e^{+w (t+1)}       (i > t, "right frame")

So the exclusive prefix (suffix) sum of row ``t`` is a plain sum over ``i < t`` (``i > t``), times a factor
that depends on ``t`` only. A partial sum is held as ``(kappa, pi, a, b)``. It means
``(a, b) * e^{kappa + w pi}``, where ``kappa`` is the key and ``pi`` the signed position (``+i`` in the left
frame, ``-i`` in the right frame) of its largest term. Two partial sums merge like a log-sum-exp
(:func:`_merge`): the larger one keeps factor 1, and the smaller one is scaled by ``e^{-|d|} <= 1``.

* No argument of ``exp`` is ever positive, so nothing overflows, whatever the decay or key range. The
  plain cumsum form has a ``|spatial_decay| <= 80`` limit; this scheme does not. The denominator's
  mantissa is always >= 1.
* Exponent differences are computed as ``d = (kappa1 - kappa2) + w * (pi1 - pi2)``: a key difference plus
  ``w`` times an exact integer distance. They are never differences of two rounded ``k + w * position``
  values of magnitude ~|k| + |spatial_decay|. Measured with the interpreter over T in {1..1000}, C up to
  192, ``|spatial_decay| <= 80`` and key std up to 20: max abs error <= 2.5e-6 against the float64 oracle.
  With rounded ``k + w * position`` values it was up to 9e-6.

A row combines three parts: prefix, the bonus ``e^{u+k_t}``, and suffix. They are weighted relative to the
largest of them through pairwise differences (:func:`_row_weights`). The row also stores
``lse_t = log(denominator)`` (float32) for the backward. Its rounding, about ``|lse| * 6e-8``, bounds the
gradients' relative accuracy to a few 1e-6 when keys are large.

Work decomposition
------------------
A program owns one batch row ``b``, ``BLOCK_C`` channels and a chunk of tokens. It walks the chunk in tiles
of ``BLOCK_T`` tokens.

* Inside a tile, both directions are a ``tl.associative_scan`` over the tile with the merge above.
* The carry from earlier tiles enters as the scan's first element. The prefix scan runs over tokens shifted
  by one, so it is exclusive without any subtraction. Subtracting a token's own term would cancel
  catastrophically under strong decay.
* The carry from later tiles is computed first, in a right-to-left sweep of tile reductions, and parked in
  a small scratch buffer (``B x n_tiles x 4 x C``).
* Every reduction runs in a fixed order, so the result is deterministic.

T-split, for long sequences with few ``(b, channel-block)`` rows (e.g. 3D volumes with small patches):

1. Phase 1 (``_chunk_summary_kernel``) reduces each chunk of ``chunk_len`` tokens to a left and a right
   summary, with all chunks in parallel.
2. Phase 2, the combine, is tiny. It runs at the start of each phase-3 program, which merges the summaries
   of all chunks to its left and to its right, in a fixed order.
3. Phase 3 is the kernel above, run on one chunk with those carries.

Without a split, the same kernel runs with one chunk.

Backward
--------
Notation (design note §1.5): ``g_t = dL/dy_t``; ``alpha_t = g_t / D_t = g_t e^{-lse_t}``; ``W`` is the
symmetric Toeplitz decay matrix with ``e^u`` on the diagonal; ``p_j = e^{k_j}``.

* ``dv_j = p_j (W alpha)_j`` and ``dk_j = p_j [v_j (W alpha)_j - (W (alpha y))_j]``. These are the same
  two-direction scans, over ``(g_t, g_t y_t)`` with keys ``-lse_t``. Every exponent is
  ``log(W_tj p_j / D_t) <= 0``.
* ``du = sum_t e^{u + k_t - lse_t} g_t (v_t - y_t)``.
* ``dw = -sum_{t, i != t} (|t-i|-1) W_ti p_i alpha_t (v_i - y_t)``.
  - ``|t-i|-1`` counts the tokens ``j`` strictly between ``i`` and ``t``, and ``W_ti = e^{-w} W_ji W_tj``
    for such ``j``.
  - So the double sum is ``e^{-w} sum_j [A_j . B_j + C_j . F_j]``: ``A``, ``C`` are the forward
    prefix/suffix states of ``(p v, p)``, and ``B``, ``F`` the suffix/prefix states of
    ``(alpha, alpha y)``.
  - No distance-weighted scan is needed, only products of states that the backward computes anyway.

``dw`` and ``du`` are written per program into a ``(B, n_chunks, 2, C)`` buffer. Torch sums it in a fixed
order; there are no float atomics.

Saved for the backward:

* ``k``, ``v`` (input dtype);
* ``y`` and ``lse`` (float32; for float32 inputs, ``y`` is the output itself);
* with a T-split, the ``(B, n_chunks, 8, C)`` chunk summaries.

Only Triton's JIT is used: nothing is compiled at install or import time. Under ``TRITON_INTERPRET=1`` the
kernels also run, slowly, on CPU tensors; that is how the CPU test suite checks them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .biwkv import _check_shapes

__all__ = ["bi_wkv_triton", "bi_wkv_triton_vjp", "LaunchConfig", "launch_config", "kernel_limit", "interpreted"]

# Finite stand-in for log(0). exp(NEG - x) == 0 for any finite x, and NEG - NEG stays finite, so empty
# partial sums never produce inf - inf = NaN.
NEG: tl.constexpr = tl.constexpr(-1.0e30)


# ----------------------------------------------------------------------------------------------------------
# Triton building blocks
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _merge4(k1, p1, a1, b1, k2, p2, a2, b2, w):
    """Log-sum-exp merge of two partial sums ``(a, b) * e^{k + w p}`` (associative, commutative)."""
    d = (k1 - k2) + w * (p1 - p2)
    first = d >= 0
    # one exp per merge: the larger side keeps factor 1, the smaller one gets e^{-|d|} <= 1
    f = tl.exp(-tl.abs(d))
    f1 = tl.where(first, 1.0, f)
    f2 = tl.where(first, f, 1.0)
    return tl.where(first, k1, k2), tl.where(first, p1, p2), a1 * f1 + a2 * f2, b1 * f1 + b2 * f2


@triton.jit
def _merge(k1, p1, a1, b1, w1, k2, p2, a2, b2, w2):
    """``_merge4`` as a scan combine function: ``w`` travels along as a fifth (constant) component."""
    k, p, a, b = _merge4(k1, p1, a1, b1, k2, p2, a2, b2, w1)
    return k, p, a, b, w1


@triton.jit
def _tile_reduce(kap, pos, a, b, w, BLOCK_T: tl.constexpr):
    """Reduce a (BLOCK_T, BLOCK_C) tile of elements ``(a, b) * e^{kap + w pos}`` along the token axis.
    The largest element is found on the rounded log-weights; the exponents are then exact differences."""
    idx = tl.argmax(kap + w * pos, axis=0)
    sel = tl.arange(0, BLOCK_T)[:, None] == idx[None, :]
    km = tl.sum(tl.where(sel, kap, 0.0), axis=0)
    pm = tl.sum(tl.where(sel, pos, 0.0), axis=0)
    e = tl.exp((kap - km[None, :]) + w * (pos - pm[None, :]))
    return km, pm, tl.sum(e * a, axis=0), tl.sum(e * b, axis=0)


@triton.jit
def _elem(p0, p1, p2, offs, mask, BWD: tl.constexpr):
    """Elements of the tokens at ``offs``: (key, mantissa a, mantissa b).

    Forward (p0, p1 = k, v): ``(k, v, 1)``. Backward (p0, p1, p2 = lse, g, y): ``(-lse, g, g y)``, i.e.
    ``alpha = g / D`` in log form."""
    if BWD:
        ll = tl.load(p0 + offs, mask=mask, other=0.0)
        gg = tl.load(p1 + offs, mask=mask, other=0.0).to(tl.float32)
        yy = tl.load(p2 + offs, mask=mask, other=0.0)
        kap = tl.where(mask, -ll, NEG)
        a = gg
        b = gg * yy
    else:
        kk = tl.load(p0 + offs, mask=mask, other=0.0).to(tl.float32)
        vv = tl.load(p1 + offs, mask=mask, other=0.0).to(tl.float32)
        kap = tl.where(mask, kk, NEG)
        a = vv
        b = tl.where(mask, 1.0, 0.0)
    return kap, a, b


@triton.jit
def _prefix_states(p0, p1, p2, base, rows, cols, cmask, C, start, end, w, ck, cp, ca, cb,
                   BWD: tl.constexpr):
    """Exclusive prefix states ``(kappa, pi, a, b)`` of every row of the tile that starts at ``start``.

    Scan row ``j`` holds token ``start + j - 1``, so an inclusive scan is exclusive in tokens. Row 0 holds
    the carry ``(ck, cp, ca, cb)`` of all tokens before the tile."""
    prev = rows - 1
    mask = (prev >= start) & (prev < end) & cmask[None, :]
    kap, a, b = _elem(p0, p1, p2, base + prev * C + cols[None, :], mask, BWD)
    pos = tl.where(mask, prev.to(tl.float32), 0.0)
    first = rows == start
    kap = tl.where(first, ck[None, :], kap)
    pos = tl.where(first, cp[None, :], pos)
    a = tl.where(first, ca[None, :], a)
    b = tl.where(first, cb[None, :], b)
    ks, ps, as_, bs, _w = tl.associative_scan((kap, pos, a, b, w + tl.zeros_like(a)), 0, _merge)
    return ks, ps, as_, bs


@triton.jit
def _suffix_states(p0, p1, p2, base, rows, cols, cmask, C, start, end, w, ck, cp, ca, cb,
                   BLOCK_T: tl.constexpr, BWD: tl.constexpr):
    """Exclusive suffix states (right frame, ``pi = -position``) of every row.

    Scan row ``j`` holds token ``start + j + 1``. The last row holds the carry of all tokens after the
    tile: later tiles of the chunk plus the chunk's own right carry."""
    nxt = rows + 1
    mask = (nxt < end) & cmask[None, :]
    kap, a, b = _elem(p0, p1, p2, base + nxt * C + cols[None, :], mask, BWD)
    pos = tl.where(mask, -nxt.to(tl.float32), 0.0)
    last = rows == start + BLOCK_T - 1
    kap = tl.where(last, ck[None, :], kap)
    pos = tl.where(last, cp[None, :], pos)
    a = tl.where(last, ca[None, :], a)
    b = tl.where(last, cb[None, :], b)
    ks, ps, as_, bs, _w = tl.associative_scan((kap, pos, a, b, w + tl.zeros_like(a)), 0, _merge,
                                              reverse=True)
    return ks, ps, as_, bs


@triton.jit
def _next_left_carry(sk, sp, sa, sb, kap, pos, a, b, last, w1):
    """Carry of all tokens up to and including the tile's last row.

    That is the last row's exclusive prefix state merged with the row's own element. Both are picked out
    with masked reductions, so no register shuffles are needed."""
    k1 = tl.max(tl.where(last, sk, NEG), axis=0)
    p1 = tl.sum(tl.where(last, sp, 0.0), axis=0)
    a1 = tl.sum(tl.where(last, sa, 0.0), axis=0)
    b1 = tl.sum(tl.where(last, sb, 0.0), axis=0)
    k2 = tl.max(tl.where(last, kap, NEG), axis=0)
    p2 = tl.sum(tl.where(last, pos, 0.0), axis=0)
    a2 = tl.sum(tl.where(last, a, 0.0), axis=0)
    b2 = tl.sum(tl.where(last, b, 0.0), axis=0)
    return _merge4(k1, p1, a1, b1, k2, p2, a2, b2, w1)


@triton.jit
def _row_weights(pk, pp, sk, sp, kk, tp, w, u):
    """Relative weights of the three parts of row ``t``: prefix, bonus and suffix.

    Their log-weights are ``lp = pk + w (pp - t + 1)``, ``lb = u + k_t`` and ``ls = sk + w (sp + t + 1)``.
    Each pairwise difference is formed directly, as key difference + ``w`` * integer distance, rather than
    through a common reference. Going through one reference (e.g. the bonus) adds two roundings at the size
    of that reference's key gap, which may be ~100 when keys are spread widely, while the part it refers to
    is negligible. The largest part gets weight 1 and the others ``e^{-gap}``. Also returns the absolute
    log-weight of the largest part (for ``lse``)."""
    d_ps = (pk - sk) + w * ((pp - sp) - 2.0 * tp)
    d_pb = (pk - kk) + (w * (pp - tp + 1.0) - u)
    d_sb = (sk - kk) + (w * (sp + tp + 1.0) - u)
    p_max = (d_ps >= 0) & (d_pb >= 0)
    s_max = (d_ps < 0) & (d_sb >= 0)
    # the selected exponents are <= 0; the clamp only keeps the unselected lanes finite
    ep = tl.where(p_max, 1.0, tl.exp(tl.minimum(tl.where(s_max, d_ps, d_pb), 0.0)))
    es = tl.where(s_max, 1.0, tl.exp(tl.minimum(tl.where(p_max, -d_ps, d_sb), 0.0)))
    eb = tl.where(p_max | s_max, tl.exp(tl.minimum(-tl.where(p_max, d_pb, d_sb), 0.0)), 1.0)
    lmax = tl.where(p_max, pk + w * (pp - tp + 1.0), tl.where(s_max, sk + w * (sp + tp + 1.0), kk + u))
    return ep, eb, es, lmax


@triton.jit
def _load4(ptr, off, C, cmask, q0: tl.constexpr):
    k = tl.load(ptr + off + q0 * C, mask=cmask, other=NEG)
    p = tl.load(ptr + off + (q0 + 1) * C, mask=cmask, other=0.0)
    a = tl.load(ptr + off + (q0 + 2) * C, mask=cmask, other=0.0)
    b = tl.load(ptr + off + (q0 + 3) * C, mask=cmask, other=0.0)
    return k, p, a, b


@triton.jit
def _store4(ptr, off, C, cmask, k, p, a, b, q0: tl.constexpr):
    tl.store(ptr + off + q0 * C, k, mask=cmask)
    tl.store(ptr + off + (q0 + 1) * C, p, mask=cmask)
    tl.store(ptr + off + (q0 + 2) * C, a, mask=cmask)
    tl.store(ptr + off + (q0 + 3) * C, b, mask=cmask)


@triton.jit
def _empty(BLOCK_C: tl.constexpr):
    z = tl.zeros([BLOCK_C], tl.float32)
    return z + NEG, z, z, z


@triton.jit
def _chunk_carries(summ_ptr, pid_b, pid_n, NC, C, cols, cmask, w1, BLOCK_C: tl.constexpr):
    """Phase 2 of the T-split: carries of chunk ``pid_n`` from the summaries of the other chunks.

    The summaries of all chunks to the left (right) are merged, in a fixed order, into the left (right)
    carry. ``summ`` is ``(B, NC, 8, C)``: the left-frame summary in slots 0-3 and the right-frame summary
    in slots 4-7."""
    lk, lp, la, lb = _empty(BLOCK_C)
    rk, rp, ra, rb = _empty(BLOCK_C)
    row0 = pid_b.to(tl.int64) * NC * 8 * C + cols
    for m in range(0, pid_n):
        k, p, a, b = _load4(summ_ptr, row0 + m * 8 * C, C, cmask, 0)
        lk, lp, la, lb = _merge4(lk, lp, la, lb, k, p, a, b, w1)
    for m in range(pid_n + 1, NC):
        k, p, a, b = _load4(summ_ptr, row0 + m * 8 * C, C, cmask, 4)
        rk, rp, ra, rb = _merge4(rk, rp, ra, rb, k, p, a, b, w1)
    return lk, lp, la, lb, rk, rp, ra, rb


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_summary_kernel(p0, p1, p2, w_ptr, summ_ptr, T, C, NT, TPC, NC,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BWD: tl.constexpr):
    """Phase 1 of the T-split: the left- and right-frame summaries of one chunk (all chunks in parallel).

    The elements are forward ones when ``BWD`` is false (p0, p1 = k, v), backward ones otherwise
    (lse, g, y)."""
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_n = tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    w1 = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    w = w1[None, :]
    base = pid_b.to(tl.int64) * T * C
    n0 = pid_n * TPC
    n1 = tl.minimum(n0 + TPC, NT)
    end = tl.minimum(n1 * BLOCK_T, T)
    lk, lp, la, lb = _empty(BLOCK_C)
    rk, rp, ra, rb = _empty(BLOCK_C)
    for n in range(n0, n1):
        rows = n * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        mask = (rows < end) & cmask[None, :]
        kap, a, b = _elem(p0, p1, p2, base + rows * C + cols[None, :], mask, BWD)
        pos = tl.where(mask, rows.to(tl.float32), 0.0)
        k, p, sa, sb = _tile_reduce(kap, pos, a, b, w, BLOCK_T)
        lk, lp, la, lb = _merge4(lk, lp, la, lb, k, p, sa, sb, w1)
        k, p, sa, sb = _tile_reduce(kap, -pos, a, b, w, BLOCK_T)
        rk, rp, ra, rb = _merge4(rk, rp, ra, rb, k, p, sa, sb, w1)
    off = (pid_b.to(tl.int64) * NC + pid_n) * 8 * C + cols
    _store4(summ_ptr, off, C, cmask, lk, lp, la, lb, 0)
    _store4(summ_ptr, off, C, cmask, rk, rp, ra, rb, 4)


@triton.jit
def _bi_wkv_fwd_kernel(k_ptr, v_ptr, w_ptr, u_ptr, y_ptr, y32_ptr, lse_ptr, scr_ptr, summ_ptr,
                       T, C, NT, TPC, NC,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SPLIT: tl.constexpr,
                       STORE_Y32: tl.constexpr, STORE_LSE: tl.constexpr):
    """Forward of one chunk: phase 3, or the whole sequence when there is no T-split.

    ``scr`` is a ``(B, NT, 4, C)`` float32 scratch that holds the right carry of every tile."""
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_n = tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    w1 = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    w = w1[None, :]
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)[None, :]
    base = pid_b.to(tl.int64) * T * C
    n0 = pid_n * TPC
    n1 = tl.minimum(n0 + TPC, NT)
    end = tl.minimum(n1 * BLOCK_T, T)

    if HAS_SPLIT:
        lk, lp, la, lb, rk, rp, ra, rb = _chunk_carries(summ_ptr, pid_b, pid_n, NC, C, cols, cmask, w1,
                                                        BLOCK_C)
    else:
        lk, lp, la, lb = _empty(BLOCK_C)
        rk, rp, ra, rb = _empty(BLOCK_C)

    # sweep 1, right to left: the carry of everything right of each tile, parked in the scratch
    scr0 = pid_b.to(tl.int64) * NT * 4 * C + cols
    for i in range(0, n1 - n0):
        n = n1 - 1 - i
        _store4(scr_ptr, scr0 + n * 4 * C, C, cmask, rk, rp, ra, rb, 0)
        rows = n * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        mask = (rows < end) & cmask[None, :]
        kap, a, b = _elem(k_ptr, v_ptr, v_ptr, base + rows * C + cols[None, :], mask, False)
        pos = tl.where(mask, -rows.to(tl.float32), 0.0)
        k, p, sa, sb = _tile_reduce(kap, pos, a, b, w, BLOCK_T)
        rk, rp, ra, rb = _merge4(rk, rp, ra, rb, k, p, sa, sb, w1)
    # other threads of this program wrote the scratch
    tl.debug_barrier()

    # sweep 2, left to right: both scans per tile; the left carry travels in registers
    for n in range(n0, n1):
        start = n * BLOCK_T
        rows = start + tl.arange(0, BLOCK_T)[:, None]
        ck, cp, ca, cb = _load4(scr_ptr, scr0 + n * 4 * C, C, cmask, 0)
        pk, pp, pa, pb = _prefix_states(k_ptr, v_ptr, v_ptr, base, rows, cols, cmask, C, start, end, w,
                                        lk, lp, la, lb, False)
        sk, sp, sa, sb = _suffix_states(k_ptr, v_ptr, v_ptr, base, rows, cols, cmask, C, start, end, w,
                                        ck, cp, ca, cb, BLOCK_T, False)
        mask = (rows < end) & cmask[None, :]
        offs = base + rows * C + cols[None, :]
        tp = rows.to(tl.float32)
        kk = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ep, eb, es, lmax = _row_weights(pk, pp, sk, sp, kk, tp, w, u)
        num = pa * ep + vv * eb + sa * es
        den = pb * ep + eb + sb * es  # >= 1: the part holding the maximum has mantissa >= 1
        y = num / den
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        if STORE_Y32:
            tl.store(y32_ptr + offs, y, mask=mask)
        if STORE_LSE:
            tl.store(lse_ptr + offs, lmax + tl.log(den), mask=mask)
        last = rows == start + BLOCK_T - 1
        lk, lp, la, lb = _next_left_carry(pk, pp, pa, pb, tl.where(mask, kk, NEG), tl.where(mask, tp, 0.0),
                                          vv, tl.where(mask, 1.0, 0.0), last, w1)


@triton.jit
def _bi_wkv_bwd_kernel(k_ptr, v_ptr, y_ptr, lse_ptr, g_ptr, w_ptr, u_ptr, dk_ptr, dv_ptr, part_ptr,
                       scr_ptr, fsumm_ptr, bsumm_ptr, T, C, NT, TPC, NC,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SPLIT: tl.constexpr):
    """Backward of one chunk: dk and dv per token; dw and du summed over the chunk into ``part``
    (``(B, NC, 2, C)``).

    ``scr`` is a ``(B, NT, 8, C)`` scratch. It holds the right carries of the forward elements (k, v) in
    slots 0-3 and of the backward elements (alpha = g/D) in slots 4-7."""
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_n = tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    w1 = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    w = w1[None, :]
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)[None, :]
    base = pid_b.to(tl.int64) * T * C
    n0 = pid_n * TPC
    n1 = tl.minimum(n0 + TPC, NT)
    end = tl.minimum(n1 * BLOCK_T, T)

    # f*: forward elements (p v, p); g*: backward elements (alpha, alpha y); *l left, *r right carries
    if HAS_SPLIT:
        flk, flp, fla, flb, frk, frp, fra, frb = _chunk_carries(fsumm_ptr, pid_b, pid_n, NC, C, cols,
                                                                cmask, w1, BLOCK_C)
        glk, glp, gla, glb, grk, grp, gra, grb = _chunk_carries(bsumm_ptr, pid_b, pid_n, NC, C, cols,
                                                                cmask, w1, BLOCK_C)
    else:
        flk, flp, fla, flb = _empty(BLOCK_C)
        frk, frp, fra, frb = _empty(BLOCK_C)
        glk, glp, gla, glb = _empty(BLOCK_C)
        grk, grp, gra, grb = _empty(BLOCK_C)

    scr0 = pid_b.to(tl.int64) * NT * 8 * C + cols
    for i in range(0, n1 - n0):
        n = n1 - 1 - i
        _store4(scr_ptr, scr0 + n * 8 * C, C, cmask, frk, frp, fra, frb, 0)
        _store4(scr_ptr, scr0 + n * 8 * C, C, cmask, grk, grp, gra, grb, 4)
        rows = n * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        mask = (rows < end) & cmask[None, :]
        offs = base + rows * C + cols[None, :]
        pos = tl.where(mask, -rows.to(tl.float32), 0.0)
        kap, a, b = _elem(k_ptr, v_ptr, v_ptr, offs, mask, False)
        k, p, sa, sb = _tile_reduce(kap, pos, a, b, w, BLOCK_T)
        frk, frp, fra, frb = _merge4(frk, frp, fra, frb, k, p, sa, sb, w1)
        kap, a, b = _elem(lse_ptr, g_ptr, y_ptr, offs, mask, True)
        k, p, sa, sb = _tile_reduce(kap, pos, a, b, w, BLOCK_T)
        grk, grp, gra, grb = _merge4(grk, grp, gra, grb, k, p, sa, sb, w1)
    tl.debug_barrier()

    dw_acc = tl.zeros([BLOCK_C], tl.float32)
    du_acc = tl.zeros([BLOCK_C], tl.float32)
    for n in range(n0, n1):
        start = n * BLOCK_T
        rows = start + tl.arange(0, BLOCK_T)[:, None]
        ck, cp, ca, cb = _load4(scr_ptr, scr0 + n * 8 * C, C, cmask, 0)
        dk_, dp_, da_, db_ = _load4(scr_ptr, scr0 + n * 8 * C, C, cmask, 4)
        # A (prefix) and C (suffix) states of the forward; F (prefix) and B (suffix) states of alpha
        pk, pp, pa, pb = _prefix_states(k_ptr, v_ptr, v_ptr, base, rows, cols, cmask, C, start, end, w,
                                        flk, flp, fla, flb, False)
        sk, sp, sa, sb = _suffix_states(k_ptr, v_ptr, v_ptr, base, rows, cols, cmask, C, start, end, w,
                                        ck, cp, ca, cb, BLOCK_T, False)
        fk, fp, fa, fb = _prefix_states(lse_ptr, g_ptr, y_ptr, base, rows, cols, cmask, C, start, end, w,
                                        glk, glp, gla, glb, True)
        bk, bp, ba, bb = _suffix_states(lse_ptr, g_ptr, y_ptr, base, rows, cols, cmask, C, start, end, w,
                                        dk_, dp_, da_, db_, BLOCK_T, True)
        mask = (rows < end) & cmask[None, :]
        offs = base + rows * C + cols[None, :]
        tp = rows.to(tl.float32)
        kk = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ll = tl.load(lse_ptr + offs, mask=mask, other=0.0)
        gg = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        yy = tl.load(y_ptr + offs, mask=mask, other=0.0)
        # p_j (W alpha)_j in its three parts; each exponent is log(W_tj p_j / D_t) <= 0 (the clamp only
        # absorbs rounding and keeps masked lanes finite)
        eb_ = tl.exp(tl.minimum((kk + bk) + w * (bp + tp + 1.0), 0.0))
        ef = tl.exp(tl.minimum((kk + fk) + w * (fp - tp + 1.0), 0.0))
        ed = tl.exp(tl.minimum((kk - ll) + u, 0.0))
        dv = eb_ * ba + ef * fa + ed * gg
        dk = eb_ * (vv * ba - bb) + ef * (vv * fa - fb) + ed * gg * (vv - yy)
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)
        tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        du_acc += tl.sum(tl.where(mask, ed * gg * (vv - yy), 0.0), axis=0)
        # pairs i < j < t and t < j < i: e^{-w} A_j.B_j + e^{-w} C_j.F_j (exponents <= 0 as well)
        t1 = tl.exp(tl.minimum((pk + bk) + w * (pp + bp + 1.0), 0.0)) * (pa * ba - pb * bb)
        t2 = tl.exp(tl.minimum((sk + fk) + w * (sp + fp + 1.0), 0.0)) * (sa * fa - sb * fb)
        dw_acc -= tl.sum(tl.where(mask, t1 + t2, 0.0), axis=0)
        last = rows == start + BLOCK_T - 1
        tpm = tl.where(mask, tp, 0.0)
        flk, flp, fla, flb = _next_left_carry(pk, pp, pa, pb, tl.where(mask, kk, NEG), tpm, vv,
                                              tl.where(mask, 1.0, 0.0), last, w1)
        glk, glp, gla, glb = _next_left_carry(fk, fp, fa, fb, tl.where(mask, -ll, NEG), tpm, gg, gg * yy,
                                              last, w1)

    off = (pid_b.to(tl.int64) * NC + pid_n) * 2 * C + cols
    tl.store(part_ptr + off, dw_acc, mask=cmask)
    tl.store(part_ptr + off + C, du_acc, mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and T-split of one call (see :func:`launch_config`)."""

    block_t: int  # tokens per tile, forward
    block_t_bwd: int  # tokens per tile, backward (more live tensors, so smaller)
    block_c: int  # channels per program
    num_warps: int
    num_warps_bwd: int
    chunk_len: int  # tokens per chunk; a multiple of both tile lengths
    n_chunks: int  # 1 = no T-split

    @property
    def split(self) -> bool:
        return self.n_chunks > 1


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)
    return 132  # interpreter on CPU tensors: behave as on an H100/H200 so the same paths are exercised


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def launch_config(
    B: int,
    T: int,
    C: int,
    device: torch.device,
    *,
    chunk_len: int | None = None,
    block_t: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> LaunchConfig:
    """Heuristic block sizes and T-split for a ``(B, T, C)`` problem.

    * ``block_c``: 32 float32 channels are one 128-byte row segment per token (coalesced loads); fewer for
      tiny C.
    * ``block_t``: 64 tokens forward, 32 backward (the backward keeps ~4x more tiles live); smaller for
      short sequences.
    * T-split when ``B * ceil(C / block_c)`` programs cannot fill the GPU (< one per SM) and the sequence
      is long: chunks are sized for ~2 programs per SM but never shorter than two tiles.

    Args:
        chunk_len: force the chunk length in tokens (rounded up to a tile multiple); 0 disables the
            split, None decides by the heuristic above.
        block_t, block_c, num_warps: override the heuristics (``block_t`` sets both directions).
    """
    bc = block_c or (32 if C > 16 else max(4, _pow2_at_least(C)))
    bt = block_t or min(64, max(16, _pow2_at_least(T)))
    btb = block_t or min(32, bt)
    for name, val in (("block_t", bt), ("block_c", bc)):
        if val & (val - 1):
            raise ValueError(f"{name} must be a power of two, got {val}")
    unit = max(bt, btb)  # both powers of two, so a multiple of unit is a multiple of both
    whole = _cdiv(T, unit) * unit
    if chunk_len is None:
        programs = B * _cdiv(C, bc)
        n_sm = _sm_count(device)
        if programs < n_sm and T >= 4 * unit:
            n_chunks = min(_cdiv(2 * n_sm, programs), _cdiv(T, 2 * unit))
            chunk = _cdiv(_cdiv(T, n_chunks), unit) * unit
        else:
            chunk = whole
    elif chunk_len <= 0:
        chunk = whole
    else:
        chunk = min(whole, _cdiv(chunk_len, unit) * unit)
    n_chunks = _cdiv(T, chunk)
    nw = num_warps or (8 if bt * bc >= 2048 else 4)
    nwb = num_warps or (8 if btb * bc >= 1024 else 4)
    return LaunchConfig(bt, btb, bc, nw, nwb, chunk, n_chunks)


# Limits of the kernels. Token offsets ``row * C + col`` are int32 inside a batch row, token positions are
# exact float32 integers only below 2^24, and CUDA grid axes y (batch) and z (chunks) hold at most 65535.
MAX_TOKENS_TIMES_CHANNELS = 2**31 - 1  # T * C must stay below this
MAX_TOKENS = 2**24  # T must stay below this
MAX_GRID_YZ = 65535


def kernel_limit(B: int, T: int, C: int, cfg: LaunchConfig) -> Optional[str]:
    """Why the kernels cannot run a ``(B, T, C)`` problem with ``cfg``, or None when they can."""
    if T * C >= MAX_TOKENS_TIMES_CHANNELS:
        return f"T*C = {T * C} >= 2^31 (int32 token offsets)"
    if T >= MAX_TOKENS:
        return f"T = {T} >= 2^24 (float32 token positions)"
    if B > MAX_GRID_YZ:
        return f"B = {B} > {MAX_GRID_YZ} (CUDA grid axis y)"
    if cfg.n_chunks > MAX_GRID_YZ:
        return f"{cfg.n_chunks} T-split chunks > {MAX_GRID_YZ} (CUDA grid axis z)"
    return None


def interpreted() -> bool:
    """True when the kernels were loaded under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return type(_bi_wkv_fwd_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------------------
# Launchers and autograd
# ----------------------------------------------------------------------------------------------------------


def _forward(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LaunchConfig, save: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward. ``w``, ``u`` float32 contiguous; ``k``, ``v`` contiguous (any float dtype).

    Returns ``(y, y32, lse, summ)``; the last three only when ``save`` (for the backward)."""
    B, T, C = k.shape
    dev = k.device
    bt, bc = cfg.block_t, cfg.block_c
    nt = _cdiv(T, bt)
    tpc = cfg.chunk_len // bt
    nc = cfg.n_chunks
    y = torch.empty_like(k)
    store_y32 = save and y.dtype != torch.float32
    y32 = torch.empty(k.shape, device=dev, dtype=torch.float32) if store_y32 else (y if save else None)
    lse = torch.empty(k.shape, device=dev, dtype=torch.float32) if save else None
    scr = torch.empty((B, nt, 4, C), device=dev, dtype=torch.float32)
    grid = (triton.cdiv(C, bc), B, nc)
    summ = None
    if cfg.split:
        summ = torch.empty((B, nc, 8, C), device=dev, dtype=torch.float32)
        _chunk_summary_kernel[grid](k, v, v, w, summ, T, C, nt, tpc, nc,
                                    BLOCK_T=bt, BLOCK_C=bc, BWD=False, num_warps=cfg.num_warps)
    _bi_wkv_fwd_kernel[grid](
        k, v, w, u, y, y32 if store_y32 else y, lse if save else y, scr, summ if summ is not None else scr,
        T, C, nt, tpc, nc,
        BLOCK_T=bt, BLOCK_C=bc, HAS_SPLIT=cfg.split, STORE_Y32=store_y32, STORE_LSE=save,
        num_warps=cfg.num_warps,
    )
    return y, y32, lse, summ


def _backward(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y32: torch.Tensor,
    lse: torch.Tensor,
    fsumm: torch.Tensor | None,
    gy: torch.Tensor,
    cfg: LaunchConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward; returns float32 ``dw``, ``du`` and ``dk``, ``dv`` in k's / v's dtype."""
    B, T, C = k.shape
    dev = k.device
    bt, bc = cfg.block_t_bwd, cfg.block_c
    nt = _cdiv(T, bt)
    tpc = cfg.chunk_len // bt
    nc = cfg.n_chunks
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    part = torch.empty((B, nc, 2, C), device=dev, dtype=torch.float32)
    scr = torch.empty((B, nt, 8, C), device=dev, dtype=torch.float32)
    grid = (triton.cdiv(C, bc), B, nc)
    bsumm = None
    if cfg.split:
        assert fsumm is not None
        bsumm = torch.empty((B, nc, 8, C), device=dev, dtype=torch.float32)
        _chunk_summary_kernel[grid](lse, gy, y32, w, bsumm, T, C, nt, tpc, nc,
                                    BLOCK_T=bt, BLOCK_C=bc, BWD=True, num_warps=cfg.num_warps_bwd)
    _bi_wkv_bwd_kernel[grid](
        k, v, y32, lse, gy, w, u, dk, dv, part, scr,
        fsumm if fsumm is not None else scr, bsumm if bsumm is not None else scr,
        T, C, nt, tpc, nc,
        BLOCK_T=bt, BLOCK_C=bc, HAS_SPLIT=cfg.split, num_warps=cfg.num_warps_bwd,
    )
    # fixed-order reduction of the per-program partial sums (deterministic, no atomics)
    dw, du = part.sum(dim=(0, 1)).unbind(0)
    return dw, du, dk, dv


# A backward hook ``(inputs, gy, grads, error) -> grads``: ``inputs`` are the float32 ``w``, ``u`` and the
# ``k``, ``v`` the kernels saw; ``grads`` are the kernel's ``(dw, du, dk, dv)``, or None when the backward
# raised ``error``. It returns the gradients to use (the first-launch guard of ``medurwkv.ops`` checks them
# there and substitutes the PyTorch path's where they are wrong).
BackwardHook = Callable[..., tuple]


class _BiWKVTriton(torch.autograd.Function):
    """Forward and backward kernels. ``forward`` returns ``(y, y32, lse, summ)`` (the last three for the
    backward, not differentiable; ``y32`` is None when ``y`` is float32, ``summ`` without a T-split). The
    ``setup_context`` form lets ``torch.func`` transforms (the compiled backward in ``medurwkv.ops``) run it."""

    @staticmethod
    def forward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cfg: LaunchConfig, hook: Optional[BackwardHook] = None):
        w32 = w.detach().to(torch.float32).contiguous()
        u32 = u.detach().to(torch.float32).contiguous()
        y, y32, lse, summ = _forward(w32, u32, k.contiguous(), v.contiguous(), cfg, save=True)
        return y, (None if y32 is y else y32), lse, summ

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        w, u, k, v, cfg, hook = inputs
        y, y32, lse, summ = output
        extra = [t for t in (y32, lse, summ) if t is not None]
        ctx.mark_non_differentiable(*extra)
        ctx.cfg = cfg
        ctx.hook = hook
        ctx.has_summ = summ is not None
        ctx.save_for_backward(w, u, k, v, y if y32 is None else y32, lse, *([summ] if summ is not None else []))

    @staticmethod
    @once_differentiable  # the backward is a kernel, not torch ops: no double backward
    def backward(ctx, gy: torch.Tensor, *_unused):  # type: ignore[override]
        w, u, k, v, y32, lse, *rest = ctx.saved_tensors
        fsumm = rest[0] if ctx.has_summ else None
        dw, du, dk, dv = _grads(w, u, k, v, y32, lse, fsumm, gy, ctx.cfg, ctx.hook)
        need = ctx.needs_input_grad
        return (dw if need[0] else None, du if need[1] else None, dk if need[2] else None,
                dv if need[3] else None, None, None)


def _grads(w, u, k, v, y32, lse, fsumm, gy, cfg: LaunchConfig, hook: Optional[BackwardHook]):
    """The backward kernels (through ``hook`` when given); dw, du in w's, u's dtypes."""
    w32 = w.to(torch.float32).contiguous()
    u32 = u.to(torch.float32).contiguous()
    k, v = k.contiguous(), v.contiguous()
    device_ctx = torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext()
    with device_ctx, torch.autocast(device_type=k.device.type, enabled=False):
        if hook is None:
            dw, du, dk, dv = _backward(w32, u32, k, v, y32, lse, fsumm, gy.contiguous(), cfg)
        else:
            grads, error = None, None
            try:
                grads = _backward(w32, u32, k, v, y32, lse, fsumm, gy.contiguous(), cfg)
            except Exception as exc:  # handed to the guard, which decides to fall back or raise
                error = exc
            dw, du, dk, dv = hook((w32, u32, k, v), gy, grads, error)
    return dw.to(w.dtype), du.to(u.dtype), dk, dv


def bi_wkv_triton_vjp(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gy: torch.Tensor,
    backward_hook: Optional[BackwardHook] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`bi_wkv_triton` for the output gradient ``gy`` without autograd: the forward
    kernel (storing what the backward needs), then the backward kernels. The compiled backward of
    ``medurwkv.ops`` uses it (tensors inside ``torch.func`` transforms cannot be handed to kernels)."""
    _check_shapes(w, u, k, v)
    B, T, C = k.shape
    k_dtype, v_dtype = k.dtype, v.dtype
    if v.dtype != k.dtype:
        k, v = k.to(torch.float32), v.to(torch.float32)
    if B * T * C == 0:
        return torch.zeros_like(w), torch.zeros_like(u), torch.zeros_like(k, dtype=k_dtype), gy.to(v_dtype, copy=True)
    cfg = launch_config(B, T, C, k.device)
    limit = kernel_limit(B, T, C, cfg)
    if limit is not None:
        raise ValueError(f"bi_wkv: the Triton kernels cannot run (B, T, C) = {(B, T, C)}: {limit}")
    k, v = k.contiguous(), v.contiguous()
    device_ctx = torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext()
    with torch.no_grad(), device_ctx, torch.autocast(device_type=k.device.type, enabled=False):
        w32 = w.to(torch.float32).contiguous()
        u32 = u.to(torch.float32).contiguous()
        y, y32, lse, summ = _forward(w32, u32, k, v, cfg, save=True)
        dw, du, dk, dv = _grads(w, u, k, v, y32, lse, summ, gy.to(k.dtype), cfg, backward_hook)
    return dw, du, dk.to(k_dtype), dv.to(v_dtype)


def bi_wkv_triton(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_len: int | None = None,
    block_t: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
    backward_hook: Optional[BackwardHook] = None,
) -> torch.Tensor:
    """Bi-WKV with Triton kernels; differentiable in all four inputs.

    Args:
        w: (C,) ``spatial_decay / T``.
        u: (C,) ``spatial_first / T``.
        k: (B, T, C) keys, float32/bfloat16/float16 (float64 is computed in float32).
        v: (B, T, C) values. When its dtype differs from ``k``'s, both are read as float32, as the PyTorch
            path computes mixed dtypes.
        chunk_len, block_t, block_c, num_warps: launch overrides, see :func:`launch_config` (tests and
            tuning; the defaults are heuristics).
        backward_hook: see ``BackwardHook`` (used by the first-launch guard of ``medurwkv.ops``).

    Returns:
        (B, T, C) in ``k``'s dtype; all arithmetic is float32 and autocast is disabled inside.

    Raises:
        ValueError: shapes, devices, or a problem beyond the kernels' limits (:func:`kernel_limit`).
    """
    _check_shapes(w, u, k, v)
    B, T, C = k.shape
    if not (w.device == u.device == k.device == v.device):
        raise ValueError("bi_wkv expects w, u, k, v on the same device")
    out_dtype = k.dtype
    if v.dtype != k.dtype:
        k, v = k.to(torch.float32), v.to(torch.float32)
    if B * T * C == 0:
        return v.to(out_dtype, copy=True)
    cfg = launch_config(B, T, C, k.device, chunk_len=chunk_len, block_t=block_t, block_c=block_c,
                        num_warps=num_warps)
    limit = kernel_limit(B, T, C, cfg)
    if limit is not None:
        raise ValueError(f"bi_wkv: the Triton kernels cannot run (B, T, C) = {(B, T, C)}: {limit}")
    # Triton launches on the current CUDA device, so make it the inputs' device
    device_ctx = torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext()
    with device_ctx, torch.autocast(device_type=k.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v)):
            y = _BiWKVTriton.apply(w, u, k, v, cfg, backward_hook)[0]
        else:
            w32 = w.to(torch.float32).contiguous()
            u32 = u.to(torch.float32).contiguous()
            y = _forward(w32, u32, k.contiguous(), v.contiguous(), cfg, save=False)[0]
    return y.to(out_dtype)
