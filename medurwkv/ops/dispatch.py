"""Which implementation computes ``bi_wkv``, and the guard that keeps a failing GPU kernel from breaking a run.

Backends (argument ``backend`` of :func:`medurwkv.ops.bi_wkv`, else the environment variable
``MEDURWKV_BIWKV_BACKEND``, else ``auto``):

* ``torch``: always the PyTorch path (:func:`medurwkv.ops.biwkv.bi_wkv_torch`); Triton is never imported.
* ``auto``: CUDA tensors (not float64) run the Triton kernels, guarded. The first launch per
  (device, dtype, T-split or not) is checked: a compile or launch error, or a result that differs from the
  float64 PyTorch path on a probe (batch 0 and up to 64 channels; tolerance 1e-4 for float32 inputs, 2e-2
  for bf16/fp16, relative to max(1, |reference|)), disables the kernels for the rest of the process with one
  logged warning that names the cause and the switch; that call and every later one use the PyTorch path.
  The first backward per key is checked the same way (dk, dv and, when the probe covers the whole batch,
  dw, du); a failing backward returns the PyTorch path's gradients. Problems beyond the kernels' limits
  (``triton_biwkv.kernel_limit``) and float64 inputs go to the PyTorch path without a warning.
* ``triton``: the same kernels and checks, but a failure raises :class:`BiWKVBackendError` instead of falling
  back, and limits raise ``ValueError``. CPU tensors are accepted only when the kernels were loaded under
  ``TRITON_INTERPRET=1``.

The check costs one float64 PyTorch evaluation of the probe per process and key (and one float64 backward
on the first backward); after that the guarded path is a set lookup per call. Under ``torch.compile`` the
backward is :func:`bi_wkv_vjp`, which takes the same routes with the same checks.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from typing import Optional

import torch

from .biwkv import _check_shapes, bi_wkv_torch

__all__ = ["BACKEND_ENV", "BACKENDS", "BiWKVBackendError", "resolve_backend", "triton_available", "bi_wkv_eager", "bi_wkv_vjp"]

BACKEND_ENV = "MEDURWKV_BIWKV_BACKEND"
BACKENDS = ("auto", "torch", "triton")
FORWARD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
PROBE_CHANNELS = 32  # the first and the last PROBE_CHANNELS channels (every channel block kind: full, ragged)
PROBE_ELEMENTS = 2**20  # at most ~this many (batch, token, channel) entries per probe: the check stays cheap

logger = logging.getLogger(__name__)


class BiWKVBackendError(RuntimeError):
    """The Triton backend was forced (``MEDURWKV_BIWKV_BACKEND=triton``) and failed or computed wrong values."""


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the Triton kernels can be imported (they run on CUDA tensors only)."""
    try:
        from . import triton_biwkv  # noqa: F401
    except Exception:  # ImportError, or a Triton build without a usable backend
        return False
    return True


def resolve_backend(backend: Optional[str] = None) -> str:
    """``backend`` if given, else ``$MEDURWKV_BIWKV_BACKEND``, else ``"auto"``; validated."""
    source = "backend" if backend is not None else BACKEND_ENV
    name = backend if backend is not None else os.environ.get(BACKEND_ENV, "")
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a Bi-WKV backend; use one of {', '.join(BACKENDS)}")
    return name


class _Guard:
    """Process-wide record of the first-launch checks (keys: (device, dtype, T-split))."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.disabled: Optional[str] = None  # the cause, once the kernels failed in auto mode
        self.forward_ok: set = set()
        self.backward_ok: set = set()

    def disable(self, cause: str) -> None:
        with self.lock:
            first = self.disabled is None
            if first:
                self.disabled = cause
        if first:
            logger.warning(
                "Bi-WKV: the Triton kernels are switched off for this process and the exact PyTorch path is "
                "used instead (%s). Results are unaffected; only speed is. Set %s=torch to skip the kernels, or "
                "%s=triton to make this an error.", cause, BACKEND_ENV, BACKEND_ENV,
            )


_GUARD = _Guard()


def _reset_guard() -> None:
    """Forget every check and re-enable the kernels (tests)."""
    global _GUARD
    _GUARD = _Guard()


def _describe(exc: BaseException) -> str:
    """Exception type and first message line, without file-system paths (logs must not name server paths)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = re.sub(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-+@~]+){2,}[/\\]?", "<path>", text)[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _triton_device(device: torch.device) -> bool:
    """Whether auto mode sends tensors on ``device`` to the kernels."""
    return device.type == "cuda"


