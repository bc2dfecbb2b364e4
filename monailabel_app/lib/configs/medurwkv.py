"""The Med-URWKV model of this app: where its bundle is, and the tasks built on it.

Bundle lookup (first match wins): ``--conf bundle <dir>``, then ``<app>/model/bundle`` (a copy or symlink you
manage yourself), then the repository's ``bundle/`` next to the app. The weights are the bundle's
``models/model.pt``: training writes it, inference reloads it. Nothing is downloaded.

``--conf`` keys read here (all optional): ``bundle``, ``preload`` (load the weights before serving; default:
in the background), ``amp`` (GPU mixed precision, default true), ``infer_concurrency`` (requests segmented at
once, default 2), ``prob_cache`` / ``prob_cache_mb`` (network outputs kept for clicks, default 2 volumes, 1024 MB), ``max_epochs`` and ``val_split`` (training defaults shown in Slicer), ``pretrained_encoder``,
``mc_dropout`` (dropout p for scoring, default 0.2), ``mc_passes`` (default 8), ``mc_slices`` (default 16),
``reserve_s`` (seconds a volume handed out by ``uncertainty`` is skipped for others, default 600), ``clicks``
(also serve the click- and scribble-guided correction models ``<name>_clicks`` and ``<name>_scribbles``, default
true) with ``click_radius_mm``,
``click_roi_margin_mm``, ``click_spread_mm``, ``click_lamda``, ``click_sigma`` (see ``lib/infers/clicks.py``).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List

from monailabel.interfaces.config import TaskConfig
from monailabel.utils.others.generic import strtobool

from ..activelearning import MostUncertain
from ..infers import MedURWKVClicks, MedURWKVInfer, MedURWKVScribbles
from ..infers.edit import MedURWKVEdit, edit_available
from ..runtime import ModelRuntime
from ..scoring import MCDropoutScoring
from ..trainers import MedURWKVTrain

logger = logging.getLogger(__name__)


def bundle_candidates(app_dir: str, conf: Dict[str, str], key: str = "bundle") -> List[str]:
    """Where a model's bundle may be, first match wins: ``--conf <key> DIR``, else ``<app>/model/<key>``, else the
    repository's ``<key>/`` next to the app (``key``: ``bundle``, or ``bundle2d`` for the 2D model)."""
    if conf.get(key):
        return [os.path.abspath(os.path.expanduser(conf[key]))]
    return [os.path.join(app_dir, "model", key), os.path.abspath(os.path.join(app_dir, os.pardir, key))]


def find_bundle(app_dir: str, conf: Dict[str, str]) -> str:
    candidates = bundle_candidates(app_dir, conf)
    for c in candidates:
        if os.path.isfile(os.path.join(c, "configs", "metadata.json")) and (
            os.path.isfile(os.path.join(c, "configs", "inference.json"))
            or os.path.isfile(os.path.join(c, "configs", "inference.yaml"))
        ):
            return c
    raise FileNotFoundError(
        "No Med-URWKV bundle found (needs configs/metadata.json and configs/inference.json) in: "
        + ", ".join(candidates)
        + ". Pass --conf bundle <path to the bundle directory>."
    )


class MedURWKVConfig(TaskConfig):
    """Infer, train, scoring and strategy tasks over one Med-URWKV bundle."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner=None, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        app_dir = os.path.dirname(model_dir)
        self.bundle_path = find_bundle(app_dir, conf)
        # the one runtime of this model (bundle, network, locks, caches): every task below is built on it
        self.runtime = ModelRuntime(self.bundle_path, conf, name=name)
        self.channel_def, self.labels = self.runtime.channel_def, self.runtime.labels
        self.path = self.runtime.weights_path

    def weights(self) -> Dict:
        return self.runtime.weights()

    def infer(self) -> Dict[str, MedURWKVInfer]:
        """The automatic model, and (unless ``--conf clicks false``) its click- and scribble-guided corrections
        ``<name>_clicks`` and ``<name>_scribbles``, all on the model's one runtime."""
        tasks = {self.name: MedURWKVInfer(self.runtime)}
        if strtobool(self.conf.get("clicks", "true")):
            tasks[f"{self.name}_clicks"] = MedURWKVClicks(self.runtime, self.conf)
            tasks[f"{self.name}_scribbles"] = MedURWKVScribbles(self.runtime, self.conf)
        if strtobool(self.conf.get("edit", "false")) or edit_available(self.bundle_path):  # lib/infers/edit.py
            tasks[f"{self.name}_edit"] = MedURWKVEdit(self.runtime, self.conf)
        return tasks

    def trainer(self) -> MedURWKVTrain:
        return MedURWKVTrain(self.bundle_path, self.conf, name=self.name)

    def scoring_method(self) -> Dict[str, MCDropoutScoring]:
        p = float(self.conf.get("mc_dropout", "0.2"))
        runtime = self.runtime.variant(dropout=p, mc_dropout=True, prob_cache=0)
        method = MCDropoutScoring(
            runtime, passes=int(self.conf.get("mc_passes", "8")), max_slices=int(self.conf.get("mc_slices", "16"))
        )
        return {"mc_dropout": method}

    def strategy(self) -> Dict[str, MostUncertain]:
        def stamp():
            return self.weights().get("mtime_ns")

        return {
            "uncertainty": MostUncertain(reserve_s=int(self.conf.get("reserve_s", "600")), current_model_stamp=stamp)
        }
