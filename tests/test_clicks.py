"""Click- and scribble-guided correction (monailabel_app/lib/infers/clicks.py) on a real head: the held-out ITK T1
and its brain mask, with a network output made wrong on purpose (a ball of brain missed, a ball of scalp taken)."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "sample_data" / "imagesTs" / "itk_kmeanstest_t1.nii.gz"
LABEL = ROOT / "sample_data" / "labelsTs" / "itk_kmeanstest_t1.nii.gz"


@pytest.fixture(scope="module")
def clicks_module():
    sys.path.insert(0, str(ROOT / "monailabel_app"))
    try:
        from lib.errors import BadInput
        from lib.infers.clicks import ClickRefined, ScribblesRefined

        yield ClickRefined, BadInput, ScribblesRefined
    finally:
        sys.path.remove(str(ROOT / "monailabel_app"))


@pytest.fixture(scope="module")
def case():
    lab = nib.load(LABEL)
    gt = np.asarray(lab.dataobj) > 0
    grid = np.indices(gt.shape)
    centre = np.array(np.nonzero(gt)).mean(1).astype(int)
    inside = np.array(np.nonzero(ndi.binary_erosion(gt, iterations=8)))
    hole_c = inside[:, np.argmin(((inside.T - centre - [0, 0, 8]) ** 2).sum(1))]  # deep in the brain, above centre
    hole = sum((g - c) ** 2 for g, c in zip(grid, hole_c)) <= 7**2
    outside = np.array(np.nonzero(~ndi.binary_dilation(gt, iterations=4) & (np.asarray(nib.load(IMAGE).dataobj) > 0)))
    far = outside[:, np.argmax(((outside.T - centre) ** 2).sum(1) * (outside[2] == centre[2]))]  # scalp, mid-height
    blob = sum((g - c) ** 2 for g, c in zip(grid, far)) <= 4**2
    wrong = (gt & ~hole) | blob  # a network that missed a ball of brain and took a ball of scalp
    missed = gt & ~wrong
    # soft like a network's softmax: 0.5 on the wrong mask's border, 0.02 / 0.98 two voxels away
    p1 = np.clip(ndi.gaussian_filter(wrong.astype(np.float32), 1.0), 0.02, 0.98).astype(np.float32)
    fg_click = hole_c
    prob = MetaTensor(torch.from_numpy(np.stack([1 - p1, p1])), affine=torch.as_tensor(lab.affine))
    assert missed[tuple(fg_click)]
    return {"gt": gt, "wrong": p1 > 1 - p1, "hole": hole & gt, "blob": blob, "prob": prob, "fg": fg_click.tolist(),
            "bg": far.tolist(), "affine": lab.affine}


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _refine(ClickRefined, case, **request):
    out = ClickRefined(keys="pred")({"pred": case["prob"].clone(), "image_path": str(IMAGE), **request})["pred"]
    assert out.shape == case["prob"].shape and isinstance(out, MetaTensor)
    return (out[1] > out[0]).numpy()


def test_clicks_fix_the_errors_they_point_at_and_nothing_far_away(clicks_module, case):
    ClickRefined, _, _ = clicks_module
    none = _refine(ClickRefined, case)
    assert np.array_equal(none, case["wrong"])  # no clicks: the automatic segmentation, voxel for voxel

    before = _dice(case["wrong"], case["gt"])
    after = _refine(ClickRefined, case, foreground=[case["fg"]], background=[case["bg"]])
    assert after[tuple(case["fg"])] and not after[tuple(case["bg"])]
    assert _dice(after, case["gt"]) > before + 0.001, (before, _dice(after, case["gt"]))  # 0.9935 -> 0.9952

    # only voxels within roi_margin_mm (30 mm) of a click may change
    spacing = np.linalg.norm(case["affine"][:3, :3], axis=0)
    grid = np.indices(case["gt"].shape)
    dist = np.minimum(*[np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, q, spacing))) for q in (case["fg"], case["bg"])])
    changed = after != case["wrong"]
    assert changed.any() and dist[changed].max() <= 30.0 + 1e-6

    # the blob is gone, the missed ball is mostly back
    assert not (after & ~ndi.binary_dilation(case["gt"], iterations=4)).any()
    assert (after & case["hole"]).sum() > 0.9 * case["hole"].sum()


def test_bad_clicks_are_the_clients_error(clicks_module, case):
    ClickRefined, BadInput, _ = clicks_module
    shape = list(case["gt"].shape)
    with pytest.raises(BadInput, match=rf"foreground click \[500, 1, 1\] is outside the image \(size {shape}\)".replace("[", r"\[").replace(r"\\[", r"\[")):
        _refine(ClickRefined, case, foreground=[[500, 1, 1]])
    with pytest.raises(BadInput, match="background click 'x' is not a voxel index"):
        _refine(ClickRefined, case, background=["x"])
    with pytest.raises(BadInput, match="'foreground' must be a list"):
        _refine(ClickRefined, case, foreground="10,10,10")
    with pytest.raises(BadInput, match="'lamda' must be a number"):
        _refine(ClickRefined, case, foreground=[case["fg"]], lamda="strong")


def _mm_to(mask, affine):
    """Distance in mm of every voxel to the nearest voxel of ``mask`` (an independent brute-force check)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    grid = np.indices(mask.shape).reshape(3, -1).T * spacing
    pts = np.argwhere(mask) * spacing
    best = np.full(len(grid), np.inf)
    for p in pts:
        best = np.minimum(best, ((grid - p) ** 2).sum(1))
    return np.sqrt(best).reshape(mask.shape)


