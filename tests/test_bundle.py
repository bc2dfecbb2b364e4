"""The MONAI bundle in bundle/: model-zoo checks with MONAI's own CLI, workflows, DDP on CPU, bad inputs.

Everything runs on a copy of the bundle in a temporary folder (``--bundle_root`` there, so ``models/`` and
``eval/`` are written there) over the shipped sample_data/ (read only). For speed only, the workflows use
8 mm voxels and 32 x 32 slice windows (``pixdim``, ``roi_size``), 2 slices per training step and no loader
workers; everything else is the shipped configuration. ``import monai`` costs seconds, so each CLI
subprocess checks several things.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
SAMPLE = ROOT / "sample_data"
HELD_OUT = SAMPLE / "imagesTs" / "itk_kmeanstest_t1.nii.gz"
DICOM = SAMPLE / "dicom" / "itk_kmeanstest_t1"
SCHEMA = "configs/schema/meta_schema_20240725.json"

TINY = {"pixdim": [8.0, 8.0, 8.0], "roi_size": [32, 32], "num_workers": 0, "sw_batch_size": 8}
TINY_TRAIN = {**TINY, "epochs": 1, "val_interval": 1, "train#num_slices": 2}


def _cli_overrides(d: dict) -> list:
    out = []
    for k, v in d.items():
        out += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return out


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    return env


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=_env(), capture_output=True, text=True, timeout=timeout)
    return r


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _causes(e: BaseException) -> str:
    """All messages of an exception chain (MONAI wraps errors raised inside config expressions)."""
    msgs = []
    while e is not None:
        msgs.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(msgs)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A copy of the bundle (no weights, no outputs) and a folder of extra inputs."""
    root = tmp_path_factory.mktemp("bundle_test")
    bundle = root / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "logs", "__pycache__", "*.pt", "*.ts", "*.safetensors"))
    inputs = root / "inputs"
    inputs.mkdir()
    shutil.copytree(DICOM, inputs / "dicom_series")  # another name than the NIfTI case: outputs are named after inputs
    img = nib.load(SAMPLE / "imagesTr" / "colin27_t1.nii.gz")  # RAS: its third axis is axial
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 45], img.affine), inputs / "slice2d.nii.gz")
    (inputs / "site_b").mkdir()  # same base name in another folder: must not overwrite the first one's output
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[8:-8, 4:-4, 50], img.affine), inputs / "site_b" / "slice2d.nii.gz")
    return {"root": root, "bundle": bundle, "inputs": inputs}


def _workflow(bundle: Path, files, workflow_type: str, **override):
    from monai.bundle import ConfigWorkflow

    files = [str(bundle / "configs" / f) for f in ([files] if isinstance(files, str) else files)]
    return ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle),
        dataset_dir=str(SAMPLE),
        **override,
    )


# ----------------------------------------------------------------------------- model-zoo CLI checks
@pytest.mark.slow
def test_zoo_cli_verify_metadata_net_in_out_and_torchscript_export(work, tmp_path):
    """verify_metadata (offline, vendored schema), verify_net_in_out (n=1 -> 32x32, as model-zoo CI, and n=4),
    and ckpt_export by tracing; the TorchScript module matches the eager network on a 128 x 128 slice batch."""
    from medurwkv.nets.medurwkv import MedURWKV

    b = work["bundle"]
    torch.manual_seed(0)
    net = MedURWKV(1, 2, encoder="adapter")
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    script = " && ".join(
        [
            f"{sys.executable} -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath {SCHEMA}",
            f"{sys.executable} -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json "
            "--config_file configs/inference.json --device cpu --n 1",
            f"{sys.executable} -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json "
            "--config_file configs/inference.json --device cpu --n 4 --encoder plain",
            f"{sys.executable} -m monai.bundle ckpt_export network_def --filepath {ts} --ckpt_file {ckpt} "
            "--meta_file configs/metadata.json --config_file configs/inference.json "
            "--use_trace True --input_shape '[1, 1, 128, 128]'",
        ]
    )
    r = _run(["bash", "-c", script], cwd=b, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "metadata is verified with no error" in r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("data shape of network is verified with no error") == 2
    loaded = torch.jit.load(str(ts))
    net.eval()
    x = torch.rand(3, 1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-4)


def test_metadata_fields_for_monai_label_and_zoo():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    for k in ("monai_version", "pytorch_version", "numpy_version", "required_packages_version", "optional_packages_version"):
        assert k in meta
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"])[0] == "image" and list(fmt["outputs"])[0] == "pred"
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "brain"}
    assert len(fmt["inputs"]["image"]["spatial_shape"]) == 2  # a 2D network (MONAI Label reads the dimension here)
    schema = json.loads((BUNDLE / SCHEMA).read_text())
    assert meta["schema"].endswith(Path(SCHEMA).name) and "network_data_format" in schema["required"]


