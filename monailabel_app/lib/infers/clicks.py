"""Click- and scribble-guided correction: Med-URWKV's segmentation refined with foreground/background clicks (3D
Slicer SmartEdit, :class:`MedURWKVClicks`) or painted strokes (Slicer's Scribbles, :class:`MedURWKVScribbles`).

The network itself takes no clicks (it is the bundle's automatic model; a click-trained "DeepEdit" variant would
need guidance input channels and a click-simulating trainer). What the clicks steer is the step after it, the
interactive refinement of Wang et al. 2018 ("Interactive medical image segmentation using deep learning with
image-specific fine tuning", BIFSeg / ISeg, Eq. 5 and 7), as MONAI Label implements it for scribbles:

1. the network's softmax probabilities, on the image's own grid (the bundle's ``Invertd``);
2. each click pulls the probability of its class up around it, by ``exp(-d^2 / 2 s^2)`` with ``s =
   click_spread_mm`` (a Gaussian click map), and becomes a small ball (``click_radius_mm``) of scribble;
3. ``monailabel.scribbles.transforms.MakeISegUnaryd`` turns probabilities + scribbles into the ISeg unary term
   (clicked voxels are certain, the rest keeps the probability), and ``ApplyGraphCutOptimisationd``
   (numpymaxflow's graph cut, smoothing weight ``lamda``, intensity scale ``sigma`` on the image scaled to
   0..1 by the percentiles of the bundle's own ``ScaleIntensityRangePercentilesd``, 0.5/99.5) finds the
   labeling that follows the image's edges;
4. only voxels within ``roi_margin_mm`` of a click may change (elsewhere the automatic label is a constraint of
   the cut), so a click never undoes correct work far from it. Without clicks the answer *is* the automatic
   segmentation.

Defaults (radius 3 mm, spread 10 mm, margin 30 mm, lamda 20, sigma 0.1) were chosen on the repository's two
sample heads with the main job's model, clicking the centre of the largest remaining error each time: six clicks
took Dice from 0.872 to 0.901 (ITK head, held out) and 0.873 to 0.906 (Colin27), every click helping, 0.1-0.3 s
per refinement on 2 CPU cores on top of the network.

Clicks are voxel indices ``[i, j, k]`` of the image as stored (what Slicer sends for models of type
``deepgrow``): ``{"foreground": [[i, j, k], ...], "background": [[i, j, k], ...]}``. A clicked voxel always ends
up with its click's class; where balls of both classes overlap, the nearer click wins (background on a tie).
A click outside the image or a malformed list is a 422 that says which click.

What a click answer replaces. 3D Slicer's SmartEdit sends only the clicks (``label`` is then the segment's *name*)
and imports the answer over the whole segment, so the answer is the network's segmentation corrected near the
clicks: hand edits made before in the Segment Editor are replaced (the task's ``/info/`` description says so). A
request that uploads the current segmentation as a ``label`` file (as Scribbles does; ``label_info`` and
``selected_label_name`` say which value is the segment, else value 1) gets that segmentation corrected near the
clicks instead, with everything farther than ``roi_margin_mm`` kept. An ``roi`` (voxel bounds ``[i0, i1, j0, j1,
k0, k1]``, Slicer's ROI prompt) confines the change: nothing outside it changes, and a click outside it is a 422.

Only a file the server itself received with the request is read as ``label`` (:func:`uploaded_file`): a path
written into the request's JSON (another patient's label, any server file) is never opened.

Scribbles (:class:`ScribblesRefined`) go through the same refinement (:func:`refine_near_seeds`) with the stroke
voxels as seeds (no ball around them) and correct the segmentation Slicer sends rather than the network's.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage as ndi
from monai.transforms import AsDiscreted, MapTransform
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.scribbles.transforms import ApplyGraphCutOptimisationd, MakeISegUnaryd

from ..errors import BadInput, root_message
from ..runtime import DEFAULT_PERCENTILES, ModelRuntime
from .medurwkv import MedURWKVInfer

logger = logging.getLogger(__name__)

FG_SCRIBBLE, BG_SCRIBBLE = 3, 2  # MONAI Label's scribble label convention


def parse_clicks(request: Dict[str, Any]) -> Tuple[List[List[int]], List[List[int]]]:
    """``foreground`` / ``background`` lists of integer voxel indices; a 422 naming the first malformed click."""
    out = []
    for key in ("foreground", "background"):
        points = request.get(key) or []
        if not isinstance(points, (list, tuple)):
            raise BadInput(f"'{key}' must be a list of [i, j, k] voxel indices, got {points!r}")
        parsed = []
        for p in points:
            if not isinstance(p, (list, tuple)) or len(p) not in (2, 3):
                raise BadInput(f"{key} click {p!r} is not a voxel index [i, j, k]")
            try:
                parsed.append([int(round(float(x))) for x in p])
            except (TypeError, ValueError):
                raise BadInput(f"{key} click {p!r} is not a voxel index [i, j, k]") from None
        out.append(parsed)
    return out[0], out[1]


def uploaded_file(path: Any, upload_dirs: Optional[Sequence[str]] = None) -> Optional[str]:
    """``path`` if it is a file MONAI Label wrote for this request's upload, else None.

    ``POST /infer`` saves an uploaded ``label`` as ``tmp*<ext>`` directly in the temporary folder and puts its path
    in the request, where the request's own JSON (``params``) can also put any string: only a regular file whose
    real path is directly in one of ``upload_dirs`` (default: the temporary folder) with that name is accepted.
    """
    if not isinstance(path, str) or not path:
        return None
    real = os.path.realpath(path)
    dirs = upload_dirs if upload_dirs is not None else [tempfile.gettempdir()]
    if os.path.dirname(real) not in {os.path.realpath(d) for d in dirs}:
        return None
    if not os.path.basename(real).startswith("tmp") or not os.path.isfile(real):
        return None
    return real


def roi_mask(roi: Any, spatial: Sequence[int]) -> Optional[np.ndarray]:
    """The voxels inside ``roi`` (voxel bounds ``[i0, i1, j0, j1, k0, k1]``, each pair in any order, as Slicer's
    RAS-to-IJK conversion gives them; the upper bound excluded); None for no ROI (absent or ``[]``). A malformed
    ROI or one that misses the image is a 422."""
    if roi is None or (isinstance(roi, (list, tuple)) and not roi):
        return None
    if not isinstance(roi, (list, tuple)):
        raise BadInput(f"'roi' must be voxel bounds [i0, i1, j0, j1, k0, k1], got {roi!r}")
    try:
        bounds = [sorted((int(roi[2 * a]), int(roi[2 * a + 1]))) for a in range(len(spatial))]
    except (TypeError, ValueError, IndexError):
        raise BadInput(f"'roi' must be voxel bounds [i0, i1, j0, j1, k0, k1], got {roi!r}") from None
    inside = np.zeros(tuple(spatial), bool)
    inside[tuple(slice(max(a, 0), max(b, 0)) for a, b in bounds)] = True
    if not inside.any():
        raise BadInput(f"'roi' {roi!r} does not overlap the image (size {list(spatial)})")
    return inside


def _spacing(prob, ndim: int) -> np.ndarray:
    affine = getattr(prob, "affine", None)
    affine = np.asarray(affine if affine is not None else np.eye(4), dtype=np.float64)
    spacing = np.linalg.norm(affine[:ndim, :ndim], axis=0)
    return np.where(spacing > 0, spacing, 1.0)


def refine_near_seeds(
    arr: np.ndarray,
    spacing: np.ndarray,
    image: Callable[[], np.ndarray],
    fg_from: np.ndarray,
    bg_from: np.ndarray,
    opt: Dict[str, float],
    seed_radius_mm: float,
    base: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The refinement shared by clicks and scribbles (steps 2-4 of the module docstring).

    Args:
        arr: (2, *spatial) softmax probabilities on the image grid.
        spacing: voxel size in mm per spatial axis.
        image: returns the image on the same grid, scaled to 0..1 (called only when there are seeds).
        fg_from, bg_from: boolean (*spatial) masks of the clicked / scribbled voxels of each class.
        opt: ``roi_margin_mm``, ``click_spread_mm``, ``lamda``, ``sigma``.
        seed_radius_mm: voxels this close to ``fg_from`` / ``bg_from`` are certain (a click's ball; 0 for
            scribbles, whose strokes already have a width). Where balls of both classes overlap, the nearer
            seed wins (background on ties).
        base: the segmentation to correct (default: the network's argmax); voxels farther than
            ``roi_margin_mm`` from every seed keep its label.

    Returns:
        the refined boolean foreground (*spatial) and a few numbers for the log.
    """
    base = arr[1] > arr[0] if base is None else np.asarray(base, bool)
    seeds = fg_from | bg_from
    if not seeds.any():
        return base, {"box": [0] * base.ndim, "changed": 0}
    pts = np.argwhere(seeds)
    margin = np.ceil((opt["roi_margin_mm"] + seed_radius_mm) / spacing).astype(int)
    lo = np.maximum(pts.min(0) - margin, 0)
    hi = np.minimum(pts.max(0) + margin + 1, base.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def distance(mask: np.ndarray) -> np.ndarray:  # mm to the nearest seed voxel of one class (inf: none)
        if not mask.any():
            return np.full(mask.shape, np.inf)
        return ndi.distance_transform_edt(~mask, sampling=spacing)

    d_fg, d_bg = distance(fg_from[box]), distance(bg_from[box])
    auto = base[box]
    # only voxels within roi_margin_mm of a seed may change: elsewhere the base label is a constraint of the cut
    near = np.minimum(d_fg, d_bg) <= opt["roi_margin_mm"]
    fg_seed = (d_fg <= seed_radius_mm) & (d_fg < d_bg)
    bg_seed = (d_bg <= seed_radius_mm) & ~fg_seed
    scribbles = np.where(auto, FG_SCRIBBLE, BG_SCRIBBLE).astype(np.float32)
    scribbles[near] = 0
    scribbles[fg_seed] = FG_SCRIBBLE
    scribbles[bg_seed] = BG_SCRIBBLE

    prob_box = arr[(slice(None),) + box].copy()
    if opt["click_spread_mm"] > 0:  # Gaussian seed maps pull the probability of the seed's class up
        two_s2 = 2 * opt["click_spread_mm"] ** 2
        pull_fg, pull_bg = np.exp(-(d_fg**2) / two_s2), np.exp(-(d_bg**2) / two_s2)
        fg_p = (prob_box[1] + (1 - prob_box[1]) * pull_fg) * (1 - pull_bg)
        prob_box = np.stack([1 - fg_p, fg_p]).astype(np.float32)
    sub = {
        "image": np.ascontiguousarray(image()[box][None]),
        "prob": np.ascontiguousarray(prob_box),
        "scribbles": scribbles[None],
    }
    sub = MakeISegUnaryd(image="image", logits="prob", scribbles="scribbles", unary="unary",
                         scribbles_bg_label=BG_SCRIBBLE, scribbles_fg_label=FG_SCRIBBLE)(sub)
    sub["unary"] = np.ascontiguousarray(sub["unary"], dtype=np.float32)
    sub = ApplyGraphCutOptimisationd(unary="unary", pairwise="image", post_proc_label="label",
                                     lamda=opt["lamda"], sigma=opt["sigma"])(sub)
    label = np.asarray(sub["label"]).reshape(tuple(hi - lo)) > 0.5
    # the cut's "certain" voxels cost -log(eps) ~ 16, which a strong smoothing term can outweigh: enforce them
    label[~near] = auto[~near]
    label[fg_seed] = True  # every seed voxel gets its class, whatever the smoothing says
    label[bg_seed] = False
    out = base.copy()
    out[box] = label
    return out, {"box": (hi - lo).tolist(), "changed": int((label != auto).sum())}


class ClickRefined(MapTransform):
    """Replace the 2-channel probability ``keys`` (on the image grid) by the click-refined one-hot result.

    The segmentation corrected is the one uploaded with the request as ``label_key`` (see the module docstring),
    else the network's; ``target`` is the segment's name when the request names none; ``upload_dirs``: where
    uploaded files may be (:func:`uploaded_file`); ``percentiles``: the image is scaled to 0..1 between these
    intensity percentiles for the cut (the bundle's: :meth:`lib.runtime.ModelRuntime.intensity_percentiles`).
    """

    needs_probabilities = True  # MedURWKVInfer caches the network's output up to this step

    def __init__(
        self,
        keys: str = "pred",
        image_path_key: str = "image_path",
        click_radius_mm: float = 3.0,
        roi_margin_mm: float = 30.0,
        lamda: float = 20.0,
        sigma: float = 0.1,
        click_spread_mm: float = 10.0,
        label_key: str = "label",
        target: str = "",
        upload_dirs: Optional[Sequence[str]] = None,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    ):
        super().__init__(keys)
        self.image_path_key = image_path_key
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.defaults = {"click_radius_mm": click_radius_mm, "roi_margin_mm": roi_margin_mm, "lamda": lamda,
                         "sigma": sigma, "click_spread_mm": click_spread_mm}
        self.label_key, self.target, self.upload_dirs = label_key, target, upload_dirs

    def _params(self, d) -> Dict[str, float]:
        p = {}
        for k, v in self.defaults.items():
            try:
                p[k] = float(d.get(k, v))
            except (TypeError, ValueError):
                raise BadInput(f"'{k}' must be a number, got {d.get(k)!r}") from None
            if not p[k] >= 0:
                raise BadInput(f"'{k}' must be >= 0, got {d.get(k)!r}")
        return p

    def _load(self, path: str, shape: Sequence[int], what: str, affine: Optional[np.ndarray] = None) -> np.ndarray:
        """A volume read as the image is read (same reader, same axis order), on the image's grid: the same shape
        and, when ``affine`` is given, the same voxel-to-world matrix (to 0.01 mm); else a 422 that says so."""
        from medurwkv.transforms import LoadVolumed

        try:
            loaded = LoadVolumed(keys="image")({"image": path})["image"]
        except Exception as e:
            raise BadInput(f"{what} could not be read: {root_message(e).replace(path, os.path.basename(path))}") from None
        arr = np.asarray(loaded, dtype=np.float32)
        while arr.ndim > len(shape) and arr.shape[0] == 1:
            arr = arr[0]  # a singleton channel axis
        while arr.ndim > len(shape) and arr.shape[-1] == 1:
            arr = arr[..., 0]  # a singleton 4th axis (NIfTI)
        if arr.shape != tuple(shape):
            raise BadInput(f"{what} has shape {list(arr.shape)}, the image {list(shape)}: it must be on the image's grid")
        own = getattr(loaded, "affine", None)
        if affine is not None and own is not None:
            own = np.asarray(own, dtype=np.float64)
            if own.shape != affine.shape or not np.allclose(own, affine, atol=1e-2):
                raise BadInput(f"{what} has the image's shape but not its position/orientation: it must be on the image's grid")
        return arr

    def _image(self, d, shape: Sequence[int]) -> np.ndarray:
        """The input image on its own grid, scaled to 0..1 by its ``percentiles`` (the graph's edges)."""
        arr = self._load(d[self.image_path_key], shape, "the image")
        lo, hi = np.percentile(arr, list(self.percentiles))
        return np.clip((arr - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)

    def _sent(self, d, prob) -> Tuple[Optional[np.ndarray], Dict[str, int], bool]:
        """The label volume uploaded with the request (None: none), its ``label_info`` as {name: value} and
        whether ``label_info`` was sent. Read as the image is read, on the image's grid, else a 422."""
        info = d.get("label_info") or []
        if not isinstance(info, (list, tuple)) or not all(isinstance(x, dict) for x in info):
            raise BadInput(f"'label_info' must be a list of {{'name': ..., 'id': ...}}, got {info!r}")
        try:
            ids = {str(x.get("name")): int(x.get("id", x.get("idx"))) for x in info}
        except (TypeError, ValueError):
            raise BadInput(f"every 'label_info' entry needs an integer 'id', got {info!r}") from None
        path = uploaded_file(d.get(self.label_key), self.upload_dirs)
        if path is None:
            return None, ids, bool(info)
        affine = getattr(prob, "affine", None)
        affine = None if affine is None else np.asarray(affine, dtype=np.float64)
        values = np.rint(self._load(path, tuple(prob.shape[1:]), self.sent_what, affine))
        return values.astype(np.int64), ids, bool(info)

    def _segment(self, d, values: np.ndarray, ids: Dict[str, int], has_info: bool) -> Optional[np.ndarray]:
        """The segment being edited in ``values``: the one named ``selected_label_name`` (or ``target``) in
        ``label_info``, value 1 without ``label_info``; None when it has no voxel (then the network's is used)."""
        target = d.get("selected_label_name") or self.target
        if not isinstance(target, str):
            raise BadInput(f"'selected_label_name' must be a segment name, got {target!r}")
        target_id = ids.get(target) if has_info else 1
        segment = values == target_id if target_id is not None else None
        return segment if segment is not None and segment.any() else None

    def _seeds(self, d, prob) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray], str]:
        """Foreground and background seed masks, the segmentation to correct (None: the network's), the region
        the result is confined to (None: everywhere; outside it the result is that segmentation) and a
        description for the log. ``prob``: the (2, *spatial) probabilities (a MetaTensor on the image grid)."""
        spatial = tuple(prob.shape[1:])
        fg, bg = parse_clicks(d)
        inside = roi_mask(d.get("roi"), spatial)
        masks = []
        for kind, points in (("foreground", fg), ("background", bg)):
            mask = np.zeros(tuple(spatial), bool)
            for point in points:
                q = point[:2] if len(spatial) == 2 and len(point) == 3 and point[2] == 0 else point  # 2D: [i, j, 0]
                if len(q) != len(spatial):
                    raise BadInput(f"{kind} click {point} does not fit a {len(spatial)}D image of size {list(spatial)}")
                if any(not 0 <= x < n for x, n in zip(q, spatial)):
                    raise BadInput(f"{kind} click {point} is outside the image (size {list(spatial)})")
                if inside is not None and not inside[tuple(q)]:
                    raise BadInput(
                        f"{kind} click {point} is outside the ROI {list(d.get('roi'))}: only voxels inside the ROI "
                        f"can change. Move the click into the ROI, or delete the ROI."
                    )
                mask[tuple(q)] = True
            masks.append(mask)
        values, ids, has_info = self._sent(d, prob)
        base = self._segment(d, values, ids, has_info) if values is not None else None
        what = f"{len(fg)} foreground / {len(bg)} background click(s)"
        what += ", correcting the segmentation sent" if base is not None else ", correcting the network's segmentation"
        if inside is not None:
            what += f", inside the ROI {list(d.get('roi'))}"
            if base is None:
                p = prob.detach().cpu().numpy() if torch.is_tensor(prob) else np.asarray(prob)
                base = p[1] > p[0]
        return masks[0], masks[1], base, inside, what

    seed_radius_key = "click_radius_mm"
    sent_what = "the segmentation sent as 'label'"  # how errors name the uploaded label volume

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            prob = d[key]
            arr = prob.detach().cpu().float().numpy() if torch.is_tensor(prob) else np.asarray(prob, np.float32)
            spatial = arr.shape[1:]
            fg, bg, base, roi, what = self._seeds(d, prob)
            if base is None and roi is None and not (fg.any() or bg.any()):
                continue  # nothing to do: exactly the automatic segmentation
            if arr.shape[0] != 2:
                raise BadInput(f"interactive correction needs a 2-class model, this one has {arr.shape[0]} classes")
            opt = self._params(d)
            radius = opt[self.seed_radius_key] if self.seed_radius_key else 0.0
            label, info = refine_near_seeds(
                arr, _spacing(prob, len(spatial)), lambda: self._image(d, spatial), fg, bg, opt, radius, base
            )
            if roi is not None:  # outside the ROI: the segmentation corrected (with the strokes painted there)
                label = np.where(roi, label, base)
            out = arr.copy()
            out[1], out[0] = label, ~label
            refined = torch.as_tensor(out)
            d[key] = prob.clone().copy_(refined) if torch.is_tensor(prob) else out
            logger.info(f"{type(self).__name__}: {what}, box {info['box']} voxels, {info['changed']} voxel(s) changed")
        return d


