"""MONAI Label app for Med-URWKV brain extraction.

    python -m monailabel.main start_server --app monailabel_app --studies <folder of NIfTI volumes>

This file only wires things together: the model and its tasks come from ``lib/configs/medurwkv.py``, which
wraps the MONAI bundle in ``bundle/`` (network, transforms, inferer, training recipe are the bundle's), and the
2D model ``medurwkv2d`` (PNG/JPEG images) from ``lib/configs/medurwkv2d.py`` over ``bundle2d/`` when it is found.
See README.md for the commands, the 3D Slicer workflow and the ``--conf`` options.
"""

import logging
import os
import threading
from typing import Any, Dict

import medurwkv
from lib.configs import MedURWKV2dConfig, MedURWKVConfig, find_bundle2d
from lib.datastore import CheckedLocalDatastore
from lib.errors import BadInput, NotFound, UnsupportedFile, image_not_found
from lib.image2d import is_image_2d
from lib.imageio import Limits, check_image_suffix
from lib.options import COMMON, check_options
from lib.scoring.mc_dropout import KEY_MODEL
from lib.server import bind_loopback_by_default, make_infer_non_blocking, one_training_at_a_time, secure_server
from lib.server import infer_inputs_only_from_request, is_request_volume, limit_request_body, safe_upload_endpoints
from lib.server import weights_from_training_only
from lib.studies import resolve_studies
from lib.uploads import CheckedSessions
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

MODEL = "medurwkv"
MODEL_2D = "medurwkv2d"


class MedURWKVApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        host = bind_loopback_by_default()
        self.limits = Limits.from_conf(conf)  # sizes of uploads, volumes and archives (README: Files and limits)
        self.model = MedURWKVConfig()
        self.model.init(MODEL, os.path.join(app_dir, "model"), conf)
        logger.info(f"Med-URWKV bundle: {self.model.bundle_path}; weights: {self.model.path}")
        self.model2d = None  # the 2D model (PNG/JPEG), when its bundle is found
        bundle2d = find_bundle2d(app_dir, conf)
        if bundle2d:
            self.model2d = MedURWKV2dConfig()
            self.model2d.init(MODEL_2D, os.path.join(app_dir, "model"), conf, bundle_path=bundle2d)
            logger.info(f"Med-URWKV 2D bundle: {bundle2d}; weights: {self.model2d.path}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Med-URWKV brain extraction",
            description="Pure-RWKV U-Net (Med-URWKV) segmenting the brain in head MRI, slice by slice"
            + (f"; model '{MODEL_2D}' segments 2D PNG/JPEG images" if self.model2d else ""),
            version=medurwkv.__version__,
        )
        make_infer_non_blocking()
        one_training_at_a_time()
        limit_request_body(self.limits)
        safe_upload_endpoints(self.limits)
        infer_inputs_only_from_request(self.limits)
        weights_from_training_only()
        roots = [self.model.bundle_path] + ([self.model2d.bundle_path] if self.model2d else [])
        secure_server(app_dir, conf, host, roots=roots)  # rebuilds the stack, keeping the body limit

    def _load_sessions(self, load=False):
        if not load:
            return None
        return CheckedSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY, self.limits)

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return CheckedLocalDatastore(
            resolve_studies(self.studies, self.app_dir),  # a dataset folder (sample_data/) is linked, not written
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            label_values=self.model.channel_def,
            label_values_2d=self.model2d.channel_def if self.model2d else None,
            limits=self.limits,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {**self.model.infer(), **(self.model2d.infer() if self.model2d else {})}

    def init_trainers(self) -> Dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        trainers = {MODEL: self.model.trainer()}
        if self.model2d is not None:
            trainers[MODEL_2D] = self.model2d.trainer()
        return trainers

    def init_strategies(self) -> Dict[str, Strategy]:
        return {**self.model.strategy(), "first": First(), "random": Random()}

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        if strtobool(self.conf.get("skip_scoring", "false")):
            return {}
        return self.model.scoring_method()

    def info(self) -> Dict[str, Any]:
        meta = super().info()
        if not self.model.weights()["available"]:
            meta["description"] = (
                f"{self.description}. NO TRAINED WEIGHTS YET (models/model.pt): submit labels and run Train."
            )
        return meta

    def infer(self, request, datastore=None):
        """Unknown image ids and non-volume files are the client's error (404/415), not a server crash."""
        model = request.get("model")
        if model not in self._infers:
            raise NotFound(f"Model '{model}' does not exist; available: {', '.join(self._infers) or 'none'}.")
        image = request.get("image")
        if isinstance(image, str):
            if is_request_volume(image):  # this request's uploaded file or session volume, never a path sent
                name = request.get("source_name") or os.path.basename(image)
                check_image_suffix(image, f"the uploaded file '{name}'")
                path = image
            else:
                ds = datastore if datastore else self.datastore()
                path = ds.get_image_uri(image)
                if not path:
                    raise image_not_found(image)
                name = image
            self._check_image_kind(model, path, name)
        return super().infer(request, datastore)

    def _check_image_kind(self, model: str, path: str, name: str) -> None:
        """The 2D model segments PNG/JPEG images only, the 3D models volumes only (415 otherwise)."""
        two_d = getattr(self._infers[model], "takes_2d_images", False)
        if two_d and not is_image_2d(path):
            raise UnsupportedFile(
                f"Model '{model}' segments 2D PNG/JPEG images; '{name}' is a volume. In 3D Slicer, open the image "
                f"with Next Sample (from the server's studies) or upload the .png/.jpg file itself."
            )
        if not two_d and is_image_2d(path):
            raise UnsupportedFile(f"Model '{model}' segments volumes; '{name}' is a 2D image: use model '{MODEL_2D}'.")

    def next_sample(self, request):
        """Strategy options are checked like every other (``lib/options.py``); the answer holds no server path."""
        request = dict(request)
        strategy = request.pop("strategy", None)
        task = self._strategies.get(strategy or "random")
        if task is None:
            raise NotFound(f"Strategy '{strategy}' does not exist; available: {', '.join(self._strategies)}.")
        allowed = task.options() if hasattr(task, "options") else COMMON
        request = check_options(f"strategy '{strategy}'", request, allowed)
        result = super().next_sample({**request, "strategy": strategy})
        path = result.pop("path", None)
        if path and is_image_2d(path):  # the plugin downloads to a file named after "name" (else the id) and
            result.setdefault("name", os.path.basename(path))  # Slicer picks the PNG/JPEG reader by its extension
        return result

    def infer_wsi(self, request, datastore=None):
        raise BadInput("Whole-slide (WSI) inference is not offered by this app: use POST /infer/{model}.")

    def _local_request(self, url, params, action):
        """Training and scoring processes call the server back (scoring after a training): with the service
        token when login is on (``lib/auth.py``), which the server hands them in their environment."""
        import requests

        token = os.environ.get("MEDURWKV_SERVICE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = requests.post(
                f"http://127.0.0.1:{settings.MONAI_LABEL_SERVER_PORT}{url}", json=params or {}, headers=headers, timeout=60
            )
        except requests.RequestException as e:  # the server is gone (killed): the training itself succeeded
            logger.error(f"Failed to trigger {action}: {type(e).__name__}")
            return None
        if response.status_code != 200:
            logger.error(f"Failed to trigger {action}: HTTP {response.status_code}")
            return None
        return response.json()

    def async_scoring(self, method, params=None):
        """MONAI Label re-scores after every training and every "Next Sample", each time in a new subprocess;
        skip that when no unlabeled volume lacks a score for the current weights (or there are no weights)."""
        if not method and not self._scoring_needed():
            return {}
        return super().async_scoring(method, params)

    def _scoring_needed(self) -> bool:
        if not self._scoring_methods:
            return False
        weights = self.model.weights()
        if not weights["available"]:
            logger.info("Uncertainty scoring skipped: no trained weights yet")
            return False
        ds = self.datastore()
        return any(ds.get_image_info(i).get(KEY_MODEL) != weights["mtime_ns"] for i in ds.get_unlabeled_images())

    def on_init_complete(self):
        """Runs in the server only (not in training/scoring subprocesses)."""
        super().on_init_complete()
        if isinstance(self._datastore, CheckedLocalDatastore):
            self._datastore.remove_stale_temp_files()  # of label/index writes a kill -9 interrupted
        weights = self.model.weights()
        if not weights["available"]:
            logger.warning(
                f"NO TRAINED WEIGHTS: {self.model.path} does not exist. The '{MODEL}' model is listed but "
                f"refuses to segment (HTTP 409) until training has written it: submit labels, then Train."
            )
        else:
            logger.info(f"Weights: {self.model.path} (modified {weights['modified']})")
        if strtobool(self.conf.get("preload", "false")):
            self.model.runtime.warm_up()
        else:  # build the network (and load the weights) now, so that the first click does not wait for it
            threading.Thread(target=self.model.runtime.warm_up, name="warm-up", daemon=True).start()
        if self.model2d is not None:
            if not self.model2d.weights()["available"]:
                logger.warning(f"NO TRAINED WEIGHTS for '{MODEL_2D}': {self.model2d.path} does not exist (HTTP 409).")
            threading.Thread(target=self.model2d.runtime.warm_up, name="warm-up-2d", daemon=True).start()
