"""Checks on the shipped brain-extraction sample data (sample_data/).

Every test here reads the committed files; only the last one needs the Debian source
packages (mricron-data, insighttoolkit5-examples) and is skipped without them.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
DATASET = SAMPLE / "dataset.json"
LISTS = ("training", "validation", "test")


def _dataset() -> dict:
    return json.loads(DATASET.read_text())


def _entries() -> list[tuple[str, dict]]:
    ds = _dataset()
    return [(key, e) for key in LISTS for e in ds[key]]


def _unique_entries() -> list[dict]:
    seen, out = set(), []
    for _, e in _entries():
        if (e["image"], e["label"]) not in seen:
            seen.add((e["image"], e["label"]))
            out.append(e)
    return out


def _load_build_module():
    spec = importlib.util.spec_from_file_location("sample_data_build", SAMPLE / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _vox_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


# ----------------------------------------------------------------------------- datalist
def test_datalist_structure():
    ds = _dataset()
    for key in LISTS:
        assert isinstance(ds[key], list) and ds[key], f"'{key}' must be a non-empty list"
        for e in ds[key]:
            assert set(e) >= {"image", "label"}, e
            for k in ("image", "label"):
                assert not Path(e[k]).is_absolute(), "paths must be relative to sample_data/"
    assert ds["labels"] == {"0": "background", "1": "brain"}


def test_monai_decathlon_datalist_loader_accepts_file():
    from monai.data import load_decathlon_datalist

    for key in LISTS:
        items = load_decathlon_datalist(str(DATASET), is_segmentation=True, data_list_key=key, base_dir=str(SAMPLE))
        assert items and all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)


def test_heldout_case_not_in_training():
    ds = _dataset()
    train = {p for e in ds["training"] for p in (e["image"], e["label"])}
    val = {p for e in ds["validation"] for p in (e["image"], e["label"])}
    train_hashes = {hashlib.sha256((SAMPLE / p).read_bytes()).hexdigest() for p in train}
    for e in ds["test"]:
        for p in (e["image"], e["label"]):
            assert p not in train and p not in val, f"{p} is used for training/validation"
            # also catches the same file copied under another name
            assert hashlib.sha256((SAMPLE / p).read_bytes()).hexdigest() not in train_hashes


@pytest.mark.parametrize("entry", _unique_entries(), ids=lambda e: Path(e["image"]).name)
def test_case_loads_and_grids_match(entry):
    img = nib.load(str(SAMPLE / entry["image"]))
    lab = nib.load(str(SAMPLE / entry["label"]))
    assert img.ndim == 3 and lab.ndim == 3
    assert img.shape == lab.shape, "image/label shapes differ"
    assert np.allclose(img.affine, lab.affine, atol=1e-5), "image/label affines differ"
    # qform and sform must agree, otherwise nibabel and ITK read different grids
    for im in (img, lab):
        assert np.allclose(im.get_qform(), im.get_sform(), atol=1e-5)
    assert img.get_data_dtype() in (np.dtype("uint8"), np.dtype("int16"))
    assert lab.get_data_dtype() == np.dtype("uint8")
    # a modest grid: 1-4 mm voxels, at most 160 voxels along any axis
    zooms = img.header.get_zooms()
    assert all(1.0 <= z <= 4.0 for z in zooms) and max(img.shape) <= 160


@pytest.mark.parametrize("entry", _unique_entries(), ids=lambda e: Path(e["image"]).name)
def test_monai_readers_agree(entry):
    """MONAI's NibabelReader and ITKReader must give the same array and affine."""
    from monai.transforms import LoadImage

    for key in ("image", "label"):
        path = str(SAMPLE / entry[key])
        a = LoadImage(reader="NibabelReader", image_only=True)(path)
        b = LoadImage(reader="ITKReader", image_only=True)(path)
        assert tuple(a.shape) == tuple(b.shape)
        assert np.allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-4), (a.affine, b.affine)
        assert np.array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("entry", _unique_entries(), ids=lambda e: Path(e["image"]).name)
def test_label_is_plausible_brain_mask(entry):
    img = nib.load(str(SAMPLE / entry["image"]))
    lab = nib.load(str(SAMPLE / entry["label"]))
    x = np.asanyarray(img.dataobj)
    m = np.asanyarray(lab.dataobj)
    assert set(np.unique(m).tolist()) == {0, 1}, "label must be binary and non-empty"
    frac = float(m.mean())
    assert 0.10 <= frac <= 0.60, f"brain fraction {frac:.3f} outside 10-60%"
    ml = float(m.sum()) * _vox_ml(lab.affine)
    assert 1000.0 <= ml <= 2200.0, f"brain volume {ml:.0f} ml is not an adult brain"
    brain = m > 0
    # the mask sits on the head (not shifted into the background) ...
    assert (x[brain] > 0).mean() >= 0.99
    # ... and is not the whole head: plenty of non-zero head voxels lie outside it
    assert ((x > 0) & ~brain).sum() >= 0.3 * brain.sum()
    # one connected piece
    from scipy import ndimage as ndi

    assert ndi.label(brain)[1] == 1