class ScribblesRefined(ClickRefined):
    """As :class:`ClickRefined`, with the seeds painted in 3D Slicer's Scribbles tool.

    What Slicer sends (its ``onUpdateScribbles``): the whole segmentation as one label volume on the image's grid
    (``label``: the uploaded file), ``label_info`` (``[{"name", "id"}, ...]``: which value is which segment), the
    segment the result is for (``selected_label_name``) and an optional ``roi`` (voxel bounds ``[i0, i1, j0, j1,
    k0, k1]``). Scribble values come from ``label_info`` (``foreground_scribbles`` / ``background_scribbles``), else
    MONAI Label's defaults 3 / 2 when there is no ``label_info`` (with it, a name it lacks means no strokes of that
    class). The segmentation corrected is the user's own (the selected segment, or value 1 when there is no
    ``label_info``), so edits far from the strokes are kept; without it, the network's. With an ROI, only strokes
    inside it steer the refinement and outside it the segmentation is kept (voxels painted there take their
    stroke's class). No strokes: the segmentation sent (or the network's) comes back unchanged. A stroke volume
    that is not an uploaded file, cannot be read or is not on the image's grid (shape and voxel-to-world matrix)
    is a 422.
    """

    seed_radius_key = None  # a painted stroke already has its width
    sent_what = "the scribbles label"

    def __init__(self, keys: str = "pred", label_key: str = "label", target: str = "", **kwargs):
        super().__init__(keys, label_key=label_key, target=target, **kwargs)
        self.defaults.pop("click_radius_mm")

    def _seeds(self, d, prob):
        spatial = tuple(prob.shape[1:])
        values, ids, has_info = self._sent(d, prob)
        if values is None:
            raise BadInput("scribbles need the segmentation with the strokes as 'label' (a label volume on the image's "
                           "grid, uploaded with the request)")
        if has_info:  # Slicer numbers its segments in order: only the names it sends say which value is a stroke
            fg_id, bg_id = ids.get("foreground_scribbles"), ids.get("background_scribbles")
        else:
            fg_id, bg_id = FG_SCRIBBLE, BG_SCRIBBLE
        if fg_id is not None and fg_id == bg_id:
            raise BadInput(f"foreground and background scribbles have the same id {fg_id} in 'label_info'")
        fg = values == fg_id if fg_id is not None else np.zeros(spatial, bool)
        bg = values == bg_id if bg_id is not None else np.zeros(spatial, bool)
        base = self._segment(d, values, ids, has_info)
        what = f"{int(fg.sum())} foreground / {int(bg.sum())} background scribble voxel(s)"
        what += ", correcting the segmentation sent" if base is not None else ", correcting the network's segmentation"
        inside = roi_mask(d.get("roi"), spatial)
        if inside is None:
            return fg, bg, base, None, what
        # outside the ROI the strokes do not steer the refinement, but the voxels painted there keep their class
        # (Slicer paints strokes over the segment: without this they would come back as holes)
        p = prob.detach().cpu().numpy() if torch.is_tensor(prob) else np.asarray(prob)
        base = p[1] > p[0] if base is None else base.copy()
        base[fg & ~inside] = True
        base[bg & ~inside] = False
        return fg & inside, bg & inside, base, inside, what


