"""Helpers that live once in medurwkv for the bundle and the Label app: strict loading, file stamps, atomic
writes, the training progress handler."""

from __future__ import annotations

import json
import os

import pytest
import torch

from medurwkv.checkpoint import CheckpointError, file_stamp, load_state_dict_strict
from medurwkv.files import atomic_path, write_json_atomic


def test_strict_load_names_the_file_and_what_differs():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    state["0.weight"] = torch.zeros(5, 3)
    state.pop("1.bias")
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"w\.pt: weights do not fit Sequential: 1 missing \(e\.g\. 1\.bias\); 1 unexpected \(e\.g\. extra\); 1 shape mismatch \(e\.g\. 0\.weight: \(5, 3\) vs \(4, 3\)\)"):
        load_state_dict_strict(net, state, source="w.pt")
    assert net[0].weight.abs().sum() > 0  # nothing was loaded
    good = {k: torch.full_like(v, 0.5) for k, v in net.state_dict().items()}
    load_state_dict_strict(net, good)
    assert torch.equal(net[1].bias, torch.full((2,), 0.5))


def test_file_stamp_changes_with_a_file_or_any_file_of_a_folder(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"a" * 10)
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert file_stamp(f) == (1_000_000_000, 10)
    f.write_bytes(b"b" * 10)  # same size, new mtime
    assert file_stamp(f) != (1_000_000_000, 10)
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"x" * 7)
    before = file_stamp(series)
    assert before[1] == 7
    (series / "2.dcm").write_bytes(b"y" * 5)
    assert file_stamp(series)[1] == 12 and file_stamp(series) != before
    assert file_stamp(tmp_path / "gone") is None


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "stats.json"
    write_json_atomic(path, {"epoch": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"epoch": ')
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]  # no temp file left


def test_progress_lines_and_stats_json(tmp_path, capsys):
    from ignite.engine import Engine, Events

    from medurwkv.engines import ProgressBar

    validator = Engine(lambda e, b: None)
    validator.state.key_metric_name = "val_mean_dice"
    validator.state.metrics = {}
    trainer = Engine(lambda e, b: {"loss": 0.5 / e.state.iteration})
    seen = []

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine):  # what ValidationHandler leaves on the evaluator
        validator.state.best_metric, validator.state.best_metric_epoch = 0.1 * engine.state.epoch, engine.state.epoch
        validator.state.metrics = {"val_mean_dice": validator.state.best_metric}

    stats = tmp_path / "models" / "train_stats.json"
    ProgressBar(validator=validator, desc="medurwkv", lines=True, iteration_interval=2, stats_file=str(stats)).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(json.loads(stats.read_text())["epoch"]))
    trainer.run([0, 1, 2], max_epochs=2)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[medurwkv] started: 2 epoch(s) of 3 iteration(s)")
    assert "[medurwkv] epoch 1/2 iteration 2/3 loss 0.2500" in out and "[medurwkv] epoch 1/2 iteration 3/3 loss 0.1667" in out
    assert not any("iteration 1/3" in line for line in out)  # every 2nd iteration and the last of an epoch
    assert "[medurwkv] epoch 2/2 done" in out[-2] and "best val_mean_dice 0.2000 (epoch 2)" in out[-2]
    assert out[-1].startswith("[medurwkv] finished 2 epoch(s)")
    final = json.loads(stats.read_text())
    assert seen == [1, 2]
    assert {k: final[k] for k in ("epoch", "total_epochs", "iteration", "best_metric", "best_metric_epoch", "key_metric", "status")} == {
        "epoch": 2, "total_epochs": 2, "iteration": 6, "best_metric": 0.2, "best_metric_epoch": 2, "key_metric": "val_mean_dice", "status": "DONE"
    }
    assert final["total_time"] >= 0


@pytest.mark.parametrize("content", [b"this is not a checkpoint", b"PK\x03\x04 truncated zip", b"\x80\x02}q\x00(X"])
def test_garbage_weights_files_are_refused_with_the_file_named(tmp_path, content):
    """Any unreadable file is a CheckpointError naming it (the legacy unpickler raises IndexError on some garbage)."""
    from medurwkv.checkpoint import load_weights

    path = tmp_path / "encoder.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"encoder\.pt: not a readable PyTorch checkpoint"):
        load_weights(path)
