"""Infer task of the 2D model: :class:`~lib.infers.medurwkv.MedURWKVInfer` over ``bundle2d/configs/inference.json``.

Everything that segments comes from the 2D bundle, unchanged: ``network_def``, ``preprocessing``
(``medurwkv.data2d.LoadImage2dd``: RGB or grayscale PNG/JPEG to 3 channels in [0, 1], then resize and ImageNet
normalisation), ``inferer`` and ``postprocessing`` (softmax, ``Invertd`` back to the image's own size, argmax).
Strict tensor-only weight loading, hot reload, no-weights 409, concurrency and the probability cache are
``MedURWKVInfer``'s. Label names are the bundle's ``channel_def``.

What differs for 2D images:

* **The answer's grid** (``lib/image2d.py``): a ``W x H`` mask for a ``W x H`` image, as ``result_extension``
  asks: ``.png`` (default; a JPEG's mask is never written lossy), or a one-slice ``.nrrd`` / ``.nii.gz`` /
  ``.nii`` / ``.mha`` on the grid 3D Slicer gives the image when it loads it (column ``i``, row ``j`` from the
  top; ITK's origin, spacing and direction for the file). MONAI Label's own writer drops the grid of 2D
  results (it wrote a ``1 x W`` file).
* **Only PNG/JPEG images** (``takes_2d_images``; the app answers 415 for volumes, and the 3D model 415 for 2D
  images).
* The bundle's own test datalist (``dataset_dir``) is not resolved (``lib/configs/medurwkv2d.py``): serving needs
  no dataset next to the bundle.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Tuple

import numpy as np
import torch

from ..image2d import MASK_EXTENSIONS, read_header_2d, write_mask_2d
from ..options import Opt
from .medurwkv import MedURWKVInfer


class MedURWKV2dInfer(MedURWKVInfer):
    """Segmentation of a PNG/JPEG image with the 2D bundle's Med-URWKV network (see the module docstring).

    Args: as :class:`~lib.infers.medurwkv.MedURWKVInfer` (the 2D model's runtime, on the 2D bundle).
    """

    takes_2d_images = True

    def options(self) -> Dict[str, Opt]:
        opts = super().options()
        opts["result_extension"] = Opt(str, choices=MASK_EXTENSIONS)
        opts["result_dtype"] = Opt(str, choices=("uint8", "uint16"))
        return opts

    def writer(self, data: Dict[str, Any], extension=None, dtype=None) -> Tuple[Any, Any]:
        """The mask on the image's grid (module docstring), with what ``MedURWKVInfer.writer`` reports."""
        image_path = str(data.get("image_path") or "")
        ext = extension or data.get("result_extension") or ".png"
        dtype = dtype or data.get("result_dtype") or "uint8"
        pred = data[self.output_label_key]
        mask = pred.detach().cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)
        while mask.ndim > 2 and mask.shape[0] == 1:  # (1, W, H): the class channel
            mask = mask[0]
        width, height = read_header_2d(image_path)[:2]
        if mask.shape != (width, height):  # Invertd restores the image's size: anything else is a server bug
            raise RuntimeError(f"the mask is {mask.shape} but the image is {width} x {height} pixels")
        fd, out = tempfile.mkstemp(suffix=ext)
        os.close(fd)
        write_mask_2d(mask.astype(np.int64), image_path, out, dtype)
        return out, {**self.report(data), "image_size": {"width": width, "height": height}}