def _probe(B: int, T: int, C: int, whole_batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch indices, channel indices) checked against the float64 path: channels are independent, so
    the first and last PROBE_CHANNELS stand for all; the budget caps tokens x channels (x batch)."""
    cols = sorted(set(range(min(C, PROBE_CHANNELS))) | set(range(max(0, C - PROBE_CHANNELS), C)))
    rows = list(range(B)) if whole_batch and B * T * len(cols) <= PROBE_ELEMENTS else [0]
    n = max(2, PROBE_ELEMENTS // (T * len(rows)))
    if len(cols) > n:  # long sequences: fewer channels, still from both ends (full and ragged blocks)
        cols = cols[: n // 2] + cols[len(cols) - (n - n // 2):]
    return torch.tensor(rows), torch.tensor(cols)


def _max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    if got.numel() == 0:
        return 0.0
    return float((got.double() - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def _check_forward(w, u, k, v, y) -> Optional[str]:
    """None if ``y`` (the kernels' output) matches the float64 path on the probe, else the cause."""
    B, T, C = k.shape
    rows, cols = _probe(B, T, C, whole_batch=False)
    rows, cols = rows.to(k.device), cols.to(k.device)
    with torch.no_grad():
        sub = [w[cols], u[cols], k[rows][:, :, cols], v[rows][:, :, cols]]
        ref = bi_wkv_torch(*(t.double() for t in sub))
        err = _max_rel_err(y[rows][:, :, cols], ref)
    tol = FORWARD_TOL.get(y.dtype, 2e-2)
    if err > tol:
        return f"the first {str(y.dtype).removeprefix('torch.')} result differs from the float64 PyTorch path by {err:.3g} (> {tol:g})"
    return None


def _vjp_torch(inputs, gy):
    """Gradients of the PyTorch path. ``torch.func`` rather than ``autograd.grad``: this runs inside a
    backward, and inside the compiled backward's custom op, where autograd records nothing."""
    y, vjp = torch.func.vjp(bi_wkv_torch, *(t.detach() for t in inputs))
    return vjp(gy.to(y.dtype))


def _check_backward(inputs, gy, grads) -> Optional[str]:
    """None if the kernels' gradients match float64 autograd through the PyTorch path on the probe."""
    w, u, k, v = inputs
    B, T, C = k.shape
    rows, cols = _probe(B, T, C, whole_batch=True)
    whole = len(rows) == B
    rows, cols = rows.to(k.device), cols.to(k.device)
    sub = [t.double() for t in (w[cols], u[cols], k[rows][:, :, cols], v[rows][:, :, cols])]
    ref = _vjp_torch(sub, gy[rows][:, :, cols].double())
    dw, du, dk, dv = grads
    got = {"dk": (dk[rows][:, :, cols], ref[2]), "dv": (dv[rows][:, :, cols], ref[3])}
    if whole:  # dw, du sum over the batch: comparable only when the probe holds every batch element
        got.update(dw=(dw[cols], ref[0]), du=(du[cols], ref[1]))
    tol = FORWARD_TOL.get(k.dtype, 2e-2)
    for name, (g, r) in got.items():
        err = _max_rel_err(g, r)
        if err > tol:
            return f"the first backward's {name} differs from the float64 PyTorch path by {err:.3g} (> {tol:g})"
    return None


def _fail(backend: str, cause: str, exc: Optional[BaseException] = None) -> None:
    """auto: switch the kernels off (one warning). triton: raise."""
    if backend == "triton":
        raise BiWKVBackendError(f"Bi-WKV Triton kernels ({BACKEND_ENV}=triton): {cause}") from exc
    _GUARD.disable(cause)


def _backward_hook(key, backend: str):
    def hook(inputs, gy, grads, error):
        if error is None and key in _GUARD.backward_ok:
            return grads
        if error is None:
            try:
                cause = _check_backward(inputs, gy, grads)
            except Exception as exc:  # the check itself must not break the step either
                cause, error = f"the first backward's check failed: {_describe(exc)}", exc
        else:
            cause = f"the first backward failed: {_describe(error)}"
        if cause is None:
            _GUARD.backward_ok.add(key)
            return grads
        _fail(backend, cause, error)
        return _vjp_torch(inputs, gy)

    return hook


def _triton_key(w, u, k, v, backend: str):
    """(key, launch config) of the kernels for these inputs, or None where the PyTorch path must run
    (limits; ``triton`` raises there)."""
    from . import triton_biwkv as tb

    B, T, C = k.shape
    cfg = tb.launch_config(B, T, C, k.device)
    limit = tb.kernel_limit(B, T, C, cfg)
    if limit is not None:
        if backend == "triton":
            raise ValueError(f"bi_wkv: the Triton kernels cannot run (B, T, C) = {(B, T, C)}: {limit}; "
                             f"use {BACKEND_ENV}=auto or torch")
        return None
    kdt = k.dtype if v.dtype == k.dtype else torch.float32  # the dtype the kernels read
    return (str(k.device), kdt, cfg.split)


def _run_triton(w, u, k, v, backend: str) -> Optional[torch.Tensor]:
    """The guarded kernels' result, or None where the PyTorch path must compute it."""
    from . import triton_biwkv as tb

    key = _triton_key(w, u, k, v, backend)
    if key is None:
        return None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v))
    hook = _backward_hook(key, backend) if grad and key not in _GUARD.backward_ok else None
    if key in _GUARD.forward_ok:
        return tb.bi_wkv_triton(w, u, k, v, backward_hook=hook)
    try:
        y = tb.bi_wkv_triton(w, u, k, v, backward_hook=hook)
        cause = _check_forward(w, u, k, v, y)
    except Exception as exc:  # compiler, launcher, driver, cache folder: anything the first launch raises
        _fail(backend, f"the first launch failed: {_describe(exc)}", exc)
        return None
    if cause is not None:
        _fail(backend, cause)
        return None
    _GUARD.forward_ok.add(key)
    return y


