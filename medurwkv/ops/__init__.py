"""The bidirectional WKV operator of Vision-RWKV.

``bi_wkv(w, u, k, v)`` is the one entry point the network uses: exact, differentiable in all four
inputs, computed in float32 (float64 if an input is float64; the result is returned in ``k``'s dtype).
Which implementation runs is decided per call (``dispatch.py``): CUDA tensors go to the Triton kernels
behind a first-launch guard that falls back to the PyTorch path, everything else runs the PyTorch path;
``MEDURWKV_BIWKV_BACKEND=auto|torch|triton`` (or ``backend=``) overrides. Under ``torch.compile`` the
operator is the custom op ``torch.ops.medurwkv.bi_wkv`` (fake implementation and autograd registered), so
graphs compile around it without breaks. ``bi_wkv_reference`` is the float64 O(T^2) oracle of the tests.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .biwkv import bi_wkv_reference, bi_wkv_torch
from .dispatch import BACKEND_ENV, BACKENDS, BiWKVBackendError, bi_wkv_eager, bi_wkv_vjp, resolve_backend, triton_available

__all__ = [
    "bi_wkv",
    "bi_wkv_reference",
    "bi_wkv_torch",
    "triton_available",
    "resolve_backend",
    "BiWKVBackendError",
    "BACKEND_ENV",
    "BACKENDS",
]


def _use_triton(device: torch.device, dtype: torch.dtype, backend: Optional[str] = None) -> bool:
    """Whether :func:`bi_wkv` would try the Triton kernels for inputs on ``device`` with ``dtype`` (before
    the guard's checks and limits): CUDA tensors, not float64, Triton importable, backend not ``torch``."""
    name = resolve_backend(backend)
    if name == "torch" or dtype == torch.float64 or not triton_available():
        return False
    return name == "triton" or device.type == "cuda"


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Bi-WKV of Vision-RWKV.

    Args:
        w: (C,) ``spatial_decay / T``.
        u: (C,) ``spatial_first / T``.
        k: (B, T, C) keys.
        v: (B, T, C) values.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; None reads ``$MEDURWKV_BIWKV_BACKEND`` (default
            ``auto``) at each call.

    Returns:
        (B, T, C) in ``k``'s dtype.
    """
    if torch.compiler.is_compiling():
        return torch.ops.medurwkv.bi_wkv(w, u, k, v, backend)
    return bi_wkv_eager(w, u, k, v, backend)


# ------------------------------------------------------------------------------------------------------------
# torch.compile: a custom op with a fake implementation and autograd. Its backward is a second custom op that
# recomputes what the backward needs from the inputs (the compiled graph keeps only those), by the same
# implementation and the same guard as eager mode.
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("medurwkv::bi_wkv", mutates_args=())
def _bi_wkv_op(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    with torch.no_grad():
        y = bi_wkv_eager(w, u, k, v, backend)
    # a custom op's output must be a new, contiguous tensor (the fake below promises that)
    if not y.is_contiguous() or any(y.data_ptr() == t.data_ptr() for t in (w, u, k, v)):
        y = y.contiguous() if not y.is_contiguous() else y.clone()
    return y


@_bi_wkv_op.register_fake
def _(w, u, k, v, backend):
    return k.new_empty(k.shape)


@torch.library.custom_op("medurwkv::bi_wkv_backward", mutates_args=())
def _bi_wkv_backward_op(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gy: torch.Tensor, backend: Optional[str]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dw, du, dk, dv = bi_wkv_vjp(w, u, k, v, gy, backend)
    # custom-op outputs must not share memory: the kernels' dw and du are two rows of one (C-sized) buffer
    return dw.clone(), du.clone(), dk.contiguous(), dv.contiguous()


@_bi_wkv_backward_op.register_fake
def _(w, u, k, v, gy, backend):
    return w.new_empty(w.shape), u.new_empty(u.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    w, u, k, v, backend = inputs
    ctx.save_for_backward(w, u, k, v)
    ctx.backend = backend


def _backward(ctx, gy):
    w, u, k, v = ctx.saved_tensors
    dw, du, dk, dv = torch.ops.medurwkv.bi_wkv_backward(w, u, k, v, gy, ctx.backend)
    return dw, du, dk, dv, None


_bi_wkv_op.register_autograd(_backward, setup_context=_setup_context)
