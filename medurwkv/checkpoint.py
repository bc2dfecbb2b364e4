"""Safe reading of weight files: tensor-only, with errors that name the file and say what is wrong.

Official Vision-RWKV checkpoints are ``torch.save`` pickles (``{'state_dict': {...}, 'meta': {...}}``).
They are read with ``torch.load(weights_only=True)``, which refuses to execute or import anything: a file
that contains Python objects other than tensors, containers and plain numbers/strings is rejected, never
unpickled. The only globals allowed on top of torch's defaults are NumPy's array/scalar reconstructors,
which old mmcv checkpoints can hold in their ``meta`` (plain data, no code).
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .files import atomic_path

__all__ = [
    "CheckpointError",
    "load_weights",
    "unwrap_state_dict",
    "load_state_dict_strict",
    "model_name",
    "save_weights",
    "file_stamp",
    "sha256sum",
]

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A weights file that cannot be used: missing, corrupt, unsafe or of another model."""


def _numpy_safe_globals() -> list:
    import importlib

    import numpy as np

    multiarray = importlib.import_module("numpy.core.multiarray" if np.__version__ < "2" else "numpy._core.multiarray")
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "uint8", "bool")]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def _read_torch_file(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # garbage makes the unpickler raise almost anything (IndexError, struct.error, ...)
        if isinstance(e, MemoryError):
            raise
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg:
            found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", msg)
            raise CheckpointError(
                f"{path}: refused to load: the file contains pickled Python objects, not only tensors"
                f"{f' ({found.group(1)})' if found else ''}. Only tensor checkpoints (torch weights_only or "
                "safetensors) are accepted; nothing in it was executed."
            ) from None
        first = msg.splitlines()[0] if msg else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt? {type(e).__name__}: {first})") from None


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt? {e})") from None


def unwrap_state_dict(obj: Any, path: PathLike = "<checkpoint>") -> Dict[str, torch.Tensor]:
    """Return the tensor dict inside common checkpoint wrappers (``state_dict``, ``model``, ``module``).

    Non-tensor entries (e.g. ``num_batches_tracked`` stored as int, metadata) are dropped."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors (keys: {list(obj)[:8]})")
    return tensors


def load_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a weights file (``.safetensors`` or a ``torch.save`` file) as a flat ``{name: tensor}`` dict.

    Raises:
        CheckpointError: missing, truncated, corrupt, holding pickled objects, or holding no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors: 8-byte little-endian header length followed by a JSON object
    if path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        return _read_safetensors(path)
    return unwrap_state_dict(_read_torch_file(path), path)


def model_name(model: nn.Module) -> str:
    """The timm architecture of ``model`` (``vrwkv_tiny``) when it has one, else its class name (for messages)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a short ``CheckpointError`` naming ``source`` and
    listing what is missing, unexpected or of another shape (instead of torch's wall of keys)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:4])})")
        raise CheckpointError(f"{source}: weights do not fit {model_name(model)}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def save_weights(state_dict: Mapping[str, torch.Tensor], path: PathLike, metadata: Dict[str, str] | None = None) -> str:
    """Write tensor-only weights atomically (``medurwkv.files.atomic_path``) and return the file's sha256.

    ``.safetensors`` paths are written with safetensors (``metadata`` goes into its header); any other
    suffix with ``torch.save`` of a plain dict of tensors (loadable with ``weights_only=True``)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, tmp)
    return sha256sum(path)


def file_stamp(path: PathLike) -> Optional[Tuple[int, int]]:
    """``(mtime_ns, size)`` of a file, or of a folder (a DICOM series: the newest mtime of the folder and its
    files, their total size): what changes when the file or any file of the folder is rewritten, added or
    removed. None when ``path`` is gone."""
    try:
        st = os.stat(path)
        if not os.path.isdir(path):
            return (int(st.st_mtime_ns), int(st.st_size))
        newest, size = int(st.st_mtime_ns), 0
        with os.scandir(path) as entries:
            for e in entries:
                if e.is_file():
                    s = e.stat()
                    newest, size = max(newest, int(s.st_mtime_ns)), size + int(s.st_size)
        return (newest, size)
    except OSError:
        return None


def sha256sum(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
