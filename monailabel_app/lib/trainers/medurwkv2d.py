"""Train task of the 2D model: :class:`~lib.trainers.medurwkv.MedURWKVTrain` over ``bundle2d/configs/train.json``.

Everything is ``MedURWKVTrain``'s (fine-tuning that never installs a worse model, checked options, one training at
a time, progress lines and ``train_stats.json``, the innermost error as the failure); the recipe is the 2D
bundle's. What differs:

* **Its images.** Only the datastore's PNG/JPEG images with a final label (the 3D trainer takes only volumes).
* **Its labels.** 3D Slicer submits the label of a 2D image as a one-slice volume (``.nrrd`` / ``.nii.gz``) on the
  image's grid (checked when it was saved, ``lib/image2d.py``); the bundle's loader (``LoadImage2dd``) reads
  PNG/JPEG. Such labels are written, for the run only, as ``W x H`` index-mask PNGs in a hidden folder next to
  the weights (``.train2d_labels``, removed when the training ends, and at the next start when Stop Training
  killed the process); PNG labels are used as they are.
* ``--conf`` keys of its own: ``max_epochs2d`` (default: the bundle's ``epochs``) and ``pretrained_encoder2d``
  (a 3-channel encoder; default ``bundle2d/models/pretrained_encoder.pt`` when present). ``val_split`` is shared.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict

import numpy as np

from ..errors import BadInput
from ..image2d import read_header_2d, write_mask_2d
from .medurwkv import MedURWKVTrain


class MedURWKV2dTrain(MedURWKVTrain):
    """Trains the 2D bundle's network on the datastore's 2D images and their final labels (module docstring)."""

    takes_2d_images = True

    def __init__(self, path: str, conf: Dict[str, str], name: str = "train"):
        super().__init__(path, conf, name=name)
        epochs = self._bundle_number(self.const.key_train_trainer_max_epochs(), 100)
        self.default_max_epochs = int(conf.get("max_epochs2d") or epochs)
        self.pretrained_encoder = conf.get("pretrained_encoder2d")  # the 3D model's (1 channel) does not fit
        self._labels_dir = ""

    def _fetch_datalist(self, request, datastore):
        datalist = super()._fetch_datalist(request, datastore)
        # the training lock is held here: what a killed training (Stop Training kills it) left is no one's
        self._labels_dir = os.path.join(os.path.dirname(self.weights_path), ".train2d_labels")
        shutil.rmtree(self._labels_dir, ignore_errors=True)
        return [dict(d, label=self._png_label(d["image"], d["label"], i)) for i, d in enumerate(datalist)]

    def _png_label(self, image: str, label: str, index: int) -> str:
        """``label`` as a PNG the bundle's loader reads: as it is when it is one, else its one slice, written to
        this run's temporary folder (named by position: no image names in the file names)."""
        if label.lower().endswith(".png"):
            return label
        import SimpleITK as sitk

        width, height = read_header_2d(image)[:2]
        array = sitk.GetArrayFromImage(sitk.ReadImage(label))  # (k, j, i) or (j, i)
        while array.ndim > 2 and array.shape[0] == 1:
            array = array[0]
        if array.shape != (height, width):
            raise BadInput(f"A final label has shape {list(array.shape)}; its 2D image is {width} x {height} pixels.")
        os.makedirs(self._labels_dir, mode=0o700, exist_ok=True)
        out = os.path.join(self._labels_dir, f"label{index}.png")
        write_mask_2d(array.T.astype(np.int64), image, out)
        return out

    def __call__(self, request, datastore):
        self._labels_dir = ""
        try:
            return super().__call__(request, datastore)
        finally:
            if self._labels_dir:  # set once the training lock is held
                shutil.rmtree(self._labels_dir, ignore_errors=True)
