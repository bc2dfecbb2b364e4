"""MONAI transforms specific to Med-URWKV's slice-wise pipeline: loading volumes with errors that name the file.

The bundle (``bundle/configs/*.json``) uses standard MONAI transforms everywhere except for loading:
:class:`LoadVolumed` is MONAI's ``LoadImaged`` (so MONAI Label, which looks for ``LoadImaged`` instances,
still recognises it) plus checks that turn a bad input into one :class:`VolumeError` whose message starts
with the file's path and says what is wrong:

* a missing file or DICOM folder, an unreadable or corrupt file (truncated gzip, wrong format);
* a 4D (or multi-channel) volume where one 3D volume or 2D image is expected;
* NaN or infinite intensities;
* a label with values outside ``0 .. num_classes - 1``, or with no foreground voxel.

:func:`check_datalist` runs the same loader over a whole datalist before a workflow starts, so that a bad case
stops training or inference before anything is written (``models/model.pt`` and earlier outputs stay as they
are) and the error reaches the user unwrapped (MONAI's ``Compose`` re-raises errors inside the pipeline as
``RuntimeError("applying transform ...")``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Hashable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged
from monai.utils import ensure_tuple

__all__ = ["VolumeError", "LoadVolumed", "check_datalist", "OutputNames"]

logger = logging.getLogger(__name__)


class VolumeError(ValueError):
    """An input image or label that cannot be used. The message starts with the file's path."""


def _describe(path: Any) -> str:
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    if isinstance(path, (list, tuple)) and path and all(isinstance(p, (str, os.PathLike)) for p in path):
        return f"{os.fspath(path[0])} (+{len(path) - 1} more files)"
    return f"<in-memory {type(path).__name__}>"


def _first_line(e: BaseException, limit: int = 300) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class LoadVolumed(LoadImaged):
    """``LoadImaged`` that validates what it loads and names the file in every error.

    Args:
        keys: keys of the image (and label) paths; a path is a NIfTI/NRRD/... file, a DICOM series folder
            (read with ITK when ``reader`` is left to MONAI's choice or set to ``"ITKReader"``) or a 2D image.
        label_keys: which of ``keys`` are labels (integer class maps).
        num_classes: labels must hold values in ``0 .. num_classes - 1`` (not checked when None).
        allow_empty_label: accept labels without any foreground voxel (off: an empty brain mask is a mistake).
        channels: the number of channels each key must have after loading (1: a single 3D volume or 2D image;
            a 4D time series or an RGB image is rejected).
        check_finite: reject images containing NaN or infinite values.
        reader, image_only, ...: as ``LoadImaged``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: Any = None,
        label_keys: Union[KeysCollection, None] = None,
        num_classes: Optional[int] = None,
        allow_empty_label: bool = False,
        channels: Optional[int] = 1,
        check_finite: bool = True,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, reader=reader, allow_missing_keys=allow_missing_keys, **kwargs)
        self.label_keys = set(ensure_tuple(label_keys)) if label_keys is not None else set()
        unknown = self.label_keys - set(self.keys)
        if unknown:
            raise ValueError(f"label_keys {sorted(map(str, unknown))} are not among keys {list(self.keys)}")
        self.num_classes = num_classes
        self.allow_empty_label = allow_empty_label
        self.channels = channels
        self.check_finite = check_finite

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            src = d[key]
            where = _describe(src)
            if isinstance(src, (str, os.PathLike)) and not os.path.exists(src):
                raise VolumeError(f"{where}: no such file or directory (the '{key}' of this case)")
            try:
                loaded = self._loader(src, reader)
            except VolumeError:
                raise
            except Exception as e:  # reader errors: corrupt/truncated file, unknown format, empty DICOM folder
                raise VolumeError(f"{where}: cannot read the '{key}' ({_first_line(e)})") from None
            if self._loader.image_only:
                img = loaded
            else:
                img, meta = loaded
                meta_key = meta_key or f"{key}_{meta_key_postfix}"
                if meta_key in d and not self.overwriting:
                    raise KeyError(f"Metadata with key {meta_key} already exists and overwriting=False.")
                d[meta_key] = meta
            self._check(img, key, where)
            d[key] = img
        return d

    def _check(self, img: Any, key: Hashable, where: str) -> None:
        meta = img.meta if isinstance(img, MetaTensor) else {}
        shape = tuple(img.shape)
        channel_dim = meta.get("original_channel_dim", "no_channel")
        has_channel = not (isinstance(channel_dim, str) or channel_dim is None or (isinstance(channel_dim, float) and np.isnan(channel_dim)))
        spatial = len(shape) - (1 if has_channel else 0)
        n_channels = int(shape[int(channel_dim)]) if has_channel else 1
        if spatial not in (2, 3) or (spatial == 3 and len(shape) > 4):
            raise VolumeError(f"{where}: the '{key}' has shape {shape}; expected a 3D volume or a 2D image")
        if self.channels is not None and n_channels != self.channels:
            kind = "a 4D volume (a series of 3D volumes)" if spatial == 3 else f"a {n_channels}-channel 2D image"
            raise VolumeError(
                f"{where}: the '{key}' is {kind} of shape {shape}; expected {self.channels} channel(s): one 3D volume "
                "or one 2D image per file (split the series, or pick the volume to segment)"
            )
        if spatial == 2 and isinstance(img, MetaTensor):
            # MONAI orients 2D images with the x-y block of their affine: a slice lying in another world plane
            # (e.g. a coronal slice saved as a 2D NIfTI) has no x-y orientation and would fail obscurely
            a = np.asarray(img.affine, dtype=np.float64)[:2, :2]
            if abs(np.linalg.det(a)) <= 1e-6 * max(float(np.abs(a).max()), 1e-12) ** 2:
                raise VolumeError(
                    f"{where}: the '{key}' is a 2D image whose plane is not axial (x-y block of its affine: {a.tolist()}); "
                    "save it as a one-slice 3D volume or as an axial 2D image"
                )
        t = torch.as_tensor(img)
        if key in self.label_keys:
            self._check_label(t, key, where)
        elif self.check_finite and t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise VolumeError(f"{where}: the '{key}' contains {bad} NaN or infinite value(s) out of {t.numel()}")

    def _check_label(self, t: torch.Tensor, key: Hashable, where: str) -> None:
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                raise VolumeError(f"{where}: the '{key}' contains NaN or infinite values; expected a class map")
            if not bool((t == t.round()).all()):
                raise VolumeError(f"{where}: the '{key}' holds non-integer values; expected a class map (0 = background)")
        lo, hi = (int(v) for v in torch.aminmax(t.to(torch.float32)))
        if lo < 0 or (self.num_classes is not None and hi >= self.num_classes):
            raise VolumeError(
                f"{where}: the '{key}' holds values {lo}..{hi}; expected classes 0..{(self.num_classes or 1) - 1}"
            )
        if not self.allow_empty_label and hi == 0:
            raise VolumeError(f"{where}: the '{key}' is empty (no foreground voxel); a mask with no structure cannot be learned or scored")


def check_datalist(data: Iterable[Mapping[Hashable, Any]], loader: LoadVolumed, name: str = "datalist") -> int:
    """Load every case of ``data`` with ``loader`` (a :class:`LoadVolumed`) and raise the first problem as a
    :class:`VolumeError` naming the file. Returns the number of cases checked.

    Used in the bundle's ``initialize`` so that bad inputs stop a workflow before it writes anything."""
    if not isinstance(loader, LoadVolumed):
        raise TypeError(f"check_datalist needs a medurwkv.transforms.LoadVolumed loader, got {type(loader).__name__}")
    try:
        items: Sequence = list(data)
        if not items:
            raise VolumeError(f"{name}: no cases (empty list); check --dataset_dir / --datalist")
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise VolumeError(f"{name}: case {i} is {item!r}, expected a dict such as {{'image': path}}")
            missing = [k for k in loader.keys if k not in item]
            if missing and not loader.allow_missing_keys:
                raise VolumeError(f"{name}: case {i} ({item}) has no {missing} entry")
            loader(item)
    except VolumeError as e:
        logger.error(f"{name}: {e}")  # one clear line in the log, before MONAI's wrapped traceback
        raise
    logger.info(f"{name}: {len(items)} case(s) checked")
    return len(items)


