"""Files from requests: names stay inside their folder, sizes are checked before decoding, nothing is lost.

The first half tests the app's helpers without a server (names, archives, size limits, label reading in each
format, the datastore's replace/delete/label rules, index recovery). The second half sends every probe to a
real server (``tests/label_server.py``) with raw HTTP and ``MONAILabelClient``: each answers 4xx, a sentinel
folder outside the studies is listed before and after and stays the same, ``/info/`` answers after each, and
the server's memory (RSS of the server and its children) is sampled while each probe runs. The probe table
(status, seconds, peak RSS) is printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from label_server import APP, MODEL, serving, stage, status_of, wait_for

sys.path.insert(0, str(APP))
try:
    from lib.datastore import CheckedLocalDatastore
    from lib.errors import BadInput, Conflict, Forbidden, TooLarge, UnsupportedFile
    from lib.imageio import Limits, check_volume_file, read_label_values, same_volume
    from lib.server import BodyLimit, PathScrubber, infer_inputs_only_from_request, one_training_at_a_time, safe_upload_endpoints
    from lib.server import bind_loopback_by_default, weights_from_training_only
    from lib.uploads import check_session_input, extract_archive, safe_name
finally:
    sys.path.remove(str(APP))

MB = 1 << 20
BAD_NAMES = ["/abs/path", "../x", "a/b", "..", ".", ".hidden", "a\\b", "x\x00y", "x" * 200, "", " x"]
GOOD_NAMES = ["colin_a", "3: T1 SAG head", "IMG-0001 (2)"]


def _nifti_bytes(shape, dtype="float32") -> bytes:
    """A NIfTI header declaring ``shape`` followed by no data (the file stays tiny)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.dtype(dtype))
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def header_only_nifti(path: Path, shape=(2000, 2000, 2000)) -> Path:
    """The 'small file, huge volume' probe: a gzipped NIfTI header alone (~100 bytes) declaring 2000^3 voxels."""
    path.write_bytes(gzip.compress(_nifti_bytes(shape), 9))
    return path


def gzip_bomb_nifti(path: Path, inflated_gb: float = 4.5) -> Path:
    """The gzip probe: a valid 64 x 64 x 4 NIfTI (32 KB of data) whose gzip stream goes on inflating to
    ``inflated_gb`` GB (concatenated gzip members of zeros; a ~4 MB file for 4.5 GB)."""
    first = gzip.compress(_nifti_bytes((64, 64, 4), "int16") + b"\0" * (64 * 64 * 4 * 2), 9)
    block = gzip.compress(b"\0" * (64 * MB), 9)
    with open(path, "wb") as f:
        f.write(first)
        for _ in range(int(inflated_gb * 1024 / 64)):
            f.write(block)
    return path


def _tar(path: Path, entries) -> Path:
    """entries: (TarInfo, bytes or None)."""
    with tarfile.open(path, "w:gz") as t:
        for info, data in entries:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name, size=0, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


def _listing(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.is_symlink(), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    } if folder.exists() else {}


def _nrrd_label(path: Path, data: np.ndarray, like: Path) -> Path:
    """``data`` (index order i, j, k) written by SimpleITK on the grid of the NIfTI ``like``."""
    import SimpleITK as sitk

    ref = sitk.ReadImage(str(like))
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(path), True)
    return path


# ============================================================================================ no server
def test_names_must_be_one_plain_component():
    for name in GOOD_NAMES:
        assert safe_name(name, "image id") == name
    for name in BAD_NAMES:
        with pytest.raises(BadInput) as e:
            safe_name(name, "image id")
        assert e.value.status_code == 422 and "image id" in e.value.detail


def test_archives_refuse_escapes_links_devices_and_size(tmp_path):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("keep")
    before = _listing(tmp_path)
    limits = Limits(max_archive_bytes=1 * MB, max_archive_files=5)
    payload = b"x" * 100
    bad = {
        "dotdot": _tar(tmp_path / "a.tar.gz", [(_info("ok.nii.gz", 100), payload), (_info("../sentinel/evil", 100), payload)]),
        "absolute": _tar(tmp_path / "b.tar.gz", [(_info(str(sentinel / "evil"), 100), payload)]),
        "symlink": _tar(tmp_path / "c.tar.gz", [(_info("link", kind=tarfile.SYMTYPE, link=str(sentinel)), None)]),
        "hardlink": _tar(tmp_path / "d.tar.gz", [(_info("hl", kind=tarfile.LNKTYPE, link="/etc/passwd"), None)]),
        "device": _tar(tmp_path / "e.tar.gz", [(_info("dev", kind=tarfile.CHRTYPE), None)]),
        "declares 10 GB": _tar(tmp_path / "f.tar.gz", [(_info("big.nii", 10 << 30), None)]),
        "too many entries": _tar(tmp_path / "g.tar.gz", [(_info(f"f{i}", 1), b"x") for i in range(6)]),
    }
    with zipfile.ZipFile(tmp_path / "h.zip", "w") as z:
        z.writestr("../sentinel/evil", payload)
    bad["zip dotdot"] = tmp_path / "h.zip"
    with zipfile.ZipFile(tmp_path / "i.zip", "w") as z:
        link = zipfile.ZipInfo("link")
        link.external_attr = (0o120777 << 16)
        z.writestr(link, str(sentinel))
    bad["zip symlink"] = tmp_path / "i.zip"
    with zipfile.ZipFile(tmp_path / "j.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.nii", b"\0" * (2 * MB))
    bad["zip over the size limit"] = tmp_path / "j.zip"
    before = _listing(sentinel)
    for what, archive in bad.items():
        target = tmp_path / f"out_{archive.name}"
        target.mkdir()
        with pytest.raises((BadInput, TooLarge)) as e:
            extract_archive(str(archive), str(target), limits)
        expected = 413 if what in ("declares 10 GB", "too many entries", "zip over the size limit") else 422
        assert e.value.status_code == expected, what
        assert not target.exists(), f"{what}: partly extracted files left behind"
    assert _listing(sentinel) == before

    good = _tar(tmp_path / "good.tar.gz", [(_info("series", kind=tarfile.DIRTYPE), None), (_info("series/a.dcm", 100), payload)])
    target = tmp_path / "good"
    target.mkdir()
    extract_archive(str(good), str(target), limits)
    assert (target / "series" / "a.dcm").read_bytes() == payload