def test_scribbles_correct_the_users_segmentation_near_the_strokes_only(clicks_module, case, tmp_path):
    """What Slicer's Scribbles tool sends: the whole segmentation as one label volume (the user's brain segment,
    strokes painted over it), label_info naming the values, the segment to correct and an optional ROI."""
    _, BadInput, ScribblesRefined = clicks_module
    shape = case["gt"].shape
    user = case["wrong"].copy()
    c = np.array(np.nonzero(case["gt"])).mean(1).astype(int)
    edit = np.zeros(shape, bool)  # a manual edit far from the strokes that the network does not know of
    edit[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, max(c[2] - 14, 0) : max(c[2] - 10, 1)] = True
    user &= ~edit
    fg_stroke, bg_stroke = np.zeros(shape, bool), np.zeros(shape, bool)
    f, b = case["fg"], case["bg"]
    fg_stroke[f[0] - 4 : f[0] + 5, f[1], f[2]] = True  # a line through the missed ball
    bg_stroke[b[0], b[1] - 2 : b[1] + 3, b[2]] = True  # a line through the scalp blob
    assert not (edit & (_mm_to(fg_stroke | bg_stroke, case["affine"]) <= 30)).any()  # the edit is out of reach

    uploads = [str(tmp_path)]  # where the server saves uploaded files (here: the test's folder)

    def refine(values, **request):
        path = tmp_path / "tmp_scribbles.nii.gz"
        nib.save(nib.Nifti1Image(values.astype(np.uint8), case["affine"]), path)
        d = {"pred": case["prob"].clone(), "image_path": str(IMAGE), "label": str(path), **request}
        out = ScribblesRefined(keys="pred", target="brain", upload_dirs=uploads)(d)["pred"]
        return (out[1] > out[0]).numpy()

    info = [{"name": "brain", "id": 1}, {"name": "background_scribbles", "id": 2}, {"name": "foreground_scribbles", "id": 3}]
    req = {"label_info": info, "selected_label_name": "brain"}
    assert np.array_equal(refine(user.astype(int), **req), user)  # no strokes: the user's segmentation, unchanged

    values = user.astype(int)
    values[bg_stroke], values[fg_stroke] = 2, 3  # Slicer paints over the segment
    after = refine(values, **req)
    assert after[fg_stroke].all() and not after[bg_stroke].any()
    assert not (after & case["blob"]).any() and (after & case["hole"]).sum() > 0.9 * case["hole"].sum()
    assert _dice(after, case["gt"]) > _dice(user, case["gt"]) + 0.001, (_dice(user, case["gt"]), _dice(after, case["gt"]))
    changed = after != user
    changed[fg_stroke] = False  # painted over: not in the user's segment any more
    assert changed.any() and _mm_to(fg_stroke | bg_stroke, case["affine"])[changed].max() <= 30.0 + 1e-6
    assert not after[edit].any()  # the manual edit is kept (the network would undo it)

    # values named by label_info, not fixed: swap the ids, same result
    swapped = np.select([values == 1, values == 2, values == 3], [4, 6, 5], 0)
    info2 = [{"name": "brain", "id": 4}, {"name": "foreground_scribbles", "id": 5}, {"name": "background_scribbles", "id": 6}]
    assert np.array_equal(refine(swapped, label_info=info2, selected_label_name="brain"), after)

    # no segment sent: the network's segmentation is corrected; an ROI (bounds in any order, as Slicer's RAS->IJK
    # gives them): strokes outside it are ignored and nothing outside it changes
    only_strokes = np.where(fg_stroke, 3, np.where(bg_stroke, 2, 0))
    assert b[2] == c[2] < f[2]
    roi = [shape[0], 0, 0, shape[1], 0, int(c[2]) + 1]
    boxed = refine(only_strokes, roi=roi, label_info=info[1:], selected_label_name="brain")
    kept = case["wrong"] | fg_stroke  # outside the ROI: the network's mask, the painted voxels taking their class
    assert np.array_equal(boxed[:, :, c[2] + 1 :], kept[:, :, c[2] + 1 :])  # the rest of the missed ball stays missed
    assert not (boxed & case["blob"])[:, :, : c[2] + 1].any() and (case["wrong"] & case["blob"])[:, :, c[2] + 1 :].any()
    # a stroke painted over the segment outside the ROI leaves no hole there
    over = user.astype(int)
    inner = ndi.binary_erosion(user, iterations=3) & (np.indices(shape)[2] == c[2] + 4)
    stroke_over = np.zeros(shape, bool)
    stroke_over[tuple(np.argwhere(inner)[:5].T)] = True
    over[stroke_over] = 3
    assert refine(over, roi=roi, **req)[stroke_over].all()

    # label_info without stroke names: its values are segments, not strokes (here a "skull" segment numbered 2)
    skull = np.where(values == 2, 2, user.astype(int))
    assert np.array_equal(refine(skull, label_info=[{"name": "brain", "id": 1}, {"name": "skull", "id": 2}],
                                 selected_label_name="brain"), skull == 1)

    with pytest.raises(BadInput, match="must be on the image's grid"):
        path = tmp_path / "tmp_small.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), case["affine"]), path)
        ScribblesRefined(keys="pred", upload_dirs=uploads)({"pred": case["prob"].clone(), "image_path": str(IMAGE), "label": str(path)})
    with pytest.raises(BadInput, match="scribbles need the segmentation"):
        ScribblesRefined(keys="pred", upload_dirs=uploads)({"pred": case["prob"].clone(), "image_path": str(IMAGE)})
    with pytest.raises(BadInput, match="'roi' must be voxel bounds"):
        refine(values, roi=["a"] * 6, **req)
    with pytest.raises(BadInput, match="'roi' must be voxel bounds"):
        refine(values, roi={"x": 1}, **req)
    with pytest.raises(BadInput, match="needs an integer 'id'"):
        refine(values, label_info=[{"name": "brain", "id": "one"}])
    with pytest.raises(BadInput, match="same id 2"):
        refine(values, label_info=[{"name": "foreground_scribbles", "id": 2}, {"name": "background_scribbles", "id": 2}])
    with pytest.raises(BadInput, match="'selected_label_name' must be a segment name"):
        refine(values, label_info=info, selected_label_name=["brain"])
    with pytest.raises(BadInput, match=r"has shape \[.*\], the image .*must be on the image's grid"):
        refine(values.transpose(2, 1, 0), **req)  # the same number of voxels, axes swapped
    with pytest.raises(BadInput, match="not its position/orientation"):
        path = tmp_path / "tmp_shifted.nii.gz"
        shifted = case["affine"].copy()
        shifted[:3, 3] += 5.0
        nib.save(nib.Nifti1Image(values.astype(np.uint8), shifted), path)
        ScribblesRefined(keys="pred", upload_dirs=uploads)({"pred": case["prob"].clone(), "image_path": str(IMAGE), "label": str(path)})
    with pytest.raises(BadInput, match="the scribbles label could not be read") as e:
        path = tmp_path / "tmp_broken.nii.gz"
        path.write_bytes(b"not a volume")
        ScribblesRefined(keys="pred", upload_dirs=uploads)({"pred": case["prob"].clone(), "image_path": str(IMAGE), "label": str(path)})
    assert str(tmp_path) not in str(e.value)  # no server paths in client messages


