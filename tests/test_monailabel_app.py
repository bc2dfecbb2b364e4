"""End-to-end tests of the MONAI Label app (monailabel_app/) against a real server process.

One server (``python -m monailabel.main start_server``) runs for the whole module on 127.0.0.1 and a free port,
over copies of the app and of the bundle in a temporary folder (nothing is written into the repository) and a
studies folder of tiny volumes cut from sample_data/. Everything goes through
``monailabel.client.MONAILabelClient``, as 3D Slicer's module does. Two staged module fixtures: ``server``, the
started server without weights, and ``trained``, the same server once the CLI loop's first round has trained it
(built on first use). Each test asks for the stage it needs, so any one runs alone (``-k``); in file order the
whole module trains as often as one chain would (first training, killed training, worse retraining).

The server, its staging (tiny volumes, 64 x 64 windows) and the offline guard are in ``tests/label_server.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from label_server import (
    APP,
    MODEL,
    ROOT,
    SAMPLE,
    VOLUMES,
    http,
    load_app_module,
    serving,
    stage,
    status_of,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A started server over the staged app, bundle (no weights) and studies."""
    with serving(stage(tmp_path_factory.mktemp("monailabel_app"))) as c:
        yield c


@pytest.fixture(scope="module")
def trained(server):
    """``server`` after one round of the CLI loop (next sample -> infer -> simulated correction -> submit -> train
    one epoch): ``models/model.pt`` exists and one volume has a final label (``results["first_labeled"]``). The
    loop's output is kept in ``results["loop"]`` for the test that checks it."""
    c = server
    if "loop" not in c.results:
        out = c.root / "al" / "dice.png"
        out.parent.mkdir()
        cmd = [sys.executable, str(c.app / "active_learning_loop.py"), "--server", c.server.url]
        cmd += ["--labels", str(c.gt), "--rounds", "1", "--max-epochs", "1", "--strategy", "uncertainty"]
        cmd += ["--eval-images", str(c.eval_images), "--eval-labels", str(c.eval_labels), "--out", str(out)]
        run = subprocess.run(cmd, env=c.env, capture_output=True, text=True, timeout=1100)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        rows = json.loads(out.with_suffix(".json").read_text())["rounds"]
        c.results["loop"] = {"plot": out, "rows": rows}
        c.results["first_labeled"] = rows[0]["sample"]
    return c


def _labeled(c) -> set:
    return {i for i, o in c.client.datastore()["objects"].items() if "final" in o["labels"]}


def _infer(c, image: str, **kw):
    path, params = c.client.infer(MODEL, image, {}, **kw)
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine, img.get_data_dtype(), params


def _assert_same_grid(result_affine, result_shape, image_path: Path):
    ref = nib.load(str(image_path))
    assert tuple(result_shape) == tuple(ref.shape)
    np.testing.assert_allclose(result_affine, ref.affine, atol=1e-4)


def _train_status(c) -> dict:
    return c.client.train_status()


_http = http