def test_size_limits_refuse_before_decoding(tmp_path):
    import psutil

    rss0 = psutil.Process().memory_info().rss
    limits = Limits()
    assert limits.max_voxels >= 512 * 512 * 2000  # a large CT is admitted
    t0 = time.time()
    with pytest.raises(TooLarge) as e:
        check_volume_file(str(header_only_nifti(tmp_path / "huge.nii.gz")), limits)
    assert "2000 x 2000 x 2000 = 8,000,000,000 voxels" in e.value.detail and "600,000,000" in e.value.detail
    bomb = gzip_bomb_nifti(tmp_path / "bomb.nii.gz", inflated_gb=0.5)
    with pytest.raises(TooLarge) as e:
        check_volume_file(str(bomb), limits)
    assert "inflates to more than" in e.value.detail
    assert time.time() - t0 < 10
    assert psutil.Process().memory_info().rss - rss0 < 200 * MB

    ct = tmp_path / "ct.nii"  # 512 x 512 x 2000 int16 declared: admitted (only the header is checked here)
    ct.write_bytes(_nifti_bytes((512, 512, 2000), "int16"))
    assert check_volume_file(str(ct), Limits(max_image_bytes=4 << 30)).shape == (512, 512, 2000)
    with pytest.raises(TooLarge) as e:
        check_volume_file(str(ct), Limits.from_conf({"max_voxels": str(512 * 512 * 1999)}))
    assert "524,288,000 voxels" in e.value.detail and "524,025,856" in e.value.detail
    assert Limits.from_conf({"max_upload_mb": "2"}).max_upload_bytes == 2 * MB
    with pytest.raises(ValueError):
        Limits.from_conf({"max_voxels": "-1"})


def test_detached_data_files_and_single_dicom_slices_are_refused(tmp_path):
    from pydicom.data import get_testdata_file

    (tmp_path / "x.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                                    "ElementDataFile = /etc/passwd\n")
    (tmp_path / "y.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                                    "ElementDataFile = /etc/passwd\n")
    (tmp_path / "z.nrrd").write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                                     "data file: /etc/passwd\n\n")
    for name in ("x.mhd", "y.mha", "z.nrrd"):
        with pytest.raises(UnsupportedFile) as e:
            check_volume_file(str(tmp_path / name), Limits())
        assert "separate data file" in e.value.detail, name
    with pytest.raises(UnsupportedFile) as e:
        check_volume_file(get_testdata_file("CT_small.dcm"), Limits())
    assert "single DICOM slice" in e.value.detail and "Include DICOM files" in e.value.detail
    series = tmp_path / "series"
    series.mkdir()
    (series / "a.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    with pytest.raises(UnsupportedFile):
        check_session_input(str(series), Limits(), "the session")  # one slice in a folder is still one slice
    (series / "b.dcm").write_bytes((series / "a.dcm").read_bytes())
    check_session_input(str(series), Limits(), "the session")  # a series
    import pydicom

    big = pydicom.dcmread(str(series / "b.dcm"))
    big.Rows, big.Columns, big.NumberOfFrames = 4096, 4096, 2000  # declared in the header only
    big.save_as(str(series / "b.dcm"))
    with pytest.raises(TooLarge) as e:
        check_session_input(str(series), Limits(), "the session")
    assert "4096 x 4096 x 2000" in e.value.detail


def test_scoring_records_an_unreadable_volume_and_scores_the_others(store, tmp_path, monkeypatch):
    from types import SimpleNamespace

    sys.path.insert(0, str(APP))
    try:
        from lib.scoring.mc_dropout import KEY_DETAIL, KEY_SCORE, MCDropoutScoring
    finally:
        sys.path.remove(str(APP))
    ds, studies, dataset, vol, affine = store
    (studies / "broken.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(500))  # arrives after the datastore started
    ds.refresh()
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    scoring = MCDropoutScoring(SimpleNamespace(dropout=0.2, weights_path=str(weights)), passes=2)

    def score_volume(path, device, passes, max_slices):  # the real reading; the network is not what is tested
        return {"score": float(np.asanyarray(nib.load(path).dataobj).mean() % 1)}

    monkeypatch.setattr(scoring, "score_volume", score_volume)
    summary = scoring({"device": "cpu"}, ds)
    assert sorted(summary["scores"]) == ["linked", "own"] and list(summary["failed"]) == ["broken"]
    assert str(studies) not in summary["failed"]["broken"]  # the id, not the server path
    info = ds.get_image_info("broken")
    assert info[KEY_SCORE] is None and "error" in info[KEY_DETAIL]
    assert isinstance(ds.get_image_info("own")[KEY_SCORE], float)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".seg.nrrd", ".nii.gz"])
def test_label_values_read_correctly_in_every_format(tmp_path, suffix):
    import SimpleITK as sitk

    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((96, 80, 40), np.int16), np.diag([0.9, 1.1, 2.0, 1.0])), str(ref))
    data = np.zeros((96, 80, 40), np.uint8)
    data[20:60, 10:50, 5:30] = 1
    path = _nrrd_label(tmp_path / f"label{suffix}", data, ref)
    del data  # nothing of the writer stays alive
    import gc

    gc.collect()
    assert read_label_values(str(path)).tolist() == [0, 1]
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).sum() == 40 * 40 * 25


def test_same_volume_across_formats(tmp_path):
    ref = tmp_path / "a.nii.gz"
    data = (np.arange(32 * 24 * 8) % 251).reshape(32, 24, 8).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(ref))
    resaved = _nrrd_label(tmp_path / "a.nrrd", data, ref)  # what Slicer uploads on each Run
    other = tmp_path / "b.nii.gz"
    nib.save(nib.Nifti1Image(data[::-1].copy(), np.diag([1.0, 1.0, 2.0, 1.0])), str(other))
    assert same_volume(str(ref), str(ref)) and same_volume(str(ref), str(resaved))
    assert not same_volume(str(ref), str(other))


