"""The 2D MONAI bundle in bundle2d/: 3-class train -> evaluate -> infer through ``python -m monai.bundle run``,
outputs at each image's original size, bad masks stopping a run before it writes, and network swaps.

Runs on a copy of the bundle in a temporary folder over the shipped 3-class sample
(``sample_data/2d/mni152_3class``, read only). For speed only: 32 x 32 images, one epoch of batches of 4, no
loader workers; everything else is the shipped configuration.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle2d"
DATA = ROOT / "sample_data" / "2d" / "mni152_3class"
RGB = ROOT / "sample_data" / "2d" / "rgb" / "visible_woman_head.png"
HEAD = ROOT / "sample_data" / "2d" / "heads" / "images" / "itk_kmeanstest_t1_z055.png"
TINY = ["--image_size", "[32,32]", "--num_workers", "0", "--batch_size", "4"]


def _run(cmd: list, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


def _bundle_run(bundle: Path, configs: list, *args) -> subprocess.CompletedProcess:
    cfg = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    return _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", cfg, "--bundle_root", bundle,
                 "--dataset_dir", DATA, *TINY, *args], cwd=bundle)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("bundle2d") / "bundle2d"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("eval", "logs", "__pycache__", "*.pt"))
    return dst


@pytest.fixture(scope="module")
def trained(bundle) -> Path:
    """Stage: one epoch of 3-class training from random weights (writes models/model.pt)."""
    r = _bundle_run(bundle, ["configs/train.json"], "--epochs", "1", "--val_interval", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "train_state.pt").is_file()
    return bundle


def test_train_writes_a_3class_model(trained):
    import torch

    sd = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    sd = sd.get("model", sd)
    assert sd["head.weight"].shape[0] == 3  # classes from metadata.json's channel_def


def test_evaluate_scores_dice_and_iou_per_class_at_original_size(trained):
    out = trained / "eval_test"
    r = _bundle_run(trained, ["configs/train.json", "configs/evaluate.json"], "--output_dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = dict(row for row in csv.reader(open(out / "metrics.csv")))
    assert set(metrics) == {"val_mean_dice", "val_mean_iou"}
    test = json.loads((DATA / "dataset.json").read_text())["test"]
    for name in ("val_mean_dice", "val_mean_iou"):
        rows = list(csv.reader(open(out / f"{name}_raw.csv")))
        assert rows[0] == ["filename", "class0", "class1", "mean"]  # grey and white matter
        assert sorted(Path(r[0]).name for r in rows[1:]) == sorted(Path(e["image"]).name for e in test)
        vals = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
        assert np.all((vals >= 0) & (vals <= 1)) and abs(vals[:, 2].mean() - float(metrics[name])) < 1e-4
    # IoU <= Dice for every image and class
    d = np.array([[float(v) for v in r[1:3]] for r in list(csv.reader(open(out / "val_mean_dice_raw.csv")))[1:]])
    i = np.array([[float(v) for v in r[1:3]] for r in list(csv.reader(open(out / "val_mean_iou_raw.csv")))[1:]])
    assert np.all(i <= d + 1e-6)


def test_infer_rgb_and_grayscale_writes_masks_at_original_size(trained, tmp_path):
    gray = DATA / "images" / json.loads((DATA / "dataset.json").read_text())["test"][0]["image"].split("/")[-1]
    inputs = [RGB, HEAD, gray]
    out = tmp_path / "pred"
    r = _bundle_run(trained, ["configs/inference.json"], "--output_dir", out, "--datalist", repr([str(p) for p in inputs]))
    assert r.returncode == 0, r.stderr[-3000:]
    for src in inputs:
        pred = Image.open(out / f"{src.stem}_seg.png")
        assert pred.size == Image.open(src).size and pred.mode == "L"  # (width, height): none of them is square
        assert set(np.unique(np.array(pred)).tolist()) <= {0, 1, 2}


def test_bad_mask_stops_training_before_anything_is_written(bundle, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    victim = data / json.loads((data / "dataset.json").read_text())["training"][2]["label"]
    Image.fromarray(np.zeros((50, 40), np.uint8)).save(victim)
    work = tmp_path / "b"
    shutil.copytree(bundle, work, ignore=shutil.ignore_patterns("models", "eval*"))
    r = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--bundle_root", work,
              "--dataset_dir", data, *TINY, "--epochs", "1"], cwd=work)
    assert r.returncode != 0
    assert f"{victim}: the 'label' is 40 x 50 pixels but its image" in r.stderr
    assert not (work / "models").exists() or not any((work / "models").glob("*.pt"))


def _parser(tmp_path, **override):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(BUNDLE / "configs" / "train.json"))
    p.update({"bundle_root": str(BUNDLE), "dataset_dir": str(DATA), "num_workers": 0, "image_size": [32, 32],
              "output_dir": str(tmp_path / "eval"), "ckpt_dir": str(tmp_path / "models"), **override})  # nothing written into the repo
    return p


def test_any_monai_network_swaps_in_through_network_def_alone(tmp_path):
    import torch
    from monai.networks.nets import BasicUNet

    from medurwkv.engines import FreezeEncoderHandler
    from medurwkv.nets.medurwkv import MedURWKV

    enc = tmp_path / "encoder.pt"
    torch.save(MedURWKV(3, 3, "tiny", "plain").pretrained_module.state_dict(), enc)
    basic = {"_target_": "BasicUNet", "spatial_dims": 2, "in_channels": 3, "out_channels": "@num_classes"}
    p = _parser(tmp_path, network_def=basic, pretrained_encoder_path=str(enc))
    assert isinstance(p.get_parsed_content("network_def"), BasicUNet)
    handlers = p.get_parsed_content("train#handlers")
    assert not any(isinstance(h, FreezeEncoderHandler) for h in handlers)
    # Med-URWKV with a pretrained encoder: loaded by network_def itself, and frozen for the first epochs
    p = _parser(tmp_path, encoder="plain", pretrained_encoder_path=str(enc), freeze_encoder_epochs=2)
    net = p.get_parsed_content("network_def")
    want = torch.load(enc, weights_only=True)
    assert all(torch.equal(v, want[k]) for k, v in net.pretrained_module.state_dict().items())
    freeze = [h for h in p.get_parsed_content("train#handlers") if isinstance(h, FreezeEncoderHandler)]
    assert len(freeze) == 1 and freeze[0].epochs == 2
    # without pretrained weights nothing is frozen
    assert not any(isinstance(h, FreezeEncoderHandler) for h in _parser(tmp_path, encoder="plain").get_parsed_content("train#handlers"))


def test_metadata_follows_the_bundle_schema():
    import jsonschema

    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads((ROOT / "bundle" / "configs" / "schema" / "meta_schema_20240725.json").read_text()))
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == len(pred["channel_def"]) == 3
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 3