# ------------------------------------------------------------------------------------- no server needed
def test_loop_script_dice_and_plot(tmp_path):
    al = load_app_module("al_loop", APP / "active_learning_loop.py")
    a = np.zeros((4, 4, 2), bool)
    b = a.copy()
    a[:2], b[1:3] = True, True
    assert al.dice(a, b) == pytest.approx(0.5)
    assert al.dice(np.zeros(3), np.zeros(3)) == 1.0
    assert al.image_id("x/colin27_t1.nii.gz") == "colin27_t1"
    rows = [
        {"labeled": 1, "sample_dice": None, "eval_dice": 0.41},
        {"labeled": 2, "sample_dice": 0.45, "eval_dice": 0.62},
        {"labeled": 3, "sample_dice": 0.60, "eval_dice": 0.71},
    ]
    out = tmp_path / "curve.png"
    al.plot_curve(rows, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dataset_folder_as_studies_is_linked_not_written(tmp_path):
    studies = load_app_module("app_studies", APP / "lib" / "studies.py")
    app = tmp_path / "app"
    work = Path(studies.resolve_studies(str(SAMPLE), str(app)))
    assert work == app / "model" / "studies" / "sample_data"
    names = sorted(p.name for p in work.iterdir())
    assert names == ["colin27_t1.nii.gz", "itk_kmeanstest_t1.nii.gz"]  # each listed image once
    assert all((work / n).resolve().parent.parent == SAMPLE for n in names)
    assert Path(studies.resolve_studies(str(SAMPLE), str(app))) == work  # idempotent (subprocesses redo it)
    assert studies.resolve_studies(str(SAMPLE / "imagesTr"), str(app)) == str(SAMPLE / "imagesTr")  # plain folder


def test_probability_cache_misses_on_rewritten_inputs_and_keeps_its_limits(tmp_path):
    import torch

    from medurwkv.checkpoint import file_stamp as _file_stamp  # what the cache keys are made of

    sys.path.insert(0, str(APP))
    try:
        from lib.runtime import ProbabilityCache
    finally:
        sys.path.remove(str(APP))
    f = tmp_path / "t1.nii.gz"
    f.write_bytes(b"x" * 10)
    first = _file_stamp(str(f))
    os.utime(f, ns=(first[1] + 10**9, first[1] + 10**9))
    assert _file_stamp(str(f)) != first  # rewritten (same size, new mtime)
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM_1.dcm").write_bytes(b"a")
    one = _file_stamp(str(series))
    (series / "IM_2.dcm").write_bytes(b"b")
    assert _file_stamp(str(series)) != one  # a slice added to a DICOM series
    assert _file_stamp(str(tmp_path / "gone.nii.gz")) is None

    cache = ProbabilityCache(max_entries=2, max_bytes=1000)
    entry = lambda n: {"pred": torch.zeros(n), "image_meta_dict": {"affine": [1]}}  # noqa: E731 (float32: 4 n bytes)
    cache.put(("a",), entry(100))
    cache.put(("b",), entry(100))
    assert cache.get(("a",)) is not None  # now the most recently used
    cache.put(("c",), entry(100))  # three entries > max_entries: the least recently used ("b") goes
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and cache.get(("c",)) is not None
    cache.put(("d",), entry(200))  # one too many ("a" goes), then 400 + 800 bytes > max_bytes ("c" goes)
    assert cache.get(("a",)) is None and cache.get(("c",)) is None and cache.get(("d",)) is not None
    cache.put(("e",), entry(300))  # larger than max_bytes alone: not kept, nothing evicted for it
    assert cache.get(("e",)) is None and cache.get(("d",)) is not None
    off = ProbabilityCache(max_entries=0)
    off.put(("a",), entry(1))
    assert off.get(("a",)) is None


def _model_config(tmp_path):
    """The app's model config (``lib/configs/medurwkv.py``) over a copy of the bundle's configs, no weights."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "bundle" / "configs", bundle / "configs")
    sys.path.insert(0, str(APP))
    try:
        from lib.configs.medurwkv import MedURWKVConfig
    finally:
        sys.path.remove(str(APP))
    config = MedURWKVConfig()
    config.init(MODEL, str(tmp_path / "app" / "model"), {"bundle": str(bundle)})
    return bundle, config


def test_uncertainty_scoring_scores_volumes_and_leaves_2d_images_to_their_model(tmp_path, monkeypatch):
    """Studies may mix volumes and PNG/JPEG images (the 2D model's): the 3D model's MC-dropout scoring scores the
    volumes only, records nothing on the images and counts them in no total."""
    import types

    import torch

    from medurwkv.checkpoint import save_weights

    bundle, config = _model_config(tmp_path)
    (bundle / "models").mkdir()
    save_weights({k: torch.zeros_like(v) for k, v in config.runtime.parsed("network_def").state_dict().items()},
                 bundle / "models" / "model.pt")
    method = config.scoring_method()["mc_dropout"]
    uris = {"head": str(tmp_path / "head.nii.gz"), "slide": str(tmp_path / "slide.png"), "photo": str(tmp_path / "p.JPG")}
    updated, scored = {}, []
    store = types.SimpleNamespace(
        get_unlabeled_images=lambda: sorted(uris), get_image_uri=uris.get, get_image_info=lambda i: {},
        update_image_info=lambda i, info: updated.setdefault(i, info),
    )
    monkeypatch.setattr(method, "score_volume", lambda path, *a: scored.append(path) or {"score": 0.25})
    summary = method({"device": "cpu"}, store)
    assert scored == [uris["head"]] and set(updated) == {"head"}
    assert summary["total"] == summary["executed"] == 1 and summary["scores"] == {"head": 0.25} and not summary["failed"]


def test_cuda_and_cuda_0_are_one_device_with_one_lock(tmp_path, monkeypatch):
    """'cuda' (what Slicer's default sends) and 'cuda:0' name the same GPU: one lock, one network copy, so two
    requests never run batches on one GPU at once; other GPUs and the CPU keep their own."""
    import torch

    _, config = _model_config(tmp_path)
    runtime = config.runtime
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert runtime.device_key("cuda") == runtime.device_key("cuda:0") == "cuda:0"
    assert runtime.device_lock("cuda") is runtime.device_lock("cuda:0")
    assert runtime.device_lock("cuda:1") is not runtime.device_lock("cuda:0")
    assert runtime.device_lock("cpu") is not runtime.device_lock("cuda") and runtime.device_key("cpu") == "cpu"


def test_tasks_share_one_runtime_that_reloads_changed_weights(tmp_path):
    """The infer, click and scribble tasks of the model run on its one runtime: one network in memory, reloaded
    when the weights file changes; the MC-dropout scorer has its own network (dropout on) under the same request
    budget and device locks."""

    import torch

    from medurwkv.checkpoint import save_weights

    bundle, config = _model_config(tmp_path)
    runtime = config.runtime
    tasks = config.infer()
    assert set(tasks) == {MODEL, f"{MODEL}_clicks", f"{MODEL}_scribbles"}
    assert all(t.runtime is runtime for t in tasks.values())
    with pytest.raises(Exception) as e:  # no weights yet: 409 with what to do
        runtime.network("cpu")
    assert getattr(e.value, "status_code", None) == 409

    net = runtime.parsed("network_def")

    def random_state():
        return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}

    weights = bundle / "models" / "model.pt"
    weights.parent.mkdir()
    save_weights(random_state(), weights)
    first = runtime.network("cpu")
    assert runtime.network("cpu") is first and not first.training  # cached, eval mode
    assert runtime.loaded_stamp("cpu")[0] == weights.stat().st_mtime_ns

    scoring = config.scoring_method()["mc_dropout"].runtime
    assert scoring.requests is runtime.requests and scoring.device_lock("cpu") is runtime.device_lock("cpu")
    mc = scoring.network("cpu")
    assert mc is not first and any(m.training for m in mc.modules() if isinstance(m, torch.nn.Dropout))

    new_state = random_state()
    save_weights(new_state, weights)  # as a training publishes it (temporary file + rename)
    os.utime(weights, ns=(runtime.loaded_stamp("cpu")[0] + 10**9,) * 2)
    second = runtime.network("cpu")
    assert second is not first
    name = next(k for k, v in new_state.items() if v.is_floating_point() and v.numel() > 1)
    assert torch.equal(second.state_dict()[name], new_state[name])


# ------------------------------------------------------------------------------------- server
def test_info_lists_model_and_says_there_are_no_weights(server):
    ctx = server
    from monailabel.client.client import MONAILabelClientException

    info = ctx.client.info()
    model = info["models"][MODEL]
    assert model["type"] == "segmentation"
    assert model["labels"] == {"brain": 1}
    assert model["dimension"] == 3
    assert info["labels"] == ["brain"]
    assert MODEL in info["trainers"]
    assert {"uncertainty", "first", "random"} <= set(info["strategies"])
    assert "mc_dropout" in info["scoring"]
    clicks = info["models"][f"{MODEL}_clicks"]  # 3D Slicer lists deepgrow models under SmartEdit
    assert clicks["type"] == "deepgrow" and clicks["labels"] == {"brain": 1} and clicks["dimension"] == 3
    assert {"click_radius_mm", "click_spread_mm", "roi_margin_mm", "lamda", "sigma"} <= set(clicks["config"])
    scribbles = info["models"][f"{MODEL}_scribbles"]  # listed in Slicer's Scribbles section
    assert scribbles["type"] == "scribbles" and scribbles["labels"] == {"brain": 1} and scribbles["dimension"] == 3
    assert model["weights"]["available"] is False
    assert "NO TRAINED WEIGHTS" in model["description"] and "NO TRAINED WEIGHTS" in info["description"]
    assert info["datastore"]["total"] == len(VOLUMES)

    with pytest.raises(MONAILabelClientException) as e:
        ctx.client.infer(MODEL, "colin_a", {})
    assert status_of(e.value) == 409 and "no trained weights" in e.value.msg
    assert "NO TRAINED WEIGHTS" in ctx.server.log()


def test_startup_is_offline_and_on_loopback(server):
    ctx = server
    assert not ctx.netlog.exists(), f"network lookups outside loopback: {ctx.netlog.read_text()}"
    assert ctx.server.listening_addresses() == {"127.0.0.1"}
    assert "runs in the worker-thread pool" in ctx.server.log()
    assert ctx.client.auth_enabled() is False  # the login is off by default on loopback (what Slicer asks first)


def test_bad_inputs_get_4xx_with_a_message(server):
    ctx = server
    from monailabel.client.client import MONAILabelClientException

    bad = ctx.root / "bad"
    bad.mkdir()
    raw = (ctx.studies / "colin_a.nii.gz").read_bytes()
    (bad / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (bad / "garbage.nii.gz").write_bytes(os.urandom(4096))
    (bad / "notes.txt").write_text("not an image")
    ref = nib.load(str(ctx.studies / "colin_a.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 2), np.uint8), ref.affine), str(bad / "small_label.nii.gz"))
    wrong_values = np.zeros(ref.shape, np.uint8)
    wrong_values[10:20, 10:20, :] = 3
    nib.save(nib.Nifti1Image(wrong_values, ref.affine), str(bad / "class3_label.nii.gz"))
    good_label = str(ctx.gt / "colin_a.nii.gz")

    cases = [
        (
            "corrupt NIfTI (truncated gzip)",
            lambda: ctx.client.infer(MODEL, "", {}, file=str(bad / "truncated.nii.gz")),
            422,
            "truncated.nii.gz",
        ),
        (
            "corrupt NIfTI (not gzip)",
            lambda: ctx.client.infer(MODEL, "", {}, file=str(bad / "garbage.nii.gz")),
            422,
            "garbage.nii.gz",
        ),
        (
            "non-image file",
            lambda: ctx.client.infer(MODEL, "", {}, file=str(bad / "notes.txt")),
            415,
            "not a supported volume",
        ),
        ("unknown image id", lambda: ctx.client.infer(MODEL, "no_such_image", {}), 404, "no_such_image"),
        ("unknown model", lambda: ctx.client.infer("no_such_model", "colin_a", {}), 404, "no_such_model"),
        ("unknown session", lambda: ctx.client.infer(MODEL, "x", {}, session_id="no-such-session"), 404, "Session"),
        (
            "label of the wrong shape",
            lambda: ctx.client.save_label("colin_a", str(bad / "small_label.nii.gz"), tag="final"),
            422,
            "shape",
        ),
        (
            "label with a class the model lacks",
            lambda: ctx.client.save_label("colin_a", str(bad / "class3_label.nii.gz"), tag="final"),
            422,
            "not classes",
        ),
        (
            "corrupt label",
            lambda: ctx.client.save_label("colin_a", str(bad / "garbage.nii.gz"), tag="final"),
            422,
            "could not be read",
        ),
        (
            "label for an unknown image",
            lambda: ctx.client.save_label("no_such_image", good_label, tag="final"),
            404,
            "no_such_image",
        ),
    ]
    for what, call, status, text in cases:
        with pytest.raises(MONAILabelClientException) as e:
            call()
        assert status_of(e.value) == status, f"{what}: {e.value.msg}"
        assert text in e.value.msg, f"{what}: {e.value.msg}"
        assert ctx.client.info()["name"], f"/info/ after {what}"
    assert ctx.client.info()["datastore"]["completed"] == 0  # nothing bad was stored


def test_active_learning_loop_first_training(trained):
    """The CLI loop: next sample -> infer (409, no weights yet) -> simulated correction -> submit -> train."""
    ctx = trained
    out, rows = ctx.results["loop"]["plot"], ctx.results["loop"]["rows"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rows) == 1
    row = rows[0]
    assert row["sample"] in VOLUMES and row["labeled"] == 1
    assert row["sample_dice"] is None  # there were no weights when the sample was handed out
    assert 0.0 <= row["eval_dice"] <= 1.0

    # the training wrote the weights, reported progress, and /info/ now has them
    assert ctx.weights.is_file()
    status = _train_status(ctx)
    assert status["status"] == "DONE"
    info = ctx.client.info()
    assert info["models"][MODEL]["weights"]["available"] is True
    stats = info["train_stats"][MODEL]
    assert stats["status"] == "DONE" and stats["total_epochs"] == 1 and "best_metric" in stats
    log = ctx.server.log()
    assert "[medurwkv] epoch 1/1 iteration 1/1" in log and "[medurwkv] finished 1 epoch(s)" in log


def test_infer_same_grid_for_datastore_images_and_sessions(trained):
    ctx = trained
    for vid in ("colin_a", "itk_c"):  # RAS and LSA (coronal slices) volumes
        data, affine, dtype, params = _infer(ctx, vid)
        _assert_same_grid(affine, data.shape, ctx.studies / f"{vid}.nii.gz")
        assert dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
        assert params["label_names"] == {"brain": 1}
        assert params["weights"]["mtime_ns"] == ctx.weights.stat().st_mtime_ns

    # a volume loaded locally in Slicer goes up as a session
    session = ctx.client.create_session(str(ctx.eval_images / "colin_eval.nii.gz"))["session_id"]
    data, affine, _, _ = _infer(ctx, "colin_eval", session_id=session)
    _assert_same_grid(affine, data.shape, ctx.eval_images / "colin_eval.nii.gz")
    # and a volume sent as a file
    data, affine, _, _ = _infer(ctx, "", file=str(ctx.eval_images / "colin_eval.nii.gz"))
    _assert_same_grid(affine, data.shape, ctx.eval_images / "colin_eval.nii.gz")


def test_twenty_concurrent_infers_while_info_answers(trained):
    ctx = trained
    from monailabel.client import MONAILabelClient

    def one(i):
        client = MONAILabelClient(ctx.server.url, tmpdir=str(ctx.client_dir))
        t = time.time()
        # a different sw_batch_size per request: 20 network runs, none answered from the probability cache
        path, params = client.infer(MODEL, "itk_c", {"client_id": f"load-{i}", "sw_batch_size": i + 1})
        elapsed = time.time() - t
        shape = nib.load(path).shape
        os.remove(path)
        assert params["probabilities"] == "computed"
        return elapsed, shape

    info_latency = []
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(one, i) for i in range(20)]
        time.sleep(1.0)
        while not all(f.done() for f in futures):
            t = time.time()
            ctx.client.info()
            info_latency.append(time.time() - t)
            time.sleep(0.5)
        results = [f.result() for f in futures]
    wall = time.time() - start
    latencies = sorted(r[0] for r in results)
    assert all(r[1] == nib.load(str(ctx.studies / "itk_c.nii.gz")).shape for r in results)
    p50, p95 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95))
    report = {
        "requests": 20,
        "volume": "itk_c (64 x 3 x 22 voxels, 3 axial slices after RAS/2 mm)",
        "p50_s": round(p50, 2),
        "p95_s": round(p95, 2),
        "max_s": round(latencies[-1], 2),
        "wall_s": round(wall, 2),
        "info_during_load": {"n": len(info_latency), "max_s": round(max(info_latency), 3) if info_latency else None},
    }
    (ctx.root / "load_report.json").write_text(json.dumps(report, indent=2))
    print(f"\n20 concurrent infers: {json.dumps(report)}")
    # /info/ kept answering while the volumes were segmented (the event loop was never blocked for an infer)
    assert len(info_latency) >= 3
    assert max(info_latency) < min(5.0, latencies[0]), info_latency


def test_uncertainty_scores_and_next_sample(trained):
    ctx = trained
    weights_stamp = ctx.client.info()["models"][MODEL]["weights"]["mtime_ns"]
    first = ctx.results["first_labeled"]
    unlabeled = sorted(set(VOLUMES) - {first})

    def scored():
        objects = ctx.client.datastore()["objects"]
        infos = {i: objects[i]["image"]["info"] for i in unlabeled}
        if all(info.get("mc_dropout_model") == weights_stamp for info in infos.values()):
            return infos
        status, task = _http(ctx, "GET", "/scoring/")
        if task and task.get("status") == "ERROR":
            raise AssertionError(f"scoring failed: {task.get('details')}")
        if status == 404 or (task and task.get("status") not in ("SUBMITTED", "RUNNING")):
            _http(ctx, "POST", "/scoring/mc_dropout")  # the post-training scoring did not cover these weights
        return None

    infos = wait_for(scored, 900, "MC-dropout scores for the current weights", interval=3.0)
    scores = {i: info["mc_dropout_score"] for i, info in infos.items()}
    for i, info in infos.items():
        detail = info["mc_dropout"]
        assert 0.0 <= scores[i] <= 1.0 and detail["passes"] == 3 and len(detail["slices"]) <= 3

    sample = ctx.client.next_sample("uncertainty", {})
    assert sample["id"] == max(scores, key=scores.get)
    assert sample["uncertainty"] == pytest.approx(scores[sample["id"]])
    assert sample["scored_with_current_weights"] is True
    # the volume just handed out is reserved: the next request gets the next most uncertain one
    second = ctx.client.next_sample("uncertainty", {})
    assert second["id"] in unlabeled and second["id"] != sample["id"]


def test_killed_training_keeps_weights_and_next_infer_uses_new_ones(trained):
    ctx = trained
    from monailabel.client.client import MONAILabelClientException

    first = ctx.results["first_labeled"]
    second = next(v for v in ("colin_a", "colin_b") if v != first)
    ctx.client.save_label(second, str(ctx.gt / f"{second}.nii.gz"), tag="final")  # 2 volumes: 2 iterations/epoch
    before = ctx.weights.stat().st_mtime_ns
    old_weights, _, _, _ = _infer(ctx, "itk_c")

    # from the bundle's initialisation, so that the epoch-1 model is saved whatever its score (a fine-tuning run
    # replaces model.pt only with a better model: see the next test)
    ctx.client.train_start(MODEL, {"max_epochs": 3, "val_interval": 1, "pretrained": False})
    with pytest.raises(MONAILabelClientException) as e:  # a quick second click, before the process exists
        ctx.client.train_start(MODEL, {"max_epochs": 1})
    assert status_of(e.value) == 429
    wait_for(lambda: _train_status(ctx)["status"] == "RUNNING", 60, "the training process", interval=0.2)
    with pytest.raises(MONAILabelClientException) as e:  # one training at a time
        ctx.client.train_start(MODEL, {"max_epochs": 1})
    assert status_of(e.value) == 429

    def progressed(marker):
        def check():
            status = _train_status(ctx)
            if status["status"] not in ("SUBMITTED", "RUNNING"):
                raise AssertionError(f"training ended early: {status['status']}: {status.get('details')}")
            return any(marker in line for line in status.get("details", [])) and status

        return check

    wait_for(lambda: ctx.weights.stat().st_mtime_ns != before, 900, "the epoch-1 checkpoint", interval=0.5)
    checkpoint = ctx.weights.stat().st_mtime_ns
    wait_for(progressed("epoch 2/3 iteration 1/2"), 600, "the middle of epoch 2", interval=0.5)
    stopped = ctx.client.train_stop()
    assert stopped["status"] == "STOPPED"

    import psutil
    import torch

    def training_processes():
        found = []
        for p in psutil.Process(ctx.server.proc.pid).children(recursive=True):
            try:
                if "train" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        return found

    wait_for(lambda: not training_processes(), 30, "the training process to exit")
    assert ctx.weights.stat().st_mtime_ns == checkpoint  # the kill did not touch the saved weights
    state = torch.load(str(ctx.weights), map_location="cpu", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    # the kill may land in a checkpoint save: its temporary file is hidden (".model.pt.*.tmp", skipped by every
    # reader and removed by a later saver once stale: tests/test_bundle.py), never a visible partial file
    left = sorted(p.name for p in ctx.weights.parent.iterdir() if not p.name.startswith("."))
    assert not [n for n in left if n.startswith("tmp") or n.endswith(".tmp")], f"a partial checkpoint is visible: {left}"
    assert all(re.fullmatch(r"\.[\w.]+\.pt\.\w+\.tmp", p.name) or not p.name.endswith(".tmp") for p in ctx.weights.parent.iterdir())

    data, affine, _, params = _infer(ctx, "itk_c")  # hot-reloaded: the result now comes from the new weights
    assert params["weights"]["mtime_ns"] == checkpoint
    _assert_same_grid(affine, data.shape, ctx.studies / "itk_c.nii.gz")
    assert not np.array_equal(data, old_weights), "the segmentation did not change with new weights"


def test_retraining_that_does_worse_keeps_the_served_model(trained):
    """Fine-tuning validates the served model first; a run that only does worse (learning rate 10) leaves
    models/model.pt, and so what Slicer gets, as it was."""
    ctx = trained
    before = ctx.weights.stat().st_mtime_ns
    served, _, _, _ = _infer(ctx, "itk_c")
    ctx.client.train_start(MODEL, {"max_epochs": 1, "val_interval": 1, "learning_rate": 10.0})
    status = wait_for(lambda: (s := _train_status(ctx))["status"] not in ("SUBMITTED", "RUNNING") and s, 600, "training")
    details = "\n".join(status.get("details", []))
    assert status["status"] == "DONE", details[-3000:]
    assert re.search(r"current model before training: \S+ [0-9.]+; model.pt is replaced only", details), details[-3000:]
    assert re.search(r"epoch 1/1 done in .*; best \S+ [0-9.]+ \(epoch 0\)", details), details[-3000:]  # still the start
    assert ctx.weights.stat().st_mtime_ns == before
    again, _, _, params = _infer(ctx, "itk_c")
    assert params["weights"]["mtime_ns"] == before and np.array_equal(again, served)


def test_click_guided_correction_flips_clicked_voxels_and_nothing_far_away(trained):
    """What SmartEdit sends: voxel indices of the image as stored. Without clicks the answer is the automatic
    segmentation; a foreground click outside it and a background click inside it flip those voxels, and nothing
    farther than roi_margin_mm (30 mm) from a click changes."""
    ctx = trained
    from monailabel.client.client import MONAILabelClientException

    auto, affine, _, _ = _infer(ctx, "itk_c")
    path, params = ctx.client.infer(f"{MODEL}_clicks", "itk_c", {})
    assert np.array_equal(np.asanyarray(nib.load(path).dataobj), auto)
    assert params["probabilities"] == "cached"  # the network's output of Auto Segmentation, not run again

    from scipy import ndimage as ndi

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    bg = np.unravel_index(np.argmax(ndi.distance_transform_edt(auto > 0, sampling=spacing)), auto.shape)
    fg = np.unravel_index(np.argmax(ndi.distance_transform_edt(auto == 0, sampling=spacing)), auto.shape)
    assert np.linalg.norm((np.array(fg) - bg) * spacing) > 10  # two clicks apart (balls of 3 mm)
    fg, bg = np.array(fg), np.array(bg)  # the labeled voxel deepest inside the mask, the unlabeled one farthest out
    request = {"foreground": [fg.tolist()], "background": [bg.tolist()]}
    path, _ = ctx.client.infer(f"{MODEL}_clicks", "itk_c", request)
    img = nib.load(path)
    got = np.asanyarray(img.dataobj)
    _assert_same_grid(img.affine, got.shape, ctx.studies / "itk_c.nii.gz")
    assert got[tuple(fg)] == 1 and got[tuple(bg)] == 0
    grid = np.indices(auto.shape)
    dist = np.minimum(*[np.sqrt(sum(((g - c) * sp) ** 2 for g, c, sp in zip(grid, q, spacing))) for q in (fg, bg)])
    changed = got != auto
    assert dist[changed].max() <= 30.0 + 1e-6

    with pytest.raises(MONAILabelClientException) as e:
        ctx.client.infer(f"{MODEL}_clicks", "itk_c", {"foreground": [[9999, 0, 0]]})
    assert status_of(e.value) == 422 and "foreground click [9999, 0, 0] is outside the image" in e.value.msg
    assert ctx.client.info()["models"][MODEL]

    # the loop script's simulated annotator: three clicks, each on the largest remaining error, raise the Dice
    al = load_app_module("al_loop", APP / "active_learning_loop.py")
    loop = al.Loop(ctx.server.url, MODEL, "first", {}, str(ctx.root))
    truth = al.read_mask(str(ctx.gt / "colin_a.nii.gz"))
    pred = loop.predict(image="colin_a")
    scores = loop.click_correct("colin_a", pred, truth, 3)
    print(f"colin_a Dice {al.dice(pred, truth):.4f} -> after clicks {[round(x, 4) for x in scores]}")
    assert len(scores) == 3 and scores[-1] > al.dice(pred, truth)
    strokes = loop.scribble_correct("colin_a", pred, truth, 3)  # the same with Scribbles strokes
    print(f"colin_a Dice {al.dice(pred, truth):.4f} -> after strokes {[round(x, 4) for x in strokes]}")
    assert len(strokes) == 3 and strokes[-1] > al.dice(pred, truth)


def test_scribbles_correct_the_segmentation_sent_near_the_strokes(trained, tmp_path):
    """What Slicer's Scribbles tool sends: the segmentation being edited with the strokes painted over it (one label
    volume, uploaded as ``label``), label_info and the segment to correct. The user's own edit far from the
    strokes survives; stroke voxels get their class; nothing beyond 30 mm of a stroke changes."""
    ctx = trained
    from monailabel.client.client import MONAILabelClientException
    from scipy import ndimage as ndi

    auto, affine, _, _ = _infer(ctx, "colin_a")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    deep = np.array(np.unravel_index(np.argmax(ndi.distance_transform_edt(auto > 0, sampling=spacing)), auto.shape))
    values = auto.astype(np.uint8)
    values[deep[0] - 2 : deep[0] + 3, deep[1], deep[2]] = 2  # a background stroke deep inside the mask
    stroke_mm = ndi.distance_transform_edt(values != 2, sampling=spacing)
    far = np.array(np.unravel_index(np.argmax(np.where(auto > 0, stroke_mm, -1)), auto.shape))
    edit = (auto > 0) & (np.sqrt((((np.indices(auto.shape).T - far) * spacing) ** 2).sum(-1)).T <= 6)
    assert edit.sum() >= 5 and stroke_mm[edit].min() > 30  # the user erased this by hand, out of the strokes' reach
    values[edit] = 0
    user = np.where(values == 1, 1, 0)
    info = [{"name": "brain", "id": 1}, {"name": "background_scribbles", "id": 2}, {"name": "foreground_scribbles", "id": 3}]
    src = tmp_path / "scribbles.nii.gz"
    nib.save(nib.Nifti1Image(values, affine), src)
    request = {"label_info": info, "selected_label_name": "brain", "roi": []}
    path, _ = ctx.client.infer(f"{MODEL}_scribbles", "colin_a", request, label_in=str(src))
    img = nib.load(path)
    got = np.asanyarray(img.dataobj)
    _assert_same_grid(img.affine, got.shape, ctx.studies / "colin_a.nii.gz")
    assert not got[values == 2].any() and auto[values == 2].all()  # the stroke's voxels flipped
    assert (stroke_mm[got != user] <= 30.0 + 1e-6).all()
    assert not got[edit].any()  # the hand edit is kept, not undone by the network's segmentation

    nib.save(nib.Nifti1Image(values[:-1], affine), src)
    with pytest.raises(MONAILabelClientException) as e:
        ctx.client.infer(f"{MODEL}_scribbles", "colin_a", request, label_in=str(src))
    assert status_of(e.value) == 422 and "must be on the image's grid" in e.value.msg


def test_restart_keeps_labels_and_binds_loopback_by_default(trained):
    ctx = trained
    labeled = _labeled(ctx)
    assert labeled  # the trained stage has at least one final label
    ctx.server.stop()
    # the bare command: no --host (monailabel would listen on 0.0.0.0, the app makes it 127.0.0.1), no --conf
    ctx.server.start(host=None, conf=False)
    # the bundle next to the app (/info/ names no server path): its weights are the ones trained above
    assert ctx.client.info()["models"][MODEL]["weights"]["mtime_ns"] == ctx.weights.stat().st_mtime_ns
    assert ctx.server.listening_addresses() == {"127.0.0.1"}
    assert "No --host given: listening on 127.0.0.1" in ctx.server.log(since_start=True)
    assert _labeled(ctx) == labeled
    assert ctx.client.info()["datastore"]["completed"] == len(labeled)
    data, affine, _, _ = _infer(ctx, "colin_b")
    _assert_same_grid(affine, data.shape, ctx.studies / "colin_b.nii.gz")
    assert not ctx.netlog.exists(), f"network lookups outside loopback: {ctx.netlog.read_text()}"


def test_slicer_local_volume_flow(server):
    """Slicer with a locally loaded volume: Submit Label first uploads the volume, then saves the label."""
    ctx = server
    completed = ctx.client.info()["datastore"]["completed"]
    ctx.client.upload_image(str(ctx.eval_images / "colin_eval.nii.gz"), "colin_eval")
    ctx.client.save_label("colin_eval", str(ctx.eval_labels / "colin_eval.nii.gz"), tag="final")
    assert ctx.client.info()["datastore"]["completed"] == completed + 1
    status, _ = _http(ctx, "GET", "/datastore/image?image=colin_eval")  # what Next Sample downloads
    assert status == 200
    path = ctx.client.download_label("colin_eval", "final")
    assert np.array_equal(
        np.asanyarray(nib.load(path).dataobj),
        np.asanyarray(nib.load(str(ctx.eval_labels / "colin_eval.nii.gz")).dataobj),
    )


def test_mismatched_weights_are_refused_with_a_clear_error(trained):
    ctx = trained
    import torch
    from monailabel.client.client import MONAILabelClientException

    state = torch.load(str(ctx.weights), map_location="cpu", weights_only=True)
    dropped = sorted(state)[0]
    state.pop(dropped)
    tmp = ctx.weights.with_name("incomplete.pt.tmp")
    torch.save(state, str(tmp))
    os.replace(tmp, ctx.weights)  # as a training would publish it
    with pytest.raises(MONAILabelClientException) as e:
        ctx.client.infer(MODEL, "itk_c", {})
    assert status_of(e.value) == 500
    assert "does not fit the bundle's network_def" in e.value.msg and dropped in e.value.msg
    assert ctx.client.info()["models"][MODEL]["weights"]["available"] is True