@pytest.fixture()
def store(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    studies = tmp_path / "studies"
    studies.mkdir()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    vol = (np.arange(32 * 24 * 8) % 97).reshape(32, 24, 8).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, affine), str(dataset / "linked.nii.gz"))
    os.symlink(dataset / "linked.nii.gz", studies / "linked.nii.gz")
    nib.save(nib.Nifti1Image(vol + 1, affine), str(studies / "own.nii.gz"))
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii", "*.nrrd"], label_values={0: "bg", 1: "fg"})
    return ds, studies, dataset, vol, affine


def test_datastore_ids_replacement_and_dataset_files(store, tmp_path):
    ds, studies, dataset, vol, affine = store
    sentinel_before = _listing(tmp_path / "dataset")
    upload = tmp_path / "up.nii.gz"
    nib.save(nib.Nifti1Image(vol * 2, affine), str(upload))
    for name in [n for n in BAD_NAMES if n]:  # an empty id: taken from the file name
        with pytest.raises(BadInput):
            ds.add_image(name, str(upload), {})
    # another volume under an existing name (Slicer node names repeat across patients): 409, nothing replaced
    with pytest.raises(Conflict) as e:
        ds.add_image("linked", str(upload), {})
    assert "rename the volume node" in e.value.detail
    assert _listing(tmp_path / "dataset") == sentinel_before
    # the same volume again, even re-saved in another format: accepted, nothing written
    again = _nrrd_label(tmp_path / "again.nrrd", vol, dataset / "linked.nii.gz")
    assert ds.add_image("linked", str(again), {}) == "linked"
    assert os.path.islink(studies / "linked.nii.gz") and _listing(tmp_path / "dataset") == sentinel_before
    assert ds.add_image("new one", str(upload), {}) == "new one"
    assert (studies / "new one.nii.gz").read_bytes() == upload.read_bytes()
    # a dataset volume is never deleted through its link
    with pytest.raises(Forbidden):
        ds.remove_image("linked")
    assert _listing(tmp_path / "dataset") == sentinel_before and "linked" in ds.list_images()
    ds.remove_image("new one")
    assert "new one" not in ds.list_images() and not (studies / "new one.nii.gz").exists()
    assert not [p for p in studies.rglob("*.tmp")]


def test_labels_tags_empty_and_atomic(store, tmp_path):
    ds, studies, dataset, vol, affine = store
    label = np.zeros(vol.shape, np.uint8)
    label[4:20, 4:12, 2:6] = 1
    good = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), str(good))
    for tag in ("../..", "../../dataset", "/tmp/x", ".hidden"):
        with pytest.raises(BadInput):
            ds.save_label("own", str(good), tag, {})
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(vol.shape, np.uint8), affine), str(empty))
    with pytest.raises(BadInput) as e:
        ds.save_label("own", str(empty), "final", {})
    assert "empty" in e.value.detail
    assert ds.get_labeled_images() == []
    nrrd = _nrrd_label(tmp_path / "label.seg.nrrd", label, studies / "own.nii.gz")
    ds.save_label("own", str(nrrd), "final", {})
    ds.save_label("own", str(good), "final", {})  # replaces the .nrrd label (the old file goes)
    assert sorted(p.name for p in (studies / "labels" / "final").iterdir()) == ["own.nii.gz"]
    assert (studies / "labels" / "final" / "own.nii.gz").read_bytes() == good.read_bytes()
    assert ds.get_labeled_images() == ["own"]
    assert not [p for p in studies.rglob("*") if p.name.endswith(".tmp")]
    with pytest.raises(BadInput):
        ds.remove_label("own", "../..")


def test_info_updates_refuse_bad_info_and_unknown_labels(store, monkeypatch):
    """PUT /datastore/image/info, /label/info and /updatelabelinfo: info that is not a JSON object, or a label
    that does not exist, were 500s (json.loads / info["user"] / LabelNotFoundException)."""
    import types

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from monailabel.endpoints import datastore as ds_endpoint
    from monailabel.endpoints import session as session_endpoint
    from monailabel.interfaces.utils import app as app_utils

    ds = store[0]
    instance = types.SimpleNamespace(datastore=lambda: ds)
    monkeypatch.setattr(ds_endpoint, "app_instance", lambda: instance)
    monkeypatch.setattr(app_utils, "app_instance", lambda: instance)
    for module in (ds_endpoint, session_endpoint):
        monkeypatch.setattr(module.router, "routes", list(module.router.routes))
    for name in ("update_image_info", "update_label_info"):
        monkeypatch.setattr(ds_endpoint, name, getattr(ds_endpoint, name))
    fastapi_app = FastAPI()
    fastapi_app.include_router(ds_endpoint.router)
    monkeypatch.setitem(sys.modules, "monailabel.app", types.SimpleNamespace(app=fastapi_app))
    safe_upload_endpoints(Limits())
    client = TestClient(fastapi_app, raise_server_exceptions=False)
    for info in ("not json", "[1]", "3"):
        r = client.put("/datastore/image/info?image=own", data={"info": info})
        assert r.status_code == 422, (info, r.status_code, r.text)
        r = client.put("/datastore/label/info?label=own&tag=final", data={"info": info})
        assert r.status_code == 422, (info, r.status_code, r.text)
    for url in ("/datastore/label/info?label=own&tag=final", "/datastore/updatelabelinfo?label=own&tag=final"):
        r = client.put(url, data={"info": '{"note": 1}', "params": '{"note": 1}'})
        assert r.status_code == 404, (url, r.status_code, r.text)
    assert client.put("/datastore/image/info?image=own", data={"info": '{"note": 1}'}).status_code == 200
    assert ds.get_image_info("own")["note"] == 1
    # GET /datastore/dataset: 404 with no label (was an AssertionError, 500); the zip of every volume is not
    # left in the temporary folder after the download (monailabel kept one per request)
    tmp = store[1].parent / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    assert client.get("/datastore/dataset").status_code == 404
    vol, affine = store[3], store[4]
    nib.save(nib.Nifti1Image((vol > 50).astype(np.uint8), affine), str(tmp.parent / "own_label.nii.gz"))
    ds.save_label("own", str(tmp.parent / "own_label.nii.gz"), "final", {})
    r = client.get("/datastore/dataset")
    assert r.status_code == 200 and zipfile.ZipFile(io.BytesIO(r.content)).namelist(), r.text
    assert os.listdir(tmp) == []


