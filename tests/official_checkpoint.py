"""Deterministic stand-ins for the released Vision-RWKV checkpoints, for the parity tests.

The official weights are not downloaded in tests. Instead every tensor of a checkpoint is filled from its key
alone (``fill_tensor``), so a file with exactly the released layout can be rebuilt anywhere in seconds
(``make_official_checkpoint``). The expected outputs in ``tests/data/official/<variant>.safetensors`` were
computed once by running the *official* Vision-RWKV modules (OpenGVLab/Vision-RWKV @ 0e0e38a, float64, eval
mode, exact Bi-WKV) on these very checkpoints and on the inputs from ``make_input``. No official code is
needed or contained here: only key names and shapes (``<variant>.json``) and the fill rules below.

Fill rules (chosen so that activations stay in a trained-like, non-saturated regime through all 12 blocks,
and so that the tests are sensitive to the details that matter: decay sign and size, the position-embedding
resize, deformable sampling positions between pixels and outside the border):

* random numbers come from the raw 64-bit stream of ``np.random.default_rng(zlib.crc32(key))`` (PCG64
  bit-generator output is stable across NumPy versions) turned into uniforms, and near-normal noise ``n``
  (Irwin-Hall sum of 4 uniforms, unit variance, bounded by +-3.5; plain IEEE arithmetic, so the noise is
  bit-identical on every platform); tensors of more than 2^20 elements (only the decode head's 3x3 convs)
  repeat a 2^20-long block;
* linear / conv weights: ``gain * n / sqrt(fan_in)`` (gain 1; 2 for the spatial-mix key projection, so that
  the WKV weights ``e^k`` span a few orders of magnitude; sqrt(2) for SPM convolutions followed by BN+ReLU;
  0.3 for the deformable ``sampling_offsets``; 0.05 for the patch embedding, so that the tokens entering
  ``ln0`` (and the first injector's ``query_norm``) have a variance of ~3e-3 and a wrong LayerNorm eps shows;
  ``up`` is a ConvTranspose2d, fan_in = in_channels);
* LayerNorm / BatchNorm scale ``1 + 0.1 n``, biases ``0.05 n`` (``sampling_offsets.bias``: ``1.5 n`` pixels,
  ``attention_weights.bias``: ``0.3 n``, patch embedding ``0.01 n``); BN ``running_mean`` ``0.1 n``,
  ``running_var`` ``exp(0.3 n)``, ``num_batches_tracked`` = 160000 (int64); the adapter's output norms
  ``norm1..4`` get ``running_var`` ``12 exp(0.3 n)``, the variance of their inputs, as a trained model's
  running statistics would;
* ``spatial_decay[c] = -5 + 8 (c/(C-1))^(0.7 + 1.3 l/11) + 0.5 n`` (the official "fancy" curve of layer
  ``l``: negative for most channels, up to ~3, plus noise), ``spatial_first = ln 0.3 + 0.5 zigzag + 0.3 n``;
* ``spatial_mix_*`` uniform in (0.05, 0.95); layer scale ``gamma1/2 = 0.5 + 0.1 n``; injector ``gamma``
  ``0.1 + 0.03 n``; ``pos_embed`` ``0.02 n`` (a third of the patch tokens' size); ``level_embed`` ``0.3 n``.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["DATA_DIR", "VARIANTS", "fill_tensor", "load_spec", "make_input", "make_official_checkpoint"]

DATA_DIR = Path(__file__).resolve().parent / "data" / "official"
VARIANTS = ("vrwkv_tiny", "vrwkv_small", "vrwkv_adapter_tiny")
_DEPTH = 12  # all three variants have 12 blocks; used by the spatial_decay curve
_TILE = 1 << 20


def _uniform(key: str, n: int) -> np.ndarray:
    """n float64 uniforms in (0, 1) from the raw PCG64 stream seeded by crc32(key): each 64-bit draw gives
    two 32-bit halves (high half first)."""
    raw = np.random.default_rng(zlib.crc32(key.encode())).bit_generator.random_raw((n + 1) // 2)
    halves = np.stack([raw >> np.uint64(32), raw & np.uint64(0xFFFFFFFF)], axis=1).reshape(-1)[:n]
    return (halves.astype(np.float64) + 0.5) * 2.0**-32


def _normal(key: str, n: int) -> np.ndarray:
    """n approximately standard normals: Irwin-Hall sums of 4 uniforms, rescaled to unit variance. Only
    exact IEEE arithmetic (no libm calls), so the values are bit-identical on every platform. Beyond
    ``_TILE`` values a ``_TILE``-long block repeats (only the UperNet head's big 3x3 convolutions, which the
    backbone ignores, are that large; this keeps the checkpoint quick to build)."""
    if n > _TILE:
        return np.resize(_normal(key, _TILE), n)
    u = _uniform(key, 4 * n).reshape(4, n)
    return ((u[0] + u[1]) + (u[2] + u[3]) - 2.0) * math.sqrt(3.0)


def _layer_index(key: str) -> int:
    m = re.search(r"layers\.(\d+)\.", key)
    return int(m.group(1)) if m else 0


def fill_tensor(key: str, shape: Sequence[int]) -> torch.Tensor:
    """The deterministic value of checkpoint entry ``key`` (float32, or int64 for ``num_batches_tracked``)."""
    shape = tuple(int(s) for s in shape)
    parts = key.split(".")
    name = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    numel = int(np.prod(shape)) if shape else 1
    if name == "num_batches_tracked":
        return torch.full(shape, 160000, dtype=torch.int64)

    noise = _normal(key, numel)
    if name == "running_var":
        # the adapter's output norms see inputs of variance ~12 (sums of SPM, extractor and block features):
        # a trained model's running_var tracks that, so the maps f1..f4 come out near unit scale
        scale = 12.0 if re.fullmatch(r"backbone\.norm[1-4]", ".".join(parts[:-1])) else 1.0
        arr = scale * np.exp(0.3 * noise)
    elif name == "running_mean":
        arr = 0.1 * noise
    elif name.startswith("spatial_mix_"):
        arr = 0.05 + 0.9 * _uniform(key, numel)
    elif name == "spatial_decay":
        c = np.arange(numel, dtype=np.float64)
        ratio = _layer_index(key) / (_DEPTH - 1)
        arr = -5.0 + 8.0 * (c / (numel - 1)) ** (0.7 + 1.3 * ratio) + 0.5 * noise
    elif name == "spatial_first":
        c = np.arange(numel)
        arr = math.log(0.3) + 0.5 * (((c + 1) % 3) - 1) + 0.3 * noise
    elif name in ("gamma1", "gamma2"):
        arr = 0.5 + 0.1 * noise
    elif name == "gamma":
        arr = 0.1 + 0.03 * noise
    elif name == "pos_embed":
        arr = 0.02 * noise
    elif name == "level_embed":
        arr = 0.3 * noise
    elif name == "bias":
        scale = {"sampling_offsets": 1.5, "attention_weights": 0.3, "projection": 0.01}.get(parent, 0.05)
        arr = scale * noise
    elif name == "weight" and len(shape) == 1:  # LayerNorm / BatchNorm scale
        arr = 1.0 + 0.1 * noise
    elif name == "weight":
        if parent == "up":  # ConvTranspose2d(C, C, 2, stride 2): each output sees in_channels inputs
            fan_in = shape[0]
        else:
            fan_in = int(np.prod(shape[1:]))
        if parent == "key" and parts[-3] == "att":
            gain = 2.0
        elif parent == "projection":  # patch embedding: small tokens, so ln0's eps matters (see above)
            gain = 0.05
        elif parent == "sampling_offsets":
            gain = 0.3
        elif ".spm." in f".{key}" and len(shape) == 4 and not parent.startswith("fc"):
            gain = math.sqrt(2.0)
        else:
            gain = 1.0
        arr = gain * noise / math.sqrt(fan_in)
    else:
        raise KeyError(f"no fill rule for checkpoint key {key!r}")
    return torch.from_numpy(arr.astype(np.float32).reshape(shape))


def load_spec(variant: str) -> dict:
    """The committed description of ``variant``: checkpoint keys/shapes, inputs and stored outputs."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    with open(DATA_DIR / f"{variant}.json") as f:
        return json.load(f)


def make_official_checkpoint(variant: str, path) -> Path:
    """Write a checkpoint laid out like the released file of ``variant`` to ``path`` (torch.save).

    ``{'state_dict': {'backbone.*', 'head.fc.*'}, 'meta': {...}}`` for the ImageNet classifiers and
    ``{'state_dict': {'backbone.*', 'decode_head.*', 'auxiliary_head.*'}, 'meta': {...}}`` for the ADE20K
    UperNet model; float32 tensors, BN counters int64.
    """
    spec = load_spec(variant)
    state_dict = {key: fill_tensor(key, shape) for key, shape in spec["keys"].items()}
    path = Path(path)
    torch.save({"state_dict": state_dict, "meta": dict(spec["checkpoint_meta"])}, path)
    return path


def make_input(variant: str, name: str) -> torch.Tensor:
    """Deterministic float32 image batch ``name`` ('HxW', batch 1) of ``variant``: N(0, 1) noise, the range
    of a mean/std-normalised image."""
    h, w = (int(s) for s in name.split("x"))
    arr = _normal(f"{variant}/input/{name}", 3 * h * w).astype(np.float32)
    return torch.from_numpy(arr.reshape(1, 3, h, w))
