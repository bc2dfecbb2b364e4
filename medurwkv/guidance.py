"""Click guidance for Med-URWKV-Edit: the slice-wise network that takes the clinician's clicks as input channels.

Med-URWKV-Edit is ``MedURWKV(in_channels=1 + len(label_names))``: the image, then one guidance channel per label
name in ``label_names`` order (the bundle's ``{"brain": 1, "background": 0}``: image, foreground clicks,
background clicks). A guidance channel is MONAI DeepEdit's encoding (``AddGuidanceSignalDeepEditd``): 1 at
each clicked voxel, smoothed by MONAI's ``GaussianFilter`` and scaled to 0..1. No clicks: all-zero guidance, the
*automatic mode*, trained in the same network.

**Reach across slices.** The network sees one axial slice at a time, but a volume's guidance is computed in
3D with the Gaussian's standard deviation ``sigma`` voxels in-plane and ``sigma_slices`` voxels across slices.
A single click on slice ``z`` therefore shows on slice ``z + dz`` at its in-plane position with the value
``g(dz) / g(0)``, where ``g = monai.networks.layers.convutils.gaussian_1d(sigma_slices)`` (the Gaussian
integrated over each slice, ``approx="erf"``; about ``exp(-dz^2 / (2 sigma_slices^2))``), for
``|dz| <= reach = guidance_reach(sigma_slices) = int(4 sigma_slices + 0.5)`` (``GaussianFilter`` truncates at 4
standard deviations), and is exactly 0 beyond it. With the bundle's ``sigma_slices`` 1.5 on its 2 mm grid:
reach 6 slices (12 mm); relative strength 0.81, 0.42, 0.15, 0.03, 0.005, 0.0004 at 1 ... 6 slices. Slices beyond the reach
of every click get all-zero guidance, i.e. the automatic mode's answer: :func:`infer_slices_with_clicks` does
not even run the network there.

**Training** (``bundle/configs/train_edit.json``) uses MONAI's DeepEdit click simulation on the 2D training
slices: ``monai.apps.deepedit.interaction.Interaction`` runs the network, ``FindDiscrepancyRegionsDeepEditd``
finds where it is wrong and :class:`RandomClickGuidanced` (``AddRandomGuidanceDeepEditd``) clicks inside the
errors, up to ``max_interactions`` rounds; with probability ``1 - deepgrow_probability`` an iteration has no
clicks (automatic mode). The first weights are the automatic model's (:class:`ExtraInputChannelsLoader`: the
image channel's stem weights copied, the guidance channels' set to zero, so training starts from exactly the
automatic segmentation). Three additions make the network see what inference gives it and learn to use it:
the training slices' clicks are encoded as from neighbouring slices too (:class:`SliceOffsetClickGuidanced`:
the weaker guidance a click shows within its reach), the guidance channels' input weights, which start at zero,
learn faster than the rest (:class:`GuidanceLearningRate`), and the training labels' boundaries are moved a few
voxels where the image does not show it (:class:`RandBoundaryShiftd`), so that the simulation finds errors to
click on in a volume the network already fits.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.apps.deepedit.transforms import AddGuidanceSignalDeepEditd, AddRandomGuidanceDeepEditd
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from torch import nn

from .checkpoint import CheckpointError, load_weights

__all__ = [
    "guidance_reach",
    "guidance_points",
    "signed_draw",
    "AddClickGuidanced",
    "RandomClickGuidanced",
    "SliceOffsetClickGuidanced",
    "RandBoundaryShiftd",
    "GuidanceLearningRate",
    "ExtraInputChannelsLoader",
    "load_with_extra_input_channels",
    "map_points",
    "slices_within_reach",
    "infer_slices_with_clicks",
]

GAUSSIAN_TRUNCATED = 4.0  # monai.networks.layers.GaussianFilter's default truncation (standard deviations)


def guidance_reach(sigma_slices: float) -> int:
    """How many slices on each side of a click its guidance reaches (``GaussianFilter``'s kernel tail)."""
    return int(max(float(sigma_slices) * GAUSSIAN_TRUNCATED, 0.5) + 0.5)


def signed_draw(rng: np.random.RandomState, largest: int) -> int:
    """A non-zero integer uniform in ``-largest .. -1`` and ``1 .. largest`` from ``rng`` (a transform's ``R``)."""
    return int(rng.randint(1, int(largest) + 1)) * (1 if rng.rand() < 0.5 else -1)


def guidance_points(value: Any) -> List[List[int]]:
    """A label's clicks from a list, an array or DeepEdit's JSON string; ``[-1, ...]`` placeholders dropped."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.tolist()
    return [[int(round(float(x))) for x in p] for p in (value or []) if not any(x < 0 for x in p)]


class AddClickGuidanced(MapTransform):
    """Append the click-guidance channels to ``image`` (channel-first, 2D ``(C, H, W)`` or 3D ``(C, H, W, D)``).

    The guidance (``data[guidance]``, ``{label name: [[i, j(, k)], ...]}``, lists or DeepEdit's JSON strings; a
    missing key or name means no clicks) is encoded by MONAI's ``AddGuidanceSignalDeepEditd``, with the Gaussian's
    ``sigma`` in-plane and ``sigma_slices`` across slices (last axis) for 3D images: see the module docstring for
    the reach. The channels follow ``label_names`` order. Also stores ``label_names`` (what DeepEdit's click
    simulation reads) and the guidance as JSON strings (so that batches collate). Any guidance channels already
    on the image are replaced (the first ``number_intensity_ch`` channels are the image).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_names: Optional[Mapping[str, int]] = None,
        guidance: str = "guidance",
        sigma: float = 3.0,
        sigma_slices: float = 1.5,
        number_intensity_ch: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if list(self.keys) != ["image"]:
            raise ValueError(f"AddClickGuidanced works on the 'image' key only (as DeepEdit's transforms), got {self.keys}")
        self.label_names = dict(label_names or {"foreground": 1, "background": 0})
        if sigma <= 0 or sigma_slices <= 0:
            raise ValueError(f"sigma and sigma_slices must be > 0, got {sigma} and {sigma_slices}")
        self.guidance = guidance
        self.number_intensity_ch = number_intensity_ch
        self._signal = {
            2: AddGuidanceSignalDeepEditd("image", guidance, sigma=sigma, number_intensity_ch=number_intensity_ch),
            3: AddGuidanceSignalDeepEditd(
                "image", guidance, sigma=(sigma, sigma, sigma_slices), number_intensity_ch=number_intensity_ch
            ),
        }
        self.reach = guidance_reach(sigma_slices)

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        given = d.get(self.guidance) or {}
        if isinstance(given, str):
            given = json.loads(given)
        if not isinstance(given, Mapping):
            raise ValueError(f"'{self.guidance}' must map label names to lists of clicks, got {type(given).__name__}")
        unknown = set(map(str, given)) - set(self.label_names)
        if unknown:
            raise ValueError(f"clicks for unknown label(s) {sorted(unknown)}; the labels are {list(self.label_names)}")
        d[self.guidance] = {name: json.dumps(guidance_points(given.get(name))) for name in self.label_names}
        d["label_names"] = dict(self.label_names)
        for key in self.key_iterator(d):
            spatial = d[key].ndim - 1
            if spatial not in (2, 3):
                raise ValueError(f"AddClickGuidanced needs a channel-first 2D or 3D image, got shape {tuple(d[key].shape)}")
            was_tensor = torch.is_tensor(d[key])
            d = self._signal[spatial](d)
            if was_tensor and not torch.is_tensor(d[key]):
                d[key] = torch.as_tensor(d[key])
        return d


class RandomClickGuidanced(AddRandomGuidanceDeepEditd):
    """MONAI's ``AddRandomGuidanceDeepEditd`` (DeepEdit's simulated click inside the largest discrepancies),
    starting from each sample's own clicks.

    The MONAI transform keeps the clicks in an instance attribute and, when it decides not to click
    (probability ``1 - data[probability]``), writes that attribute back: inside a batch a sample would receive the
    previous sample's clicks. Here the attribute is reset from the sample before every call.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        self.guidance = {name: guidance_points(data[self.guidance_key].get(name)) for name in data["label_names"]}
        return super().__call__(data)


class SliceOffsetClickGuidanced(AddClickGuidanced, Randomizable):
    """:class:`AddClickGuidanced` for the 2D training slices, with each click seen as from a neighbouring slice.

    At inference a click on slice ``z`` guides the slices ``z - reach .. z + reach`` with the Gaussian's strength
    there (module docstring); a network trained only on clicks of its own slice never sees that weaker guidance.
    Here each click of a 2D slice gets, once (kept across click rounds in ``data[offsets]``, JSON), an offset
    ``dz``: 0 with probability ``1 - offset_probability``, else uniform in ``+-1 .. +-max_offset``. Its guidance on
    the slice is what the volume's 3D encoding gives ``dz`` slices away from a click at that in-plane position: the
    same ``AddGuidanceSignalDeepEditd`` (``sigma`` in-plane, ``sigma_slices`` across) run on a stack of slices,
    and the slice read back. The click itself is chosen by MONAI's DeepEdit simulation (inside this slice's
    errors), which stands for the error on the neighbouring slice. 3D images are encoded as by the parent.
    """

    def __init__(
        self,
        *args: Any,
        max_offset: int = 3,
        offset_probability: float = 0.5,
        offsets: str = "guidance_offsets",
        **kwargs: Any,
    ) -> None:
        """``max_offset``, ``offset_probability``, ``offsets``: see the class docstring; the other arguments are
        :class:`AddClickGuidanced`'s."""
        super().__init__(*args, **kwargs)
        if not 0 <= int(max_offset) <= self.reach:
            raise ValueError(f"max_offset must be in 0 .. {self.reach} (the guidance's reach), got {max_offset}")
        if not 0.0 <= offset_probability <= 1.0:
            raise ValueError(f"offset_probability must be in [0, 1], got {offset_probability}")
        self.max_offset, self.offset_probability, self.offsets = int(max_offset), float(offset_probability), offsets

    def _offset(self) -> int:
        if self.max_offset == 0 or self.R.rand() >= self.offset_probability:
            return 0
        return signed_draw(self.R, self.max_offset)

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = super().__call__(data)  # checks, JSON guidance, label_names; the own-slice encoding
        image = d["image"]
        if image.ndim != 3 or self.max_offset == 0:
            return d
        points = {name: guidance_points(d[self.guidance][name]) for name in self.label_names}
        known = d.get(self.offsets) or "{}"
        known = json.loads(known) if isinstance(known, str) else dict(known)
        offsets = {}
        for name, pts in points.items():
            dz = [int(x) for x in known.get(name, [])][: len(pts)]
            offsets[name] = dz + [self._offset() for _ in range(len(pts) - len(dz))]
        d[self.offsets] = json.dumps(offsets)
        if not any(z for dz in offsets.values() for z in dz):
            return d
        centre = self.reach + self.max_offset  # the stack is deep enough for every click's whole kernel
        stack = {
            "image": torch.zeros((self.number_intensity_ch, *image.shape[1:], 2 * centre + 1)),
            self.guidance: {n: [[p[-2], p[-1], centre + z] for p, z in zip(points[n], offsets[n])] for n in points},
        }
        signal = self._signal[3](stack)["image"][self.number_intensity_ch :, ..., centre]
        signal = torch.as_tensor(np.asarray(signal), dtype=torch.float32)
        if torch.is_tensor(image):
            image = image.clone()
            image[self.number_intensity_ch :] = signal.to(image.dtype)
        else:
            image = np.array(image)
            image[self.number_intensity_ch :] = signal.numpy()
        d["image"] = image
        return d