def test_infer_label_copy_takes_no_suffix_from_the_client(tmp_path, monkeypatch):
    """monailabel copies an infer request's label to tmpXXXX<all suffixes of its name>: a long or NUL-holding
    name was an OSError / ValueError (500) after the label had passed every check."""
    import pathlib
    import types

    from fastapi import UploadFile
    from monailabel.endpoints import infer as infer_endpoint

    def monailabel_copy(background_tasks, model, image, session_id, params, file, label, output):
        return tempfile.NamedTemporaryFile(suffix="".join(pathlib.Path(label.filename).suffixes)).name

    monkeypatch.setattr(infer_endpoint, "run_inference", monailabel_copy)
    monkeypatch.setitem(sys.modules, "monailabel.app", types.ModuleType("monailabel.app"))
    assert infer_inputs_only_from_request(Limits())
    vol = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), np.eye(4)), str(vol))
    for name in ("seg." + "x" * 250 + ".nii.gz", "seg.a\x00b.nii.gz"):
        label = UploadFile(io.BytesIO(vol.read_bytes()), filename=name)
        copy = infer_endpoint.run_inference(None, MODEL, "colin_a", "", "{}", None, label, None)
        assert copy.endswith(".nii.gz") and len(os.path.basename(copy)) < 40, copy


def test_infer_binary_label_needs_its_image_and_size(store, monkeypatch, tmp_path):
    """A .bin label is reshaped by monailabel to its datastore image: with a file or session, an unknown image
    or another byte count, that was a 500. The volume it is converted to is removed after the request."""
    import types

    from fastapi import HTTPException, UploadFile
    from monailabel.endpoints import infer as infer_endpoint
    from monailabel.interfaces.utils import app as app_utils

    ds, vol = store[0], store[3]
    converted = []

    def run_inference(background_tasks, model, image, session_id, params, file, label, output):
        if image:  # what monailabel does with a .bin label: a volume on the image's grid, in the temp folder
            raw = tmp_path / "strokes.bin"
            raw.write_bytes(label.file.read())
            converted.append(infer_endpoint.binary_to_image(ds.get_image_uri(image), str(raw)))
            assert os.path.isfile(converted[-1])
        return "ran"

    monkeypatch.setattr(app_utils, "app_instance", lambda: types.SimpleNamespace(datastore=lambda: ds))
    monkeypatch.setattr(infer_endpoint, "run_inference", run_inference)
    monkeypatch.setattr(infer_endpoint, "binary_to_image", infer_endpoint.binary_to_image)  # undone after the test
    monkeypatch.setitem(sys.modules, "monailabel.app", types.ModuleType("monailabel.app"))
    assert infer_inputs_only_from_request(Limits())

    def infer(image, size, session_id=""):
        label = UploadFile(io.BytesIO(b"\x01" * size), filename="strokes.bin")
        return infer_endpoint.run_inference(None, MODEL, image, session_id, "{}", None, label, None)

    for image, size, session_id, status in (("own", vol.size - 1, "", 422), ("nope", vol.size, "", 404),
                                            ("", vol.size, "0" * 8 + "-0000-0000-0000-" + "0" * 12, 422)):
        with pytest.raises(HTTPException) as e:
            infer(image, size, session_id)
        assert e.value.status_code == status, (image, size, e.value.detail)
    assert infer("own", vol.size) == "ran"
    assert len(converted) == 1 and not os.path.exists(converted[0])  # monailabel left it in the temp folder


def test_image_info_path_of_a_linked_volume_is_not_answered(store, tmp_path):
    """GET /datastore/image/info and Next Sample answer get_image_info, whose "path" is the real path: for a
    studies volume that is a link, a folder outside every root the scrubber knows (here: the dataset folder)."""
    ds, studies = store[0], store[1]
    scrub = PathScrubber([str(studies), str(tmp_path / "app")])
    info = ds.get_image_info("linked")
    assert info["path"].startswith(str(tmp_path / "dataset"))
    body = scrub.body(json.dumps({"id": "linked", **info}).encode(), "application/json")
    assert b"dataset" not in body and "path" not in json.loads(body), body
    assert json.loads(scrub.body(b'{"path": "colin_a.nii.gz"}', "application/json")) == {"path": "colin_a.nii.gz"}
    # GET /datastore/?output=train answers datalist(): the real paths of image and label
    listing = json.loads(scrub.body(json.dumps([{"image": info["path"], "label": "/x/y/l.nii.gz"}]).encode(),
                                    "application/json"))
    assert listing == [{"image": "linked.nii.gz", "label": "l.nii.gz"}], listing
    # a message that starts with a server path keeps its words; only the path inside it is cut
    weights = str(studies / "model.pt")
    text = f"{weights} does not fit. Another variant/encoder/number of classes?"
    msg = json.loads(scrub.body(json.dumps({"detail": text}).encode(), "application/json"))
    assert msg == {"detail": "model.pt does not fit. Another variant/encoder/number of classes?"}, msg