def test_clicks_correct_the_segment_sent_and_stay_inside_the_roi(clicks_module, case, tmp_path):
    """Item 6 of issue 15: a request that uploads the current segmentation gets it corrected near the clicks (a hand
    edit far away survives); an ROI confines the change and a click outside it is refused, never ignored."""
    ClickRefined, BadInput, _ = clicks_module
    shape = case["gt"].shape
    c = np.array(np.nonzero(case["gt"])).mean(1).astype(int)
    edit = np.zeros(shape, bool)  # erased by hand, far from both clicks
    edit[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, max(c[2] - 14, 0) : max(c[2] - 10, 1)] = True
    clicks = {"foreground": [case["fg"]], "background": [case["bg"]]}
    assert not (edit & (_mm_to(_click_mask(shape, clicks), case["affine"]) <= 30)).any()  # out of the clicks' reach
    user = case["wrong"] & ~edit
    path = tmp_path / "tmp_segment.nii.gz"  # the name MONAI Label gives an uploaded file
    nib.save(nib.Nifti1Image(user.astype(np.uint8), case["affine"]), path)

    def refine(**request):
        d = {"pred": case["prob"].clone(), "image_path": str(IMAGE), **clicks, **request}
        out = ClickRefined(keys="pred", target="brain", upload_dirs=[str(tmp_path)])(d)["pred"]
        return (out[1] > out[0]).numpy()

    plain = refine(label="brain")  # what SmartEdit sends: the segment's name, no file: the network's mask corrected
    assert plain[edit].any() and plain[tuple(case["fg"])] and not plain[tuple(case["bg"])]
    kept = refine(label=str(path))  # the current segmentation uploaded: corrected near the clicks, the edit kept
    assert not kept[edit].any() and kept[tuple(case["fg"])] and not kept[tuple(case["bg"])]
    assert np.array_equal(kept | edit, plain | edit)  # the same correction, on the segment sent
    named = refine(label=str(path), label_info=[{"name": "brain", "id": 1}], selected_label_name="brain")
    assert np.array_equal(named, kept)

    # an ROI around the foreground click only: the background click is outside it -> 422 naming it
    f = case["fg"]
    roi = [f[0] + 12, f[0] - 12, f[1] - 12, f[1] + 12, f[2] - 12, f[2] + 12]  # bounds in any order, as Slicer sends
    with pytest.raises(BadInput, match=r"background click \[.*\] is outside the ROI .* delete the ROI"):
        refine(label="brain", roi=roi)
    clicks.pop("background")
    boxed = refine(label="brain", roi=roi)
    inside = np.zeros(shape, bool)
    inside[f[0] - 12 : f[0] + 12, f[1] - 12 : f[1] + 12, f[2] - 12 : f[2] + 12] = True
    assert np.array_equal(boxed[~inside], case["wrong"][~inside]) and boxed[tuple(f)]
    assert (boxed != case["wrong"]).any()
    with pytest.raises(BadInput, match="does not overlap the image"):
        refine(label="brain", roi=[-9, -5, 0, 4, 0, 4])
    with pytest.raises(BadInput, match="'roi' must be voxel bounds"):
        refine(label="brain", roi="everywhere")


