"""Infer task: MONAI Label's ``BundleInferTask`` over ``bundle/configs/inference.json``, with what it lacks.

What comes from the bundle, unchanged: ``network_def``, ``preprocessing``, ``inferer`` (a ``SliceInferer`` over
axial slices, so a 3D volume goes through the 2D network in batches of ``sw_batch_size`` slices) and
``postprocessing`` (minus ``SaveImaged``; MONAI Label writes the result itself). Label names come from
``metadata.json`` (``outputs.pred.channel_def``, background dropped).

What this class adds to the stock task:

* **No weights, no predictions.** Without ``models/model.pt`` the model is still listed in ``/info/`` (so Slicer
  shows it and its trainer) but its description says so and inference answers 409 with what to do, instead of
  serving a randomly initialised network.
* **Strict loading with a clear error.** ``load_state_dict(strict=True)``; a mismatch names the missing,
  unexpected and mis-shaped keys (stock MONAI Label loads with ``strict=False`` and only warns).
* **Hot reload.** The cached network is rebuilt when ``model.pt`` changes (mtime or size), so weights written by
  training are used by the next request. A file caught mid-write is retried once.
* **AMP on GPU** (bf16 where supported, else fp16; ``amp`` option), float32 on CPU.
* **Concurrency control.** At most ``concurrency`` requests run at once in this task and the network runs one
  batch at a time per device; together with ``lib.server`` (which moves ``/infer`` off the event loop) the
  server keeps answering ``/info/`` while volumes are segmented.
* **One network run per volume for interactive work.** The softmax on the image grid (and what the remaining
  steps need) is kept for the last ``prob_cache`` volumes, keyed by the image and weights files' stamps and the
  options; a click, stroke or re-run on the same volume only runs the steps from ``AsDiscreted`` (or the
  refinement before it) on. The result JSON says ``"probabilities": "cached"`` or ``"computed"``.
* **Input errors are the client's.** An unreadable volume fails at loading with HTTP 422 and the reader's message.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from monai.inferers import Inferer, SliceInferer
from monai.transforms import AsDiscreted, LoadImaged, SaveImaged
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.interfaces.utils.transform import run_transforms
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask
from monailabel.transform.pre import LoadImageTensord

from medurwkv.checkpoint import CheckpointError, file_stamp, load_state_dict_strict, load_weights
from medurwkv.data2d import channel_def

from ..errors import BadInput, ModelNotReady, WeightsError
from ..options import COMMON, Opt, check_options, devices, options_like

logger = logging.getLogger(__name__)


def _root_message(e: BaseException, limit: int = 400) -> str:
    """The innermost error of a chain (MONAI wraps transform errors several times)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def weights_state(path: str) -> Dict[str, Any]:
    """What ``/info/`` and results report about the weights file (its name in the bundle, never a server path)."""
    name = f"models/{os.path.basename(path)}"
    if not os.path.isfile(path):
        return {"file": name, "available": False}
    st = os.stat(path)
    return {
        "file": name,
        "available": True,
        "bytes": st.st_size,
        "modified": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime)),
        "mtime_ns": st.st_mtime_ns,
    }


def bundle_labels(metadata_file: str) -> Tuple[Dict[int, str], Dict[str, int]]:
    """The bundle's classes by index (``metadata.json``'s ``channel_def``) and the labels clients see (lower-case
    names without background)."""
    classes = dict(enumerate(channel_def(metadata_file)))
    return classes, {v.lower(): k for k, v in classes.items() if v.lower() != "background"}


class ProbabilityCache:
    """The last few volumes' softmax probabilities on the image grid, with what the steps after them need.

    Clicks and scribbles are sent one correction at a time; each request used to run the whole network again
    on the same volume. An entry is keyed by the image file's stamp (path, mtime, size), the weights file's stamp
    and the options that change the network's output (device, amp, sw_batch_size), so new weights, a rewritten
    image or other options miss. At most ``max_entries`` volumes (0: off) and ``max_bytes`` of tensors are kept,
    the least recently used going first; a volume larger than ``max_bytes`` alone is not kept.
    """

    def __init__(self, max_entries: int = 2, max_bytes: int = 2**30):
        self.max_entries, self.max_bytes = max(0, int(max_entries)), int(max_bytes)
        self._entries: "OrderedDict[Tuple, Tuple[Dict[str, Any], int]]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def nbytes(entry: Dict[str, Any]) -> int:
        return sum(v.numel() * v.element_size() for v in entry.values() if torch.is_tensor(v))

    def get(self, key: Optional[Tuple]) -> Optional[Dict[str, Any]]:
        if key is None or not self.max_entries:
            return None
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def put(self, key: Optional[Tuple], entry: Dict[str, Any]) -> None:
        size = self.nbytes(entry)
        if key is None or not self.max_entries or size > self.max_bytes:
            return
        with self._lock:
            self._entries[key] = (entry, size)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries or sum(n for _, n in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)