def test_truncated_index_is_recovered_from_its_last_good_copy(store):
    ds, studies, dataset, vol, affine = store
    ds.update_image_info("own", {"mc_dropout_score": 0.25})
    index = studies / "datastore_v2.json"
    index.write_bytes(index.read_bytes()[:100])  # what an in-place write killed half-way leaves
    again = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii", "*.nrrd"])
    assert sorted(again.list_images()) == ["linked", "own"]
    assert again.get_image_info("own")["mc_dropout_score"] == 0.25
    assert json.loads(index.read_text())["objects"]["own"]
    assert [p.name for p in studies.glob("datastore_v2.json.broken-*")]
    # no good copy either: rebuilt from the files on disk (infos lost, volumes and labels kept)
    for p in (index, Path(str(index) + ".bak")):
        p.write_text("{")
    rebuilt = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii", "*.nrrd"])
    assert sorted(rebuilt.list_images()) == ["linked", "own"]


def test_index_written_by_another_process_is_reloaded(store):
    """Training and scoring subprocesses write the index (by rename now): the server's datastore sees it."""
    ds, studies, dataset, vol, affine = store
    ext = ["*.nii.gz", "*.nii", "*.nrrd"]
    server = CheckedLocalDatastore(str(studies), extensions=ext, auto_reload=True)
    try:
        CheckedLocalDatastore(str(studies), extensions=ext).update_image_info("own", {"mc_dropout_score": 0.5})
        wait_for(lambda: server.get_image_info("own").get("mc_dropout_score") == 0.5, 10, "the reload", 0.1)
    finally:
        server._observer.stop()


def test_task_options_cannot_name_another_task(monkeypatch):
    """monailabel merges the options over {"model": <url>}: an unknown model (nothing checks its options) whose
    options say {"model": "medurwkv"} must not start that task with unchecked options."""
    import types

    from fastapi import HTTPException
    from monailabel.interfaces.utils import app as app_utils
    from monailabel.utils.async_tasks import task as task_module

    started = []
    monkeypatch.setattr(task_module.AsyncTask, "run", staticmethod(lambda *a, **k: started.append(k) or ("ok", None)))
    monkeypatch.setitem(sys.modules, "monailabel.app", types.ModuleType("monailabel.app"))

    class Task:
        def check_request(self, params, model=""):
            if set(params) - {"model", "method", "max_epochs"}:
                raise BadInput("unknown option")
            return params

    instance = types.SimpleNamespace(_trainers={MODEL: Task()}, _infers={MODEL: Task()},
                                     _scoring_methods={"mc_dropout": Task()})
    monkeypatch.setattr(app_utils, "app_instance", lambda: instance)
    assert one_training_at_a_time()
    run = task_module.AsyncTask.run
    bad = {"model": MODEL, "method": "mc_dropout", "tracking_uri": "x"}
    for method, request in (("train", {"model": "nope"}), ("batch_infer", {"model": "nope", "images": "all"}),
                            ("scoring", {"method": "nope"})):
        with pytest.raises(HTTPException) as e:
            run(method, request=request, params=bad, enqueue=True)
        assert e.value.status_code == 404, method
    for method, request in (("train", {"model": MODEL}), ("scoring", {"method": "mc_dropout"})):
        with pytest.raises(BadInput):
            run(method, request=request, params={"model": "other", "method": "other"}, enqueue=True)
    assert run("train", request={"model": MODEL}, params={"max_epochs": 2}, enqueue=True) == ("ok", None)
    assert len(started) == 1


def test_tasks_never_run_inside_the_server(monkeypatch):
    """?run_sync=true (POST /train/, /scoring/, /batch/infer/) ran the task in the server's event loop, past the
    one-training check."""
    import types

    from monailabel.interfaces.utils import app as app_utils
    from monailabel.utils.async_tasks import task as task_module

    started = []
    monkeypatch.setattr(task_module.AsyncTask, "run", staticmethod(lambda *a, **k: started.append(k) or ("ok", None)))
    monkeypatch.setitem(sys.modules, "monailabel.app", types.ModuleType("monailabel.app"))
    instance = types.SimpleNamespace(_trainers={}, _infers={}, _scoring_methods={})
    monkeypatch.setattr(app_utils, "app_instance", lambda: instance)
    assert one_training_at_a_time()
    for method, key in (("train", "model"), ("scoring", "method"), ("batch_infer", "model")):
        with pytest.raises(BadInput):
            task_module.AsyncTask.run(method, request={key: "x"}, params=None, force_sync=True)
    assert not started


def test_deeply_nested_options_are_a_422():
    """'[[[[...' (a few hundred kB, under the body limit) made json.loads / the expression check raise
    RecursionError: a 500 for infer params, upload params and info forms."""
    from lib.options import Opt, check_options
    from lib.server import _json_object

    with pytest.raises(BadInput):
        _json_object("[" * 100000 + "]" * 100000, "params")
    deep = '{"a": ' * 500 + "1" + "}" * 500  # parses, but is stored as info and scrubbed in every answer
    with pytest.raises(BadInput):
        _json_object(deep, "info")
    assert _json_object('{"a": {"b": [1, {"c": 2}]}}', "info")["a"]["b"][1]["c"] == 2
    assert b"<server path>" not in PathScrubber(["/srv/app"]).body(deep.encode(), "application/json")
    nested: dict = {}
    for _ in range(20000):
        nested = {"a": nested}
    with pytest.raises(BadInput):
        check_options("x", {"labels": nested}, {"labels": Opt(dict)})


def test_weights_cannot_be_uploaded_or_deleted_through_the_api(monkeypatch, tmp_path):
    """monailabel's PUT /model/{model} copied any bytes over model.pt in place; DELETE renamed it away."""
    import types

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from monailabel.endpoints import model as model_endpoint
    from monailabel.interfaces.utils import app as app_utils

    weights = tmp_path / "model.pt"
    weights.write_bytes(b"trained")
    instance = types.SimpleNamespace(model_file=lambda model, validate=True: str(weights))
    monkeypatch.setattr(app_utils, "app_instance", lambda: instance)
    monkeypatch.setattr(model_endpoint, "app_instance", lambda: instance)
    monkeypatch.setattr(model_endpoint.router, "routes", list(model_endpoint.router.routes))
    fastapi_app = FastAPI()
    fastapi_app.include_router(model_endpoint.router)
    monkeypatch.setitem(sys.modules, "monailabel.app", types.SimpleNamespace(app=fastapi_app))
    assert weights_from_training_only()
    client = TestClient(fastapi_app)
    r = client.put(f"/model/{MODEL}", files={"file": ("model.pt", b"garbage")})
    assert r.status_code == 403 and "training only" in r.json()["detail"], r.text
    assert client.delete(f"/model/{MODEL}").status_code == 403
    assert weights.read_bytes() == b"trained" and os.listdir(tmp_path) == ["model.pt"]
    assert client.get(f"/model/{MODEL}").content == b"trained"


