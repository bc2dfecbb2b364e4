"""Med-URWKV-Edit in 3D Slicer: the click-guided network (``medurwkv/guidance.py``) as a ``deepedit`` model.

The network takes the clicks as input channels (it was trained with them: ``bundle/configs/train_edit.json``);
its weights are ``<bundle>/models/edit/model.pt`` and its configs ``inference.json`` + ``inference_edit.json``.

What Slicer's MONAI Label module sends for a ``deepedit`` model (its ``onClickDeepgrow``): the clicks of every
segment named like one of the model's labels, as voxel indices ``[i, j, k]`` of the image as stored
(``{"brain": [[i, j, k], ...], "background": [[i, j, k], ...]}``), the current segment's name (``label``) and
optionally a box (``roi``: voxel bounds ``[i0, i1, j0, j1, k0, k1]``). A request may also upload the current
segmentation (``label`` as a file, as for Scribbles: MONAI Label then passes its path). The task is registered
as 3D, so Slicer imports the whole answer, not only the clicked slice.

* **No clicks**: the automatic mode (all-zero guidance).
* **Reach**: a click guides its own axial slice of the network's grid and ``reach`` slices on each side (see
  ``medurwkv/guidance.py``); the network runs only there, and every other slice keeps the automatic answer.
* **Then the graph cut of ``medurwkv_clicks``** (``lib/infers/clicks.py``'s :func:`refine_near_seeds`, the same
  function and defaults) on the network's guided probabilities, with the clicks as seeds: only voxels within its
  ``roi_margin_mm`` of a click and inside the steered region (below) may change (:func:`refine_edit`). The
  network carries each click across the slices it reaches; the cut makes the answer follow the image's edges
  next to the click. Both together, and the network alone, are measured by ``benchmarks/bench_clicks.py``.
* **Every clicked voxel gets its click's class** (as with ``medurwkv_clicks``).
* **The clinician's work is kept**: when the current segmentation is sent, every voxel outside the steered
  region (the slices the clicks reach, inside ``roi`` when one is given) keeps its value. With a ``roi``, only
  clicks inside it steer, and the network's change is confined to the box (on the network's grid: the box's
  bounding box there).
* **Same request, same answer**: the network runs in eval mode and the automatic logits are cached per volume
  (keyed by the image and weights files' stamps), so a click re-runs only the slices it reaches.
* A click outside the image, a click that is not ``[i, j, k]``, or a segment name the model does not have is a
  422 that says which.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from monai.transforms import AsDiscreted, MapTransform
from monailabel.interfaces.tasks.infer_v2 import InferType

from medurwkv.guidance import AddClickGuidanced, guidance_points, infer_slices_with_clicks, map_points

from ..errors import BadInput
from ..options import Opt
from ..runtime import ModelRuntime, ProbabilityCache
from .clicks import ClickRefined, _spacing, refine_defaults, refine_near_seeds, roi_mask, uploaded_file
from .medurwkv import MedURWKVInfer

logger = logging.getLogger(__name__)

EDIT_CONFIG = "inference_edit.json"
EDIT_WEIGHTS = os.path.join("edit", "model.pt")


def edit_available(bundle_path: str) -> bool:
    """The bundle has the click-guided model's config and weights."""
    return os.path.isfile(os.path.join(bundle_path, "configs", EDIT_CONFIG)) and os.path.isfile(
        os.path.join(bundle_path, "models", EDIT_WEIGHTS)
    )


def parse_edit_clicks(request: Dict[str, Any], label_names: Sequence[str]) -> Dict[str, List[List[int]]]:
    """``{label name: [[i, j, k], ...]}`` from a request; a 422 naming the first malformed click or unknown name."""
    selected = request.get("label")
    if isinstance(selected, str) and selected and not uploaded_file(selected) and selected not in label_names:
        raise BadInput(f"unknown label '{selected}': this model's labels are {list(label_names)}")
    for key, value in request.items():  # click lists under a name the model does not have (e.g. deepgrow's)
        if key not in label_names and key != "roi" and _looks_like_clicks(value):
            raise BadInput(f"clicks for unknown label '{key}': this model's labels are {list(label_names)}")
    clicks = {}
    for name in label_names:
        points = request.get(name) or []
        if not isinstance(points, (list, tuple)):
            raise BadInput(f"'{name}' must be a list of [i, j, k] voxel indices, got {points!r}")
        parsed = []
        for p in points:
            if not isinstance(p, (list, tuple)) or len(p) != 3:
                raise BadInput(f"{name} click {p!r} is not a voxel index [i, j, k]")
            try:
                parsed.append([int(round(float(x))) for x in p])
            except (TypeError, ValueError, OverflowError):
                raise BadInput(f"{name} click {p!r} is not a voxel index [i, j, k]") from None
        clicks[name] = parsed
    return clicks