# what 3D Slicer's MONAI Label module adds to an infer request besides the task's own config (read from the
# plugin's source, Project-MONAI/MONAILabel: Run, SmartEdit, Scribbles); ``label`` is a segment name, never a path
_NAME = r"[^/\\\x00-\x1f]{0,128}"
CLIENT_INFER_OPTIONS: Dict[str, Opt] = {
    **COMMON,
    "result_extension": Opt(str, choices=(".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd")),
    "result_dtype": Opt(str, choices=("uint8", "int8", "uint16", "int16", "int32", "float32")),
    "label": Opt(str, pattern=_NAME, nullable=True, doc="segment name (SmartEdit)"),
    "foreground": Opt(list, doc="clicks [[i, j, k], ...]"),
    "background": Opt(list, doc="clicks [[i, j, k], ...]"),
    "roi": Opt(list, nullable=True, doc="voxel bounds [i0, i1, j0, j1, k0, k1]"),
    "slice": Opt(int, 0, 2**31, nullable=True),
    "reset_state": Opt(bool),
    "label_info": Opt(list, doc="[{'name', 'id'}, ...] (Scribbles)"),
    "selected_label_name": Opt(str, pattern=_NAME, nullable=True),
    "source_name": Opt(str, pattern=_NAME, doc="name of the uploaded file, for messages"),
}
# keys the server itself puts into an infer request (monailabel's route and the app), never client options
INFER_SERVER_KEYS = ("model", "image", "session", "description", "save_label", "label_tag")