def test_configs_agree_on_the_network():
    cfg = {n: json.loads((BUNDLE / "configs" / f"{n}.json").read_text()) for n in ("train", "inference", "convert")}
    # one route for encoder weights: training builds the network with them; inference loads model.pt as handlers#0
    train_net = dict(cfg["train"]["network_def"])
    assert train_net.pop("pretrained_encoder") == "@pretrained_encoder_path" and "pretrained_encoder_loader" not in cfg["train"]
    assert train_net == cfg["inference"]["network_def"]
    loader = cfg["inference"]["handlers"][0]
    assert loader["_target_"] == "CheckpointLoader" and loader["strict"] is True and loader["load_dict"] == {"model": "@network"}
    assert "model.pt" in loader["load_path"]
    # multi-GPU training and evaluation run train.json's own initialize steps (no hand-made copy)
    multi, evaluate = (json.loads((BUNDLE / "configs" / f"{n}.json").read_text()) for n in ("multi_gpu_train", "evaluate"))
    assert [i for i in multi["initialize"] if i.startswith("@")] == [i for i in cfg["train"]["initialize"] if i.startswith("@")]
    assert "@data_checks#1" in evaluate["initialize"]
    assert not any("check_datalist" in i or "_loader(" in i for i in multi["initialize"] + evaluate["initialize"])
    for k in ("pixdim", "roi_size", "encoder"):
        assert cfg["train"][k] == cfg["inference"][k], k
    assert cfg["convert"]["in_channels"] == cfg["train"]["network_def"]["in_channels"]
    assert cfg["convert"]["variant"] == cfg["train"]["network_def"]["variant"]
    assert cfg["convert"]["encoder"] == cfg["train"]["encoder"]
    assert cfg["train"]["network_def"]["_target_"] == "medurwkv.nets.medurwkv.MedURWKV"
    assert "dropout" in cfg["train"]["network_def"]  # MONAI Label's epistemic scoring sets it


@pytest.mark.parametrize("bundle", ["bundle", "bundle2d"])
def test_seed_override_sets_the_random_state_the_run_starts_from(bundle):
    """`--seed N` (train.json's `seed`, 123 by default) is what `initialize` seeds numpy and torch with."""
    import monai
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / bundle / "configs" / "train.json"))
    assert parser["seed"] == 123
    for seed in (123, 7):
        parser["seed"] = seed
        parser.get_parsed_content("initialize#0", lazy=False)
        assert np.random.rand() == np.random.RandomState(seed).rand()
        assert torch.initial_seed() == seed
    monai.utils.set_determinism(None)


def test_logging_conf_passes_monai_allowlist():
    from monai.bundle.workflows import _apply_logging_file

    _apply_logging_file(str(BUNDLE / "configs" / "logging.conf"))


