"""What every task of one model shares: :class:`ModelRuntime`, created once per model by its ``lib/configs`` module
and handed to the model's infer, click, scribble, edit and scoring tasks through their constructors.

One runtime holds:

* **the bundle**: its folder, ``metadata.json`` (input/output keys, classes) and one parsed inference config
  (``monai.bundle.ConfigParser``; ConfigParser and ``sys.path`` edits are not thread-safe, so everything parsed from
  it is parsed under :attr:`ModelRuntime.config_lock`);
* **the bundle's transforms and inferer** as MONAI Label runs them (:meth:`~ModelRuntime.pre_transforms`,
  :meth:`~ModelRuntime.inferer`, :meth:`~ModelRuntime.post_transforms`, :meth:`~ModelRuntime.preprocess`), and the
  intensity scaling its preprocessing applies (:meth:`~ModelRuntime.intensity_percentiles`);
* **the network**: built once from ``network_def``, loaded strictly (tensor-only) from the weights file, one copy
  per device, rebuilt when the file changes on disk (mtime or size; a file caught mid-write is retried once):
  :meth:`~ModelRuntime.network`;
* **what bounds the work**: the requests that may run at once (:attr:`~ModelRuntime.requests`, ``--conf
  infer_concurrency``) and one lock per device held while the network runs (:meth:`~ModelRuntime.device_lock`);
* **the probability cache** (:attr:`~ModelRuntime.prob_cache`): a click after Auto Segmentation reuses its network
  output.

:meth:`ModelRuntime.variant` makes the runtime of another network over the same bundle (the click-trained model,
the MC-dropout scorer): its own config, weights, network and cache, the same request budget and device locks.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from monai.bundle import ConfigItem, ConfigParser
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import Compose, LoadImaged, SaveImaged, ScaleIntensityRangePercentilesd
from monailabel.interfaces.utils.transform import run_transforms
from monailabel.transform.post import Restored
from monailabel.transform.pre import LoadImageTensord
from monailabel.utils.others.class_utils import unload_module

from medurwkv.checkpoint import CheckpointError, file_stamp, load_state_dict_strict, load_weights
from medurwkv.data2d import channel_def

from .errors import BadInput, ModelNotReady, WeightsError, root_message

logger = logging.getLogger(__name__)

INFERENCE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")  # the first found is the bundle's
DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?")  # what a request's "device" may set in the parsed config
DEFAULT_PERCENTILES = (0.5, 99.5)  # intensity scaling for a bundle whose preprocessing has no percentile scaling


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

    @classmethod
    def from_conf(cls, conf: Dict[str, str], entries: Optional[int] = None, min_entries: int = 0) -> "ProbabilityCache":
        """The cache the app's ``--conf`` asks for: ``prob_cache`` volumes (2; or ``entries``), at least
        ``min_entries``, and ``prob_cache_mb`` MiB (1024)."""
        n = int(conf.get("prob_cache", "2")) if entries is None else int(entries)
        return cls(max(min_entries, n), int(float(conf.get("prob_cache_mb", "1024")) * 2**20))

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


class ModelRuntime:
    """One model's bundle, network, locks and caches, shared by all its tasks (see the module docstring).

    Args:
        bundle_path: the bundle directory (``configs/inference.json``, ``configs/metadata.json``, ``models/``).
        conf: the app's ``--conf`` dict (``amp``, ``infer_concurrency``, ``prob_cache``, ``prob_cache_mb``).
        name: the model's name in the app (messages; default: the bundle folder's name).
        extra_configs: config files of ``configs/`` read over the inference config (e.g. ``inference_edit.json``).
        weights: the weights file, relative to ``models/``.
        dropout: decoder dropout set on the network (``> 0`` with ``mc_dropout=True`` for MC-dropout scoring).
        mc_dropout: only dropout layers in train mode (``medurwkv.nets.medurwkv.enable_mc_dropout``), else eval.
        prob_cache: volumes kept in :attr:`prob_cache` (default ``--conf prob_cache``, 2; 0: off).
    """

    def __init__(
        self,
        bundle_path: str,
        conf: Dict[str, str],
        name: Optional[str] = None,
        extra_configs: Sequence[str] = (),
        weights: str = "model.pt",
        dropout: float = 0.0,
        mc_dropout: bool = False,
        prob_cache: Optional[int] = None,
    ):
        self.bundle_path = bundle_path
        self.conf = conf
        self.name = name or os.path.basename(os.path.normpath(bundle_path))
        configs = os.path.join(bundle_path, "configs")
        found = [c for c in INFERENCE_CONFIGS if os.path.exists(os.path.join(configs, c))]
        if not found:
            raise FileNotFoundError(f"No {' or '.join(INFERENCE_CONFIGS)} in {configs}")
        self.config_files = [os.path.join(configs, found[0])] + [os.path.join(configs, c) for c in extra_configs]
        self.config = ConfigParser()
        self.config.read_config(self.config_files if extra_configs else self.config_files[0])
        self.config.config.update({"bundle_root": bundle_path, "use_click": False})
        self.config_lock = threading.RLock()

        metadata_file = os.path.join(configs, "metadata.json")
        with open(metadata_file) as fp:
            self.metadata = json.load(fp)
        self.key_image, self.image_format = next(iter(self.metadata["network_data_format"]["inputs"].items()))
        self.key_pred = next(iter(self.metadata["network_data_format"]["outputs"]))
        self.channel_def, self.labels = bundle_labels(metadata_file)

        self.weights_path = os.path.join(bundle_path, "models", weights)
        self.dropout, self.mc_dropout = float(dropout), bool(mc_dropout)
        self.amp_default = str(conf.get("amp", "true")).lower() in ("1", "true", "yes")
        self.prob_cache = ProbabilityCache.from_conf(conf, prob_cache)
        self.requests = threading.BoundedSemaphore(max(1, int(conf.get("infer_concurrency", "2"))))
        self._device_locks: Dict[str, threading.Lock] = {}
        self._device_locks_guard = threading.Lock()
        self._network_lock = threading.Lock()  # building/reloading the cached networks
        self._template: Optional[torch.nn.Module] = None
        self._networks: Dict[str, Tuple[torch.nn.Module, Tuple]] = {}

    def variant(
        self,
        extra_configs: Sequence[str] = (),
        weights: str = "model.pt",
        dropout: float = 0.0,
        mc_dropout: bool = False,
        prob_cache: Optional[int] = None,
    ) -> "ModelRuntime":
        """Another network over the same bundle: its own config, weights, network and probability cache, and this
        runtime's request budget and device locks (the same machine)."""
        other = ModelRuntime(self.bundle_path, self.conf, self.name, extra_configs, weights, dropout, mc_dropout, prob_cache)
        other.requests = self.requests
        other._device_locks, other._device_locks_guard = self._device_locks, self._device_locks_guard
        return other

    # ------------------------------------------------------------------ the bundle's config, thread-safe
    def parsed(self, key: str, data: Optional[Dict[str, Any]] = None, default: Any = None) -> Any:
        """The bundle config's ``key`` instantiated (``default`` when absent), parsed under :attr:`config_lock` with
        the bundle's folder importable (its ``scripts/``) and the config's ``device`` set to ``data["device"]``."""
        with self.config_lock:
            if key not in self.config:
                return default
            device = (data or {}).get("device")
            if isinstance(device, str) and DEVICE.fullmatch(device):  # never an expression ("$...") from a request
                self.config.config["device"] = device
                if self.config.ref_resolver.items.get("device"):
                    self.config.ref_resolver.items["device"] = ConfigItem(config=device, id="device")
            sys.path.insert(0, self.bundle_path)
            unload_module("scripts")
            try:
                return self.config.get_parsed_content(key, instantiate=True)
            finally:
                sys.path.remove(self.bundle_path)

    def _transforms(self, key: str, data: Optional[Dict[str, Any]]) -> List[Callable]:
        c = self.parsed(key, data, default=[])
        return list(c.transforms) if isinstance(c, Compose) else list(c)

    def pre_transforms(self, data: Optional[Dict[str, Any]] = None) -> List[Callable]:
        """The bundle's ``preprocessing``, its loaders wrapped as MONAI Label wraps them (an image already loaded, a
        session's volume, passes through)."""
        pre = []
        for t in self._transforms("preprocessing", data):
            if isinstance(t, LoadImaged):
                # as monailabel's BundleInferTask (LoadImaged has no public setter): the metadata dict that
                # Restored reads (image_meta_dict) is kept next to the image
                t._loader.image_only = False
                t = LoadImageTensord(keys=t.keys, load_image_d=t)
            pre.append(t)
        return pre

    def post_transforms(self, data: Optional[Dict[str, Any]] = None) -> List[Callable]:
        """The bundle's ``postprocessing`` without ``SaveImaged`` (MONAI Label writes the result), restored to the
        image's own grid."""
        post = [t for t in self._transforms("postprocessing", data) if not isinstance(t, SaveImaged)]
        return post + [Restored(keys=self.key_pred, ref_image=self.key_image)]

    def inferer(self, data: Optional[Dict[str, Any]] = None) -> Inferer:
        """A copy of the bundle's ``inferer`` (the parsed one is shared; ``SliceInferer`` edits itself per call),
        with ``data["sw_batch_size"]`` when given."""
        i = copy.copy(self.parsed("inferer", data, default=None) or SimpleInferer())
        sw = (data or {}).get("sw_batch_size")
        if sw and hasattr(i, "sw_batch_size"):
            i.sw_batch_size = max(1, int(sw))
        return i

    def intensity_percentiles(self) -> Tuple[float, float]:
        """The ``lower`` / ``upper`` percentiles of the bundle's ``ScaleIntensityRangePercentilesd`` (the intensity
        scaling the network sees), read from its parsed inference config; :data:`DEFAULT_PERCENTILES` without one."""
        for t in self._transforms("preprocessing", None):
            if isinstance(t, ScaleIntensityRangePercentilesd):
                return float(t.scaler.lower), float(t.scaler.upper)
        return DEFAULT_PERCENTILES

    def preprocess(self, data: Dict[str, Any], transforms: Optional[Sequence[Callable]] = None) -> Dict[str, Any]:
        """``data`` through ``transforms`` (default: :meth:`pre_transforms`). Loading errors are input errors (422,
        naming the file as the client sent it); everything after loading is the server's.

        MONAI >= 1.5 ``Spacingd`` updates every ``<key>_*`` entry of the dict as a metadata dict, and MONAI Label
        0.8.5 puts the string ``image_path`` in it (AttributeError: 'str' object has no attribute 'update'): such
        non-dict entries are set aside while the transforms run.
        """
        transforms = list(self.pre_transforms(data) if transforms is None else transforms)
        prefix = f"{self.key_image}_"
        aside = {k: data.pop(k) for k in list(data) if k.startswith(prefix) and not isinstance(data[k], dict)}
        try:
            n_load = 0
            while n_load < len(transforms) and isinstance(transforms[n_load], (LoadImageTensord, LoadImaged)):
                n_load += 1
            if n_load:
                try:
                    data = run_transforms(data, transforms[:n_load], log_prefix="PRE", use_compose=False)
                except Exception as e:
                    path = str(aside.get(f"{self.key_image}_path") or data.get(self.key_image))
                    name = data.get("source_name") or os.path.basename(path)
                    reason = root_message(e).replace(path, name)  # no server paths in client messages
                    raise BadInput(f"Could not read the image '{name}': {reason}") from None
            data = run_transforms(data, transforms[n_load:], log_prefix="PRE", use_compose=False)
        finally:
            data.update(aside)
        return data

    # ------------------------------------------------------------------ network: strict, lazy, hot-reloaded
    def weights(self) -> Dict[str, Any]:
        return weights_state(self.weights_path)

    def _build_template(self) -> torch.nn.Module:
        if self._template is None:
            net = self.parsed("network_def")
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

    @staticmethod
    def device_key(device: Any) -> str:
        """One name per device: ``cuda`` is the current CUDA device's ``cuda:N`` (so ``cuda`` and ``cuda:0`` share a
        lock and a network copy), ``cpu`` stays ``cpu``."""
        try:
            d = torch.device(device)
        except (RuntimeError, TypeError):  # not a device name: its own key (the option allow-list refuses these)
            return str(device)
        if d.type == "cuda" and d.index is None and torch.cuda.is_available():
            d = torch.device("cuda", torch.cuda.current_device())
        return str(d)

    def network(self, device: str) -> torch.nn.Module:
        """The network loaded from the current weights file on ``device`` (reloaded when the file changed); 409
        without weights, 500 naming the keys when they do not fit."""
        path = self.weights_path
        device = self.device_key(device)
        for attempt in range(2):
            stamp = file_stamp(path)
            if stamp is None:
                raise ModelNotReady(
                    f"Model '{self.name}' has no trained weights yet. Submit labels (Submit Label in Slicer) "
                    f"and run Train with trainer '{self.name}': inference starts working as soon as training "
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

    def loaded_stamp(self, device: Any) -> Optional[Tuple]:
        """The stamp (mtime_ns, size, ...) of the weights file the network on ``device`` was loaded from; None when
        none is loaded there."""
        cached = self._networks.get(self.device_key(device)) if device is not None else None
        return cached[1] if cached else None

    def device_lock(self, device: Any) -> threading.Lock:
        """The lock to hold while running a network on ``device`` (one batch at a time per device)."""
        with self._device_locks_guard:
            return self._device_locks.setdefault(self.device_key(device), threading.Lock())

    def default_device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def warm_up(self) -> None:
        """Build the network, and load the weights if there are any (the server calls this at start)."""
        try:
            with self._network_lock:
                self._build_template()
            if os.path.isfile(self.weights_path):
                self.network(self.default_device())
        except Exception as e:  # reported again, with its status, by the first inference
            logger.warning(f"Warm-up failed: {e}")

    def amp_context(self, data: Optional[Dict[str, Any]], device: str):
        """``torch.autocast`` on CUDA when ``amp`` is on (bf16 if supported, else fp16); nothing on CPU."""
        amp = (data or {}).get("amp", self.amp_default)
        amp = amp if isinstance(amp, bool) else str(amp).lower() in ("1", "true", "yes")
        if amp and str(device).startswith("cuda") and torch.cuda.is_available():
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast(device_type="cuda", dtype=dtype)
        return nullcontext()