def test_body_limit_answers_413_without_reading_the_rest():
    import asyncio

    seen = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            seen.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def run(headers, chunks):
        sent, queue = [], list(chunks)

        async def receive():
            body = queue.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(queue)}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "headers": headers}
        asyncio.run(BodyLimit(app, 1000)(scope, receive, send))
        return sent[0]["status"], len(queue)

    assert run([(b"content-length", b"10000000000")], [b"x"]) == (413, 1)  # refused before reading
    status, left = run([], [b"x" * 600, b"x" * 600, b"x" * 600, b"x" * 600])  # chunked, no length
    assert status == 413 and left == 2  # stopped at the chunk that went over
    assert run([], [b"x" * 500, b"x" * 400]) == (200, 0)


def test_without_host_uvicorn_binds_loopback_and_an_explicit_host_is_kept(monkeypatch):
    """monailabel's start_server hands its default host 0.0.0.0 to uvicorn before the app exists; without --host on
    the command line the app makes uvicorn's configuration give 127.0.0.1 when the socket is opened (after the
    app's startup). An explicit --host is what uvicorn binds."""
    import uvicorn

    def config(host):
        return uvicorn.Config("monailabel.app:app", host=host, log_config=None)

    made = config("0.0.0.0")  # as monailabel.main makes it, before the app is created
    monkeypatch.setattr(sys, "argv", ["monailabel.main", "start_server", "--app", "app", "--studies", "studies"])
    try:
        assert bind_loopback_by_default() == "127.0.0.1"
        assert made.host == "127.0.0.1" and config("::").host == "127.0.0.1"
        assert config("10.1.2.3").host == "10.1.2.3"  # only the all-interfaces default is changed
        assert bind_loopback_by_default() == "127.0.0.1"  # a second app in the process: the same
    finally:
        if "host" in vars(uvicorn.Config):
            delattr(uvicorn.Config, "host")
    monkeypatch.setattr(sys, "argv", ["monailabel.main", "start_server", "--host", "0.0.0.0"])
    assert bind_loopback_by_default() == "0.0.0.0"
    assert config("0.0.0.0").host == "0.0.0.0" and "host" not in vars(uvicorn.Config)


# ============================================================================================ real server
PROBES = []  # (probe, status, seconds, peak RSS MB of the server and its children)