# ----------------------------------------------------------------------------- workflows
@pytest.mark.slow
def test_train_evaluate_resume_then_infer_nifti_dicom_2d(work):
    """model-zoo's unit-test chain: train (check_properties empty) -> models/model.pt -> evaluate -> resume,
    then the real CLI infers a NIfTI volume, a DICOM series and a 2D image onto each input's own grid."""
    from monai.transforms import LoadImage

    b = work["bundle"]
    models = b / "models"

    train = _workflow(b, "train.json", "train", **TINY_TRAIN)
    train.initialize()
    assert train.check_properties() == []
    train.run()
    first_score = float(train.parser.get_parsed_content("validate#evaluator").state.metrics["val_mean_dice"])
    train.finalize()
    model = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in model.values())
    assert set(model) == set(train.parser.get_parsed_content("network_def").state_dict())
    state = torch.load(models / "train_state.pt", map_location="cpu", weights_only=True)
    assert set(state) == {"model", "optimizer", "lr_scheduler", "trainer", "best_model"} and state["trainer"]["iteration"] == 1
    assert state["best_model"]["score"] == pytest.approx(first_score, abs=1e-6) and state["best_model"]["best_metric_epoch"] == 1
    assert sorted(p.name for p in models.iterdir() if p.name != ".gitkeep") == ["model.pt", "train_state.pt"]  # no temp files
    assert list((b / "eval").glob("events.out.tfevents.*"))  # TensorBoard

    evaluate = _workflow(b, ["train.json", "evaluate.json"], "train", **TINY)
    evaluate.initialize()
    assert evaluate.check_properties() == []
    evaluate.run()
    evaluate.finalize()
    metrics = (b / "eval" / "metrics.csv").read_text()
    assert "val_mean_dice" in metrics and "itk_kmeanstest_t1" in (b / "eval" / "val_mean_dice_raw.csv").read_text()

    _resume_keeps_the_best_model(b, first_score)

    infer = _workflow(b, "inference.json", "infer", **TINY)
    infer.initialize()
    assert infer.check_properties() == []

    out = work["root"] / "pred"
    inputs = [HELD_OUT, work["inputs"] / "dicom_series", work["inputs"] / "slice2d.nii.gz", work["inputs"] / "site_b" / "slice2d.nii.gz"]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", b, "--output_dir", out]
    cmd += _cli_overrides({**TINY, "datalist": [str(p) for p in inputs]})
    r = _run(cmd, cwd=b)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    pred = nib.load(out / "itk_kmeanstest_t1_seg.nii.gz")
    ref = nib.load(HELD_OUT)
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1} and pred.get_data_dtype() == np.uint8

    series = LoadImage(reader="ITKReader", image_only=True)(str(work["inputs"] / "dicom_series"))
    pred = nib.load(out / "dicom_series_seg.nii.gz")
    assert pred.shape == tuple(series.shape) and np.allclose(pred.affine, series.affine.numpy(), atol=1e-4)

    for name, src in [("slice2d", "slice2d.nii.gz"), ("site_b_slice2d", "site_b/slice2d.nii.gz")]:
        pred = nib.load(out / f"{name}_seg.nii.gz")
        ref = nib.load(work["inputs"] / src)
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-5), name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["itk_kmeanstest_t1_seg.nii.gz", "dicom_series_seg.nii.gz", "slice2d_seg.nii.gz", "site_b_slice2d_seg.nii.gz"]
    )


def _resume_keeps_the_best_model(b: Path, first_score: float) -> None:
    """resume=true continues at the saved epoch and takes model.pt's saved score as the one to beat: model.pt is
    replaced iff the resumed epoch scores higher. A state file whose saved best is unbeatable (1.0) must leave
    model.pt alone; a saved score is ignored once model.pt was rewritten after it; a state file without the entry
    (older versions) resumes with a warning and the first validation replaces model.pt, as before (the control)."""
    models = b / "models"
    state1 = (models / "train_state.pt").read_bytes()

    def resume(state_bytes: bytes):
        (models / "train_state.pt").write_bytes(state_bytes)
        written = lambda: (os.stat(models / "model.pt").st_ino, os.stat(models / "model.pt").st_mtime_ns)  # noqa: E731
        before = written()  # by atomic replace: a new inode (a deterministic rerun may write the same bytes)
        wf = _workflow(b, "train.json", "train", **{**TINY_TRAIN, "epochs": 2, "resume": True})
        wf.initialize()
        assert wf.trainer.state.epoch == 1  # continues after the saved epoch
        evaluator = wf.parser.get_parsed_content("validate#evaluator")
        seeded = (evaluator.state.best_metric, evaluator.state.best_metric_epoch)
        wf.run()
        score = float(evaluator.state.metrics["val_mean_dice"])
        after = (evaluator.state.best_metric, evaluator.state.best_metric_epoch)
        wf.finalize()
        assert torch.load(models / "train_state.pt", map_location="cpu", weights_only=True)["trainer"]["iteration"] == 2
        return seeded, score, after, written() != before

    seeded, score, after, replaced = resume(state1)
    assert seeded == (pytest.approx(first_score, abs=1e-6), 1)
    assert replaced == (score > first_score) and after[0] == pytest.approx(max(score, first_score), abs=1e-6)

    state = torch.load(io.BytesIO(state1), map_location="cpu", weights_only=True)
    st = os.stat(models / "model.pt")  # the first resume may have replaced it: the score is for today's file
    state["best_model"].update(score=1.0, best_metric=1.0, file_stamp=[st.st_mtime_ns, st.st_size])
    buf = io.BytesIO()
    torch.save(state, buf)
    seeded, score, after, replaced = resume(buf.getvalue())
    assert seeded == (1.0, 1) and score < 1.0 and not replaced and after == (1.0, 1)

    # model.pt rewritten after the state was saved (by hand, or by a validation whose state never got saved):
    # the saved score is not that file's any more and is ignored
    os.utime(models / "model.pt", ns=(os.stat(models / "model.pt").st_atime_ns, os.stat(models / "model.pt").st_mtime_ns + 10**9))
    (models / "train_state.pt").write_bytes(buf.getvalue())
    wf = _workflow(b, "train.json", "train", **{**TINY_TRAIN, "epochs": 2, "resume": True})
    wf.initialize()
    assert wf.parser.get_parsed_content("validate#evaluator").state.best_metric_epoch == -1
    wf.finalize()

    del state["best_model"]
    buf = io.BytesIO()
    torch.save(state, buf)
    seeded, score, after, replaced = resume(buf.getvalue())
    assert seeded[1] == -1 and replaced and after == (pytest.approx(score, abs=1e-6), 2)


