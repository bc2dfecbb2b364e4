"""Ignite/MONAI engine handlers for Med-URWKV training: the paper's encoder freeze, atomic checkpoints,
resuming, and progress (a tqdm bar or log lines, with an optional stats JSON).

All are plain handlers with ``attach(engine)`` (or ``__call__(engine)`` for one-off loaders), so the bundle's
``train.json`` lists them next to MONAI's own handlers.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn as nn
import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver, from_engine

from .checkpoint import file_stamp
from .files import atomic_path, write_json_atomic

__all__ = ["FreezeEncoderHandler", "AtomicCheckpointSaver", "ResumeTraining", "ProgressBar"]

logger = logging.getLogger(__name__)


def _unwrap(network: nn.Module) -> nn.Module:
    while isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        network = network.module
    return network


class FreezeEncoderHandler:
    """Freeze the pretrained encoder for the first ``epochs`` epochs, then train everything (Med-URWKV recipe).

    At the start of each epoch, ``network.encoder_parameters()`` get ``requires_grad = epoch > epochs``.
    Frozen parameters receive no gradient, so AdamW leaves them (and their weight decay) alone and the
    backward pass skips the encoder. Under DDP, wrap the network with ``find_unused_parameters=True``.
    BatchNorm running statistics (adapter stem) keep updating, as in the rest of the network.

    Args:
        network: a ``MedURWKV`` (or a DDP/DataParallel wrapper of one).
        epochs: number of leading epochs with a frozen encoder; 0 disables freezing.
    """

    def __init__(self, network: nn.Module, epochs: int = 5) -> None:
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        net = _unwrap(network)
        if not hasattr(net, "encoder_parameters"):
            raise TypeError(f"{type(net).__name__} has no encoder_parameters(); FreezeEncoderHandler needs a MedURWKV")
        self.network = net
        self.epochs = int(epochs)
        self._frozen: Optional[bool] = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        frozen = engine.state.epoch <= self.epochs
        if frozen == self._frozen:
            return
        params = self.network.encoder_parameters()
        for p in params:
            p.requires_grad_(not frozen)
        self._frozen = frozen
        n = sum(p.numel() for p in params)
        state = f"frozen until the end of epoch {self.epochs}" if frozen else "trainable"
        engine.logger.info(f"Epoch {engine.state.epoch}: encoder ({n / 1e6:.2f} M parameters) {state}")


class _AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` writing through :func:`medurwkv.files.atomic_path` (temporary file in the same folder,
    fsync, ``os.replace``): readers never see a partly written file. With a fixed ``filename`` the previous file
    is not deleted before the new one is written: the replace swaps it, so a crash, Ctrl-C or ``kill -9`` at any
    moment leaves the old or the new checkpoint on disk.

    A ``kill -9`` during a save cannot remove its temporary file (``.<filename>.<random>.tmp``, hidden, ignored by
    every reader); the next saver for the same fixed file name removes such leftovers once they are older than
    ``STALE_S`` seconds (an older temporary file cannot belong to a save still in progress)."""

    STALE_S = 600.0

    def __init__(self, dirname: str, filename: Optional[str] = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        if filename and idist.get_rank() == self.save_on_rank:
            self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> list:
        removed = []
        now = time.time()
        for p in self.dirname.glob(f".{self.filename}.*.tmp"):
            try:
                if now - p.stat().st_mtime > self.STALE_S:
                    p.unlink()
                    removed.append(p.name)
            except OSError:  # gone meanwhile, or not ours to remove: leave it
                pass
        if removed:
            logger.info(f"Removed {len(removed)} temporary file(s) left by an interrupted save of {self.filename}")
        return removed

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Optional[Mapping] = None) -> None:
        if self.save_on_rank != idist.get_rank():
            return
        path = self.dirname / (self.filename or filename)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, str(tmp), **self.kwargs)
        os.chmod(path, os.stat(path).st_mode | stat.S_IRGRP | stat.S_IROTH)  # as ignite's saver: readable by the server

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically.

    MONAI's saver writes in place (``atomic=False``) and, for a fixed ``key_metric_filename`` such as
    ``model.pt``, deletes the previous best file *before* writing the new one, so an interruption can leave
    no model or a truncated one. This subclass keeps every argument and behaviour of ``CheckpointSaver`` and
    swaps the disk writer for a temp-file + rename writer that never deletes a fixed-name file.

    Args:
        interval_filename: fixed file name for the ``save_interval`` checkpoints (default: MONAI's
            ``checkpoint_epoch=N.pt`` names).
        engine_key: also save the state (epoch, iteration) of the engine this handler is attached to, under
            this key (e.g. ``"trainer"``, for resuming). A config cannot list the trainer in ``save_dict`` of
            one of its own handlers (circular reference), hence this option.
        keep_incumbent: for fine-tuning runs that validate the weights they start from before training
            (``ValidationHandler(exec_at_start=True)``: the evaluator's epoch is then 0). That score becomes the
            score to beat and nothing is written, so a run that never does better than the model it started from
            leaves ``key_metric_filename`` (e.g. ``models/model.pt``) as it was. Without it, the first validation
            of every run overwrites the best file, even with a worse model. Needs ``key_metric_filename``.

    The saver is itself stateful: ``state_dict()`` holds the score of the best file written so far (and the
    evaluator's best metric and epoch). Listed in the ``save_dict`` of the trainer's interval checkpoint, it is
    saved with the training state, and ``ResumeTraining`` restores it, so a resumed run replaces
    ``key_metric_filename`` only with a model that beats the one the interrupted run saved.
        Other arguments: as ``monai.handlers.CheckpointSaver``. What is saved is each object's
        ``state_dict()`` (DDP/DataParallel unwrapped by ignite): tensors and plain Python values only,
        loadable with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        interval_filename: Optional[str] = None,
        engine_key: Optional[str] = None,
        keep_incumbent: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        if engine_key is not None and engine_key in save_dict:
            raise ValueError(f"engine_key {engine_key!r} is already a key of save_dict")
        if keep_incumbent and not (kwargs.get("save_key_metric") and kwargs.get("key_metric_filename")):
            raise ValueError("keep_incumbent needs save_key_metric=True and a fixed key_metric_filename")
        self.engine_key = engine_key
        self.keep_incumbent = bool(keep_incumbent)
        self.key_metric_filename = kwargs.get("key_metric_filename")
        self.incumbent_score: Optional[float] = None
        self._engine: Optional[Engine] = None
        # MONAI's CheckpointSaver builds its ignite Checkpoints in __init__ with an in-place DiskSaver, takes no other
        # writer and has no public accessor: its three private attributes are read here, once, and nowhere else
        self.final_checkpoint: Optional[Checkpoint] = self._final_checkpoint  # private: to swap in the atomic writer
        self.key_metric_checkpoint: Optional[Checkpoint] = self._key_metric_checkpoint  # private: same; best score
        self.interval_checkpoint: Optional[Checkpoint] = self._interval_checkpoint  # private: same; interval_filename
        for ckpt in self.checkpoints():
            old = ckpt.save_handler
            filename = getattr(old, "filename", None)
            if ckpt is self.interval_checkpoint and interval_filename:
                filename = interval_filename
            ckpt.save_handler = _AtomicDiskSaver(dirname=str(old.dirname), filename=filename)

    def checkpoints(self) -> list:
        """The ignite ``Checkpoint`` objects this saver writes with (final, key metric, interval; those enabled)."""
        return [c for c in (self.final_checkpoint, self.key_metric_checkpoint, self.interval_checkpoint) if c is not None]

    def _take_as_best(self, score: float, filename: str) -> None:
        """``score`` is the one to beat: ignite's public ``Checkpoint.load_state_dict`` sets its list of saved items
        (``"_saved"`` is the key of ignite's documented state format, not an attribute)."""
        self.key_metric_checkpoint.load_state_dict({"_saved": [(score, filename)]})

    def metrics_completed(self, engine: Engine) -> None:
        ckpt = self.key_metric_checkpoint
        if self.keep_incumbent and ckpt is not None and engine.state.epoch <= 0:  # validation before training
            self.incumbent_score = float(ckpt.score_function(engine))
            self._take_as_best(self.incumbent_score, "<weights the run started from>")
            logger.info(
                f"Validation before training: key metric {self.incumbent_score:.4f} for the starting weights; "
                f"{self.key_metric_filename} is replaced only by a model that scores higher"
            )
            return
        super().metrics_completed(engine)

    def state_dict(self) -> dict:
        """The best key-metric score behind ``key_metric_filename`` so far (``None`` before any), as plain values."""
        ckpt = self.key_metric_checkpoint
        saved = ckpt.state_dict()["_saved"] if ckpt is not None else []  # ignite's public state: [(score, file)]
        best = max((float(score) for score, _ in saved), default=None)
        state = getattr(self._engine, "state", None)
        best_metric = getattr(state, "best_metric", None)
        return {
            "key_metric_filename": self.key_metric_filename,
            "file_stamp": self._file_stamp(),
            "score": best,
            "best_metric": float(best_metric) if best is not None and best_metric is not None else None,
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)) if best is not None else -1,
        }

    def _file_stamp(self) -> Optional[list]:
        """(mtime_ns, size) of ``key_metric_filename``: whether the file is still the one the score belongs to."""
        ckpt = self.key_metric_checkpoint
        if ckpt is None or not self.key_metric_filename:
            return None
        stamp = file_stamp(os.path.join(str(ckpt.save_handler.dirname), str(self.key_metric_filename)))
        return None if stamp is None else list(stamp)

    def load_state_dict(self, state: Mapping) -> None:
        """Take a saved best score as the one to beat (see ``state_dict``). Ignored, with a warning, when the file
        it belongs to is gone or was rewritten since (by hand, or by a validation whose training state was never
        saved): the first validation then writes a new one, as without a saved score."""
        if "_saved" in state:  # MONAI's own format (``key_metric_save_state``, ignite's ``Checkpoint.state_dict``)
            super().load_state_dict(state)
            return
        ckpt, score = self.key_metric_checkpoint, state.get("score")
        if ckpt is None or score is None:
            return
        path = os.path.join(str(ckpt.save_handler.dirname), str(self.key_metric_filename))
        stamp = state.get("file_stamp")
        if (
            state.get("key_metric_filename") != self.key_metric_filename
            or self._file_stamp() is None
            or (stamp is not None and list(stamp) != self._file_stamp())
        ):
            logger.warning(f"Saved best score {score:.4f} ignored: {path} is gone or is not the model it belongs to")
            return
        self.incumbent_score = float(score)
        self._take_as_best(self.incumbent_score, str(self.key_metric_filename))
        if self._engine is not None and state.get("best_metric") is not None:
            self._engine.state.best_metric = state["best_metric"]
            self._engine.state.best_metric_epoch = int(state.get("best_metric_epoch", -1))
        logger.info(f"{path} scores {score:.4f} (saved best): it is replaced only by a model that scores higher")

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        if self.engine_key is not None:
            for ckpt in self.checkpoints():
                ckpt.to_save[self.engine_key] = engine
        super().attach(engine)