def _stem(path: str) -> str:
    """The part of ``path``'s base name that MONAI's ``SaveImage`` keeps (``create_file_basename``): one extension
    removed, two for ``.gz``."""
    name, ext = os.path.splitext(os.path.basename(os.path.normpath(str(path))))
    if ext == ".gz":
        name, _ = os.path.splitext(name)
    return name


class OutputNames:
    """``output_name_formatter`` for MONAI's ``SaveImage(d)`` that never lets two inputs of one run write the same file.

    MONAI names an output after its input's base name, so ``case1/t1.nii.gz`` and ``case2/t1.nii.gz`` (or ``t1.nii``
    beside ``t1.nii.gz``, or a DICOM folder ``t1`` beside ``t1.nii.gz``) would all become ``t1_seg.nii.gz`` and each
    would silently overwrite the one before. Inputs whose base name is unique keep MONAI's usual name; inputs that
    share one get, in front, the folder names below the folders they have in common (``case1_t1_seg.nii.gz``,
    ``case2_t1_seg.nii.gz``), and a number where even the folders agree (``t1_1_seg``, ``t1_2_seg``).

    ``datalist``: the run's inputs, as paths or as dicts holding the path under ``key``."""

    def __init__(self, datalist: Iterable[Any], key: str = "image"):
        paths = [item[key] if isinstance(item, Mapping) else item for item in datalist]
        paths = [os.path.abspath(os.path.normpath(str(p))) for p in paths if isinstance(p, (str, os.PathLike))]
        groups: dict = {}
        for p in dict.fromkeys(paths):  # unique, in datalist order
            groups.setdefault(_stem(p), []).append(p)
        self.names: dict = {}
        for stem, members in groups.items():
            if len(members) == 1:
                continue
            parents = [os.path.dirname(p).split(os.sep) for p in members]
            common = 0
            while all(len(x) > common for x in parents) and len({x[common] for x in parents}) == 1:
                common += 1
            candidates = ["_".join([part for part in x[common:] if part] + [stem]) for x in parents]
            if len(set(candidates)) < len(candidates):
                candidates = [f"{c}_{i}" for i, c in enumerate(candidates, start=1)]
            self.names.update(zip(members, candidates))
        if self.names:
            logger.info(f"inputs share base names; outputs renamed: {self.names}")

    def __call__(self, metadict: Optional[Mapping], saver: Any) -> dict:
        from monai.data.folder_layout import default_name_formatter

        kw = default_name_formatter(dict(metadict) if metadict else {}, saver)
        key = os.path.abspath(os.path.normpath(kw["subject"]))
        if key in self.names:  # a ".nii.gz" that SaveImage strips again, so dots inside the new name survive
            kw["subject"] = self.names[key] + ".nii.gz"
        return kw
