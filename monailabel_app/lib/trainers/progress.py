"""Training progress for MONAI Label: one log line per epoch/iteration and a small JSON of stats.

The train task appends this handler to the bundle's ``train#handlers`` (by dotted path, so it also works in the
multi-GPU config that MONAI Label exports to JSON). It prints ``[train] epoch e/E iter i/I loss ...`` lines,
which MONAI Label shows in ``GET /train/`` (``details``, the last 20 output lines) and in the server log, and
rewrites ``stats_file`` atomically with the keys 3D Slicer's MONAI Label module reads from ``/info/``
``train_stats`` (``epoch``, ``total_epochs``, ``best_metric`` for its accuracy bar, ``total_time`` when done).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Optional

from monai.utils import min_version, optional_import

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")


def write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class TrainProgress:
    """Ignite handler for the trainer.

    Args:
        stats_file: where to keep the stats JSON (next to the weights, ``models/train_stats.json``).
        validator: the validation evaluator (``@validate#evaluator``), for the best key metric.
        iteration_interval: print every this many iterations (and the last one of each epoch).
        name: the model name shown in the lines.
    """

    def __init__(
        self, stats_file: str, validator: Optional[Any] = None, iteration_interval: int = 1, name: str = "train"
    ):
        self.stats_file = stats_file
        self.validator = validator
        self.iteration_interval = max(1, int(iteration_interval))
        self.name = name
        self.start = time.time()
        self.stats: dict = {}

    def attach(self, engine) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # multi-GPU: one report, from rank 0
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _print(self, msg: str) -> None:
        print(f"[{self.name}] {msg}", file=sys.stdout, flush=True)

    def _best(self):
        state = getattr(self.validator, "state", None)
        best = getattr(state, "best_metric", None)
        if best is None or best == -1:
            return None, None
        return float(best), int(getattr(state, "best_metric_epoch", -1))

    def _save(self, engine, **extra) -> None:
        best, best_epoch = self._best()
        self.stats = {
            "epoch": int(engine.state.epoch),
            "total_epochs": int(engine.state.max_epochs),
            "iteration": int(engine.state.iteration),
            "best_metric": best if best is not None else 0.0,
            "best_metric_epoch": best_epoch,
            "key_metric": getattr(getattr(self.validator, "state", None), "key_metric_name", None),
            "start_ts": int(self.start),
            "elapsed_s": round(time.time() - self.start, 1),
            **extra,
        }
        write_json_atomic(self.stats_file, self.stats)

    def started(self, engine) -> None:
        self.start = time.time()
        n = engine.state.epoch_length
        device = getattr(engine.state, "device", None) or getattr(engine, "device", "")
        self._print(f"started: {engine.state.max_epochs} epoch(s) of {n} iteration(s) on {device}")
        best, best_epoch = self._best()
        if best is not None and best_epoch == 0:  # ValidationHandler(exec_at_start) ran before this handler
            key = getattr(self.validator.state, "key_metric_name", None) or "metric"
            self._print(f"current model before training: {key} {best:.4f}; model.pt is replaced only by a better one")
        self._save(engine, status="RUNNING")

    def iteration_completed(self, engine) -> None:
        n = engine.state.epoch_length or 0
        i = (engine.state.iteration - 1) % n + 1 if n else engine.state.iteration
        if i % self.iteration_interval == 0 or i == n:
            out = engine.state.output
            loss = None
            if isinstance(out, list) and out and isinstance(out[0], dict):
                loss = out[0].get("loss")
            elif isinstance(out, dict):
                loss = out.get("loss")
            loss_s = f" loss {float(loss):.4f}" if loss is not None else ""
            self._print(f"epoch {engine.state.epoch}/{engine.state.max_epochs} iteration {i}/{n}{loss_s}")

    def epoch_completed(self, engine) -> None:
        self._save(engine, status="RUNNING")
        best, best_epoch = self._best()
        best_s = (
            f"; best {self.stats.get('key_metric') or 'metric'} {best:.4f} (epoch {best_epoch})"
            if best is not None
            else ""
        )
        self._print(f"epoch {engine.state.epoch}/{engine.state.max_epochs} done in {self.stats['elapsed_s']} s{best_s}")

    def completed(self, engine) -> None:
        self._save(engine, status="DONE", total_time=round(time.time() - self.start, 1))
        self._print(f"finished {engine.state.epoch} epoch(s) in {self.stats['total_time']} s")
