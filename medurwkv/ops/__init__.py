"""The bidirectional WKV operator of Vision-RWKV.

``bi_wkv(w, u, k, v)`` is the one entry point the network uses: exact, differentiable in all four
inputs, computed in float32 (inputs of other floating dtypes are accepted and the result is returned in
``k``'s dtype). CUDA tensors go to the Triton kernels when Triton is importable; everything else runs the
PyTorch implementation, which is also the CPU path. ``bi_wkv_reference`` is the float64 O(T^2) oracle used
by the tests.
"""

from __future__ import annotations

import functools

import torch

from .biwkv import bi_wkv_reference, bi_wkv_torch

__all__ = ["bi_wkv", "bi_wkv_reference", "bi_wkv_torch", "triton_available"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the Triton kernels can be imported (they run on CUDA tensors only)."""
    try:
        from . import triton_biwkv  # noqa: F401
    except Exception:  # ImportError, or a Triton build without a usable backend
        return False
    return True


def _use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`bi_wkv` runs the Triton kernels for inputs on ``device`` with ``dtype``: CUDA tensors
    (float64 stays on the PyTorch path, which computes in float64) when Triton imports."""
    return device.type == "cuda" and dtype != torch.float64 and triton_available()


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV of Vision-RWKV.

    Args:
        w: (C,) ``spatial_decay / T``.
        u: (C,) ``spatial_first / T``.
        k: (B, T, C) keys.
        v: (B, T, C) values.

    Returns:
        (B, T, C) in ``k``'s dtype.
    """
    if _use_triton(k.device, k.dtype):
        from .triton_biwkv import bi_wkv_triton

        return bi_wkv_triton(w, u, k, v)
    return bi_wkv_torch(w, u, k, v)
