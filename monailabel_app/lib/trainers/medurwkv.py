"""Train task: MONAI Label's ``BundleTrainTask`` over ``bundle/configs/train.json``.

MONAI Label runs it in a subprocess (``python -m monailabel.interfaces.utils.app -m train``), one at a time.
The stock task already overrides the bundle's ``bundle_root``, ``device``, ``train#trainer#max_epochs``,
``train#dataset#data`` / ``validate#dataset#data`` (the datastore's ``final`` labels) and ``train#handlers``;
the bundle's validation ``CheckpointSaver`` then writes ``models/model.pt``, which the infer task hot-reloads.

Changes to the stock task:

* **Weights to start from.** With ``pretrained`` (default on) an existing ``models/model.pt`` is fine-tuned
  through the bundle's own ``finetune_from`` (loaded strictly, tensor-only); without it the bundle's own
  initialisation is used, which loads the pretrained Vision-RWKV encoder when there is one (see the README). The
  stock task crashes with ``pretrained=false`` (``os.path.exists(None)``) and adds a non-strict loader.
* **Never a worse model.** Fine-tuning keeps the bundle's ``validate_start_weights`` (on with ``finetune_from``):
  the current model is validated first and its score is the one to beat, so a run that does worse than the served
  model (bad corrections, a learning rate too high, too few epochs) leaves ``model.pt`` as it was. Turn off with
  ``keep_better_model: false`` in the request.
* **Learning rate** from the request (``learning_rate``; default the bundle's).
* **Few labels.** Training with no final label fails at once with a message. With fewer labeled volumes than
  the split needs, validation reuses the training volumes (it then monitors fit only), so that the
  key-metric checkpoint (``model.pt``) is still written.
* **Progress.** The bundle's ``medurwkv.engines.ProgressBar`` prints lines (``lines=True``) instead of a bar,
  one per iteration/epoch (shown by ``GET /train/`` and the logs), and keeps ``models/train_stats.json`` for
  ``/info/`` ``train_stats``, which 3D Slicer uses for its training and accuracy bars.
* **Devices.** CPU when there is no GPU; multi-GPU only with more than one GPU and a ``multi_gpu_train`` config.
* **Options are data.** Only the options listed by :meth:`MedURWKVTrain.options` are accepted, each with its type
  and range (``lib/options.py``); the server checks them before it starts the process, and the process again.
  MLflow tracking (``tracking``, ``tracking_uri``: copied into the bundle config, where a ``$`` string is run as
  Python) and ``run_id`` are not offered; ``model_filename`` is always ``model.pt``, listed even before it exists
  (Slicer takes the first item of every list option).
* **One training at a time, across restarts.** The process holds ``models/model.pt.lock``
  (``lib/trainers/lock.py``) while it runs; a second one fails at once. A training whose server was killed
  finishes (its output goes nowhere, :class:`OutputWithoutReader`) rather than dying at its next progress line.
* **The real reason.** A failed training ends with ``TrainingFailed: <innermost error>``, the last line that
  ``GET /train/`` shows, instead of MONAI's "Failed to evaluate ConfigExpression".
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any, Dict, Optional

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import device_list, strtobool

from ..errors import AppError, BadInput, root_message
from ..image2d import is_image_2d
from ..options import COMMON, Opt, check_options, devices
from .lock import TrainingLock

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"
WEIGHTS_FILE = "model.pt"
# what the server or monailabel adds to a training request itself (never from the client's body)
SERVER_KEYS = ("model", "bundle_path", "local_rank")


class TrainingFailed(RuntimeError):
    """A training that failed, with the innermost error as its message (the last line of ``GET /train/``)."""


class OutputWithoutReader:
    """``sys.stdout``/``sys.stderr`` of a training process that survive their reader. The server reads the
    training's output through a pipe; when the server is killed the pipe breaks, and the next progress line would
    end the training half-way (BrokenPipeError) with the weights in an arbitrary state. Instead the output then
    goes nowhere and the training finishes; the training lock (``lock.py``) keeps a restarted server from
    starting a second one meanwhile."""

    def __init__(self, stream):
        self._stream = stream

    def _lost(self):
        self._stream = open(os.devnull, "w")

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError:
            self._lost()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            self._lost()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def failure_reason(e: BaseException) -> str:
    """The innermost error, and the bundle config item MONAI was evaluating when it happened (MONAI wraps every
    error as "Failed to evaluate ConfigExpression: <the expression>", which alone says nothing)."""
    if isinstance(e, AppError):
        return e.detail
    where, cur = None, e
    while cur is not None:
        text = str(cur)
        if isinstance(cur, RuntimeError) and text.startswith(("Failed to evaluate", "Failed to instantiate")):
            expr = re.sub(r"__local_refs\['([^']+)'\]", r"@\1", text.split(":", 1)[-1])
            expr = re.sub(r"[\s\"()]+", " ", expr).strip()
            where = expr if len(expr) <= 160 else expr[:157] + "..."
        cur = cur.__cause__ or (cur.__context__ if not cur.__suppress_context__ else None)
    root = root_message(e)
    return f"{root} (while evaluating the bundle config item: {where})" if where else root


class MedURWKVTrain(BundleTrainTask):
    """Trains the bundle's network on the datastore's final labels (see the module docstring).

    Args:
        path: the bundle directory.
        conf: the app's ``--conf`` dict (``max_epochs`` default for the UI, ``val_split``).
        name: model name shown in progress lines.
    """

    def __init__(self, path: str, conf: Dict[str, str], name: str = "train"):
        super().__init__(path, conf, enable_tracking=False, model_dict_key="model", load_strict=True)
        if not self.valid:
            raise FileNotFoundError(f"No train.json or train.yaml in {os.path.join(path, 'configs')}")
        self.name = name
        self.default_max_epochs = int(
            conf.get("max_epochs") or self._bundle_number(self.const.key_train_trainer_max_epochs(), 50)
        )
        self.default_val_split = float(conf.get("val_split", "0.2"))
        self.pretrained_encoder = conf.get("pretrained_encoder")
        self._finetune_from: Optional[str] = None
        self._request: Dict[str, Any] = {}

    def _bundle_number(self, key: str, default, cast=int):
        """A numeric config value of the bundle, references resolved (``"@epochs"`` -> 100)."""
        try:
            return cast(self.bundle_config.get_parsed_content(key, instantiate=False))
        except Exception:
            return default

    def encoder_weights(self) -> Optional[str]:
        """Pretrained encoder weights for a first training: ``--conf pretrained_encoder`` or the bundle's
        ``models/pretrained_encoder.pt`` written by ``convert.json``. The bundle's ``network_def`` reads it
        (``pretrained_encoder_path``: an official ``.pth``, safetensors or a converted ``.pt``)."""
        if self.pretrained_encoder:
            return os.path.abspath(os.path.expanduser(self.pretrained_encoder))
        path = os.path.join(self.bundle_path, "models", "pretrained_encoder.pt")
        return path if os.path.isfile(path) else None

    @property
    def stats_path(self) -> str:
        return os.path.join(self.bundle_path, "models", STATS_FILE)

    @property
    def weights_path(self) -> str:
        return os.path.join(self.bundle_path, "models", WEIGHTS_FILE)

    def training_lock(self) -> TrainingLock:
        return TrainingLock(self.weights_path)

    def config(self) -> Dict[str, Any]:
        """The options Slicer shows (developer mode) and sends back, every one in :meth:`options`. Every list has
        an item in every state: Slicer sends ``v[0]`` of each list (an empty one raised IndexError before the
        first weights existed)."""
        return {
            "device": device_list() or ["cpu"],
            "pretrained": True,
            "max_epochs": self.default_max_epochs,
            "val_split": self.default_val_split,
            "val_interval": self._bundle_number("val_interval", 1),
            "multi_gpu": torch.cuda.device_count() > 1,
            "gpus": "all",
            "learning_rate": self._bundle_number("learning_rate", 3e-4, float),
            "keep_better_model": True,
            "model_filename": [WEIGHTS_FILE],
        }

    def options(self) -> Dict[str, Opt]:
        """What a training request may hold (see ``lib/options.py``)."""
        return {
            **COMMON,
            "device": devices(sorted(set(device_list()) | {"cpu", "cuda"})),
            "pretrained": Opt(bool, doc="fine-tune the current model.pt"),
            "max_epochs": Opt(int, 1, 100000),
            "val_split": Opt(float, 0.0, 0.9),
            "val_interval": Opt(int, 1, 100000),
            "multi_gpu": Opt(bool),
            "gpus": Opt(str, pattern=r"all|\d{1,3}(,\d{1,3}){0,63}", doc="'all' or GPU indices '0,1'"),
            "learning_rate": Opt(float, 1e-9, 100.0),
            "keep_better_model": Opt(bool),
            "model_filename": Opt(str, choices=(WEIGHTS_FILE,)),
        }

    def check_request(self, request: Dict[str, Any]) -> Dict[str, Any]:
        return check_options(f"training '{self.name}'", request, self.options(), server_keys=SERVER_KEYS)

    def stats(self) -> Dict[str, Any]:
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return {}

    takes_2d_images = False  # the images this bundle trains on: volumes here, PNG/JPEG in lib/trainers/medurwkv2d.py

    def _fetch_datalist(self, request, datastore: Datastore):
        datalist = super()._fetch_datalist(request, datastore)
        datalist = [d for d in datalist if is_image_2d(d["image"]) == self.takes_2d_images]  # studies may mix both
        if not datalist:
            kind = "2D image" if self.takes_2d_images else "volume"
            raise BadInput(
                f"No {kind} has a final label yet: submit at least one corrected label (Submit Label) before training."
            )
        return datalist

    def _partition_datalist(self, datalist, request, shuffle=False):
        request = dict(request)
        request.setdefault("val_split", self.default_val_split)
        train_ds, val_ds = super()._partition_datalist(datalist, request, shuffle=shuffle)
        if not train_ds:
            train_ds = list(datalist)
        if val_ds is not None and not val_ds:
            logger.warning(
                f"Only {len(datalist)} labeled volume(s): validation reuses the training volume(s), so the "
                f"validation Dice measures fit, not generalisation."
            )
            val_ds = list(train_ds)
        return train_ds, val_ds

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        """Only decides what to start from; the bundle loads it (``finetune_from``, set in ``_update_overrides``)."""
        self._finetune_from = model_pytorch if pretrained and os.path.exists(model_pytorch) else None
        if not pretrained:
            logger.info("pretrained=false: starting from the bundle's initialisation")
        elif self._finetune_from is None:
            logger.info(
                f"No {model_pytorch} yet: starting from the bundle's initialisation (pretrained encoder if configured)"
            )

    def _update_overrides(self, overrides):
        # validate (and so write the key-metric checkpoint models/model.pt) at least once, also in short runs
        max_epochs = int(overrides.get(self.const.key_train_trainer_max_epochs(), self.default_max_epochs))
        if "val_interval" in self.bundle_config:
            interval = int(self._request.get("val_interval") or self._bundle_number("val_interval", 1))
            overrides["val_interval"] = max(1, min(interval, max_epochs))
        if self._request.get("learning_rate") not in (None, "") and "learning_rate" in self.bundle_config:
            lr = float(self._request["learning_rate"])
            if not lr > 0:
                raise BadInput(f"learning_rate must be a positive number, got {self._request['learning_rate']!r}")
            overrides["learning_rate"] = lr
        if self._finetune_from is not None:
            # the bundle loads the weights strictly and, with validate_start_weights, validates them first: the
            # served model's own score is the one to beat (no worse model.pt)
            if "finetune_from" not in self.bundle_config:
                raise BadInput(f"The bundle {self.bundle_path} has no 'finetune_from': it cannot fine-tune model.pt")
            logger.info(f"Fine-tuning from {self._finetune_from} (strict)")
            overrides["finetune_from"] = self._finetune_from
            keep = strtobool(str(self._request.get("keep_better_model", True)))
            if "validate_start_weights" in self.bundle_config:
                overrides["validate_start_weights"] = bool(keep)
            if keep:
                logger.info("Fine-tuning: validating the current model first; model.pt is replaced only by a better one")
        # a first training (no model.pt to fine-tune) starts from the pretrained encoder when there is one
        elif "pretrained_encoder_path" in self.bundle_config:
            encoder = self.encoder_weights()
            if encoder:
                if not os.path.isfile(encoder):
                    raise BadInput(f"pretrained_encoder {encoder} does not exist")
                logger.info(f"Starting from the pretrained encoder {encoder}")
                overrides["pretrained_encoder_path"] = encoder
            else:
                logger.info("No pretrained encoder weights found: the encoder starts from random initialisation")
        handlers = overrides.get(self.const.key_train_handlers())
        if isinstance(handlers, list):
            # log lines instead of a tqdm bar (its \r redraws are unreadable in /train/ details), and the stats
            # JSON that /info/ train_stats (Slicer's progress and accuracy bars) reads
            progress = {"lines": True, "stats_file": self.stats_path, "desc": self.name}
            if self.bundle_config.get("validate#evaluator") is not None:
                progress["validator"] = "@validate#evaluator"
            ours = [h for h in handlers if isinstance(h, dict) and h.get("_target_") == "medurwkv.engines.ProgressBar"]
            for h in handlers:
                if isinstance(h, dict) and str(h.get("_target_", "")).endswith("ProgressBar") and h not in ours:
                    h["disable"] = True
            if ours:
                ours[0].update(progress)
            else:
                handlers.append({"_target_": "medurwkv.engines.ProgressBar", **progress})
        return overrides

    def __call__(self, request, datastore: Datastore):
        request = self.check_request(dict(request))  # also checked by the server before the process started
        request.setdefault("max_epochs", self.default_max_epochs)
        if not isinstance(sys.stdout, OutputWithoutReader):
            sys.stdout, sys.stderr = OutputWithoutReader(sys.stdout), OutputWithoutReader(sys.stderr)
        lock = self.training_lock()
        if not lock.acquire():
            raise TrainingFailed(
                f"another training (process {lock.holder()}) is running on {WEIGHTS_FILE}: only one at a time"
            )
        # the stock task edits the parsed config's handler list in place: start from the file every time
        self.bundle_config = self._load_bundle_config(self.bundle_path, self.bundle_config_path)
        self._request = request
        if not torch.cuda.is_available():
            request["device"] = "cpu"
            request["multi_gpu"] = False
        try:
            return super().__call__(request, datastore)
        except Exception as e:
            logger.exception("Training failed")
            reason = failure_reason(e)
            print(f"[{self.name}] training failed: {reason}", flush=True)
            raise TrainingFailed(reason) from None
        finally:
            lock.release()