class ResumeTraining:
    """Resume a training run: call it on the trainer before ``run()`` (``"$@resume(@train#trainer) if @resume else None"``).

    * ``state_path`` exists (written by the bundle every ``val_interval`` epochs and at the end): restores the
      network, optimizer, LR scheduler and the trainer's epoch/iteration, so ``run()`` continues where it stopped,
      and the best score so far into ``best_model_saver`` (the evaluator's key-metric ``AtomicCheckpointSaver``,
      saved under ``"best_model"``), so ``model_path`` is replaced only by a better model. A state file without
      that entry (written before it existed) resumes as before, with a warning that the first validation writes
      ``model_path``.
    * otherwise ``model_path`` exists (``models/model.pt``, the best validation weights): loads the network
      weights only and starts the schedule from epoch 1 (logged as a warning).
    * neither: ``FileNotFoundError`` naming both paths.
    """

    def __init__(
        self,
        state_path: str,
        model_path: str,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        map_location: Any = None,
        best_model_saver: Any = None,
    ) -> None:
        self.state_path, self.model_path = str(state_path), str(model_path)
        self.network, self.optimizer, self.lr_scheduler = _unwrap(network), optimizer, lr_scheduler
        self.map_location = map_location
        self.best_model_saver = best_model_saver

    def __call__(self, engine: Engine) -> str:
        if os.path.isfile(self.state_path):
            load_dict = {"model": self.network, "optimizer": self.optimizer, "trainer": engine}
            if self.lr_scheduler is not None:
                load_dict["lr_scheduler"] = self.lr_scheduler
            if self.best_model_saver is not None:
                saved = torch.load(self.state_path, map_location="cpu", weights_only=True, mmap=True)
                if "best_model" in saved:
                    load_dict["best_model"] = self.best_model_saver
                else:
                    engine.logger.warning(
                        f"{self.state_path} holds no best score (written by an older version): the first validation "
                        f"after resuming replaces {self.model_path} whatever its score"
                    )
                del saved
            CheckpointLoader(load_path=self.state_path, load_dict=load_dict, map_location=self.map_location)(engine)
            engine.logger.info(f"Resumed training from {self.state_path} at epoch {engine.state.epoch}/{engine.state.max_epochs}")
            return self.state_path
        if os.path.isfile(self.model_path):
            CheckpointLoader(load_path=self.model_path, load_dict={"model": self.network}, map_location=self.map_location)(engine)
            engine.logger.warning(
                f"{self.state_path} not found: loaded the network weights of {self.model_path} only; "
                "the optimizer, LR schedule and epoch count start afresh (the bundle validates these weights first, "
                "validate_start_weights, so only a better model replaces them)"
            )
            return self.model_path
        raise FileNotFoundError(f"resume=true but there is nothing to resume from: neither {self.state_path} nor {self.model_path} exists")


