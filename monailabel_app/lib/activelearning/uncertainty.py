"""``uncertainty`` strategy: the unlabeled volume with the highest MC-dropout score goes to the annotator next.

Scores come from ``lib.scoring.mc_dropout`` (run after every training and on demand with ``POST /scoring/``).
Ranking:

1. unlabeled volumes not handed out by this strategy in the last ``reserve_s`` seconds come first, so two
   annotators (or one pressing "Next Sample" twice to skip a case) get different volumes;
2. then the highest score; volumes without a score yet (new, or no trained model) come after scored ones, in
   name order.

The answer carries the score and whether it was computed with the current weights.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..scoring.mc_dropout import KEY_MODEL, KEY_SCORE

logger = logging.getLogger(__name__)


class MostUncertain(Strategy):
    def __init__(self, reserve_s: int = 600, current_model_stamp=None):
        super().__init__("Most uncertain unlabeled volume first (MC-dropout score)")
        self.reserve_s = reserve_s
        self.current_model_stamp = current_model_stamp  # callable -> mtime_ns of model.pt or None

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Optional[Dict[str, Any]]:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request.get("strategy", "uncertainty")
        now = int(time.time())
        stamp = self.current_model_stamp() if self.current_model_stamp else None

        ranked = []
        for image_id in images:
            info = datastore.get_image_info(image_id)
            served = info.get("strategy", {}).get(strategy, {}).get("ts", 0)
            reserved = now - served < self.reserve_s
            score = info.get(KEY_SCORE)
            scored = isinstance(score, (int, float))
            ranked.append((reserved, not scored, -(score if scored else 0.0), image_id, info))
        ranked.sort(key=lambda r: r[:4])
        reserved, unscored, neg_score, image_id, info = ranked[0]
        result: Dict[str, Any] = {
            "id": image_id,
            "uncertainty": None if unscored else -neg_score,
            "scored_with_current_weights": (not unscored) and stamp is not None and info.get(KEY_MODEL) == stamp,
        }
        if unscored:
            result["reason"] = "no uncertainty score yet (no trained weights or scoring not run): first unscored volume"
        logger.info(f"{strategy}: {len(images)} unlabeled; selected {image_id} (score {result['uncertainty']})")
        return result
