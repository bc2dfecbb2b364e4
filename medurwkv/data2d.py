"""2D image segmentation data: datalists from image/mask folders, and a loader for PNG/JPEG/BMP pairs.

Used by the 2D bundle (``bundle2d/configs/*.json``), ``python -m medurwkv datalist`` and
``sample_data/build_2d.py``.

**Datalists** (:func:`build_datalist`). Images and masks are paired by name: the mask of ``NAME.ext`` is
``NAME<mask_suffix>.<any image ext>`` in the masks folder. This covers the paper's datasets:

===========  ============================================  =====================================
layout       files                                         arguments
===========  ============================================  =====================================
ISIC         ``ISIC_0000000.jpg`` + ``ISIC_0000000_segmentation.png``   ``--mask-suffix _segmentation``
Kvasir-SEG   ``images/x.jpg`` + ``masks/x.jpg``             (no suffix)
BUSI         ``benign (1).png`` + ``benign (1)_mask.png``, one folder   ``--mask-suffix _mask``
GlaS         ``train_1.bmp`` + ``train_1_anno.bmp``, one folder          ``--mask-suffix _anno``
===========  ============================================  =====================================

Anything not paired (an image without mask, a mask without image, two files with one name) is refused with
the names listed. The split is a seeded shuffle of the sorted names, so the same folders, fractions and seed
give the same lists on every machine.

**Loading** (:class:`LoadImage2dd`). MONAI's ``LoadImaged`` with its PIL reader (so arrays are in MONAI's
(W, H) order and ``SaveImaged`` writes them back the same way), plus one rule for each kind of input, and an
error naming the file for anything else:

* images: RGB stays RGB; grayscale (one channel, or three equal channels, or a grey palette) is replicated
  to three channels when ``channels=3`` (the pretrained RGB stem is used unchanged); alpha is dropped;
  8-bit values are divided by 255 and 16-bit values by 65535, so images reach the network in [0, 1].
* masks, to class indices ``0 .. num_classes - 1``: an index mask as is; with two classes a 0/255 mask (255 ->
  1), and a JPEG mask (lossy, e.g. Kvasir-SEG) thresholded at 128; ``label_map="nonzero"`` maps every
  non-zero value to 1 (instance maps such as GlaS); a dict ``{class: grey value or [r, g, b]}`` maps the
  values or colours of a colour mask. A value outside the map, or a mask whose size differs from its image's,
  is a :class:`~medurwkv.transforms.VolumeError` naming the mask.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.image_reader import PILReader
from monai.transforms import EnsureChannelFirst

from .transforms import LoadVolumed, VolumeError, _describe

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatalistError",
    "pair_images",
    "split_cases",
    "build_datalist",
    "write_datalist",
    "LoadImage2dd",
    "channel_def",
    "imagenet_stats",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LOSSY_FORMATS = ("JPEG", "MPO")
# the statistics the ImageNet-pretrained Vision-RWKV stems were trained with (bundle2d's NormalizeIntensityd)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatalistError(ValueError):
    """Image and mask folders that do not pair up, or a bad split. The message lists the names."""


def _list_names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _images_in(folder: Path) -> List[Path]:
    if not folder.is_dir():
        raise DatalistError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def pair_images(images: Union[str, Path], masks: Union[str, Path], mask_suffix: str = "") -> List[Dict[str, str]]:
    """Pair every image in ``images`` with its mask ``<stem><mask_suffix>.<ext>`` in ``masks``.

    When both are the same folder (BUSI, GlaS), the files whose stem ends with ``mask_suffix`` are the masks.
    Returns ``[{"image": path, "label": path}, ...]`` sorted by image name; raises :class:`DatalistError`
    listing every unpaired or ambiguous name."""
    images, masks = Path(images), Path(masks)
    same = images.resolve() == masks.resolve()
    if same and not mask_suffix:
        raise DatalistError(f"{images}: images and masks share one folder, so --mask-suffix is needed (e.g. _mask, _anno)")
    image_files = _images_in(images)
    mask_files = _images_in(masks)
    if same:
        mask_files = [p for p in image_files if p.stem.endswith(mask_suffix)]
        image_files = [p for p in image_files if not p.stem.endswith(mask_suffix)]
    by_stem: Dict[str, List[Path]] = {}
    for p in mask_files:
        by_stem.setdefault(p.stem, []).append(p)
    problems: List[str] = []
    dup_images: Dict[str, List[Path]] = {}
    for p in image_files:
        dup_images.setdefault(p.stem, []).append(p)
    for stem, ps in dup_images.items():
        if len(ps) > 1:
            problems.append(f"images with one name: {_list_names([p.name for p in ps])}")
    pairs, used = [], set()
    missing = []
    for p in image_files:
        want = p.stem + mask_suffix
        found = by_stem.get(want, [])
        if len(found) > 1:
            problems.append(f"{p.name} has several masks: {_list_names([m.name for m in found])}")
        elif not found:
            missing.append(p.name)
        else:
            pairs.append({"image": str(p), "label": str(found[0])})
            used.add(want)
    if missing:
        problems.append(f"{len(missing)} image(s) without a mask '<name>{mask_suffix}.<ext>' in {masks}: {_list_names(missing)}")
    orphans = [m.name for stem, ms in by_stem.items() if stem not in used for m in ms]
    orphans = [n for n in orphans if not any(n in q for q in problems)]
    if orphans:
        problems.append(f"{len(orphans)} mask(s) without an image in {images}: {_list_names(sorted(orphans))}")
    if problems:
        raise DatalistError("unmatched image/mask pairs (nothing written):\n  " + "\n  ".join(problems))
    if not pairs:
        raise DatalistError(f"{images}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return pairs


def split_cases(cases: Sequence[Any], split: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> Dict[str, list]:
    """Seeded shuffle of ``cases`` cut into ``training`` / ``validation`` / ``test`` by the fractions ``split``
    (normalised to sum 1; a zero fraction gives an empty list). Each non-zero fraction gets at least one case
    when there are enough cases."""
    fr = [float(f) for f in split]
    if len(fr) != 3 or any(f < 0 for f in fr) or sum(fr) <= 0 or fr[0] <= 0:
        raise DatalistError(f"split needs three fractions >= 0 (training > 0), e.g. 0.7,0.1,0.2; got {list(split)}")
    total = sum(fr)
    fr = [f / total for f in fr]
    n = len(cases)
    order = list(cases)
    random.Random(seed).shuffle(order)
    counts = [int(round(f * n)) for f in fr]
    for i in (1, 2):  # a requested validation/test list is never empty while training keeps >= 1 case
        if fr[i] > 0 and counts[i] == 0 and n - sum(counts) + counts[0] > 1:
            counts[i] = 1
    counts[0] = n - counts[1] - counts[2]
    if counts[0] < 1:
        raise DatalistError(f"{n} case(s) cannot be split {list(split)} with at least one training case")
    a, b = counts[0], counts[0] + counts[1]
    return {"training": order[:a], "validation": order[a:b], "test": order[b:]}


def build_datalist(
    images: Union[str, Path],
    masks: Union[str, Path],
    out: Union[str, Path],
    mask_suffix: str = "",
    split: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    labels: Optional[Mapping[str, str]] = None,
) -> dict:
    """Pair images and masks (:func:`pair_images`), split them (:func:`split_cases`) and write a MONAI datalist
    (``load_decathlon_datalist`` format, paths relative to ``out``'s folder) atomically to ``out``."""
    out = Path(out)
    pairs = pair_images(images, masks, mask_suffix)
    base = out.resolve().parent
    rel = [{k: os.path.relpath(Path(v).resolve(), base) for k, v in p.items()} for p in pairs]
    lists = split_cases(rel, split, seed)
    datalist: dict = {
        "description": (
            f"pairs of {os.path.relpath(Path(images).resolve(), base)}/ and {os.path.relpath(Path(masks).resolve(), base)}/ "
            f"(mask suffix {mask_suffix!r}), split {[float(f) for f in split]}, seed {seed}"
        ),
    }
    if labels:
        datalist["labels"] = {str(k): str(v) for k, v in labels.items()}
    datalist.update({"numTraining": len(lists["training"]), **{k: sorted(v, key=lambda e: e["image"]) for k, v in lists.items()}})
    write_datalist(datalist, out)
    return datalist


def write_datalist(datalist: Mapping, out: Union[str, Path]) -> None:
    """Write ``datalist`` as indented JSON through a temporary file and ``os.replace``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(datalist, indent=2) + "\n")
    os.replace(tmp, out)


def channel_def(meta_file: Union[str, Path]) -> List[str]:
    """Class names, in index order, from a bundle's ``metadata.json`` (``network_data_format#outputs#pred#channel_def``:
    keys ``"0" .. "N-1"``). The 2D bundle takes its number of classes from here."""
    try:
        meta = json.loads(Path(meta_file).read_text())
        cd = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_file}: cannot read network_data_format#outputs#pred#channel_def ({type(e).__name__}: {e})") from None
    keys = sorted(cd, key=lambda k: int(k) if str(k).isdigit() else -1)
    if [str(k) for k in keys] != [str(i) for i in range(len(cd))] or len(cd) < 2:
        raise ValueError(f"{meta_file}: channel_def keys must be '0' .. 'N-1' with N >= 2 (background is '0'), got {list(cd)}")
    return [str(cd[k]) for k in keys]


def imagenet_stats(channels: int = 3) -> Tuple[List[float], List[float]]:
    """ImageNet mean and std for ``channels`` input channels (1: the averages, for a grayscale stem)."""
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if channels == 1:
        return [float(np.mean(IMAGENET_MEAN))], [float(np.mean(IMAGENET_STD))]
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def _pil_mode(img: Any) -> Any:
    """PIL converter: palette images become RGB(A) (grey palettes then read as grayscale), 1-bit become 8-bit."""
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode == "1":
        return img.convert("L")
    if img.mode == "CMYK":
        return img.convert("RGB")
    return img


def _parse_label_map(label_map: Any, num_classes: Optional[int]) -> Any:
    if label_map is None or isinstance(label_map, str):
        if isinstance(label_map, str) and label_map != "nonzero":
            raise ValueError(f"label_map must be None, 'nonzero' or a dict {{class: value or [r, g, b]}}, got {label_map!r}")
        if label_map == "nonzero" and num_classes not in (None, 2):
            raise ValueError(f"label_map='nonzero' makes binary masks, but num_classes is {num_classes}")
        return label_map
    parsed = []
    for cls, value in dict(label_map).items():
        c = int(cls)
        if num_classes is not None and not 0 <= c < num_classes:
            raise ValueError(f"label_map class {cls} is outside 0..{num_classes - 1}")
        v = tuple(int(x) for x in value) if isinstance(value, (list, tuple)) else (int(value),)
        if len(v) not in (1, 3):
            raise ValueError(f"label_map value of class {cls} must be a grey value or [r, g, b], got {value!r}")
        parsed.append((c, v))
    if len({v for _, v in parsed}) < len(parsed):
        raise ValueError(f"label_map gives one value to several classes: {label_map}")
    return parsed


class LoadImage2dd(LoadVolumed):
    """Load 2D images and masks (PNG, JPEG, BMP, TIFF) channel-first, by the rules in this module's docstring.

    Args:
        keys: image and label keys.
        label_keys: which keys are masks (converted to class indices ``0 .. num_classes - 1``, one channel).
        num_classes: the number of classes, background included (the network's ``out_channels``).
        label_map: ``None``, ``"nonzero"`` or ``{class: grey value or [r, g, b]}`` (see the module docstring).
        channels: channels of the image the network takes: 3 (grayscale replicated) or 1 (RGB refused).
        reader: a MONAI image reader (default: ``PILReader`` converting palettes to RGB).

    Output: image ``float32`` in [0, 1] of shape (channels, W, H); label ``uint8`` of shape (1, W, H).
    """

    def __init__(
        self,
        keys: Any,
        label_keys: Any = None,
        num_classes: Optional[int] = None,
        label_map: Any = None,
        channels: int = 3,
        reader: Any = None,
        **kwargs: Any,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        super().__init__(
            keys,
            reader=reader if reader is not None else PILReader(converter=_pil_mode),
            label_keys=label_keys,
            num_classes=num_classes,
            allow_empty_label=True,
            channels=None,
            image_only=True,
            **kwargs,
        )
        self.label_map = _parse_label_map(label_map, num_classes)
        self.image_channels = channels
        self._first = EnsureChannelFirst()

    def _check_label(self, t: torch.Tensor, key: Hashable, where: str) -> None:
        pass  # masks are converted and checked in __call__ (values depend on the label rules)

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict:
        d = super().__call__(data, reader)
        image_shape = None
        image_where = None
        for key in self.key_iterator(d):
            where = _describe(data[key])
            img = self._first(d[key])
            if key in self.label_keys:
                d[key] = self._to_classes(img, key, where)
            else:
                d[key] = self._to_image(img, key, where)
                image_shape, image_where = tuple(d[key].shape[1:]), where
        if image_shape is not None:
            for key in self.label_keys:
                if key in d and tuple(d[key].shape[1:]) != image_shape:
                    w, h = d[key].shape[1:]
                    raise VolumeError(
                        f"{_describe(data[key])}: the '{key}' is {w} x {h} pixels but its image {image_where} is "
                        f"{image_shape[0]} x {image_shape[1]}; a mask must have its image's size"
                    )
        return d

    @staticmethod
    def _mode(img: Any) -> str:
        meta = img.meta if isinstance(img, MetaTensor) else {}
        return str(meta.get("mode", ""))

    @staticmethod
    def _gray_if_equal(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 4:  # RGBA: drop alpha
            x = x[:3]
        if x.shape[0] == 2:  # LA
            x = x[:1]
        if x.shape[0] == 3 and bool((x[0] == x[1]).all()) and bool((x[0] == x[2]).all()):
            x = x[:1]
        return x

    def _to_image(self, img: Any, key: Hashable, where: str) -> Any:
        mode = self._mode(img)
        x = self._gray_if_equal(img)
        if x.shape[0] not in (1, 3):
            raise VolumeError(f"{where}: the '{key}' has {img.shape[0]} channels; expected a grayscale or RGB image")
        if x.shape[0] == 3 and self.image_channels == 1:
            raise VolumeError(f"{where}: the '{key}' is an RGB image but the network takes one channel (set channels=3 / in_channels=3)")
        if mode.startswith("I;16") or (mode == "I" and float(x.max()) > 255):
            scale = 65535.0
        elif mode in ("F", "I"):
            scale = max(float(x.max()), 1.0) if mode == "F" else 255.0
        else:
            scale = 255.0
        x = x.to(torch.float32) / scale
        if x.shape[0] == 1 and self.image_channels == 3:
            x = x.repeat(3, 1, 1)
        return x

    def _to_classes(self, img: Any, key: Hashable, where: str) -> Any:
        x = self._gray_if_equal(img).to(torch.int64)
        n = self.num_classes
        lm = self.label_map
        if isinstance(lm, list):
            out = torch.full(x.shape[1:], -1, dtype=torch.int64)
            for c, v in lm:
                if len(v) != x.shape[0]:
                    raise VolumeError(
                        f"{where}: the '{key}' has {x.shape[0]} channel(s) but label_map value {list(v)} of class {c} "
                        f"has {len(v)}; use grey values for grayscale masks and [r, g, b] for colour masks"
                    )
                hit = (x == torch.tensor(v).view(-1, 1, 1)).all(0)
                out[hit] = c
            bad = out < 0
            if bool(bad.any()):
                vals = torch.unique(x.permute(1, 2, 0)[bad], dim=0)[:5].tolist()
                raise VolumeError(
                    f"{where}: the '{key}' has {int(bad.sum())} pixel(s) with values not in label_map, e.g. {vals}; "
                    f"label_map covers {[list(v) for _, v in lm]}"
                )
            return self._wrap(img, out)
        if x.shape[0] != 1:
            raise VolumeError(f"{where}: the '{key}' is a colour mask; give a label_map {{class: [r, g, b]}} for it")
        x = x[0]
        if lm == "nonzero":
            return self._wrap(img, (x > 0).to(torch.int64))
        lossy = isinstance(img, MetaTensor) and str(img.meta.get("format", "")).upper() in LOSSY_FORMATS
        if n == 2 and lossy:
            return self._wrap(img, (x >= 128).to(torch.int64))
        lo, hi = int(x.min()), int(x.max())
        values = torch.unique(x)
        if n == 2 and hi == 255 and set(values.tolist()) <= {0, 255}:
            return self._wrap(img, (x == 255).to(torch.int64))
        if lo < 0 or (n is not None and hi >= n):
            shown = values[(values < 0) | (values >= (n or 0))][:8].tolist() if n else values[:8].tolist()
            raise VolumeError(
                f"{where}: the '{key}' holds values {shown} outside the classes 0..{(n or 1) - 1} (values present: "
                f"{values[:12].tolist()}); expected an index mask, a 0/255 binary mask (2 classes), or a label_map"
            )
        return self._wrap(img, x)

    @staticmethod
    def _wrap(img: Any, classes: torch.Tensor) -> Any:
        out = classes.to(torch.uint8)[None]
        if isinstance(img, MetaTensor):
            return MetaTensor(out, meta=dict(img.meta), applied_operations=list(img.applied_operations))
        return out