def test_a_path_in_the_request_json_is_never_opened(clicks_module, case, tmp_path):
    """``label`` is read only when it is the file the server saved for this request's upload: a path written into
    the request's JSON (another patient's label, any server file) is refused (scribbles) or taken as a segment name
    (clicks), never read."""
    ClickRefined, BadInput, ScribblesRefined = clicks_module
    other = tmp_path / "tmp_other_patient.nii.gz"  # exists and fits the grid, but was not uploaded with the request
    nib.save(nib.Nifti1Image(np.zeros(case["gt"].shape, np.uint8), case["affine"]), other)
    uploads = [str(tmp_path / "uploads")]
    for label in (str(other), str(LABEL), str(tmp_path / "uploads" / ".." / other.name), "/etc/hostname"):
        d = {"pred": case["prob"].clone(), "image_path": str(IMAGE), "label": label}
        with pytest.raises(BadInput, match="uploaded with the request"):
            ScribblesRefined(keys="pred", upload_dirs=uploads)(dict(d))
        out = ClickRefined(keys="pred", upload_dirs=uploads)({**d, "foreground": [case["fg"]]})["pred"]
        assert (out[1] > out[0]).numpy()[case["wrong"]].mean() > 0.99  # the network's mask, the empty file unread


def _click_mask(shape, clicks):
    mask = np.zeros(shape, bool)
    for points in clicks.values():
        for q in points:
            mask[tuple(q)] = True
    return mask


def _loop_script():
    sys.path.insert(0, str(ROOT / "monailabel_app"))
    try:
        import active_learning_loop
    finally:
        sys.path.remove(str(ROOT / "monailabel_app"))
    return active_learning_loop


def _cube() -> np.ndarray:
    truth = np.zeros((20, 20, 20), bool)
    truth[4:16, 4:16, 4:16] = True
    return truth