def _looks_like_clicks(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(p, (list, tuple)) for p in value)


def steered_region(
    guidance: Dict[str, Any], src: np.ndarray, dst: np.ndarray, spatial: Sequence[int], reach: int, roi: Any = None
) -> np.ndarray:
    """The voxels of the image (``spatial``, voxel-to-world ``src``) the clicks steer: those whose slice on the
    network's grid (voxel-to-world ``dst``) is within ``reach`` of a click's slice (``guidance``: clicks on that
    grid), inside ``roi`` (voxel bounds on the image) when one is given."""
    steered = np.zeros(tuple(spatial), bool)
    zs = sorted({int(p[-1]) for pts in guidance.values() for p in guidance_points(pts)})
    if zs:  # slice index on the network's grid of every image voxel: an affine function of (i, j, k)
        row = (np.linalg.inv(dst) @ src)[2]
        ijk = np.indices(tuple(spatial), dtype=np.float32)
        z = row[0] * ijk[0] + row[1] * ijk[1] + row[2] * ijk[2] + row[3]
        # the nearest click slice of every voxel, in one pass (a loop over the clicked slices was one pass each)
        centres = np.asarray(zs, dtype=np.float32)
        at = np.clip(np.searchsorted(centres, z), 1, len(centres) - 1) if len(centres) > 1 else np.zeros(z.shape, int)
        nearest = np.minimum(np.abs(z - centres[at]), np.abs(z - centres[np.maximum(at - 1, 0)]))
        steered = nearest <= reach + 0.5
    inside = roi_mask(roi, spatial)
    return steered if inside is None else steered & inside


