"""The app driven exactly as 3D Slicer's MONAI Label module drives it (issue 15), against a real server process.

Request shapes are read from the plugin's source, Project-MONAI/MONAILabel at commit 058ddfc (2025-12-24, the head
of ``main`` when checked; monailabel 0.8.5 on PyPI is older): ``plugins/slicer/MONAILabel/MONAILabel.py`` (the
buttons; line numbers below are that file's) and ``plugins/slicer/MONAILabel/MONAILabelLib/client.py`` (the HTTP).
That ``client.py`` builds the same requests as ``monailabel.client.MONAILabelClient`` 0.8.5 (diffed: only a log
line and an empty-result guard differ), so the transport here is that class; what the buttons add on top (the
options they read from ``/info/``, the ``params`` JSON they assemble, the files they write, how they read the
answer) is :class:`SlicerPlugin`, written from the plugin's code, not copied. Label files are written with ITK
(SimpleITK), as Slicer writes them, in ``.nii.gz``, ``.nrrd`` and ``.seg.nrrd``.

Module-scoped fixtures: ``ctx`` (a started server over tiny studies, ``tests/label_server.py``) and ``trained`` (a
model trained for one epoch, unless a test before already trained one). Each test runs alone (``-k``).
``test_cold_start_*`` needs the server without weights: it is the first test of the module.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

from label_server import MODEL, SAMPLE, crop, http, stage, status_of, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CLIENT_ID = "user-xyz"  # the plugin's default client id (MONAILabel.py:1070, setting MONAILabel/clientId)
NODE = "3: T1 SAG head"  # a volume node name as Slicer gives DICOM series: they repeat across patients
CLICKS, SCRIBBLES = f"{MODEL}_clicks", f"{MODEL}_scribbles"


# ----------------------------------------------------------------------------------------------- the plugin
class SlicerPlugin:
    """One Slicer session of the MONAI Label module: what each button sends and how it reads the answer.

    ``file_ext`` is the plugin's *File Extension* setting (MONAILabel.py:258 default ``.nii.gz``, :542-543), the
    format of every volume and label it writes.
    """

    def __init__(self, c, file_ext: str = ".nii.gz"):
        from monailabel.client import MONAILabelClient

        self.c = c
        self.tmpdir = Path(tempfile.mkdtemp(dir=c.client_dir))
        self.client = MONAILabelClient(c.server.url, tmpdir=str(self.tmpdir), client_id=CLIENT_ID)
        self.file_ext = file_ext
        self.info: Dict[str, Any] = {}
        self.sample: Dict[str, Any] = {}
        self.volume = None  # the volume node (a SimpleITK image)
        self.segments: Dict[str, np.ndarray] = {}  # the segmentation node: name -> mask (z, y, x), in order

    # -- server info (fetchInfo, MONAILabel.py:1112-1150)
    def fetch_info(self) -> Dict[str, Any]:
        self.info = self.client.info()
        assert not self.info.get("config"), "the plugin stops with 'Please upgrade the monai server' (:1121-1126)"
        return self.info

    def options(self, section: str, name: str, edits: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """getParamsFromConfig (:907-915): every option of the task, a list giving its first element. ``edits``:
        values typed into the Options table (developer mode), converted to the type /info/ shows (:826-838)."""
        section = {"infer": "models", "train": "trainers", "activelearning": "strategies"}.get(section, section)
        config = dict(self.info.get(section, {}).get(name, {}).get("config", {}))
        for key, value in (edits or {}).items():
            old = config.get(key)
            config[key] = bool(value) if isinstance(old, bool) else int(value) if isinstance(old, int) else (
                float(value) if isinstance(old, float) else value)
        try:
            return {k: v[0] if isinstance(v, list) else v for k, v in config.items()}
        except IndexError:
            empty = [k for k, v in config.items() if v == []]
            pytest.fail(f"the plugin cannot read the {section}.{name} options: {empty} are empty lists in /info/ "
                        f"(v[0], MONAILabel.py:915); Slicer shows only 'Failed to ...' and sends nothing")

    # -- volumes
    def write_volume(self, image) -> str:
        """slicer.util.saveNode of the volume to a temporary file with the File Extension (:1427-1431)."""
        import SimpleITK as sitk

        path = tempfile.NamedTemporaryFile(suffix=self.file_ext, dir=self.tmpdir, delete=False).name
        sitk.WriteImage(image, path, True)
        return path

    def load_local(self, path: Path, node_name: str) -> None:
        """A volume opened from the user's disk: the plugin makes it a sample of that id with ``session: True``
        (updateGUIFromParameterNode, :555-557)."""
        import SimpleITK as sitk

        self.volume = sitk.ReadImage(str(path))
        self.sample = {"id": node_name, "session": True}
        self.segments = {label: np.zeros(self.shape, bool) for label in self.info.get("labels", [])}  # :1384-1385

    @property
    def shape(self):
        import SimpleITK as sitk

        return sitk.GetArrayViewFromImage(self.volume).shape  # (z, y, x)

    # -- Next Sample (onNextSampleButton, :1261-1360)
    def next_sample(self) -> Dict[str, Any]:
        import SimpleITK as sitk

        strategy = next(iter(self.info.get("strategies", {})))  # strategyBox, first item (:1282, :637-642)
        sample = self.client.next_sample(strategy, self.options("activelearning", strategy))
        assert sample.get("id"), f"Next Sample got no sample: {sample}"
        # Slicer on another machine: the volume is downloaded (:1318-1324), its checksum checked when given
        status, body = http(self.c, "GET", f"/datastore/image?image={_q(sample['id'])}")
        assert status == 200 and isinstance(body, bytes), (status, body)
        if sample.get("checksum"):
            algo, digest = str(sample["checksum"]).split(":", 1)
            assert hashlib.new(algo.lower(), body).hexdigest() == digest.lower()
        name = sample.get("name", sample["id"])
        suffix = "".join(Path(name).suffixes) or ".nii.gz"
        local = self.tmpdir / f"download{suffix}"
        local.write_bytes(body)
        self.volume = sitk.ReadImage(str(local))
        # an original label is fetched when the datastore lists one (:1326-1346); these studies have none
        objects = self.client.datastore()["objects"]
        assert sample["id"] in objects
        self.sample = sample
        self.segments = {label: np.zeros(self.shape, bool) for label in self.info.get("labels", [])}
        return sample

    def auto_model(self) -> str:
        """The model Next Sample runs by itself (initSample, :1387-1397): the first that has the first label."""
        for label in self.info.get("labels", []):
            for name, model in self.info["models"].items():
                if label in model.get("labels", []):
                    return name
        raise AssertionError("no model for the app's labels")

    # -- sessions and uploads (getSessionId :1615-1622, onUploadImage :1418-1507)
    def session_id(self) -> Optional[str]:
        if not self.sample.get("session"):
            return None
        sid = self.sample.get("session_id")
        if not sid or not self.client.get_session(sid):
            self.sample["session_id"] = self.client.create_session(self.write_volume(self.volume))["session_id"]
        return self.sample["session_id"]

    def upload(self):
        """PUT /datastore/?image=<node name>; the plugin ignores the answer and goes on with the node name."""
        answer = self.client.upload_image(self.write_volume(self.volume), self.sample["id"])
        self.sample["session"] = False
        return answer

    # -- answers (logic.infer :2468-2481, updateSegmentationMask :1846-1983)
    def infer(self, model: str, params: Dict[str, Any], label_file: Optional[str] = None):
        params = dict(params, result_extension=".nrrd", result_dtype="uint8")  # :2473-2474
        path, answer = self.client.infer(model, self.sample["id"], params, label_in=label_file,
                                         session_id=self.session_id())
        return path, answer or {}

    def read_answer(self, path: str) -> np.ndarray:
        """The plugin reads the file with SimpleITK (:1890) onto the volume: it must be on the volume's grid."""
        import SimpleITK as sitk

        assert path.endswith(".nrrd"), path
        result = sitk.ReadImage(path)
        assert result.GetSize() == self.volume.GetSize()
        np.testing.assert_allclose(result.GetOrigin(), self.volume.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(result.GetSpacing(), self.volume.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(result.GetDirection(), self.volume.GetDirection(), atol=1e-4)
        assert result.GetPixelID() == sitk.sitkUInt8
        arr = sitk.GetArrayFromImage(result)
        assert set(np.unique(arr).tolist()) <= {0, 1}
        return arr > 0

    def labels_of(self, model: str, answer: Dict[str, Any]) -> List[str]:
        labels = answer.get("label_names") or self.info["models"][model].get("labels")  # :1646-1650
        if isinstance(labels, dict):
            labels = [k for k, _ in sorted(labels.items(), key=lambda item: item[1])]
        return [x for x in labels if x != "background"]

    def run(self) -> np.ndarray:
        """Auto Segmentation's Run (onClickSegmentation, :1624-1664): a local volume is uploaded first."""
        if self.sample.get("session"):
            self.upload()
        model = self.auto_model()
        path, answer = self.infer(model, self.options("infer", model))
        labels = self.labels_of(model, answer)
        assert labels == ["brain"], labels
        self.segments["brain"] = self.read_answer(path)  # imported over the whole segment (:1897-1921)
        return self.segments["brain"]

    def smart_edit(self, foreground, background, roi=None, segment: str = "brain") -> np.ndarray:
        """SmartEdit with a 3D deepgrow model (onClickDeepgrow, :1669-1802): points as [i, j, k] voxel indices,
        the segment's name as ``label``, no file; the answer replaces the segment (no slice, no freeze)."""
        model = next(k for k, v in self.info["models"].items() if v["type"] in ("deepgrow", "deepedit"))
        assert model == CLICKS and self.info["models"][model].get("dimension", 3) == 3
        params = {"label": segment, "foreground": foreground, "background": background}  # :1759-1763
        params.update(self.options("infer", model))  # :1767
        if roi:
            params["roi"] = roi  # :1768-1769
        path, answer = self.infer(model, params)
        assert self.labels_of(model, {}) == [segment]
        self.segments[segment] = self.read_answer(path)
        return self.segments[segment]

    def scribbles(self, fg: np.ndarray, bg: np.ndarray, roi: Optional[list] = None) -> np.ndarray:
        """Scribbles' Update (onUpdateScribbles, :2068-2143): every segment exported to one labelmap (values in
        segment order), the strokes being two more segments (:2040-2052); the answer replaces the segment."""
        self.segments.setdefault("background_scribbles", np.zeros(self.shape, bool))
        self.segments.setdefault("foreground_scribbles", np.zeros(self.shape, bool))
        self.segments["background_scribbles"] = bg
        self.segments["foreground_scribbles"] = fg
        names = list(self.segments)
        label_file = self.write_labelmap(names)
        label_info = [{"name": n, "id": i + 1} for i, n in enumerate(names)]  # :2089-2092
        target = next(n for n in names if n not in ("background", "foreground_scribbles", "background_scribbles"))
        model = next(k for k, v in self.info["models"].items() if v["type"] == "scribbles")
        params = self.options("infer", model)
        params.update({"roi": roi or [], "label_info": label_info, "selected_label_name": target})  # :2111-2116
        path, answer = self.infer(model, params, label_file=label_file)
        self.segments[target] = self.read_answer(path)
        self.segments["background_scribbles"] = np.zeros(self.shape, bool)  # cleared before saving (:1526, :2174)
        self.segments["foreground_scribbles"] = np.zeros(self.shape, bool)
        return self.segments[target]

    # -- Submit Label (onSaveLabel, :1522-1613)
    def write_labelmap(self, names: List[str]) -> str:
        """ExportSegmentsToLabelmapNode + saveNode (:1559-1574): the listed segments numbered 1, 2, ... on the
        volume's grid, written by ITK in the File Extension (a .seg.nrrd: the segmentation node itself)."""
        import SimpleITK as sitk

        values = np.zeros(self.shape, np.int16)
        for i, n in enumerate(names):
            values[self.segments[n]] = i + 1
        path = tempfile.NamedTemporaryFile(suffix=self.file_ext, dir=self.tmpdir, delete=False).name
        if self.file_ext == ".seg.nrrd":
            img = sitk.GetImageFromArray(values.astype(np.uint8))
            img.CopyInformation(self.volume)
            for i, n in enumerate(names):  # the keys vtkMRMLSegmentationStorageNode writes for each segment
                for key, value in (("ID", n), ("Name", n), ("LabelValue", i + 1), ("Layer", 0),
                                   ("Color", "0.5 0.5 0.5"), ("Tags", "|"), ("NameAutoGenerated", 0),
                                   ("ColorAutoGenerated", 1)):
                    img.SetMetaData(f"Segment{i}_{key}", str(value))
                img.SetMetaData(f"Segment{i}_Extent", " ".join(f"0 {s - 1}" for s in self.volume.GetSize()))
            img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
            img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
            img.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
        else:
            img = sitk.GetImageFromArray(values)
            img.CopyInformation(self.volume)
        sitk.WriteImage(img, path, True)
        return path

    def submit(self) -> Dict[str, Any]:
        if self.sample.get("session"):
            self.upload()
        names = [n for n in self.segments if n not in ("background", "foreground_scribbles", "background_scribbles")]
        label_info = [{"name": n, "idx": list(self.segments).index(n) + 1} for n in names]  # :1547-1556
        label_file = self.write_labelmap(list(self.segments) if self.file_ext == ".seg.nrrd" else names)
        model = self.auto_model()  # segmentationModelSelector.currentText
        answer = self.client.save_label(self.sample["id"], label_file, params={"label_info": label_info, "model": model})
        self.fetch_info()  # :1583
        return answer

    # -- Train (onTraining :1179-1219, monitorTraining :502-533)
    def train(self, edits: Dict[str, Any]) -> Dict[str, Any]:
        assert self.info["datastore"]["completed"] > 0  # the Train button is enabled only then (:660)
        return self.client.train_start(MODEL, self.options("train", MODEL, edits))

    def wait_training(self, timeout: float = 900) -> Dict[str, Any]:
        """monitorTraining polls GET /train/ until the status is no longer RUNNING (a training just submitted is
        SUBMITTED for a moment, when ``check_if_running`` still says no)."""
        status = _training_done(self.client, timeout)
        self.fetch_info()
        return status


def _training_done(client, timeout: float = 900) -> Dict[str, Any]:
    return wait_for(lambda: (s := client.train_status())["status"] not in ("SUBMITTED", "RUNNING") and s, timeout,
                    "the training", interval=2.0)


def _q(s: str) -> str:
    from urllib.parse import quote_plus

    return quote_plus(s)


def _itk_ball(shape, centre, radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _zyx(ijk) -> tuple:
    """A Slicer IJK index [i, j, k] as an index of the (z, y, x) array ITK gives."""
    return tuple(int(x) for x in ijk[::-1])


def _ijk(zyx) -> List[int]:
    return [int(x) for x in zyx[::-1]]


def _deepest(mask: np.ndarray, spacing_zyx) -> tuple:
    from scipy import ndimage as ndi

    return np.unravel_index(np.argmax(ndi.distance_transform_edt(mask, sampling=spacing_zyx)), mask.shape)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    c = stage(tmp_path_factory.mktemp("slicer_plugin"))
    # a second patient, for two volumes under one node name: another head and another size than colin_eval
    c.other = c.root / "other_patient.nii.gz"
    crop(SAMPLE / "imagesTs" / "itk_kmeanstest_t1.nii.gz", ((32, 96), (28, 32), (8, 30)), c.other)
    try:
        c.server.start(host="127.0.0.1")
        yield c
    finally:
        c.server.stop()


@pytest.fixture(scope="module")
def trained(ctx):
    """Weights for the tests that need them: the cold-start test's, or one epoch on two ground-truth labels."""
    if not ctx.weights.is_file():
        from monailabel.client import MONAILabelClient

        client = MONAILabelClient(ctx.server.url, tmpdir=str(ctx.client_dir))
        for vid in ("colin_a", "colin_b"):
            client.save_label(vid, str(ctx.gt / f"{vid}.nii.gz"), tag="final")
        client.train_start(MODEL, {"max_epochs": 1, "val_interval": 1})
        status = _training_done(client)
        assert status["status"] == "DONE", status.get("details", [])[-20:]
    assert ctx.weights.is_file()
    return ctx


# ----------------------------------------------------------------------------------------------- tests
def test_cold_start_no_weights_submit_train_run(ctx):
    """README's cold start from Slicer: no weights -> Run says what to do -> Submit Label -> Train -> Run."""
    from monailabel.client.client import MONAILabelClientException

    assert not ctx.weights.exists(), "this test needs the server without weights: run it first or alone"
    plugin = SlicerPlugin(ctx)
    info = plugin.fetch_info()
    assert "NO TRAINED WEIGHTS" in info["models"][MODEL]["description"]
    sample = plugin.next_sample()
    assert plugin.auto_model() == MODEL

    with pytest.raises(MONAILabelClientException) as e:  # Next Sample runs Auto Segmentation by itself
        plugin.run()
    msg = e.value.msg
    assert status_of(e.value) == 409, msg
    assert f"Model '{MODEL}' has no trained weights yet" in msg and "'bundle'" not in msg, msg
    assert "Train" in msg and str(ctx.root) not in msg, msg  # what to do; no server path

    # the clinician draws the brain (here: the ground truth) and submits it in Slicer's default format (.nii.gz)
    import SimpleITK as sitk

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(ctx.gt / f"{sample['id']}.nii.gz"))) > 0
    plugin.segments["brain"] = truth
    saved = plugin.submit()
    assert saved.get("image") == sample["id"] or sample["id"] in json.dumps(saved), saved
    assert plugin.info["datastore"]["completed"] == 1

    started = plugin.train({"max_epochs": 1, "val_interval": 1})  # the Options table, developer mode
    assert started.get("status") in ("SUBMITTED", "RUNNING", "DONE"), started
    status = plugin.wait_training()
    assert status["status"] == "DONE", status.get("details", [])[-20:]
    assert plugin.info["models"][MODEL]["weights"]["available"] is True
    assert plugin.info["train_stats"][MODEL].get("total_epochs") == 1  # what the training bar reads (:502-533)

    mask = plugin.run()
    assert mask.shape == truth.shape


def test_two_volumes_uploaded_under_one_node_name(trained):
    """Two patients' volumes open in Slicer under the same node name, one after the other. The first goes up
    with a session (SmartEdit before Run), then permanently on Run; the second must never replace it nor end up
    with its label: the upload is refused (Slicer then stops before Run), or what Run gets back is on the
    second volume's grid. The same volume uploaded again under its name (a new Slicer session) is accepted.
    File Extension .seg.nrrd: the label is the segmentation node itself, and the volumes go up as .seg.nrrd too."""
    import SimpleITK as sitk
    from monailabel.client.client import MONAILabelClientException

    c = trained
    first = SlicerPlugin(c, file_ext=".seg.nrrd")  # then every file it sends ends in .seg.nrrd, volumes too (:1427)
    first.fetch_info()
    first.load_local(c.eval_images / "colin_eval.nii.gz", NODE)

    # SmartEdit before Run: the volume goes up as a session (getSessionId), not into the studies
    before = set(first.client.datastore()["objects"])
    centre = [s // 2 for s in first.volume.GetSize()]
    first.smart_edit([centre], [])
    assert first.sample.get("session_id") and NODE not in first.client.datastore()["objects"]
    assert set(first.client.datastore()["objects"]) == before and first.segments["brain"][_zyx(centre)]

    mask_a = first.run()  # Run: PUT /datastore/?image=<node name>, then infer on that id
    assert NODE in first.client.datastore()["objects"] and first.sample["session"] is False
    truth_a = sitk.GetArrayFromImage(sitk.ReadImage(str(c.eval_labels / "colin_eval.nii.gz"))) > 0
    first.segments["brain"] = truth_a
    first.submit()
    stored_a = _stored(c, NODE)
    np.testing.assert_array_equal(stored_a["label"], truth_a)
    volume_a = sitk.GetArrayFromImage(first.volume)
    np.testing.assert_array_equal(stored_a["image"], volume_a)

    # the same volume again under its name (Slicer restarted): accepted, same answer
    again = SlicerPlugin(c, file_ext=".seg.nrrd")
    again.fetch_info()
    again.load_local(c.eval_images / "colin_eval.nii.gz", NODE)
    np.testing.assert_array_equal(again.run(), mask_a)

    # another patient, same node name
    second = SlicerPlugin(c)
    second.fetch_info()
    second.load_local(c.other, NODE)
    assert second.shape != first.shape
    try:
        mask_b = second.run()
    except MONAILabelClientException as e:  # Slicer shows "Failed to upload volume to Server.\n<msg>", no Run
        assert status_of(e) == 409 and NODE in e.msg, e.msg  # a conflict, naming the volume
        assert second.sample["session"] is True, "the refusal must come from the upload, before any infer"
    else:  # accepted: the plugin then infers on the node name, so that id must now be this volume (read_answer
        assert mask_b.shape == second.shape  # checks the grid: a mask of the first patient fails there)
    stored = _stored(c, NODE)
    np.testing.assert_array_equal(stored["image"], volume_a)  # the first patient's volume and label, together
    np.testing.assert_array_equal(stored["label"], truth_a)
    for vid, obj in first.client.datastore()["objects"].items():  # no label anywhere on another volume's grid
        if "final" in obj.get("labels", {}):
            both = _stored(c, vid)
            assert both["label"].shape == both["image"].shape, vid

    # the way out: the node renamed, the second volume goes up under its own id
    second.sample = {"id": NODE + " (2)", "session": True}
    mask_b = second.run()
    assert mask_b.shape == second.shape  # on the second volume's grid


def _stored(c, image_id: str) -> Dict[str, np.ndarray]:
    """The image and final label the server holds for ``image_id`` (what Next Sample and training read)."""
    import SimpleITK as sitk

    out = {}
    for key, selector in (("image", f"/datastore/image?image={_q(image_id)}"),
                          ("label", f"/datastore/label?label={_q(image_id)}&tag=final")):
        status, body = http(c, "GET", selector)
        assert status == 200, (selector, status, body)
        suffix = ".nrrd" if body[:4] == b"NRRD" else ".nii.gz" if body[:2] == b"\x1f\x8b" else ".nii"
        path = Path(tempfile.mkdtemp(dir=c.client_dir)) / f"{key}{suffix}"
        path.write_bytes(body)
        out[key] = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    out["label"] = out["label"] > 0
    return out


def test_smartedit_says_what_a_click_replaces_and_honours_the_roi(trained):
    """Item 6: SmartEdit sends no segment, so its answer replaces the whole segment: /info/ says so. The ROI the
    plugin sends confines the change, and a click outside it is refused with a message, not ignored."""
    from monailabel.client.client import MONAILabelClientException

    plugin = SlicerPlugin(trained)
    info = plugin.fetch_info()
    description = info["models"][CLICKS]["description"]
    assert "replaces the whole segment" in description and "Segment Editor" in description
    assert "ROI" in description
    plugin.next_sample()
    auto = plugin.run()
    spacing = plugin.volume.GetSpacing()[::-1]
    inside_zyx = _deepest(auto, spacing)
    click = _ijk(inside_zyx)
    size = plugin.volume.GetSize()
    roi = []  # getROIPointsXYZ (:2145-2172): [i0, i1, j0, j1, k0, k1], a pair reversed where the axis is flipped
    for a, x in enumerate(click):
        lo, hi = max(x - 3, 0), min(x + 4, size[a])
        roi += [hi, lo] if a == 0 else [lo, hi]
    got = plugin.smart_edit([], [click], roi=roi)
    box = np.zeros(auto.shape, bool)
    box[tuple(slice(min(roi[2 * a], roi[2 * a + 1]), max(roi[2 * a], roi[2 * a + 1])) for a in (2, 1, 0))] = True
    assert not got[inside_zyx] and auto[inside_zyx]  # the background click took
    np.testing.assert_array_equal(got[~box], auto[~box])  # nothing outside the ROI changed
    far = _ijk(np.unravel_index(np.argmax(np.where(box, -1, np.indices(auto.shape).sum(0))), auto.shape))
    with pytest.raises(MONAILabelClientException) as e:
        plugin.smart_edit([far], [click], roi=roi)
    assert status_of(e.value) == 422 and "outside the ROI" in e.value.msg, e.value.msg

    # 'label' is read only as the file uploaded with the request: a server path in the JSON is never opened
    other = str(trained.gt / "colin_a.nii.gz")  # another patient's label, on the server's disk
    with pytest.raises(MONAILabelClientException) as e:
        plugin.infer(SCRIBBLES, {"label": other, "label_info": [], "selected_label_name": "brain", "roi": []})
    assert status_of(e.value) == 422 and other not in e.value.msg, e.value.msg


def test_clinician_round_next_sample_run_smartedit_scribbles_submit_nrrd_train_run(trained):
    """The whole round in Slicer with File Extension .nrrd: Next Sample -> Run -> SmartEdit -> a hand edit ->
    Scribbles (the hand edit kept) -> Submit Label (.nrrd) -> Train -> Run with the new weights."""
    import SimpleITK as sitk

    c = trained
    plugin = SlicerPlugin(c, file_ext=".nrrd")
    plugin.fetch_info()
    sample = plugin.next_sample()
    auto = plugin.run()
    spacing = plugin.volume.GetSpacing()[::-1]
    assert auto.any()

    # SmartEdit: a foreground click on the unlabeled voxel farthest from the mask, a background one deep inside
    fg_zyx, bg_zyx = _deepest(~auto, spacing), _deepest(auto, spacing)
    edited = plugin.smart_edit([_ijk(fg_zyx)], [_ijk(bg_zyx)])
    assert edited[fg_zyx] and not edited[bg_zyx]

    # a hand edit with the Segment Editor, then Scribbles: a background stroke far from the edit
    hand = _itk_ball(auto.shape, fg_zyx, 1.5)
    plugin.segments["brain"] = edited | hand
    from scipy import ndimage as ndi

    mm_to_hand = ndi.distance_transform_edt(~hand, sampling=spacing)
    candidates = np.argwhere(edited & (mm_to_hand > 33))  # strokes reach 30 mm
    assert len(candidates), "no voxel of the mask far enough from the hand edit"
    stroke_at = tuple(candidates[len(candidates) // 2])
    bg = np.zeros(auto.shape, bool)
    bg[stroke_at[0], stroke_at[1], max(stroke_at[2] - 1, 0) : stroke_at[2] + 2] = True
    after = plugin.scribbles(np.zeros(auto.shape, bool), bg)
    assert not after[bg].any()  # the stroke took
    assert after[hand].all()  # the hand edit, out of the stroke's reach, is kept

    # Submit Label as .nrrd, stored as sent
    plugin.submit()
    stored = _stored(c, sample["id"])
    np.testing.assert_array_equal(stored["label"], after)
    assert plugin.info["datastore"]["completed"] >= 2

    before = c.weights.stat().st_mtime_ns
    plugin.train({"max_epochs": 1, "val_interval": 1, "keep_better_model": False})
    status = plugin.wait_training()
    assert status["status"] == "DONE", status.get("details", [])[-20:]
    assert c.weights.stat().st_mtime_ns != before  # new weights written
    path, answer = plugin.infer(MODEL, plugin.options("infer", MODEL))
    plugin.read_answer(path)
    weights = answer.get("weights", {})
    assert weights.get("mtime_ns", c.weights.stat().st_mtime_ns) == c.weights.stat().st_mtime_ns
    assert sitk.ReadImage(path).GetSize() == plugin.volume.GetSize()