def _route(w, u, k, v, backend: Optional[str]) -> str:
    """"torch" or "triton" for these inputs (raises for an impossible forced ``triton``)."""
    if backend == "torch":
        return "torch"
    _check_shapes(w, u, k, v)
    f64 = any(t.dtype == torch.float64 for t in (w, u, k, v))  # the PyTorch path computes these in float64
    if backend == "triton":
        if f64:
            raise ValueError(f"bi_wkv: float64 inputs are computed by the PyTorch path; use {BACKEND_ENV}=auto or torch")
        if not triton_available():
            raise BiWKVBackendError(f"{BACKEND_ENV}=triton, but Triton cannot be imported")
        from . import triton_biwkv as tb

        if not (k.device.type == "cuda" or tb.interpreted()):
            raise ValueError(f"{BACKEND_ENV}=triton needs CUDA tensors (or TRITON_INTERPRET=1), got {k.device}")
        return "triton"
    if f64 or not _triton_device(k.device) or _GUARD.disabled is not None:
        return "torch"
    if not triton_available():  # a CUDA run without its kernels: say so once, it is only slower
        _GUARD.disable("Triton cannot be imported")
        return "torch"
    return "triton"


def bi_wkv_vjp(w, u, k, v, gy, backend: Optional[str] = None):
    """``(dw, du, dk, dv)`` of ``bi_wkv`` for the output gradient ``gy``, by the implementation the forward
    would use (the kernels' first backward is checked as in eager mode). Used by the compiled backward."""
    backend = resolve_backend(backend)
    if _route(w, u, k, v, backend) == "triton":
        from . import triton_biwkv as tb

        key = _triton_key(w, u, k, v, backend)
        if key is not None:
            hook = _backward_hook(key, backend) if key not in _GUARD.backward_ok else None
            try:
                return tb.bi_wkv_triton_vjp(w, u, k, v, gy, backward_hook=hook)
            except BiWKVBackendError:
                raise
            except Exception as exc:  # the forward kernel of the recomputation failed
                _fail(backend, f"the first launch failed: {_describe(exc)}", exc)
    return _vjp_torch((w, u, k, v), gy)


def bi_wkv_eager(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """``bi_wkv`` outside ``torch.compile``: picks the implementation (see the module docstring)."""
    backend = resolve_backend(backend)
    if _route(w, u, k, v, backend) == "torch":
        return bi_wkv_torch(w, u, k, v)
    y = _run_triton(w, u, k, v, backend)
    return bi_wkv_torch(w, u, k, v) if y is None else y