class RssSampler:
    """Peak resident memory of the server process and all its children, sampled every 50 ms."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        import psutil

        total = 0
        for p in [self.root] + self.root.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.05)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@pytest.fixture(scope="module")
def srv(tmp_path_factory):

    c = stage(tmp_path_factory.mktemp("security_files"))
    # a dataset volume linked into the studies (as --studies sample_data does) and a sentinel folder outside
    c.dataset = c.root / "dataset"
    c.dataset.mkdir()
    src = c.studies / "colin_b.nii.gz"
    (c.dataset / "linked.nii.gz").write_bytes(src.read_bytes())
    os.symlink(c.dataset / "linked.nii.gz", c.studies / "linked.nii.gz")
    c.sentinel = c.root / "sentinel"
    c.sentinel.mkdir()
    (c.sentinel / "keep.txt").write_text("must survive")
    (c.sentinel / "secret.nii.gz").write_bytes((c.studies / "colin_a.nii.gz").read_bytes())
    (c.sentinel / "sub").mkdir()
    c.tmp = c.root / "server_tmp"  # the server's own TMPDIR: rejected uploads must leave nothing there
    c.tmp.mkdir()
    c.env["TMPDIR"] = str(c.tmp)
    c.files = c.root / "probe_files"
    c.files.mkdir()
    try:
        with serving(c):
            yield c
    finally:
        if PROBES:
            print("\nprobe | status | seconds | peak RSS MB (server + children)")
            for row in PROBES:
                print(" | ".join(str(x) for x in row))


def _watched(c, what: str, call, expect, rss_bound_mb: float = 600):
    """Run one probe: its status, nothing changed outside, /info/ answers, memory bounded; recorded in PROBES."""
    import psutil  # noqa: F401

    outside = (_listing(c.sentinel), _listing(c.dataset))
    t0 = time.time()
    with RssSampler(c.server.proc.pid) as rss:
        base = rss.peak
        status, body = call()
    seconds = round(time.time() - t0, 2)
    PROBES.append((what, status, seconds, round(rss.peak / MB)))
    assert status in (expect if isinstance(expect, tuple) else (expect,)), f"{what}: {status} {body}"
    assert (_listing(c.sentinel), _listing(c.dataset)) == outside, f"{what}: something outside changed"
    assert c.client.info()["name"], f"/info/ after {what}"
    assert (rss.peak - base) / MB < rss_bound_mb, f"{what}: server RSS grew by {(rss.peak - base) / MB:.0f} MB"
    return body


def _raw(c, method: str, selector: str, files=None, data=None, timeout=120):
    import requests

    r = requests.request(method, c.server.url + selector, files=files, data=data, timeout=timeout)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def _leftovers(c) -> list:
    """Upload copies left in the server's TMPDIR (monailabel's own ``tmp*.json`` task requests are not uploads)."""
    return [p.name for p in c.tmp.iterdir() if not (p.name.startswith("tmp") and p.name.endswith(".json"))]


def _upload(path: Path, field: str = "file", name: str = None):
    return {field: (name or path.name, open(path, "rb"))}


def test_server_paths_stay_inside_their_folders(srv):
    c = srv
    vol = c.studies / "colin_a.nii.gz"
    secret = c.sentinel / "secret.nii.gz"
    label = c.gt / "colin_a.nii.gz"
    probes = [
        ("PUT image=/abs/path", "PUT", f"/datastore/image?image={c.sentinel}/evil", _upload(vol), 422),
        ("PUT image=../x", "PUT", "/datastore/image?image=../sentinel/evil", _upload(vol), 422),
        ("PUT image=..%2Fx", "PUT", "/datastore/image?image=..%2Fsentinel%2Fevil", _upload(vol), 422),
        ("PUT upload name ../x (no id)", "PUT", "/datastore/image", _upload(vol, name="../../sentinel/x.nii.gz"), 200),
        ("PUT label tag=../..", "PUT", "/datastore/label?image=colin_a&tag=../..", _upload(label, "label"), 422),
        ("PUT label tag=../../sentinel", "PUT", "/datastore/label?image=colin_a&tag=..%2F..%2Fsentinel",
         _upload(label, "label"), 422),
        ("DELETE /session/..", "DELETE", "/session/%2E%2E", None, (404, 405)),
        ("GET /session/..?image", "GET", "/session/%2E%2E?image=true", None, 404),
        ("DELETE label tag=../..", "DELETE", "/datastore/label?id=colin_a&tag=..%2F..", None, 422),
        ("infer image=<server path>", "POST", f"/infer/{MODEL}?image={secret}", None, (404, 422)),
        ("infer session_id=../sentinel", "POST", f"/infer/{MODEL}?session_id=..%2Fsentinel", None, 404),
        ("infer params image=<server path>", "POST", f"/infer/{MODEL}?image=colin_a",
         {"params": (None, json.dumps({"image": str(secret)}))}, 422),
        ("infer params label=<server path>", "POST", f"/infer/{MODEL}?image=colin_a",
         {"params": (None, json.dumps({"label": str(secret)}))}, 422),
        ("WSI infer image=<server path>", "POST", f"/infer/wsi/{MODEL}?image={secret}", None, (404, 422)),
        ("DELETE dataset-linked image", "DELETE", "/datastore/image?id=linked", None, 403),
        ("PUT other volume as linked", "PUT", "/datastore/image?image=linked", _upload(vol), 409),
        ("PUT /model/ weights", "PUT", f"/model/{MODEL}", {"file": ("model.pt", b"not weights")}, 403),
        ("DELETE /model/ weights", "DELETE", f"/model/{MODEL}", None, 403),
        ("PUT image info not an object", "PUT", "/datastore/image/info?image=colin_a", {"info": (None, "[1]")}, 422),
        ("PUT info of a missing label", "PUT", "/datastore/label/info?label=colin_a&tag=nope",
         {"info": (None, "{}")}, 404),
    ]
    for what, method, selector, files, expect in probes:
        body = _watched(c, what, lambda: _raw(c, method, selector, files=files), expect)
        if what.startswith("PUT upload name"):
            assert body["image"] == "x" and (c.studies / "x.nii.gz").is_file()  # the name's last component only
    assert not (c.root / "evil").exists() and not (c.root / "evil.nii.gz").exists()
    assert os.path.islink(c.studies / "linked.nii.gz")
    assert "linked" in c.client.datastore()["objects"]


def test_server_archives_are_unpacked_only_when_safe(srv):
    c = srv
    payload = (c.studies / "colin_a.nii.gz").read_bytes()
    archives = {
        "tar.gz with ../ entry": _tar(c.files / "a.tar.gz", [(_info("../../sentinel/evil", len(payload)), payload)]),
        "tar.gz with absolute entry": _tar(c.files / "b.tar.gz", [(_info(str(c.sentinel / "evil"), len(payload)), payload)]),
        "tar.gz with symlink": _tar(c.files / "c.tar.gz", [(_info("x.nii.gz", kind=tarfile.SYMTYPE, link=str(c.sentinel / "secret.nii.gz")), None)]),
        "tar.gz declaring a 10 GB entry": _tar(c.files / "d.tar.gz", [(_info("big.nii", 10 << 30), None)]),
    }
    with zipfile.ZipFile(c.files / "e.zip", "w") as z:
        z.writestr("../../sentinel/evil", payload)
    archives["zip with ../ entry"] = c.files / "e.zip"
    for what, path in archives.items():
        expect = 413 if "10 GB" in what else 422
        _watched(c, what, lambda: _raw(c, "PUT", "/session/?uncompress=true", files=_upload(path, "files")), expect)
    good = _tar(c.files / "good.tar.gz", [(_info("vol.nii.gz", len(payload)), payload)])
    status, body = _raw(c, "PUT", "/session/?uncompress=true", files=_upload(good, "files"))
    assert status == 200 and c.client.get_session(body["session_id"])
    assert not _leftovers(c)


def test_server_memory_probes_are_refused_before_decoding(srv):
    c = srv
    huge = header_only_nifti(c.files / "huge.nii.gz")
    bomb = gzip_bomb_nifti(c.files / "bomb.nii.gz", inflated_gb=4.5)
    assert huge.stat().st_size < 200 and bomb.stat().st_size < 6 * MB
    for name, path in (("2000^3 header", huge), ("gzip bomb 4.5 GB", bomb)):
        for route, selector, field in (
            ("PUT /datastore/image", "/datastore/image?image=probe", "file"),
            ("POST /infer file", f"/infer/{MODEL}", "file"),
            ("PUT /session/", "/session/", "files"),
            ("PUT /datastore/label", "/datastore/label?image=colin_a&tag=final", "label"),
            ("POST /infer scribbles label", f"/infer/{MODEL}_scribbles?image=colin_a", "label"),
        ):
            body = _watched(c, f"{name} -> {route}", lambda: _raw(c, "PUT" if "PUT" in route else "POST", selector,
                                                               files=_upload(path, field)), 413, rss_bound_mb=300)
            assert "voxels" in str(body) or "inflates" in str(body)
    import http.client

    def lying_length():  # a request that declares 10 GB: answered before the body is read
        conn = http.client.HTTPConnection("127.0.0.1", c.server.port, timeout=30)
        conn.putrequest("PUT", "/datastore/image?image=big")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(10 << 30))
        conn.endheaders()
        conn.send(b"--x\r\n")
        r = conn.getresponse()
        return r.status, r.read().decode()

    assert "max_upload_mb" in _watched(c, "Content-Length 10 GB", lying_length, 413, rss_bound_mb=100)
    assert "probe" not in c.client.datastore()["objects"]
    assert not _leftovers(c)


def test_server_uploads_keep_each_volume_and_its_labels(srv):
    """Slicer uploads on every Run with the node name: same volume again is fine, another volume is a 409."""
    from pydicom.data import get_testdata_file

    c = srv
    c.client.upload_image(str(c.eval_images / "colin_eval.nii.gz"), "3: T1 SAG head")
    c.client.save_label("3: T1 SAG head", str(c.eval_labels / "colin_eval.nii.gz"), tag="final")
    again = _nrrd_label(c.files / "resaved.nrrd", np.asanyarray(nib.load(str(c.eval_images / "colin_eval.nii.gz")).dataobj),
                        c.eval_images / "colin_eval.nii.gz")
    c.client.upload_image(str(again), "3: T1 SAG head")  # what the plugin sends on the next Run: accepted
    for what, call, status, text in (
        ("another head under the same name", lambda: c.client.upload_image(str(c.studies / "itk_c.nii.gz"), "3: T1 SAG head"),
         409, "already exists"),
        ("a single DICOM slice", lambda: c.client.upload_image(get_testdata_file("CT_small.dcm"), "CT_small"),
         415, "single DICOM slice"),
        ("an empty label", lambda: c.client.save_label("colin_a", str(_empty_label(c)), tag="final"), 422, "empty"),
    ):
        message = _watched(c, what, lambda: _client_call(call), status)
        assert text in message, f"{what}: {message}"
    objects = c.client.datastore()["objects"]
    assert "CT_small" not in objects and "final" not in objects["colin_a"]["labels"]
    stored = c.client.download_label("3: T1 SAG head", "final")
    assert np.array_equal(np.asanyarray(nib.load(stored).dataobj),
                          np.asanyarray(nib.load(str(c.eval_labels / "colin_eval.nii.gz")).dataobj))
    assert not _leftovers(c)


def _client_call(call):
    """(status, message) of a ``MONAILabelClient`` call, as Slicer's plugin sees it."""
    from monailabel.client.client import MONAILabelClientException

    try:
        call()
    except MONAILabelClientException as e:
        return status_of(e), e.msg
    return 200, ""