def test_total_size_is_small():
    # the 3D sample; the 2D sample (sample_data/2d, built by build_2d.py) is checked in tests/test_datalist.py
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file() and not {"__pycache__", "2d"} & set(p.relative_to(SAMPLE).parts))
    assert total < 3 * 1024 * 1024, f"sample_data is {total / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------- DICOM
def _dicom_entry() -> dict:
    ds = _dataset()
    assert ds.get("dicom"), "dataset.json lists no DICOM series"
    return ds["dicom"][0]


def test_dicom_series_headers():
    import pydicom

    e = _dicom_entry()
    files = sorted((SAMPLE / e["series"]).glob("*.dcm"))
    assert len(files) == e["num_slices"] >= 24
    dss = [pydicom.dcmread(str(f)) for f in files]
    assert {d.SOPClassUID for d in dss} == {pydicom.uid.MRImageStorage}
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.dot(np.array(d.ImagePositionPatient, dtype=float), normal) for d in dss])
    steps = np.diff(np.sort(pos))
    assert np.allclose(steps, float(dss[0].SliceThickness), atol=1e-3)
    assert np.allclose(steps, float(dss[0].SpacingBetweenSlices), atol=1e-3)
    for d in dss:
        assert np.allclose(np.array(d.ImageOrientationPatient, dtype=float), iop)
        assert (d.Rows, d.Columns) == tuple(e["rows_columns"])
        assert d.BitsAllocated == 16 and d.Modality == "MR"


def test_dicom_series_matches_its_nifti_source():
    from monai.transforms import LoadImage, Orientation, SpatialCrop

    e = _dicom_entry()
    dcm = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(SAMPLE / e["series"]))
    src = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)(str(SAMPLE / e["source_image"]))
    crop = SpatialCrop(roi_start=e["crop_start"], roi_end=e["crop_stop"])(src)
    # the series is written in scanner convention (rows superior->inferior, slices
    # anterior->posterior), so its own orientation differs from the NIfTI's ...
    assert "".join(nib.aff2axcodes(dcm.affine.numpy())) == "LIP"
    assert tuple(dcm.shape) == tuple(crop.shape)
    # ... and after MONAI's LPS->RAS handling plus reorientation the grids are identical
    a = Orientation(axcodes="RAS")(dcm)
    b = Orientation(axcodes="RAS")(crop)
    assert tuple(a.shape) == tuple(b.shape)
    assert np.allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-4), (a.affine, b.affine)
    assert np.array_equal(a.numpy(), b.numpy()), "DICOM voxel values differ from the NIfTI crop"
    # the crop holds the whole brain, so a prediction on the DICOM can be scored
    lab = np.asanyarray(nib.load(str(SAMPLE / e["source_label"])).dataobj)
    s0, s1 = e["crop_start"], e["crop_stop"]
    assert lab[s0[0] : s1[0], s0[1] : s1[1], s0[2] : s1[2]].sum() == lab.sum()


# ----------------------------------------------------------------------------- rebuild
def _read_norm(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def test_rebuild_is_reproducible(tmp_path):
    build = _load_build_module()
    if not build.sources_present():
        missing = [str(p) for p in build.source_paths() if not p.is_file()]
        pytest.skip(
            "source data not installed (needs Debian packages mricron-data and "
            f"insighttoolkit5-examples); missing: {', '.join(missing)}"
        )
    changed = build.source_mismatches()
    if changed:
        pytest.skip(
            "installed source files differ from the ones sample_data was built from "
            f"(other package versions?): {', '.join(changed)}"
        )
    build.build(tmp_path)
    committed = {
        p.relative_to(SAMPLE)
        for p in SAMPLE.rglob("*")
        if p.is_file() and p.suffix in (".gz", ".dcm", ".json") and p.relative_to(SAMPLE).parts[0] != "2d"
    }
    rebuilt = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert committed == rebuilt
    for rel in sorted(rebuilt):
        # compare uncompressed content: gzip bytes may differ with another zlib build
        assert _read_norm(SAMPLE / rel) == _read_norm(tmp_path / rel), f"{rel} differs after rebuild"
