"""The 2D model of this app (``medurwkv2d``): the 2D bundle, and the infer and train tasks built on it.

Bundle lookup (first match wins): ``--conf bundle2d <dir>``, then ``<app>/model/bundle2d`` (a copy or symlink you
manage yourself), then the repository's ``bundle2d/`` next to the app. When none is found the app serves the 3D
model only (``--conf bundle2d false`` turns the 2D model off). The weights are the bundle's ``models/model.pt``
(tensor-only, strictly loaded, reloaded when the file changes); label names are its ``metadata.json``
``channel_def``. Nothing is downloaded.

``--conf`` keys read for the 2D model: ``bundle2d``, ``max_epochs2d``, ``pretrained_encoder2d``
(``lib/trainers/medurwkv2d.py``); ``amp``, ``infer_concurrency``, ``prob_cache``, ``prob_cache_mb`` and
``val_split`` are shared with the 3D model (see ``lib/configs/medurwkv.py``). No uncertainty scoring or strategy of
its own: the app's ``first`` and ``random`` strategies hand out 2D images as well.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

from monailabel.interfaces.config import TaskConfig

from ..infers.medurwkv2d import MedURWKV2dInfer
from ..runtime import ModelRuntime
from .medurwkv import bundle_candidates
from ..trainers.medurwkv2d import MedURWKV2dTrain


def find_bundle2d(app_dir: str, conf: Dict[str, str]) -> Optional[str]:
    """The 2D bundle's directory, or None (no 2D model). An explicit ``--conf bundle2d`` that is not a bundle is
    an error at start, not a silently missing model."""
    if str(conf.get("bundle2d", "")).lower() in ("false", "none", "off"):
        return None
    for c in bundle_candidates(app_dir, conf, key="bundle2d"):
        if os.path.isfile(os.path.join(c, "configs", "metadata.json")) and os.path.isfile(
            os.path.join(c, "configs", "inference.json")
        ):
            return c
    if conf.get("bundle2d"):
        raise FileNotFoundError(
            f"--conf bundle2d {conf['bundle2d']}: no configs/metadata.json and configs/inference.json there."
        )
    return None


class MedURWKV2dConfig(TaskConfig):
    """The infer and train tasks over one 2D Med-URWKV bundle (no scoring or strategy of its own yet)."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, bundle_path: str = "", **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.bundle_path = bundle_path
        # the model's one runtime (bundle, network, locks, caches: lib/runtime.py); the bundle's own test datalist
        # (read from its dataset_dir) is not resolved: serving needs no dataset next to the bundle
        self.runtime = ModelRuntime(bundle_path, conf, name=name)
        self.runtime.config["datalist"] = []
        self.channel_def, self.labels = self.runtime.channel_def, self.runtime.labels
        self.path = self.runtime.weights_path

    def weights(self) -> Dict:
        return self.runtime.weights()

    def infer(self) -> Dict[str, MedURWKV2dInfer]:
        return {self.name: MedURWKV2dInfer(self.runtime)}

    def trainer(self) -> MedURWKV2dTrain:
        return MedURWKV2dTrain(self.bundle_path, self.conf, name=self.name)