@pytest.mark.slow
def test_fine_tuning_that_does_worse_keeps_the_model_it_started_from(tmp_path):
    """finetune_from loads model weights strictly and turns on validate_start_weights: the starting weights are
    validated first and set the score to beat, so a run that only makes the model worse (learning rate 10) leaves
    models/model.pt alone; with validate_start_weights false, the worse model overwrites the better one (MONAI's
    default, shown as the control)."""
    b = tmp_path / "bundle"
    shutil.copytree(BUNDLE, b, ignore=shutil.ignore_patterns("eval", "logs", "__pycache__", "*.pt", "*.ts", "*.safetensors"))
    weights = b / "models" / "model.pt"

    def train(**override):
        wf = _workflow(b, "train.json", "train", **{**TINY_TRAIN, **override})
        wf.initialize()
        if override.get("finetune_from"):  # loaded strictly at initialize
            net = wf.parser.get_parsed_content("network_def").state_dict()
            assert all(torch.equal(net[k], incumbent[k]) for k in incumbent)
        wf.run()
        evaluator = wf.parser.get_parsed_content("validate#evaluator")
        saver = next(h for h in wf.parser.get_parsed_content("validate#handlers") if hasattr(h, "incumbent_score"))
        result = (float(evaluator.state.metrics["val_mean_dice"]), evaluator.state.best_metric_epoch, saver.incumbent_score)
        wf.finalize()
        return result

    train(epochs=3)
    start = tmp_path / "start.pt"
    shutil.copy(weights, start)
    incumbent = torch.load(start, map_location="cpu", weights_only=True)
    last, best_epoch, incumbent_score = train(finetune_from=str(start), learning_rate=10.0)
    assert incumbent_score is not None and incumbent_score > 0.2 and last < incumbent_score - 0.1
    assert best_epoch == 0
    kept = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(torch.equal(kept[k], incumbent[k]) for k in incumbent)

    # resume=true without train_state.pt starts from model.pt's weights: they are validated first, as fine-tuning
    (b / "models" / "train_state.pt").unlink()
    last, best_epoch, incumbent_score = train(resume=True, learning_rate=10.0)
    assert incumbent_score > 0.2 and last < incumbent_score - 0.1 and best_epoch == 0
    kept = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(torch.equal(kept[k], incumbent[k]) for k in incumbent)

    last, best_epoch, incumbent_score = train(finetune_from=str(start), learning_rate=10.0, validate_start_weights=False)
    assert incumbent_score is None and best_epoch == 1
    replaced = torch.load(weights, map_location="cpu", weights_only=True)
    assert not all(torch.equal(replaced[k], incumbent[k]) for k in incumbent)