def refine_defaults(conf: Dict[str, str]) -> Dict[str, float]:
    """The graph cut's parameters from the app's ``--conf`` (``click_radius_mm``, ``click_roi_margin_mm``,
    ``click_lamda``, ``click_sigma``, ``click_spread_mm``): the clicks task's and Med-URWKV-Edit's."""
    return {
        "click_radius_mm": float(conf.get("click_radius_mm", "3")),
        "roi_margin_mm": float(conf.get("click_roi_margin_mm", "30")),
        "lamda": float(conf.get("click_lamda", "20")),
        "sigma": float(conf.get("click_sigma", "0.1")),
        "click_spread_mm": float(conf.get("click_spread_mm", "10")),
    }


class MedURWKVClicks(MedURWKVInfer):
    """The bundle's model with click-guided correction (type ``deepgrow``, so 3D Slicer lists it under SmartEdit).

    Args:
        runtime: the model's runtime, as the automatic task's: the same network, device locks, request budget and
            probability cache (a click after Auto Segmentation reuses its network output).
        conf: the app's ``--conf``, for the refinement defaults (``click_radius_mm``, ``click_roi_margin_mm``,
            ``click_lamda``, ``click_sigma``, ``click_spread_mm``), which requests may override.
    """

    def __init__(self, runtime: ModelRuntime, conf: Dict[str, str]):
        super().__init__(runtime)
        self.type = InferType.DEEPGROW
        self.refine_defaults = refine_defaults(conf)
        self._config.update(self.refine_defaults)
        self.description = (
            "Med-URWKV with click-guided correction: foreground/background clicks correct the AUTOMATIC "
            "segmentation within {margin:g} mm of them (ISeg unary + graph cut on the network's probabilities). "
            "3D Slicer's SmartEdit sends only the clicks, so each answer replaces the whole segment: edits made "
            "earlier with the Segment Editor are lost. Click first, then edit by hand, or use Scribbles "
            "({scribbles}), which keeps your edits. A client that uploads the current segmentation as 'label' "
            "gets it corrected near the clicks, the rest kept. With an ROI placed, only voxels inside it change "
            "(a click outside it is refused)."
        ).format(margin=self.refine_defaults["roi_margin_mm"], scribbles=f"{self.model_name}_scribbles")

    def post_transforms(self, data=None) -> Sequence:
        transforms = list(super().post_transforms(data))
        at = next((i for i, t in enumerate(transforms) if isinstance(t, AsDiscreted)), None)
        if at is None:
            raise RuntimeError("the bundle's postprocessing has no AsDiscreted(argmax) step to refine before")
        transforms.insert(at, self.refiner())
        return transforms

    refiner_class = ClickRefined  # the refinement step (MedURWKVScribbles: ScribblesRefined)

    def refiner(self) -> ClickRefined:
        target = next(iter(self.labels), "") if isinstance(self.labels, dict) else ""
        return self.refiner_class(keys=self.key_pred, target=target, percentiles=self.runtime.intensity_percentiles(),
                                  **self.refine_defaults)

    def __call__(self, request, callbacks=None):
        parse_clicks(request)  # malformed click lists fail before the volume is segmented
        return super().__call__(request, callbacks)


class MedURWKVScribbles(MedURWKVClicks):
    """The bundle's model with scribble-guided correction (type ``scribbles``: 3D Slicer's Scribbles section).

    Same runtime (network, cache, request budget) as the automatic task; the strokes steer the refinement of
    :class:`ScribblesRefined` (``roi_margin_mm``, ``click_spread_mm``, ``lamda``, ``sigma`` as for clicks).
    """

    refiner_class = ScribblesRefined

    def __init__(self, runtime: ModelRuntime, conf: Dict[str, str]):
        super().__init__(runtime, conf)
        self.type = InferType.SCRIBBLES
        self.refine_defaults.pop("click_radius_mm")
        self._config.pop("click_radius_mm", None)
        self.description = (
            "Med-URWKV with scribble-guided correction: foreground/background strokes correct the segmentation "
            "near them (ISeg unary + graph cut on the network's probabilities); the rest of it is kept."
        )

    def __call__(self, request, callbacks=None):
        return MedURWKVInfer.__call__(self, request, callbacks)  # no click lists to check up front