def _empty_label(c) -> Path:
    ref = nib.load(str(c.studies / "colin_a.nii.gz"))
    path = c.files / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine), str(path))
    return path


def test_server_large_label_keeps_info_responsive_and_survives_kill_9(srv):
    """A 105 MB label: /info/ keeps answering while it is checked and stored; kill -9 in the middle of writing
    the next one leaves the old or the new label (never a broken one), and the restarted server has it, even
    from a truncated index."""
    c = srv
    shape = (512, 512, 400)  # uint8, uncompressed: 105 MB
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    image = c.files / "big.nii"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), affine), str(image))
    c.client.upload_image(str(image), "big")
    labels = {}
    for name, box in (("a", (slice(100, 300), slice(100, 300), slice(50, 250))),
                      ("b", (slice(150, 400), slice(120, 330), slice(80, 350)))):
        data = np.zeros(shape, np.uint8)
        data[box] = 1
        labels[name] = c.files / f"label_{name}.nii"
        nib.save(nib.Nifti1Image(data, affine), str(labels[name]))
        del data
    expected = {k: v.read_bytes() for k, v in labels.items()}

    latencies, done = [], threading.Event()

    def poll_info():
        import requests

        while not done.is_set():
            t0 = time.time()
            requests.get(c.server.url + "/info/", timeout=60)
            latencies.append(time.time() - t0)
            time.sleep(0.1)

    poller = threading.Thread(target=poll_info, daemon=True)
    poller.start()
    t0 = time.time()
    _watched(c, "105 MB label (check + atomic write)",
             lambda: _raw(c, "PUT", "/datastore/label?image=big&tag=final", files=_upload(labels["a"], "label")), 200,
             rss_bound_mb=1500)
    done.set()
    poller.join()
    assert max(latencies) < 2.0, f"/info/ stalled {max(latencies):.1f} s while the label was checked"
    PROBES.append(("/info/ max latency during the 105 MB label", 200, round(max(latencies), 2), "-"))

    final = c.studies / "labels" / "final"
    result = {}

    def save_b():
        try:
            result["status"] = _raw(c, "PUT", "/datastore/label?image=big&tag=final", files=_upload(labels["b"], "label"))[0]
        except Exception as e:  # the connection dies with the server
            result["status"] = type(e).__name__

    sender = threading.Thread(target=save_b, daemon=True)
    sender.start()
    tmp = wait_for(lambda: [p for p in final.iterdir() if p.name.endswith(".tmp")], 120, "the label write", 0.001)
    os.killpg(c.server.proc.pid, signal.SIGKILL)
    c.server.proc.wait(30)
    sender.join(60)
    PROBES.append(("kill -9 while writing the label", f"temp file {tmp[0].name[:12]}...", round(time.time() - t0, 1), "-"))
    assert (final / "big.nii").read_bytes() in (expected["a"], expected["b"])
    index = c.studies / "datastore_v2.json"
    json.loads(index.read_text())  # the index is whole
    index.write_bytes(index.read_bytes()[:200])  # and had an older server truncated it, the start recovers

    c.server.start(host="127.0.0.1")
    assert "restored from its last good copy" in c.server.log(since_start=True)
    assert not [p for p in final.iterdir() if p.name.endswith(".tmp")]
    stored = Path(c.client.download_label("big", "final")).read_bytes()
    assert stored in (expected["a"], expected["b"])
    assert "final" in c.client.datastore()["objects"]["big"]["labels"]