class ProgressBar:
    """Progress of a whole training run: one tqdm bar over all iterations of all epochs (the default), or, with
    ``lines=True``, one log line per ``iteration_interval`` iterations and per epoch (readable where a bar's
    ``\r`` redraws are not: MONAI Label's ``GET /train/`` details, server logs). Shows the epoch, the loss and
    the validation key metric; resumed runs start where they stopped.

    With ``stats_file``, a small JSON is rewritten atomically at the start, after every epoch and at the end
    with ``epoch``, ``total_epochs``, ``iteration``, ``best_metric`` (0.0 before any), ``best_metric_epoch``,
    ``key_metric``, ``start_ts``, ``elapsed_s``, ``status`` (``RUNNING``/``DONE``) and, when done,
    ``total_time``: the keys 3D Slicer's MONAI Label module reads from ``/info/`` ``train_stats``.
    Under DDP only rank 0 reports.

    Args:
        validator: the validation evaluator whose key metric is shown (optional).
        output_transform: how to read the loss from ``engine.state.output``.
        desc: label of the bar or prefix of the lines (``[desc] ...``).
        disable: turn the bar off (e.g. on non-zero ranks); ``None`` lets tqdm decide. Lines and stats are
            not affected.
        lines: print lines instead of drawing a bar.
        iteration_interval: with ``lines``, print every this many iterations (and the last of each epoch).
        stats_file: path of the stats JSON, or None for none.
    """

    def __init__(
        self,
        validator: Optional[Engine] = None,
        output_transform: Callable = from_engine(["loss"], first=True),
        desc: str = "train",
        disable: Optional[bool] = False,
        lines: bool = False,
        iteration_interval: int = 1,
        stats_file: Optional[str] = None,
    ) -> None:
        self.validator = validator
        self.output_transform = output_transform
        self.desc = desc
        self.disable = disable
        self.lines = bool(lines)
        self.iteration_interval = max(1, int(iteration_interval))
        self.stats_file = stats_file
        self.stats: Dict[str, Any] = {}
        self.start = time.time()
        self._bar: Any = None

    def attach(self, engine: Engine) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # multi-GPU: one report, from rank 0
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._close_on_error)

    # --- what is shown ----------------------------------------------------------------------------------------
    def _loss(self, engine: Engine) -> Optional[float]:
        try:
            loss = self.output_transform(engine.state.output)
            if isinstance(loss, (tuple, list)) and len(loss) == 1:  # from_engine on a dict output gives (loss,)
                loss = loss[0]
            return float(loss)
        except Exception:  # no loss in the output (e.g. a custom engine): show the rest
            return None

    def _best(self) -> tuple:
        """(best key metric, its epoch) of the validator so far, or (None, None)."""
        state = getattr(self.validator, "state", None)
        best = getattr(state, "best_metric", None)
        if best is None or best == -1:
            return None, None
        return float(best), int(getattr(state, "best_metric_epoch", -1))

    def _postfix(self, engine: Engine) -> dict:
        post = {"epoch": f"{engine.state.epoch}/{engine.state.max_epochs}"}
        loss = self._loss(engine)
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        v = self.validator
        if v is not None and getattr(v.state, "key_metric_name", None) in (v.state.metrics or {}):
            post[v.state.key_metric_name] = f"{float(v.state.metrics[v.state.key_metric_name]):.4f}"
        return post

    def _print(self, msg: str) -> None:
        print(f"[{self.desc}] {msg}", file=sys.stdout, flush=True)

    def _save(self, engine: Engine, **extra: Any) -> None:
        best, best_epoch = self._best()
        self.stats = {
            "epoch": int(engine.state.epoch),
            "total_epochs": int(engine.state.max_epochs or 0),
            "iteration": int(engine.state.iteration),
            "best_metric": best if best is not None else 0.0,
            "best_metric_epoch": best_epoch,
            "key_metric": getattr(getattr(self.validator, "state", None), "key_metric_name", None),
            "start_ts": int(self.start),
            "elapsed_s": round(time.time() - self.start, 1),
            **extra,
        }
        if self.stats_file:
            write_json_atomic(self.stats_file, self.stats)

    # --- events -----------------------------------------------------------------------------------------------
    def _open(self, engine: Engine) -> None:
        self.start = time.time()
        if self.lines:
            device = getattr(engine.state, "device", None) or getattr(engine, "device", "")
            self._print(f"started: {engine.state.max_epochs} epoch(s) of {engine.state.epoch_length} iteration(s) on {device}")
            best, best_epoch = self._best()
            if best is not None and best_epoch == 0:  # ValidationHandler(exec_at_start) ran before this handler
                key = getattr(self.validator.state, "key_metric_name", None) or "metric"
                self._print(f"current model before training: {key} {best:.4f}; model.pt is replaced only by a better one")
        else:
            from tqdm.auto import tqdm

            total = (engine.state.max_epochs or 0) * (engine.state.epoch_length or 0)
            self._bar = tqdm(total=total or None, initial=engine.state.iteration, desc=self.desc, unit="it", dynamic_ncols=True, disable=self.disable, mininterval=1.0)
        self._save(engine, status="RUNNING")

    def _update(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(engine), refresh=False)
            self._bar.update(1)
        if self.lines:
            n = engine.state.epoch_length or 0
            i = (engine.state.iteration - 1) % n + 1 if n else engine.state.iteration
            if i % self.iteration_interval == 0 or i == n:
                loss = self._loss(engine)
                loss_s = f" loss {loss:.4f}" if loss is not None else ""
                self._print(f"epoch {engine.state.epoch}/{engine.state.max_epochs} iteration {i}/{n}{loss_s}")

    def _epoch(self, engine: Engine) -> None:  # after the validation handlers of this epoch have run
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(engine))
        self._save(engine, status="RUNNING")
        if self.lines:
            best, best_epoch = self._best()
            best_s = f"; best {self.stats.get('key_metric') or 'metric'} {best:.4f} (epoch {best_epoch})" if best is not None else ""
            self._print(f"epoch {engine.state.epoch}/{engine.state.max_epochs} done in {self.stats['elapsed_s']} s{best_s}")

    def _close(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._save(engine, status="DONE", total_time=round(time.time() - self.start, 1))
        if self.lines:
            self._print(f"finished {engine.state.epoch} epoch(s) in {self.stats['total_time']} s")

    def _close_on_error(self, engine: Engine, e: Exception) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        raise e
