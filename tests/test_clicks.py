"""Click-guided correction (monailabel_app/lib/infers/clicks.py) on a real head: the held-out ITK T1 and its
brain mask, with a network output made wrong on purpose (a ball of brain missed, a ball of scalp taken)."""

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
        from lib.infers.clicks import ClickRefined

        yield ClickRefined, BadInput
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
    return {"gt": gt, "wrong": p1 > 1 - p1, "hole": hole & gt, "prob": prob, "fg": fg_click.tolist(), "bg": far.tolist(), "affine": lab.affine}


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _refine(ClickRefined, case, **request):
    out = ClickRefined(keys="pred")({"pred": case["prob"].clone(), "image_path": str(IMAGE), **request})["pred"]
    assert out.shape == case["prob"].shape and isinstance(out, MetaTensor)
    return (out[1] > out[0]).numpy()


def test_clicks_fix_the_errors_they_point_at_and_nothing_far_away(clicks_module, case):
    ClickRefined, _ = clicks_module
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
    ClickRefined, BadInput = clicks_module
    shape = list(case["gt"].shape)
    with pytest.raises(BadInput, match=rf"foreground click \[500, 1, 1\] is outside the image \(size {shape}\)".replace("[", r"\[").replace(r"\\[", r"\[")):
        _refine(ClickRefined, case, foreground=[[500, 1, 1]])
    with pytest.raises(BadInput, match="background click 'x' is not a voxel index"):
        _refine(ClickRefined, case, background=["x"])
    with pytest.raises(BadInput, match="'foreground' must be a list"):
        _refine(ClickRefined, case, foreground="10,10,10")
    with pytest.raises(BadInput, match="'lamda' must be a number"):
        _refine(ClickRefined, case, foreground=[case["fg"]], lamda="strong")


def test_loop_script_clicks_the_deepest_voxel_of_the_largest_error():
    sys.path.insert(0, str(ROOT / "monailabel_app"))
    try:
        from active_learning_loop import next_click
    finally:
        sys.path.remove(str(ROOT / "monailabel_app"))
    truth = np.zeros((20, 20, 20), bool)
    truth[4:16, 4:16, 4:16] = True
    pred = truth.copy()
    pred[4:16, 4:16, 4:9] = False  # 720 voxels missed
    pred[0:3, 0:3, 0:3] = True  # 27 voxels taken
    kind, voxel = next_click(pred, truth)
    assert kind == "foreground" and not pred[tuple(voxel)] and truth[tuple(voxel)]
    assert voxel[2] == 6 and 6 <= voxel[0] <= 13 and 6 <= voxel[1] <= 13  # 3 voxels deep: the slab's deepest
    pred[4:16, 4:16, 4:9] = True
    assert next_click(pred, truth) == ("background", [1, 1, 1])
    assert next_click(truth, truth) is None