class RandBoundaryShiftd(Randomizable, MapTransform):
    """Move a binary label's boundary by a few voxels, where the image does not show it: errors clicks can fix.

    A click-guided network fine-tuned on volumes it already fits sees almost no errors at training, so MONAI's
    click simulation has nothing to click on and the network learns to ignore its guidance channels. Yet the
    errors left on an unseen head are mostly such boundary offsets: a mask drawn by another protocol or annotator
    lies 1-3 voxels outside (or inside) the network's boundary over part of the brain (a thin shell, no voxel
    deeper than ~3 voxels). With probability ``prob`` this transform makes one: the label is dilated (``shift``
    > 0) or eroded (< 0) by ``|shift|`` voxels (MONAI's ``dilate``/``erode``, a ``2|shift|+1`` square; the
    erosion also removes any part narrower than that, possibly all of a small slice's label), ``shift`` uniform
    in ``+-1 .. +-max_shift``, over the whole slice with probability ``whole_probability``, else inside a disk
    of radius uniform in ``radius`` (voxels) centred on a voxel the shift changes. The image is not changed, so
    the automatic mode cannot predict the shift; the simulated clicks fall on it (the discrepancy) and tell the
    network which way, and how far around the click, to move its boundary. Shifts are symmetric, so the
    automatic mode's expected target stays the original boundary.

    Works on channel-first 2D labels ``(1, H, W)`` with values 0/1 (the training slices), tensor or array; the
    result keeps the label's type, dtype and metadata. Draws from the transform's own ``R``.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        prob: float = 0.5,
        max_shift: int = 3,
        radius: Sequence[float] = (20.0, 60.0),
        whole_probability: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0.0 <= prob <= 1.0 or not 0.0 <= whole_probability <= 1.0:
            raise ValueError(f"prob and whole_probability must be in [0, 1], got {prob} and {whole_probability}")
        if int(max_shift) < 1:
            raise ValueError(f"max_shift must be >= 1, got {max_shift}")
        lo, hi = (float(r) for r in radius)
        if not 0 < lo <= hi:
            raise ValueError(f"radius must be (low, high) with 0 < low <= high, got {radius}")
        self.prob, self.max_shift, self.radius, self.whole_probability = float(prob), int(max_shift), (lo, hi), float(whole_probability)

    def randomize(self, data: Any = None) -> None:  # the draws are made per call, on the label's own boundary
        pass

    @staticmethod
    def shifted(label: torch.Tensor, shift: int) -> torch.Tensor:
        """``label`` (``(1, H, W)``, 0/1) dilated (``shift`` > 0) or eroded (< 0) by a ``2|shift|+1`` square."""
        from monai.transforms.utils_morphological_ops import dilate, erode

        size = 2 * abs(int(shift)) + 1
        out = (dilate if shift > 0 else erode)(label[None].float(), size)
        return (out[0] > 0.5).to(label.dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.ndim != 3 or label.shape[0] != 1:
                raise ValueError(f"RandBoundaryShiftd needs a (1, H, W) label, got shape {tuple(label.shape)}")
            t = label if torch.is_tensor(label) else torch.as_tensor(np.asarray(label))
            if not bool(((t == 0) | (t == 1)).all()):
                raise ValueError("RandBoundaryShiftd needs a 0/1 label")
            if self.R.rand() >= self.prob:
                continue
            shift = signed_draw(self.R, self.max_shift)
            moved = self.shifted(t, shift)
            edge = torch.nonzero(moved != t)
            if len(edge) == 0:  # an empty slice (nothing to grow) or a full one (nothing to erode)
                continue
            if self.R.rand() >= self.whole_probability:
                _, cy, cx = (int(v) for v in edge[self.R.randint(len(edge))])
                r = self.R.uniform(*self.radius)
                yy = torch.arange(t.shape[1], device=t.device)[:, None]
                xx = torch.arange(t.shape[2], device=t.device)[None, :]
                moved = torch.where(((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)[None], moved, t)
            if torch.is_tensor(label):
                out = label.clone()
                out[...] = moved.to(label.dtype)
            else:
                out = moved.cpu().numpy().astype(np.asarray(label).dtype)
            d[key] = out
        return d


class GuidanceLearningRate:
    """Ignite handler: the guidance channels' input weights learn ``factor`` times faster than the rest.

    The click-guided network starts with zero weights on its guidance channels (:class:`ExtraInputChannelsLoader`)
    while the image channel's are trained; at the base learning rate they stay ~30 times smaller than the image's
    over a short fine-tuning and the network ignores the clicks. The guidance slices ``[:, number_intensity_ch:]``
    live in the same tensors as the image channel's (the patch embedding, the adapter's stem), so a param group
    cannot hold them alone: instead the optimizer's step on those slices is multiplied by ``factor`` after each
    iteration. For element-wise optimizers (Adam, AdamW, SGD without momentum coupling across elements) this is
    exactly a learning rate ``factor x`` the scheduled one on those elements (AdamW's moments do not depend on the
    learning rate; its decoupled weight decay scales with it too).

    Args:
        network: the click-guided network (``in_channels`` = image + guidance channels).
        factor: learning-rate multiplier for the guidance weights (1: no change).
        number_intensity_ch: image channels (the first input channels).
    """

    def __init__(self, network: nn.Module, factor: float = 30.0, number_intensity_ch: int = 1) -> None:
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.network, self.factor, self.number_intensity_ch = network, float(factor), int(number_intensity_ch)
        self._before: List[torch.Tensor] = []

    def weights(self) -> List[torch.Tensor]:
        """The input convolutions' weights (4D, consuming the network's ``in_channels``)."""
        net = self.network.module if hasattr(self.network, "module") else self.network
        first = getattr(net, "in_channels", None)
        return [p for p in net.parameters() if p.dim() == 4 and first is not None and p.shape[1] == first]

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not self.weights():
            raise ValueError("GuidanceLearningRate: the network has no input convolution with in_channels weights")
        if self.factor == 1.0:  # the base learning rate: nothing to rescale, nothing to remember per iteration
            return
        engine.add_event_handler(Events.ITERATION_STARTED, self._remember)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._scale)

    @torch.no_grad()
    def _remember(self, engine: Any = None) -> None:
        self._before = [w[:, self.number_intensity_ch :].clone() for w in self.weights()]

    @torch.no_grad()
    def _scale(self, engine: Any = None) -> None:
        if not self._before:
            return
        for w, before in zip(self.weights(), self._before):
            g = w[:, self.number_intensity_ch :]
            g.copy_(before + (g - before) * self.factor)
        self._before = []


def load_with_extra_input_channels(network: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> List[str]:
    """Load a state dict saved for fewer input channels (the automatic Med-URWKV) strictly into ``network``.

    Every tensor must match in name and shape, except input convolutions (4D weights whose shapes differ only in
    dimension 1, the input channels: the patch embedding and the adapter's stem): their first channels get the
    saved weights and the extra (guidance) channels zeros, so the network's output is unchanged while the
    guidance is all zero. Returns the names of the widened weights.
    """
    own = network.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: not this network's weights (missing {missing[:5]}, unexpected {unexpected[:5]})")
    widened, merged = [], {}
    for name, value in state_dict.items():
        target = own[name]
        if value.shape == target.shape:
            merged[name] = value
        elif value.dim() == 4 and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:] and value.shape[1] < target.shape[1]:
            w = torch.zeros_like(target)
            w[:, : value.shape[1]] = value
            merged[name] = w
            widened.append(name)
        else:
            raise CheckpointError(f"{source}: '{name}' has shape {tuple(value.shape)}, the network {tuple(target.shape)}")
    network.load_state_dict(merged, strict=True)
    return widened


class ExtraInputChannelsLoader:
    """Ignite-style loader (``loader(engine)``, like MONAI's ``CheckpointLoader``) that starts the click-guided
    network from the automatic model's weights file with :func:`load_with_extra_input_channels`.

    Args:
        load_path: the automatic model's ``model.pt`` (read tensor-only by :func:`medurwkv.checkpoint.load_weights`).
        network: the click-guided network (``in_channels`` = 1 + guidance channels).
    """

    def __init__(self, load_path: str, network: nn.Module) -> None:
        self.load_path, self.network = load_path, network

    def __call__(self, engine: Any = None) -> List[str]:
        net = self.network.module if hasattr(self.network, "module") else self.network
        return load_with_extra_input_channels(net, load_weights(self.load_path), source=str(self.load_path))


def map_points(points: Iterable[Sequence[float]], src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """Voxel indices on one grid (``src_affine``: voxel -> world) to the nearest voxels of another grid."""
    pts = np.asarray(list(points), dtype=np.float64).reshape(-1, 3)
    homo = np.c_[pts, np.ones(len(pts))]
    out = (np.linalg.inv(np.asarray(dst_affine, np.float64)) @ np.asarray(src_affine, np.float64) @ homo.T).T[:, :3]
    return np.rint(out).astype(int)


def slices_within_reach(guidance: Mapping[str, Iterable[Sequence[int]]], depth: int, reach: int) -> List[int]:
    """Indices (last axis, ``0 .. depth - 1``) of the slices within ``reach`` of any click."""
    zs = set()
    for points in guidance.values():
        for p in guidance_points(points):
            z = int(p[-1])
            zs.update(range(max(z - reach, 0), min(z + reach, depth - 1) + 1))
    return sorted(zs)


@torch.no_grad()
def infer_slices_with_clicks(
    network: nn.Module,
    inferer: Any,
    image: torch.Tensor,
    guidance: Mapping[str, Iterable[Sequence[int]]],
    auto_logits: torch.Tensor,
    transform: AddClickGuidanced,
) -> torch.Tensor:
    """The click-guided network's logits on a preprocessed volume, computed only where the clicks reach.

    Args:
        network, inferer: the click-guided network and its slice-wise inferer (``SliceWiseInferer``).
        image: (1, H, W, D) preprocessed image (the network's grid; slices along the last axis).
        guidance: ``{label name: [[i, j, k], ...]}`` on that grid.
        auto_logits: (C, H, W, D) the same network's output without clicks (the automatic mode; cache it).
        transform: the :class:`AddClickGuidanced` of the bundle (its ``sigma``, ``sigma_slices``, label names).

    Returns:
        (C, H, W, D) logits: the automatic ones on slices beyond every click's reach (their guidance is zero
        there), the network's with guidance on the others.
    """
    zs = slices_within_reach(guidance, image.shape[-1], transform.reach)
    out = auto_logits.clone()
    if not zs:
        return out
    x = transform({"image": image[: transform.number_intensity_ch], "guidance": dict(guidance)})["image"]
    x = torch.as_tensor(x)[None, ..., zs]
    param = next(network.parameters())
    logits = inferer(x.to(device=param.device, dtype=torch.float32), network)
    out[..., zs] = torch.as_tensor(logits)[0].to(out.device, out.dtype)
    return out