def test_loop_script_clicks_the_deepest_voxel_of_the_largest_error():
    next_click = _loop_script().next_click
    truth = _cube()
    pred = truth.copy()
    pred[4:16, 4:16, 4:9] = False  # 720 voxels missed
    pred[0:3, 0:3, 0:3] = True  # 27 voxels taken
    kind, voxel = next_click(pred, truth)
    assert kind == "foreground" and not pred[tuple(voxel)] and truth[tuple(voxel)]
    assert voxel[2] == 6 and 6 <= voxel[0] <= 13 and 6 <= voxel[1] <= 13  # 3 voxels deep: the slab's deepest
    pred[4:16, 4:16, 4:9] = True
    assert next_click(pred, truth) == ("background", [1, 1, 1])
    assert next_click(truth, truth) is None


def test_loop_script_strokes_paint_inside_the_error_they_point_at():
    loop = _loop_script()
    next_click, next_stroke = loop.next_click, loop.next_stroke
    truth = _cube()
    pred = truth.copy()
    pred[4:16, 4:16, 4:9] = False  # missed slab: a foreground stroke of 9 voxels along axis 0, inside it
    kind, stroke = next_stroke(pred, truth)
    assert kind == "foreground" and 5 <= stroke.sum() <= 9 and (truth & ~pred)[stroke].all()
    assert stroke[tuple(next_click(pred, truth)[1])]  # through the voxel an annotator would click
    assert len(set(map(tuple, np.argwhere(stroke)[:, 1:]))) == 1  # one line along the first axis
    pred = truth.copy()
    pred[0:3, 0:3, 0:3] = True  # a 3-voxel-wide false positive: the stroke stays inside it
    kind, stroke = next_stroke(pred, truth)
    assert kind == "background" and stroke.sum() == 3 and (pred & ~truth)[stroke].all()
    assert next_stroke(truth, truth) is None


def test_the_cut_scales_the_image_as_the_bundles_preprocessing_does(tmp_path):
    """The graph cut sees the image scaled to 0..1 between the percentiles of the bundle's own
    ScaleIntensityRangePercentilesd: change them in the bundle's inference.json and the click and scribble tasks
    follow (read from the parsed config, nothing from the request)."""
    import json
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "bundle" / "configs", bundle / "configs")
    path = bundle / "configs" / "inference.json"
    cfg = json.loads(path.read_text())
    scale = next(t for t in cfg["preprocessing"]["transforms"] if t["_target_"] == "ScaleIntensityRangePercentilesd")
    assert (scale["lower"], scale["upper"]) == (0.5, 99.5)  # the shipped bundle
    scale["lower"], scale["upper"] = 5.0, 90.0
    path.write_text(json.dumps(cfg))
    sys.path.insert(0, str(ROOT / "monailabel_app"))
    try:
        from lib.infers.clicks import ClickRefined, MedURWKVClicks, MedURWKVScribbles
        from lib.infers.edit import EditRefined, MedURWKVEdit
        from lib.runtime import ModelRuntime
    finally:
        sys.path.remove(str(ROOT / "monailabel_app"))
    runtime = ModelRuntime(str(bundle), {})
    refiners = [MedURWKVClicks(runtime, {}).refiner(), MedURWKVScribbles(runtime, {}).refiner()]
    assert [r.percentiles for r in refiners] == [(5.0, 90.0)] * 2
    # Med-URWKV-Edit's graph cut after its network: the same percentiles, and the app's --conf click_* settings
    edit = MedURWKVEdit(runtime, {"click_lamda": "7", "click_roi_margin_mm": "12"})
    cut = next(t for t in edit.post_transforms() if isinstance(t, EditRefined)).refiner
    assert cut.percentiles == (5.0, 90.0)
    assert cut.defaults["lamda"] == 7.0 and cut.defaults["roi_margin_mm"] == 12.0

    shape = nib.load(IMAGE).shape
    arr = ClickRefined()._load(str(IMAGE), shape, "the image")
    lo, hi = np.percentile(arr, [5.0, 90.0])
    scaled = refiners[0]._image({"image_path": str(IMAGE)}, shape)
    np.testing.assert_allclose(scaled, np.clip((arr - lo) / (hi - lo), 0.0, 1.0), atol=1e-6)
    shipped = ClickRefined()._image({"image_path": str(IMAGE)}, shape)  # 0.5 / 99.5
    assert (scaled == 1.0).mean() > 0.05 and (shipped == 1.0).mean() < 0.01  # the top 10 %, not 0.5 %, saturate
