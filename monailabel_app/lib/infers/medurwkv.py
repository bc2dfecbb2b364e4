"""Infer task: MONAI Label's ``BasicInferTask`` over ``bundle/configs/inference.json``, with what the stock
``BundleInferTask`` lacks. The bundle, its transforms, the network, the locks and the caches are the model's
:class:`lib.runtime.ModelRuntime`, shared with its click, scribble, edit and scoring tasks.

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
* **Concurrency control.** At most ``infer_concurrency`` requests run at once in the model's tasks and the
  network runs one batch at a time per device; together with ``lib.server`` (which moves ``/infer`` off the event loop) the
  server keeps answering ``/info/`` while volumes are segmented.
* **One network run per volume for interactive work.** The softmax on the image grid (and what the remaining
  steps need) is kept for the last ``prob_cache`` volumes, keyed by the image and weights files' stamps and the
  options; a click, stroke or re-run on the same volume only runs the steps from ``AsDiscreted`` (or the
  refinement before it) on. The result JSON says ``"probabilities": "cached"`` or ``"computed"``.
* **Input errors are the client's.** An unreadable volume fails at loading with HTTP 422 and the reader's message.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from monai.inferers import Inferer, SliceInferer
from monai.transforms import AsDiscreted
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from medurwkv.checkpoint import file_stamp

from ..options import COMMON, Opt, check_options, devices, options_like
from ..runtime import ModelRuntime, weights_state


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


class MedURWKVInfer(BasicInferTask):
    """Segmentation with the bundle's Med-URWKV network (see the module docstring).

    Args:
        runtime: the model's :class:`lib.runtime.ModelRuntime` (bundle, network, locks, caches), shared with the
            model's other tasks.
    """

    def __init__(self, runtime: ModelRuntime):
        self.runtime = runtime
        self.model_name = runtime.name
        self.valid = False
        self.version = runtime.metadata.get("version")
        self.bundle_name = runtime.metadata.get("name", os.path.basename(runtime.bundle_path))
        self.key_image, self.key_pred = runtime.key_image, runtime.key_pred

        # a 2D network applied slice by slice segments 3D volumes: that is the dimension clients see
        inferer = runtime.parsed("inferer")
        net_dims = len(runtime.image_format.get("spatial_shape") or [0, 0, 0])
        dimension = 3 if isinstance(inferer, SliceInferer) else net_dims
        self._default_sw_batch_size = getattr(inferer, "sw_batch_size", None)

        config: Dict[str, Any] = {"amp": runtime.amp_default}  # options shown in Slicer (developer mode)
        if self._default_sw_batch_size is not None:
            config["sw_batch_size"] = int(self._default_sw_batch_size)
        BasicInferTask.__init__(
            self,
            path=runtime.weights_path,
            network=None,
            type=InferType.SEGMENTATION,
            labels=runtime.labels,
            dimension=dimension,
            description=runtime.metadata.get("description", self.bundle_name),
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
        return self.runtime.weights_path

    def is_valid(self) -> bool:
        return self.valid

    def info(self) -> Dict[str, Any]:
        i = super().info()
        weights = weights_state(self.weights_path)
        i["version"] = self.version
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

    # ------------------------------------------------------------------ the bundle's transforms (the runtime's)
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return self.runtime.pre_transforms(data)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return self.runtime.post_transforms(data)

    def inferer(self, data=None) -> Inferer:
        return self.runtime.inferer(data)

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
        entry = self.runtime.prob_cache.get(key)
        if entry is not None:  # the network's output for this volume is known: no loading, no network
            data[self._CACHE] = ("hit", entry)
            return data
        data = self.runtime.preprocess(data, transforms)
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
        self.runtime.prob_cache.put(payload, {k: data[k].detach().cpu() if torch.is_tensor(data[k]) else copy.deepcopy(data[k]) for k in keys})
        return super().run_post_transforms(data, transforms[at:])

    # ------------------------------------------------------------------ network (the runtime's)
    def _get_network(self, device, data):
        return self.runtime.network(device)

    def _device_lock(self, device):
        return self.runtime.device_lock(device)

    def amp_context(self, data: Optional[Dict[str, Any]], device: str):
        return self.runtime.amp_context(data, device)

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
        with self.runtime.requests:
            return super().__call__(request, callbacks)

    def writer(self, data: Dict[str, Any], extension=None, dtype=None) -> Tuple[Any, Any]:
        source = str(data.get("image_path") or "")
        if extension is None and not data.get("result_extension") and (not source or os.path.isdir(source)):
            extension = ".nii.gz"  # a DICOM series (folder) has no extension to copy: answer with NIfTI
        file, result = super().writer(data, extension=extension, dtype=dtype or data.get("result_dtype") or "uint8")
        return file, {**(result or {}), **self.report(data)}

    def report(self, data: Dict[str, Any]) -> Dict[str, Any]:
        """What every answer tells about how it was made: the weights file (and the one the network was loaded
        from) and whether the network ran (``"probabilities": "cached"``: it did not run again)."""
        weights = weights_state(self.weights_path)
        loaded = self.runtime.loaded_stamp(data.get("device"))
        if loaded:
            weights["loaded_mtime_ns"] = loaded[0]
        return {"weights": weights, "probabilities": data.get("probabilities", "computed")}