class MedURWKVInfer(BundleInferTask):
    """Segmentation with the bundle's Med-URWKV network (see the module docstring).

    Args:
        path: the bundle directory (``configs/inference.json``, ``configs/metadata.json``, ``models/``).
        conf: the app's ``--conf`` dict (``amp``, ``infer_concurrency``).
        dropout: decoder dropout set on the network (``> 0`` for MC-dropout scoring, with ``mc_dropout=True``).
        mc_dropout: put only dropout layers in train mode (``medurwkv.nets.medurwkv.enable_mc_dropout``).
        name: the model's name in the app (what Slicer lists and trains; default: the bundle folder's name).
    """

    def __init__(
        self, path: str, conf: Dict[str, str], dropout: float = 0.0, mc_dropout: bool = False, name: Optional[str] = None
    ):
        self.model_name = name or os.path.basename(os.path.normpath(path))
        # BundleInferTask.__init__ is not called: it drops a bundle without weights and builds the network
        # eagerly; the attributes its transform methods use are set here instead.
        self.valid = False
        self.const = BundleConstants()
        self.pre_filter: Optional[Sequence] = None
        self.post_filter: Optional[Sequence] = [SaveImaged]
        self.extend_load_image = True
        self.add_post_restore = True
        self.dropout = dropout
        self.mc_dropout = mc_dropout
        self.displayable_configs: Dict[str, Any] = {}

        configs = [c for c in self.const.configs() if os.path.exists(os.path.join(path, "configs", c))]
        if not configs:
            raise FileNotFoundError(f"No {' or '.join(self.const.configs())} in {os.path.join(path, 'configs')}")
        self.bundle_path = path
        self.bundle_config_path = os.path.join(path, "configs", configs[0])
        self.bundle_config = self._load_bundle_config(self.bundle_path, self.bundle_config_path)
        self.bundle_config.config["use_click"] = False

        with open(os.path.join(path, "configs", self.const.metadata_json())) as fp:
            metadata = json.load(fp)
        self.key_image, image_fmt = next(iter(metadata["network_data_format"]["inputs"].items()))
        self.key_pred = next(iter(metadata["network_data_format"]["outputs"]))
        self.channel_def, labels = bundle_labels(os.path.join(path, "configs", self.const.metadata_json()))
        self.version = metadata.get("version")
        self.bundle_name = metadata.get("name", os.path.basename(path))

        # a 2D network applied slice by slice segments 3D volumes: that is the dimension clients see
        inferer = (
            self.bundle_config.get_parsed_content("inferer", instantiate=True)
            if "inferer" in self.bundle_config
            else None
        )
        net_dims = len(image_fmt.get("spatial_shape") or [0, 0, 0])
        dimension = 3 if isinstance(inferer, SliceInferer) else net_dims
        self._default_sw_batch_size = getattr(inferer, "sw_batch_size", None)

        self._amp_default = str(conf.get("amp", "true")).lower() in ("1", "true", "yes")
        self._semaphore = threading.BoundedSemaphore(max(1, int(conf.get("infer_concurrency", "2"))))
        self._config_lock = threading.RLock()  # ConfigParser and sys.path edits are not thread-safe
        self._network_lock = threading.Lock()  # building/reloading the cached networks
        self._device_locks: Dict[str, threading.Lock] = {}
        self._template: Optional[torch.nn.Module] = None
        self._prob_cache = ProbabilityCache(
            0 if mc_dropout else int(conf.get("prob_cache", "2")), int(float(conf.get("prob_cache_mb", "1024")) * 2**20)
        )

        config: Dict[str, Any] = {"amp": self._amp_default}  # options shown in Slicer (developer mode)
        if self._default_sw_batch_size is not None:
            config["sw_batch_size"] = int(self._default_sw_batch_size)
        BasicInferTask.__init__(
            self,
            path=os.path.join(path, "models", self.const.model_pytorch()),
            network=None,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=dimension,
            description=metadata.get("description", self.bundle_name),
            load_strict=True,
            config=config,
            preload=False,
            train_mode=False,
            skip_writer=False,
        )
        self.valid = True

    # ------------------------------------------------------------------ state reported to clients
    @property
    def weights_path(self) -> str:
        return self.path[0]

    def weights_available(self) -> bool:
        return os.path.isfile(self.weights_path)

    def is_valid(self) -> bool:
        return self.valid

    def info(self) -> Dict[str, Any]:
        i = super().info()
        weights = weights_state(self.weights_path)
        i["weights"] = weights
        i["bundle"] = {"name": self.bundle_name, "version": self.version}
        if not weights["available"]:
            i["description"] = (
                f"NO TRAINED WEIGHTS YET ({weights['file']} is missing): inference is disabled. "
                f"Submit labels, then run Train; the model becomes available when training saves its first "
                f"checkpoint. ({self.description})"
            )
        return i

    def options(self) -> Dict[str, Opt]:
        """What the ``params`` of an infer request may hold: this task's config (as ``/info/`` shows it), typed
        after its defaults, and what 3D Slicer adds (see ``lib/options.py``)."""
        opts = {**options_like(self._config), **CLIENT_INFER_OPTIONS}
        opts["device"] = devices(sorted(set(self._config.get("device") or []) | {"cpu", "cuda"}))
        if "sw_batch_size" in opts:
            opts["sw_batch_size"] = Opt(int, 1, 4096)
        for k, o in opts.items():  # the refinement's millimetres and weights: finite, not negative
            if o.kind is float and o.low is None:
                opts[k] = Opt(float, 0.0, 1e6)
        return opts

    def check_request(self, params: Dict[str, Any], model: str = "") -> Dict[str, Any]:
        return check_options(f"model '{model or self.bundle_name}'", params, self.options())

    def _default_device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    # ------------------------------------------------------------------ bundle transforms, thread-safe
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        with self._config_lock:
            return super().pre_transforms(data)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        with self._config_lock:
            return super().post_transforms(data)

    def inferer(self, data=None) -> Inferer:
        with self._config_lock:
            i = copy.copy(super().inferer(data))  # the parsed inferer is shared; SliceInferer edits itself per call
        sw = (data or {}).get("sw_batch_size")
        if sw and hasattr(i, "sw_batch_size"):
            i.sw_batch_size = max(1, int(sw))
        return i

    # ------------------------------------------------------------------ probabilities cache
    _CACHE = "_medurwkv_prob_cache"

    def _prob_key(self, data: Dict[str, Any]) -> Optional[Tuple]:
        path = data.get("image_path") or data.get(self.input_key)
        if not isinstance(path, str) or not path:
            return None
        image, weights = file_stamp(path), file_stamp(self.weights_path)
        if image is None or weights is None:
            return None
        return (os.path.realpath(path), image, weights, str(data.get("device")), str(data.get("amp")), str(data.get("sw_batch_size")))

    def _cache_hit(self, data: Dict[str, Any]) -> bool:
        return data.get(self._CACHE, (None,))[0] == "hit"

    def run_pre_transforms(self, data: Dict[str, Any], transforms):
        key = self._prob_key(data)
        entry = self._prob_cache.get(key)
        if entry is not None:  # the network's output for this volume is known: no loading, no network
            data[self._CACHE] = ("hit", entry)
            return data
        data = self._run_pre_transforms(data, transforms)
        data[self._CACHE] = ("miss", key)
        return data

    def run_invert_transforms(self, data: Dict[str, Any], pre_transforms, names):
        return data if self._cache_hit(data) else super().run_invert_transforms(data, pre_transforms, names)

    def run_post_transforms(self, data: Dict[str, Any], transforms):
        """The bundle's postprocessing, split before its first step that turns probabilities into labels
        (``AsDiscreted``, or an interactive refinement placed before it): what comes before is cached."""
        state, payload = data.pop(self._CACHE, (None, None))
        transforms = list(transforms)
        at = next((i for i, t in enumerate(transforms) if isinstance(t, AsDiscreted) or getattr(t, "needs_probabilities", False)), None)
        if state == "hit":
            data.update({k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in payload.items()})
            data["probabilities"] = "cached"
            return super().run_post_transforms(data, transforms[at:])
        if at is None or state != "miss":
            return super().run_post_transforms(data, transforms)
        data = super().run_post_transforms(data, transforms[:at])
        keys = [k for k in data if k in (self.input_key, self.output_label_key)
                or (k.startswith((f"{self.input_key}_", f"{self.output_label_key}_")) and not isinstance(data[k], str))]
        self._prob_cache.put(payload, {k: data[k].detach().cpu() if torch.is_tensor(data[k]) else copy.deepcopy(data[k]) for k in keys})
        return super().run_post_transforms(data, transforms[at:])

    def _run_pre_transforms(self, data: Dict[str, Any], transforms):
        """Loading errors are input errors (422); everything after loading is the server's.

        MONAI >= 1.5 ``Spacingd`` updates every ``<key>_*`` entry of the dict as a metadata dict, and MONAI
        Label 0.8.5 puts the string ``image_path`` in it (AttributeError: 'str' object has no attribute
        'update'): such non-dict entries are set aside while the transforms run.
        """
        transforms = list(transforms)
        prefix = f"{self.input_key}_"
        aside = {k: data.pop(k) for k in list(data) if k.startswith(prefix) and not isinstance(data[k], dict)}
        try:
            n_load = 0
            while n_load < len(transforms) and isinstance(transforms[n_load], (LoadImageTensord, LoadImaged)):
                n_load += 1
            if n_load:
                try:
                    data = run_transforms(data, transforms[:n_load], log_prefix="PRE", use_compose=False)
                except Exception as e:
                    path = str(aside.get(f"{self.input_key}_path") or data.get(self.input_key))
                    name = data.get("source_name") or os.path.basename(path)
                    reason = _root_message(e).replace(path, name)  # no server paths in client messages
                    raise BadInput(f"Could not read the image '{name}': {reason}") from None
            data = super().run_pre_transforms(data, transforms[n_load:])
        finally:
            data.update(aside)
        return data

    # ------------------------------------------------------------------ network: strict, lazy, hot-reloaded
    def _build_template(self) -> torch.nn.Module:
        if self._template is None:
            with self._config_lock:
                net = self.bundle_config.get_parsed_content(self.const.key_network_def(), instantiate=True)
            if self.dropout > 0:
                net.dropout = self.dropout  # MedURWKV.dropout is a settable property (MC dropout)
            self._template = net.cpu()
        return self._template

    def _load(self, path: str) -> torch.nn.Module:
        """A copy of the bundle's network with ``path`` loaded strictly (tensor-only), in eval or MC-dropout mode."""
        state = load_weights(path)
        network = copy.deepcopy(self._build_template())
        try:
            load_state_dict_strict(network, state, os.path.basename(path))
        except CheckpointError as e:
            raise WeightsError(
                f"{path} does not fit the bundle's network_def ({e}). Was it trained with "
                f"another variant/encoder/number of classes? Retrain from the app, or restore the matching model.pt."
            ) from None
        if self.mc_dropout:
            from medurwkv.nets.medurwkv import enable_mc_dropout

            enable_mc_dropout(network)
        else:
            network.eval()
        return network

    def _get_network(self, device, data):
        path = self.weights_path
        for attempt in range(2):
            stamp = file_stamp(path)
            if stamp is None:
                raise ModelNotReady(
                    f"Model '{self.model_name}' has no trained weights yet. Submit labels (Submit Label in Slicer) "
                    f"and run Train with trainer '{self.model_name}': inference starts working as soon as training "
                    f"saves its first checkpoint."
                ) from None
            with self._network_lock:
                cached = self._networks.get(device)
                if cached and cached[1] == stamp:
                    return cached[0]
                try:
                    network = self._load(path).to(torch.device(device))
                except CheckpointError as e:  # truncated or mid-write file
                    if attempt == 0:
                        logger.warning(f"Could not read {path} ({e}); retrying once")
                        time.sleep(1.0)
                        continue
                    raise WeightsError(f"{path} could not be loaded: {e}") from None
                logger.info(f"{'Reloaded' if cached else 'Loaded'} weights {path}{' (changed on disk)' if cached else ''} on {device}")
                self._networks[device] = (network, stamp)
                return network
        raise AssertionError("unreachable")

    def loaded_network(self, device: str, data: Optional[Dict[str, Any]] = None) -> Tuple[torch.nn.Module, threading.Lock]:
        """The network loaded from the current ``model.pt`` on ``device`` (reloaded when the file changed), and the
        lock to hold while running it: for other tasks that run it themselves (MC-dropout scoring)."""
        return self._get_network(device, data), self._device_lock(device)

    def warm_up(self) -> None:
        """Build the network, and load the weights if there are any (the server calls this at start)."""
        try:
            with self._network_lock:
                self._build_template()
            if self.weights_available():
                self._get_network(self._default_device(), None)
        except Exception as e:  # reported again, with its status, by the first inference
            logger.warning(f"Warm-up failed: {e}")

    def _device_lock(self, device: str) -> threading.Lock:
        with self._network_lock:
            return self._device_locks.setdefault(str(device), threading.Lock())

    def amp_context(self, data: Optional[Dict[str, Any]], device: str):
        """``torch.autocast`` on CUDA when ``amp`` is on (bf16 if supported, else fp16); nothing on CPU."""
        amp = (data or {}).get("amp", self._amp_default)
        amp = amp if isinstance(amp, bool) else str(amp).lower() in ("1", "true", "yes")
        if amp and str(device).startswith("cuda") and torch.cuda.is_available():
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast(device_type="cuda", dtype=dtype)
        return nullcontext()

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        if self._cache_hit(data):
            return data
        self._get_network(device, data)  # fail fast (409/500) before taking the device
        with self._device_lock(device), self.amp_context(data, device):
            data = super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)
        pred = data[self.output_label_key]
        if torch.is_tensor(pred) and pred.is_floating_point() and pred.dtype != torch.float32:
            data[self.output_label_key] = pred.float()
        return data

    # ------------------------------------------------------------------ request
    def __call__(self, request, callbacks=None) -> Tuple[Any, Dict]:
        with self._semaphore:
            return super().__call__(request, callbacks)

    def writer(self, data: Dict[str, Any], extension=None, dtype=None) -> Tuple[Any, Any]:
        source = str(data.get("image_path") or "")
        if extension is None and not data.get("result_extension") and (not source or os.path.isdir(source)):
            extension = ".nii.gz"  # a DICOM series (folder) has no extension to copy: answer with NIfTI
        file, result = super().writer(data, extension=extension, dtype=dtype or data.get("result_dtype") or "uint8")
        weights = weights_state(self.weights_path)
        cached = self._networks.get(data.get("device"))
        if cached:
            weights["loaded_mtime_ns"] = cached[1][0]
        result = dict(result or {})
        result["weights"] = weights
        result["probabilities"] = data.get("probabilities", "computed")  # "cached": the network did not run again
        return file, result