@pytest.mark.slow
def test_convert_then_torchrun_two_cpu_processes_with_frozen_pretrained_encoder(work, tmp_path):
    """convert.json turns an official-layout ADE20K checkpoint into models/pretrained_encoder.pt; torchrun runs
    train.json + multi_gpu_train.json with 2 CPU processes (gloo, DDP), loads that encoder strictly, trains
    one epoch with it frozen and one unfrozen, and rank 0 saves models/model.pt."""
    sys.path.insert(0, str(ROOT / "tests"))
    from official_checkpoint import make_official_checkpoint

    b = tmp_path / "bundle"
    shutil.copytree(work["bundle"], b, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    (b / "models").mkdir()
    src = make_official_checkpoint("vrwkv_adapter_tiny", tmp_path / "upernet_vrwkv_adapter_tiny_512_160k_ade20k.pth")

    r = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/convert.json", "--src", src], cwd=b)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    encoder = b / "models" / "pretrained_encoder.pt"
    weights = torch.load(encoder, map_location="cpu", weights_only=True)
    assert weights["spm.stem.0.weight"].shape[1] == 1  # adapted to the bundle's single input channel

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']"]
    cmd += ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", "--bundle_root", b, "--dataset_dir", SAMPLE]
    cmd += _cli_overrides({**TINY_TRAIN, "epochs": 2, "freeze_encoder_epochs": 1, "pretrained_encoder_path": str(encoder)})
    r = _run(cmd, cwd=b, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "encoder (8.31 M parameters) frozen until the end of epoch 1" in log and "trainable" in log
    assert (b / "models" / "model.pt").is_file()
    saved = sorted(p.name for p in (b / "models").iterdir())
    assert saved == ["model.pt", "pretrained_encoder.pt", "train_state.pt"]
    model = torch.load(b / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in model)  # DDP wrapper not saved


# ----------------------------------------------------------------------------- bad inputs
def _write_4d(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.random.rand(24, 24, 12, 3).astype(np.float32), np.eye(4)), path)
    return path


def _write_nan(path: Path) -> Path:
    vol = np.random.rand(24, 24, 12).astype(np.float32)
    vol[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    return path


def _write_corrupt(path: Path) -> Path:
    data = HELD_OUT.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated gzip stream
    return path


def _write_empty_label(path: Path) -> Path:
    lab = nib.load(SAMPLE / "labelsTr" / "colin27_t1.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(lab.shape, np.uint8), lab.affine), path)
    return path


BAD_IMAGES = {
    "missing": (lambda p: p, "no such file or directory"),
    "4d": (_write_4d, "4D volume"),
    "nan": (_write_nan, "NaN"),
    "corrupt": (_write_corrupt, "cannot read the 'image'"),
}


@pytest.fixture()
def guarded(work, tmp_path):
    """A bundle copy holding a models/model.pt and an earlier prediction that must survive failed runs."""
    b = tmp_path / "bundle"
    shutil.copytree(work["bundle"], b, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    (b / "models").mkdir()
    (b / "eval").mkdir()
    keep = {b / "models" / "model.pt": b"weights that must survive", b / "eval" / "itk_kmeanstest_t1_seg.nii.gz": b"an earlier result"}
    for p, data in keep.items():
        p.write_bytes(data)
    yield b
    for p, data in keep.items():
        assert p.read_bytes() == data, f"{p} was modified by a failed run"
    assert sorted(x.name for x in (b / "eval").iterdir()) == ["itk_kmeanstest_t1_seg.nii.gz"]


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_stops_inference_with_the_file_named(guarded, tmp_path, case):
    make, reason = BAD_IMAGES[case]
    bad = make(tmp_path / f"bad_{case}.nii.gz")
    wf = _workflow(guarded, "inference.json", "infer", **TINY, datalist=[str(HELD_OUT), str(bad)])
    with pytest.raises(RuntimeError) as e:
        wf.initialize()
        wf.run()
    msg = _causes(e.value)
    assert "VolumeError" in msg and f"{bad}: " in msg and reason in msg, msg


def test_empty_label_stops_training_with_the_file_named(guarded, tmp_path):
    label = _write_empty_label(tmp_path / "empty_label.nii.gz")
    datalist = tmp_path / "dataset.json"
    case = {"image": str(SAMPLE / "imagesTr" / "colin27_t1.nii.gz"), "label": str(label)}
    datalist.write_text(json.dumps({"training": [case], "validation": [case]}))
    wf = _workflow(guarded, "train.json", "train", **TINY_TRAIN, datalist=str(datalist))
    with pytest.raises(RuntimeError) as e:
        wf.initialize()
        wf.run()
    msg = _causes(e.value)
    assert f"{label}: the 'label' is empty (no foreground voxel)" in msg, msg


@pytest.mark.slow
def test_cli_reports_a_corrupt_file_by_name_and_keeps_outputs(guarded, tmp_path):
    bad = _write_corrupt(tmp_path / "truncated.nii.gz")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", guarded]
    cmd += _cli_overrides({**TINY, "datalist": [str(HELD_OUT), str(bad)]})
    r = _run(cmd, cwd=guarded)
    assert r.returncode != 0
    assert f"VolumeError: {bad}: cannot read the 'image'" in r.stderr, r.stderr[-3000:]


def test_load_volumed_accepts_good_inputs_and_names_label_problems(tmp_path):
    from medurwkv.transforms import LoadVolumed, VolumeError, check_datalist

    loader = LoadVolumed(keys=["image", "label"], label_keys="label", num_classes=2)
    good = {"image": str(SAMPLE / "imagesTr" / "colin27_t1.nii.gz"), "label": str(SAMPLE / "labelsTr" / "colin27_t1.nii.gz")}
    assert check_datalist([good], loader) == 1
    lab = nib.load(good["label"])
    three = tmp_path / "three_classes.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(lab.dataobj) * 2).astype(np.uint8), lab.affine), three)
    with pytest.raises(VolumeError, match=f"{three}: the 'label' holds values 0..2; expected classes 0..1"):
        loader({**good, "label": str(three)})
    with pytest.raises(VolumeError, match="no cases"):
        check_datalist([], loader)
    dicom = LoadVolumed(keys="image")({"image": str(DICOM)})["image"]
    assert tuple(dicom.shape) == (86, 87, 62)
    held_out = nib.load(HELD_OUT)  # LSA: its third axis is coronal
    coronal = tmp_path / "coronal2d.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(held_out.dataobj)[:, :, 30], held_out.affine), coronal)
    with pytest.raises(VolumeError, match=f"{coronal}: the 'image' is a 2D image whose plane is not axial"):
        LoadVolumed(keys="image")({"image": str(coronal)})


def test_output_names_keep_inputs_with_one_base_name_apart(tmp_path):
    """MONAI names outputs after the input's base name; OutputNames renames only the inputs that would collide."""
    from monai.transforms import SaveImage

    from medurwkv.transforms import OutputNames

    d = str(tmp_path)
    inputs = [f"{d}/site_a/case1/t1.nii.gz", f"{d}/site_b/case1/t1.nii.gz", f"{d}/site_a/flair.nii.gz",
              f"{d}/x/scan.nii", f"{d}/x/scan.nii.gz", f"{d}/x/scan", f"{d}/y/sub-01.ses-1.nii.gz"]
    namer = OutputNames([{"image": p} for p in inputs])
    saver = SaveImage(output_dir=tmp_path / "out", output_postfix="seg", separate_folder=False, output_name_formatter=namer,
                      output_dtype=np.uint8, resample=False)
    for i, p in enumerate(inputs):
        saver(torch.full((1, 2, 2, 2), i), meta_data={"filename_or_obj": p, "affine": np.eye(4)})
    written = {f.name: int(np.asarray(nib.load(f).dataobj)[0, 0, 0]) for f in (tmp_path / "out").iterdir()}
    assert written == {
        "site_a_case1_t1_seg.nii.gz": 0, "site_b_case1_t1_seg.nii.gz": 1, "flair_seg.nii.gz": 2,
        "scan_1_seg.nii.gz": 3, "scan_2_seg.nii.gz": 4, "scan_3_seg.nii.gz": 5, "sub-01.ses-1_seg.nii.gz": 6,
    }


# ----------------------------------------------------------------------------- library pieces used by the bundle
def test_freeze_encoder_handler_freezes_then_unfreezes():
    from ignite.engine import Engine, Events

    from medurwkv.engines import FreezeEncoderHandler
    from medurwkv.nets.medurwkv import MedURWKV

    net = MedURWKV(1, 2, encoder="plain")
    engine = Engine(lambda e, b: None)
    FreezeEncoderHandler(net, epochs=1).attach(engine)
    seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append([p.requires_grad for p in net.encoder_parameters()]))
    engine.run([0], max_epochs=2)
    assert not any(seen[0]) and all(seen[1])
    assert all(p.requires_grad for n, p in net.named_parameters() if not n.startswith("encoder.backbone"))


def test_atomic_checkpoint_saver_never_leaves_a_missing_or_partial_model(tmp_path, monkeypatch):
    from ignite.engine import Engine

    from medurwkv.engines import AtomicCheckpointSaver

    net = torch.nn.Linear(3, 2)
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True, key_metric_filename="model.pt")
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"dice": 0.5}
    engine.state.key_metric_name = "dice"
    saver.metrics_completed(engine)
    first = (tmp_path / "model.pt").read_bytes()
    engine.state.metrics = {"dice": 0.9}
    with torch.no_grad():
        net.weight.add_(1.0)

    def crash(*a, **k):
        raise KeyboardInterrupt  # interrupted while writing the new best model

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        saver.metrics_completed(engine)
    monkeypatch.undo()
    assert (tmp_path / "model.pt").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_kill_during_save_leaves_a_hidden_temporary_that_the_next_saver_removes_once_stale(tmp_path, monkeypatch):
    """``kill -9`` in the middle of a checkpoint save cannot clean up: what it leaves is a hidden
    ``.model.pt.*.tmp`` next to the intact model.pt; the next run's saver removes it once it is older than any
    save in progress could be, and leaves a fresh one (a save under way in another process) alone."""
    import time

    from ignite.engine import Engine

    from medurwkv.engines import AtomicCheckpointSaver

    def saver():
        return AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": torch.nn.Linear(3, 2)}, save_key_metric=True, key_metric_filename="model.pt")

    engine = Engine(lambda e, b: None)
    engine.state.metrics, engine.state.key_metric_name = {"dice": 0.5}, "dice"
    written = []
    real_save = torch.save

    def save(obj, f, **kw):
        written.append(os.path.basename(f))
        real_save(obj, f, **kw)

    monkeypatch.setattr(torch, "save", save)
    saver().metrics_completed(engine)
    monkeypatch.undo()
    assert len(written) == 1 and re.fullmatch(r"\.model\.pt\.\w+\.tmp", written[0]), written  # hidden while written
    stale = tmp_path / ".model.pt.abc123.tmp"
    fresh = tmp_path / ".model.pt.def456.tmp"
    other = tmp_path / ".train_stats.json.ghi789.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    model = (tmp_path / "model.pt").read_bytes()
    saver()
    assert not stale.exists() and fresh.exists() and other.exists()  # only its own file's stale leftovers
    assert (tmp_path / "model.pt").read_bytes() == model
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["model.pt"]


def test_best_model_score_survives_a_new_saver_in_our_format_and_monais(tmp_path):
    """What a resumed run does: a new saver takes the saved best score (our state_dict, or MONAI's
    ``key_metric_save_state`` format) and writes model.pt only for a higher one."""
    from ignite.engine import Engine

    from medurwkv.engines import AtomicCheckpointSaver

    def saver_and_engine():
        saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": torch.nn.Linear(3, 2)}, save_key_metric=True, key_metric_filename="model.pt")
        engine = Engine(lambda e, b: None)
        engine.state.key_metric_name = "dice"
        saver.attach(engine)
        return saver, engine

    saver, engine = saver_and_engine()
    engine.state.metrics = {"dice": 0.8}
    saver.metrics_completed(engine)
    saved = saver.state_dict()
    assert saved["score"] == pytest.approx(0.8) and saved["file_stamp"][1] == (tmp_path / "model.pt").stat().st_size
    for state in (saved, {"_saved": [(0.8, "model.pt")]}):
        stamp = (tmp_path / "model.pt").stat().st_mtime_ns
        resumed, engine = saver_and_engine()
        resumed.load_state_dict(state)
        engine.state.metrics = {"dice": 0.7}
        resumed.metrics_completed(engine)
        assert (tmp_path / "model.pt").stat().st_mtime_ns == stamp  # 0.7 < 0.8: kept
        engine.state.metrics = {"dice": 0.9}
        resumed.metrics_completed(engine)
        assert (tmp_path / "model.pt").stat().st_mtime_ns != stamp  # 0.9 > 0.8: replaced


def test_slice_wise_inferer_batches_slices_and_takes_2d():
    from medurwkv.inferers import SliceWiseInferer

    calls = []

    def net(x):
        calls.append(tuple(x.shape))
        assert x.shape[-2:] == (32, 32)
        return torch.cat([x, 1 - x], dim=1)

    inferer = SliceWiseInferer(spatial_dim=2, roi_size=[32, 32], sw_batch_size=4)
    out = inferer(torch.rand(1, 1, 20, 30, 10), net)
    assert out.shape == (1, 2, 20, 30, 10) and calls[0] == (4, 1, 32, 32) and len(calls) == 3
    calls.clear()
    out = inferer(torch.rand(1, 1, 40, 30), net)
    assert out.shape == (1, 2, 40, 30) and all(c[0] <= 4 for c in calls)
