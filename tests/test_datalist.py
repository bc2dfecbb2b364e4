"""2D data: ``python -m medurwkv datalist`` on the paper's folder layouts, the 2D loader's image and label rules,
its errors, and the 2D sample data (``sample_data/2d``).

Layouts are made from the real sample images with the real datasets' file-name patterns (ISIC, Kvasir-SEG,
BUSI, GlaS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medurwkv.data2d import DatalistError, LoadImage2dd, build_datalist, channel_def, pair_images, split_cases
from medurwkv.transforms import VolumeError

ROOT = Path(__file__).resolve().parents[1]
S2D = ROOT / "sample_data" / "2d"
HEADS = S2D / "heads"
MNI = S2D / "mni152_3class"
RGB = S2D / "rgb" / "visible_woman_head.png"


def _heads() -> list[tuple[np.ndarray, np.ndarray]]:
    imgs = sorted((HEADS / "images").glob("*.png"))[:3]
    return [(np.array(Image.open(p)), np.array(Image.open(HEADS / "masks" / f"{p.stem}_mask.png"))) for p in imgs]


def _layout(tmp: Path, name: str) -> tuple[Path, Path, str, object]:
    """Write the three first head slices in the layout ``name``; returns (images, masks, suffix, label_map)."""
    pairs = _heads()
    if name == "isic":  # ISIC 2017/2018: JPEG images, PNG masks 0/255 with _segmentation
        im, ms = tmp / "ISIC2018_Task1-2_Training_Input", tmp / "ISIC2018_Task1_Training_GroundTruth"
        im.mkdir(), ms.mkdir()
        for i, (x, y) in enumerate(pairs):
            Image.fromarray(x).convert("RGB").save(im / f"ISIC_{i:07d}.jpg", quality=95)
            Image.fromarray(y).save(ms / f"ISIC_{i:07d}_segmentation.png")
        return im, ms, "_segmentation", None
    if name == "kvasir":  # Kvasir-SEG: images/ and masks/ with the same JPEG names
        im, ms = tmp / "images", tmp / "masks"
        im.mkdir(), ms.mkdir()
        for i, (x, y) in enumerate(pairs):
            n = f"cju{i}qkwl35piu0993l0dewei2.jpg"
            Image.fromarray(x).convert("RGB").save(im / n, quality=90)
            Image.fromarray(y).convert("RGB").save(ms / n, quality=75)  # lossy: values near 0 and 255
        return im, ms, "", None
    if name == "busi":  # BUSI: one folder per class, "benign (1).png" + "benign (1)_mask.png"
        d = tmp / "benign"
        d.mkdir()
        for i, (x, y) in enumerate(pairs, start=1):
            Image.fromarray(x).convert("RGB").save(d / f"benign ({i}).png")
            Image.fromarray(y).save(d / f"benign ({i})_mask.png")
        return d, d, "_mask", None
    if name == "glas":  # GlaS: BMP images and instance-labelled BMP annotations in one folder
        d = tmp / "Warwick QU Dataset (Released 2016_07_08)"
        d.mkdir()
        for i, (x, y) in enumerate(pairs, start=1):
            Image.fromarray(x).convert("RGB").save(d / f"train_{i}.bmp")
            inst = (y > 0).astype(np.uint8)
            inst[: inst.shape[0] // 2] *= 2  # two "glands": instance ids 1 and 2
            Image.fromarray(inst).save(d / f"train_{i}_anno.bmp")
        return d, d, "_anno", "nonzero"
    raise ValueError(name)


@pytest.mark.parametrize("layout", ["isic", "kvasir", "busi", "glas"])
def test_datalist_layouts_pair_load_and_binarise(tmp_path, layout):
    images, masks, suffix, label_map = _layout(tmp_path, layout)
    out = tmp_path / "lists" / "dataset.json"
    d = build_datalist(images, masks, out, mask_suffix=suffix, split=(1, 0, 0))
    assert len(d["training"]) == 3 and d["validation"] == [] and d["test"] == []
    assert json.loads(out.read_text()) == d
    loader = LoadImage2dd(["image", "label"], label_keys="label", num_classes=2, label_map=label_map)
    refs = _heads()
    for e, (x, y) in zip(d["training"], refs):
        assert Path(e["label"]).stem == Path(e["image"]).stem + suffix
        case = loader({k: str(out.parent / v) for k, v in e.items()})
        img, lab = case["image"], case["label"]
        assert img.shape == (3, x.shape[1], x.shape[0])  # MONAI's (W, H) order
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        # the reference mask, transposed to (W, H); JPEG masks differ from it at most along the edges
        want = (y.T > 0).astype(np.uint8)
        got = np.asarray(lab[0])
        assert set(np.unique(got)) <= {0, 1}
        assert (got != want).mean() < (0.01 if layout == "kvasir" else 1e-9)


def test_datalist_cli_refuses_unmatched_pairs_and_writes_nothing(tmp_path):
    images, masks, suffix, _ = _layout(tmp_path, "isic")
    (masks / "ISIC_0000001_segmentation.png").rename(masks / "ISIC_0000001_seg.png")
    out = tmp_path / "dataset.json"
    cmd = [sys.executable, "-m", "medurwkv", "datalist", "--images", str(images), "--masks", str(masks), "--mask-suffix", suffix, str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "ISIC_0000001.jpg" in r.stderr and "ISIC_0000001_seg.png" in r.stderr
    assert not out.exists()
    (masks / "ISIC_0000001_seg.png").rename(masks / "ISIC_0000001_segmentation.png")
    # the same arguments, once paired (in-process: the CLI's import of torch and monai costs seconds)
    from medurwkv.cli import datalist

    datalist(str(out), images=str(images), masks=str(masks), mask_suffix=suffix, split="0.34,0.33,0.33", seed=3)
    d = json.loads(out.read_text())
    assert sorted(len(d[k]) for k in ("training", "validation", "test")) == [1, 1, 1]
    assert all(not Path(e["image"]).is_absolute() for k in ("training", "validation", "test") for e in d[k])


def test_pairing_errors_name_the_files(tmp_path):
    images, masks, suffix, _ = _layout(tmp_path, "busi")
    (images / "benign (4)_mask.png").write_bytes((images / "benign (1)_mask.png").read_bytes())  # mask without image
    with pytest.raises(DatalistError, match=r"benign \(4\)_mask\.png"):
        pair_images(images, masks, suffix)
    with pytest.raises(DatalistError, match="--mask-suffix"):
        pair_images(images, masks, "")


def test_split_is_seeded_and_deterministic():
    names = [f"case{i:02d}" for i in range(20)]
    a, b, c = split_cases(names, (0.7, 0.1, 0.2), 0), split_cases(list(names), (0.7, 0.1, 0.2), 0), split_cases(names, (0.7, 0.1, 0.2), 1)
    assert a == b and a != c
    assert [len(a[k]) for k in ("training", "validation", "test")] == [14, 2, 4]
    assert sorted(sum(a.values(), [])) == names
    assert [len(v) for v in split_cases(names[:3], (0.8, 0.1, 0.1), 0).values()] == [1, 1, 1]
    with pytest.raises(DatalistError):
        split_cases(names, (0, 0.5, 0.5))


def test_rgb_and_grayscale_images():
    load = LoadImage2dd("image")
    rgb = load({"image": str(RGB)})["image"]
    w, h = Image.open(RGB).size
    assert rgb.shape == (3, w, h) and not bool((rgb[0] == rgb[1]).all())
    gray_path = MNI / "images" / "mni152_2009a_z042.png"
    gray = load({"image": str(gray_path)})["image"]
    assert gray.shape[0] == 3 and bool((gray[0] == gray[1]).all()) and bool((gray[0] == gray[2]).all())
    assert abs(float(gray.max()) - np.array(Image.open(gray_path)).max() / 255.0) < 1e-6
    assert LoadImage2dd("image", channels=1)({"image": str(gray_path)})["image"].shape[0] == 1
    with pytest.raises(VolumeError, match="visible_woman_head.png.*RGB image but the network takes one channel"):
        LoadImage2dd("image", channels=1)({"image": str(RGB)})


def _case(tmp: Path, mask: np.ndarray, ext: str = ".png") -> dict:
    img = np.zeros((40, 30), np.uint8)
    Image.fromarray(img).save(tmp / "img.png")
    Image.fromarray(mask).save(tmp / f"mask{ext}")
    return {"image": str(tmp / "img.png"), "label": str(tmp / f"mask{ext}")}


def test_label_rules_and_bad_masks_name_the_file(tmp_path):
    three = LoadImage2dd(["image", "label"], label_keys="label", num_classes=3)
    idx = np.zeros((40, 30), np.uint8)
    idx[5:10], idx[20:30] = 1, 2
    assert np.array_equal(np.asarray(three(_case(tmp_path, idx))["label"][0]), idx.T)
    idx[0, 0] = 5
    with pytest.raises(VolumeError, match=r"mask\.png.*values \[5\] outside the classes 0\.\.2"):
        three(_case(tmp_path, idx))
    with pytest.raises(VolumeError, match=r"mask\.png.*is 31 x 40 pixels but its image .*img\.png is 30 x 40"):
        three(_case(tmp_path, np.zeros((40, 31), np.uint8)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(VolumeError, match=r"broken\.png: cannot read"):
        three({"image": str(tmp_path / "broken.png"), "label": str(tmp_path / "mask.png")})
    # a colour mask through a label_map; a colour outside it is named
    col = np.zeros((40, 30, 3), np.uint8)
    col[5:10] = (255, 0, 0)
    col[20:30] = (0, 255, 0)
    mapped = LoadImage2dd(["image", "label"], label_keys="label", num_classes=3, label_map={"0": [0, 0, 0], "1": [255, 0, 0], "2": [0, 255, 0]})
    lab = np.asarray(mapped(_case(tmp_path, col))["label"][0]).T
    assert lab[7, 0] == 1 and lab[25, 0] == 2 and lab[0, 0] == 0
    col[0, 0] = (0, 0, 255)
    with pytest.raises(VolumeError, match=r"mask\.png.*1 pixel\(s\) with values not in label_map, e\.g\. \[\[0, 0, 255\]\]"):
        mapped(_case(tmp_path, col))
    with pytest.raises(VolumeError, match=r"mask\.png.*colour mask; give a label_map"):
        three(_case(tmp_path, col))
    # 0/255 is binary only with 2 classes
    binary = (idx.clip(0, 1) * 255).astype(np.uint8)
    assert set(np.unique(np.asarray(LoadImage2dd(["image", "label"], label_keys="label", num_classes=2)(_case(tmp_path, binary))["label"]))) == {0, 1}
    with pytest.raises(VolumeError, match="outside the classes 0..2"):
        three(_case(tmp_path, binary))


def test_sample_2d_data_is_small_and_consistent():
    total = sum(p.stat().st_size for p in S2D.rglob("*") if p.is_file())
    assert total < 1024 * 1024, f"sample_data/2d is {total / 2**20:.2f} MiB"
    d = json.loads((MNI / "dataset.json").read_text())
    assert d["labels"] == {"0": "background", "1": "grey matter", "2": "white matter"}
    assert channel_def(ROOT / "bundle2d" / "configs" / "metadata.json") == list(d["labels"].values())
    entries = [e for k in ("training", "validation", "test") for e in d[k]]
    assert len(entries) == len({e["image"] for e in entries}) == 20 and d["test"] and d["validation"]
    seen = set()
    for e in entries:
        x, y = np.array(Image.open(MNI / e["image"])), np.array(Image.open(MNI / e["label"]))
        assert x.shape == y.shape and x.dtype == np.uint8
        seen |= set(np.unique(y).tolist())
    assert seen == {0, 1, 2}


def test_sample_2d_heads_and_rgb_rebuild_identically(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_2d", ROOT / "sample_data" / "build_2d.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    names = build.build_heads(tmp_path)
    assert len(names) == 8
    rebuilt = sorted(p.relative_to(tmp_path) for p in (tmp_path / "heads").rglob("*.png"))
    assert rebuilt == sorted(p.relative_to(S2D) for p in HEADS.rglob("*.png"))
    for rel in rebuilt:
        assert (tmp_path / rel).read_bytes() == (S2D / rel).read_bytes(), rel
    if not build.RGB_SOURCE.is_file():
        pytest.skip(f"{build.RGB_SOURCE} not installed (Debian insighttoolkit5-examples)")
    assert build.build_rgb(tmp_path).read_bytes() == RGB.read_bytes()