def refine_edit(
    prob: np.ndarray,
    clicks: Dict[str, List[List[int]]],
    steered: np.ndarray,
    spacing: np.ndarray,
    image: Any,
    opt: Dict[str, float],
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Med-URWKV-Edit's answer on the image grid: the graph cut of ``medurwkv_clicks`` (:func:`refine_near_seeds`)
    on the click-guided network's probabilities, confined to the steered region.

    Args:
        prob: (2, *spatial) softmax of the network run with the clicks, on the image grid.
        clicks: ``{label name: [[i, j, k], ...]}`` on the image grid (``"background"``: background, any other
            name: foreground).
        steered: (*spatial) the voxels the clicks may change (:func:`steered_region`).
        spacing: voxel size in mm per axis.
        image: returns the image on that grid scaled to 0..1 (called only when there are clicks).
        opt: ``ClickRefined``'s parameters (``click_radius_mm``, ``roi_margin_mm``, ``click_spread_mm``,
            ``lamda``, ``sigma``).

    Returns:
        the boolean foreground (*spatial) and the refinement's numbers for the log. Outside ``steered`` it is the
        network's argmax; clicked voxels are not forced here (:class:`EditResultd` does it last).
    """
    spatial = tuple(prob.shape[1:])
    seeds = {True: np.zeros(spatial, bool), False: np.zeros(spatial, bool)}
    for name, points in clicks.items():
        for p in points:
            if steered[tuple(p)]:
                seeds[name != "background"][tuple(p)] = True
    network = prob[1] > prob[0]
    if not (seeds[True].any() or seeds[False].any()):
        return network, {"box": [0] * len(spatial), "changed": 0}
    label, info = refine_near_seeds(prob, spacing, image, seeds[True], seeds[False], opt, opt["click_radius_mm"])
    return np.where(steered, label, network), info


class EditClicksToGridd(MapTransform):
    """The request's clicks (voxels of the image as stored) as ``guidance`` on the network's grid.

    Runs after the bundle's spatial preprocessing, before :class:`AddClickGuidanced`: the image's
    ``original_affine`` (as loaded) and ``affine`` (now) map each click. Clicks outside the image are a 422; with a
    ``roi``, clicks outside it are dropped (they do not steer).
    """

    def __init__(self, label_names: Sequence[str], keys: str = "image"):
        super().__init__(keys)
        self.label_names = list(label_names)

    def __call__(self, data):
        d = dict(data)
        img = d[self.keys[0]]
        shape = [int(x) for x in np.asarray(img.meta["spatial_shape"]).tolist()]
        src, dst = np.asarray(img.meta["original_affine"], np.float64), np.asarray(img.affine, np.float64)
        clicks = parse_edit_clicks(d, self.label_names)
        inside = roi_mask(d.get("roi"), shape)
        guidance, used = {}, {}
        for name, points in clicks.items():
            for p in points:
                if any(not 0 <= x < n for x, n in zip(p, shape)):
                    raise BadInput(f"{name} click {p} is outside the image (size {shape})")
            kept = [p for p in points if inside is None or inside[tuple(p)]]
            used[name] = kept
            guidance[name] = map_points(kept, src, dst).tolist() if kept else []
        d["guidance"] = guidance
        d["edit_clicks"] = used  # on the image's grid, for the steered region
        d["edit_grid"] = (src, dst, shape)
        return d


class EditResultd(MapTransform):
    """After ``AsDiscreted``: every clicked voxel gets its click's class, and when the current segmentation is sent
    with the request (``label``: a label volume on the image's grid), every voxel outside the steered region keeps
    its value there.

    The steered region: image voxels whose slice on the network's grid is within ``reach`` of a click's slice,
    inside the ``roi`` when one is given. Without a segmentation sent, nothing else is needed: beyond the reach the
    network did not run and outside the box its change was undone on its grid (:meth:`MedURWKVEdit.run_inferer`).
    """

    def __init__(self, keys: str, reach: int, target: str):
        super().__init__(keys)
        self.reach, self.target = reach, target

    def __call__(self, data):
        d = dict(data)
        key = self.keys[0]
        pred = d[key]
        arr = np.asarray(pred.detach().cpu() if torch.is_tensor(pred) else pred)
        spatial = arr.shape[-3:]
        fg = arr.reshape(-1, *spatial)[-1] > 0
        src, dst, _ = d["edit_grid"]
        steered = d.pop("edit_steered", None)  # EditRefined's, when it ran on clicks
        path = uploaded_file(d.get("label"))  # only the segment uploaded with this request, never a path sent
        if path is not None:
            values = np.rint(ClickRefined()._load(path, spatial, "the segmentation sent", src)).astype(np.int64)
            base = values == (1 if values.max() <= 1 else self._target_id(d))
            if steered is None or steered.shape != tuple(spatial):
                steered = steered_region(d["guidance"], src, dst, spatial, self.reach, d.get("roi"))
            fg = np.where(steered, fg, base)
            logger.info(f"Med-URWKV-Edit: {int(steered.sum())} voxel(s) steered; the segmentation sent kept elsewhere")
        for name, points in d["edit_clicks"].items():
            for p in points:
                fg[tuple(p)] = name != "background"
        out = fg.astype(arr.dtype).reshape(arr.shape)
        d[key] = pred.clone().copy_(torch.as_tensor(out)) if torch.is_tensor(pred) else out
        return d

    def _target_id(self, d) -> int:
        info = d.get("label_info") or []
        ids = {str(x.get("name")): x.get("id", x.get("idx")) for x in info if isinstance(x, dict)}
        try:
            return int(ids.get(self.target, 1))
        except (TypeError, ValueError):
            raise BadInput(f"'label_info' gives no integer id for '{self.target}'") from None


class EditRefined(MapTransform):
    """Before ``AsDiscreted``: :func:`refine_edit` on the probabilities ``keys`` (2 channels, image grid), replaced by
    the refined one-hot result. ``refine_options``: ``ClickRefined``'s (the app's ``--conf click_*`` through
    :func:`~lib.infers.clicks.refine_defaults`, and the bundle's intensity percentiles), as ``medurwkv_clicks``."""

    def __init__(self, keys: str, reach: int, **refine_options: Any):
        super().__init__(keys)
        self.reach = reach
        self.refiner = ClickRefined(keys=keys, **refine_options)  # its parameters and image reader, not a copy

    def __call__(self, data):
        d = dict(data)
        key = self.keys[0]
        prob = d[key]
        if not any(d["edit_clicks"].values()):
            return d  # the automatic mode
        arr = prob.detach().cpu().float().numpy() if torch.is_tensor(prob) else np.asarray(prob, np.float32)
        if arr.shape[0] != 2:
            raise BadInput(f"interactive correction needs a 2-class model, this one has {arr.shape[0]} classes")
        spatial = arr.shape[1:]
        src, dst, _ = d["edit_grid"]
        steered = d["edit_steered"] = steered_region(d["guidance"], src, dst, spatial, self.reach, d.get("roi"))
        label, info = refine_edit(arr, d["edit_clicks"], steered, _spacing(prob, len(spatial)),
                                  lambda: self.refiner._image(d, spatial), self.refiner._params(d))
        out = np.stack([~label, label]).astype(arr.dtype)
        d[key] = prob.clone().copy_(torch.as_tensor(out)) if torch.is_tensor(prob) else out
        logger.info(f"Med-URWKV-Edit: graph cut near the clicks, box {info['box']} voxels, {info['changed']} voxel(s) changed")
        return d


class MedURWKVEdit(MedURWKVInfer):
    """The click-guided Med-URWKV-Edit (type ``deepedit``; see the module docstring).

    Args:
        runtime: the model's runtime; this task runs on its :meth:`~lib.runtime.ModelRuntime.variant` with
            ``configs/inference_edit.json`` and ``models/edit/model.pt`` (its own network; the same request budget
            and device locks).
        conf: as the runtime's (``prob_cache`` also sets how many volumes' automatic logits are kept; ``click_*``
            the graph cut after the network, as for ``medurwkv_clicks``).
    """

    def __init__(self, runtime: ModelRuntime, conf: Dict[str, str]):
        # the parent's cache of post-processed outputs is off (prob_cache=0): clicks change them
        super().__init__(runtime.variant(extra_configs=[EDIT_CONFIG], weights=EDIT_WEIGHTS, prob_cache=0))
        self.label_names = dict(self.runtime.parsed("edit_label_names"))
        self.labels = self.label_names  # Slicer sends one click list per name, "background" included
        self.type = InferType.DEEPEDIT
        self.refine_defaults = refine_defaults(conf)  # the graph cut after the network: as medurwkv_clicks
        self._auto_logits = ProbabilityCache.from_conf(conf, min_entries=1)  # the automatic logits: at least one volume
        self.description = (
            "Med-URWKV-Edit: the network takes foreground/background clicks (one list per label name) and "
            "corrects the slices they reach; no clicks = automatic segmentation."
        )

    def _guidance_transform(self) -> AddClickGuidanced:
        return self.runtime.parsed("edit_guidance")

    def pre_transforms(self, data=None) -> Sequence:
        transforms = list(super().pre_transforms(data))
        at = next((i for i, t in enumerate(transforms) if isinstance(t, AddClickGuidanced)), None)
        if at is None:
            raise RuntimeError(f"{EDIT_CONFIG}'s preprocessing has no AddClickGuidanced step")
        transforms.insert(at, EditClicksToGridd(list(self.label_names), keys=self.input_key))
        return transforms

    def options(self):
        """The automatic task's options, plus one click list per label name (as Slicer sends deepedit clicks)."""
        opts = super().options()
        for name in self.label_names:
            opts.setdefault(name, Opt(list, doc=f"clicks [[i, j, k], ...] for '{name}'"))
        return opts

    def post_transforms(self, data=None) -> Sequence:
        transforms = list(super().post_transforms(data))
        at = next((i for i, t in enumerate(transforms) if isinstance(t, AsDiscreted)), None)
        if at is None:
            raise RuntimeError("the bundle's postprocessing has no AsDiscreted(argmax) step")
        target = next((n for n in self.label_names if n != "background"), "")
        reach = self._guidance_transform().reach
        transforms.insert(at + 1, EditResultd(self.output_label_key, reach, target))
        transforms.insert(at, EditRefined(self.output_label_key, reach, percentiles=self.runtime.intensity_percentiles(),
                                          **self.refine_defaults))
        return transforms

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        network = self._get_network(device, data)
        transform = self._guidance_transform()
        image = data[self.input_key]
        key = self._prob_key(data)
        inferer = self.inferer(data)
        with self._device_lock(device), torch.no_grad(), self.amp_context(data, device):
            entry = self._auto_logits.get(key)
            if entry is None:
                x = image.clone()
                x[transform.number_intensity_ch :] = 0  # the automatic mode
                auto = inferer(x[None].to(torch.device(device)), network)[0].float().cpu()
                self._auto_logits.put(key, {"logits": auto})
            else:
                auto = entry["logits"]
            logits = infer_slices_with_clicks(network, inferer, image[: transform.number_intensity_ch].cpu(),
                                              data["guidance"], auto, transform).float()
        roi = data.get("roi")
        if roi and any(data["edit_clicks"].values()):  # confine the change to the box's bounding box on this grid
            src, dst, shape = data["edit_grid"]
            bounds = [sorted((int(roi[2 * a]), int(roi[2 * a + 1]))) for a in range(3)]
            corners = np.array(np.meshgrid(*[[max(a, 0), max(b - 1, 0)] for a, b in bounds], indexing="ij")).reshape(3, -1).T
            q = map_points(corners, src, dst)
            lo, hi = np.maximum(q.min(0), 0), q.max(0) + 1
            keep = auto.clone()
            box = (slice(None),) + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            keep[box] = logits[box]
            logits = keep
        data[self.output_label_key] = logits
        data["probabilities"] = "cached" if entry is not None else "computed"
        return data

    def __call__(self, request, callbacks=None):
        parse_edit_clicks(request, list(self.label_names))  # malformed clicks fail before the volume is read
        return super().__call__(request, callbacks)
