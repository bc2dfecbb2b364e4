"""MC-dropout uncertainty of each unlabeled volume, stored in the datastore for the ``uncertainty`` strategy.

Method (the choice is documented in the README):

1. The volume goes through the bundle's ``preprocessing`` (same orientation, spacing, intensity scaling and
   padding as inference).
2. Up to ``max_slices`` slices along the ``SliceInferer``'s axis are taken, evenly spaced among the slices that
   contain image signal (not padding/air only): the score is cheap and does not grow with the volume length.
3. The network is put in MC-dropout mode: ``MedURWKV.dropout = p`` (decoder dropout, 0.2 by default) and
   ``enable_mc_dropout`` (dropout layers stochastic, everything else, BatchNorm and stochastic depth included,
   in eval mode). ``passes`` stochastic forward passes give softmax maps ``p_t``.
4. Per pixel: predictive entropy ``H(mean_t p_t)`` (normalised by ``log(classes)`` to [0, 1]) and mutual
   information ``H(mean p) - mean_t H(p_t)`` (the epistemic part, BALD).
5. The volume score is the mean predictive entropy over the pixels that *any* pass labels as foreground (the
   predicted brain and its uncertain rim), or over all pixels if no pass predicts any foreground. Averaging
   over that region, not the whole slice, keeps large confident background from diluting the score.

Written with ``datastore.update_image_info``: ``mc_dropout_score`` (the value the strategy sorts on),
``mc_dropout_model`` (mtime of the weights used; volumes already scored with the current weights are skipped)
and ``mc_dropout`` (details: entropy, mutual information, foreground fraction, passes, slices, dropout, time).
A volume that cannot be read or scored gets ``mc_dropout = {"error": ...}`` and no score (the strategy serves
it after the scored ones); the others are still scored.

MONAI Label's ``EpistemicScoring`` is not used: it reruns the whole infer pipeline per pass (full volume,
inversion, post-processing) with the network in ``train()`` mode, which also switches BatchNorm to batch
statistics and turns on stochastic depth.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, List

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.utils.others.generic import name_to_device

from ..image2d import is_image_2d
from ..runtime import ModelRuntime, weights_state
from ..options import COMMON, Opt, check_options, devices

logger = logging.getLogger(__name__)

KEY_SCORE = "mc_dropout_score"
KEY_MODEL = "mc_dropout_model"
KEY_DETAIL = "mc_dropout"


class MCDropoutScoring(ScoringMethod):
    """Scores unlabeled volumes by MC-dropout uncertainty (see the module docstring).

    Args:
        runtime: the model's runtime in MC-dropout mode (``ModelRuntime.variant(dropout=p, mc_dropout=True)``):
            the bundle's preprocessing, inferer and network, run under its device locks.
        passes: stochastic forward passes per volume.
        max_slices: slices per volume.
        seed: RNG seed per volume, so a score is reproducible for given weights.
    """

    def __init__(self, runtime: ModelRuntime, passes: int = 8, max_slices: int = 16, seed: int = 0):
        super().__init__(
            f"MC-dropout uncertainty (dropout {runtime.dropout}, {passes} passes, <= {max_slices} slices per volume)"
        )
        if passes < 2:
            raise ValueError("MC dropout needs at least 2 passes")
        self.runtime = runtime
        self.passes = passes
        self.max_slices = max_slices
        self.seed = seed

    def options(self) -> Dict[str, Opt]:
        """What a ``POST /scoring/mc_dropout`` body may hold (see ``lib/options.py``)."""
        return {
            **COMMON,
            "force": Opt(bool, doc="score again volumes already scored with the current weights"),
            "max_samples": Opt(int, 0, 10**6),
            "device": devices(("cpu", "cuda")),
            "passes": Opt(int, 2, 100),
            "max_slices": Opt(int, 1, 4096),
        }

    def check_request(self, request: Dict[str, Any]) -> Dict[str, Any]:
        return check_options("scoring 'mc_dropout'", request, self.options(), server_keys=("method", "gpus"))

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        request = self.check_request(request)
        start = time.time()
        weights = weights_state(self.runtime.weights_path)
        # volumes only: 2D images (PNG/JPEG, the 2D model's) are not this network's input, so not scored here
        unlabeled = [i for i in datastore.get_unlabeled_images() if not is_image_2d(datastore.get_image_uri(i))]
        if not weights["available"]:
            msg = f"no trained weights ({self.runtime.weights_path}): uncertainty scores need a trained model"
            logger.warning(f"MC-dropout scoring skipped: {msg}")
            return {"total": len(unlabeled), "executed": 0, "skipped": len(unlabeled), "reason": msg}

        stamp = weights["mtime_ns"]
        force = bool(request.get("force", False))
        max_samples = int(request.get("max_samples", 0) or 0)
        todo: List[str] = [i for i in sorted(unlabeled) if force or datastore.get_image_info(i).get(KEY_MODEL) != stamp]
        todo = todo[:max_samples] if max_samples else todo
        device = name_to_device(request.get("device", "cuda"))
        passes = int(request.get("passes", self.passes))
        max_slices = int(request.get("max_slices", self.max_slices))

        scores, failed = {}, {}
        for image_id in todo:
            t0 = time.time()
            try:
                detail = self.score_volume(datastore.get_image_uri(image_id), device, passes, max_slices)
            except Exception as e:  # one unreadable volume must not stop the scoring of the others
                reason = f"{type(e).__name__}: {e}".replace(datastore.get_image_uri(image_id), image_id)[:500]
                failed[image_id] = reason
                # recorded with the weights' stamp (not retried until new weights) and no score (served last)
                datastore.update_image_info(
                    image_id, {KEY_SCORE: None, KEY_MODEL: stamp, KEY_DETAIL: {"error": reason, "ts": int(time.time())}}
                )
                logger.warning(f"MC-dropout: {image_id} could not be scored, going on with the others: {reason}")
                continue
            detail["seconds"] = round(time.time() - t0, 2)
            datastore.update_image_info(image_id, {KEY_SCORE: detail["score"], KEY_MODEL: stamp, KEY_DETAIL: detail})
            scores[image_id] = detail["score"]
            logger.info(f"MC-dropout: {image_id} => score {detail['score']:.4f} ({detail['seconds']} s)")

        summary = {
            "total": len(unlabeled),
            "executed": len(todo),
            "skipped": len(unlabeled) - len(todo),
            "scores": scores,
            "failed": failed,
            "latency": round(time.time() - start, 2),
        }
        logger.info(f"MC-dropout scoring: {summary}")
        return summary

    @torch.no_grad()
    def score_volume(self, image_path: str, device: str, passes: int, max_slices: int) -> Dict[str, Any]:
        runtime = self.runtime
        data: Dict[str, Any] = {runtime.key_image: image_path, "image_path": image_path, "device": device,
                                "logging": "WARNING"}
        data = runtime.preprocess(data)
        image = torch.as_tensor(data[runtime.key_image]).float()  # (C, *spatial)
        inferer = runtime.inferer(data)
        axis = 1 + int(getattr(inferer, "spatial_dim", image.dim() - 2))  # the slicing axis in (C, *spatial)

        signal = image.movedim(axis, 0).flatten(1)  # (S, C*H*W)
        has_signal = (signal.amax(1) - signal.amin(1)) > 1e-6
        candidates = torch.nonzero(has_signal).flatten()
        if len(candidates) == 0:
            candidates = torch.arange(signal.shape[0])
        n = min(max_slices, len(candidates))
        pick = candidates[np.unique(np.linspace(0, len(candidates) - 1, n).round().astype(int))]
        x = image.index_select(axis, pick)[None].to(device)  # the picked slices as a thin volume

        network = runtime.network(device)
        torch.manual_seed(self.seed)
        probs = []
        with runtime.device_lock(device), runtime.amp_context(data, device):
            for _ in range(passes):  # the bundle's inferer pads/windows each slice exactly as inference does
                probs.append(torch.softmax(inferer(x, network).float(), dim=1)[0].cpu())
        p = torch.stack(probs)  # (T, K, *spatial)
        k = p.shape[1]
        eps = 1e-8
        norm = math.log(k) if k > 1 else 1.0
        mean = p.mean(0)
        entropy = -(mean * torch.log(mean + eps)).sum(0) / norm  # (*spatial)
        expected = -(p * torch.log(p + eps)).sum(1).mean(0) / norm
        mutual_info = (entropy - expected).clamp_min(0)
        fg = (p.argmax(1) != 0).any(0)  # any pass says foreground
        region = fg if bool(fg.any()) else torch.ones_like(fg)
        return {
            "score": float(entropy[region].mean()),
            "entropy": float(entropy[region].mean()),
            "mutual_information": float(mutual_info[region].mean()),
            "entropy_all_pixels": float(entropy.mean()),
            "foreground_fraction": float(fg.float().mean()),
            "passes": passes,
            "slices": [int(s) for s in pick],
            "dropout": runtime.dropout,
            "ts": int(time.time()),
        }
