"""Med-URWKV-Edit served by the MONAI Label app (monailabel_app/lib/infers/edit.py), through MONAILabelClient on a
real server (tests/label_server.py), as 3D Slicer's deepedit flow sends it: clicks per label name.

The weights are made here, untrained (only the mechanics are checked, not how well clicks correct): a random
automatic Med-URWKV as ``models/model.pt`` and the same network widened to the guidance channels, with random
guidance weights, as ``models/edit/model.pt``. How much the trained network's clicks help is measured by
benchmarks/bench_clicks.py. The volume is a 64 x 64 x 30 crop of Colin27 (RAS, 2 mm: the network's own grid), so
axial slice k of the image is slice k of the network.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from label_server import HELD_OUT, MODEL, serving, stage, status_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EDIT = f"{MODEL}_edit"
VOLUMES = {"colin_z": ("colin27_t1", "Tr", ((14, 78), (22, 86), (25, 55)))}
REACH = 6  # bundle/configs/inference_edit.json: edit_sigma_slices 1.5 -> 6 slices


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):

    from medurwkv.checkpoint import save_weights
    from medurwkv.guidance import guidance_reach, load_with_extra_input_channels
    from medurwkv.nets.medurwkv import MedURWKV

    assert guidance_reach(1.5) == REACH
    c = stage(tmp_path_factory.mktemp("edit_app"), volumes=VOLUMES, held_out=HELD_OUT)
    torch.manual_seed(0)
    auto = MedURWKV(in_channels=1, out_channels=2, variant="tiny", encoder="adapter")
    edit = MedURWKV(in_channels=3, out_channels=2, variant="tiny", encoder="adapter")
    widened = load_with_extra_input_channels(edit, auto.state_dict())
    with torch.no_grad():
        for name in widened:  # guidance weights as if trained: the clicks change the output
            w = dict(edit.named_parameters())[name]
            w[:, 1:] = torch.randn_like(w[:, 1:]) * w[:, :1].std() * 20
    (c.bundle / "models" / "edit").mkdir(parents=True)
    save_weights(auto.state_dict(), c.bundle / "models" / "model.pt")
    save_weights(edit.state_dict(), c.bundle / "models" / "edit" / "model.pt")
    with serving(c):
        yield c


def _infer(c, model, params, **kw):
    path, result = c.client.infer(model, "colin_z", params, **kw)
    img = nib.load(path)
    ref = nib.load(str(c.studies / "colin_z.nii.gz"))
    assert img.shape == ref.shape  # the answer is on the image's grid, the whole volume (Slicer takes it as 3D)
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    return np.asanyarray(img.dataobj).astype(np.uint8), result


def _no_clicks(c) -> np.ndarray:
    """The answer without clicks (computed once per module, by whichever test needs it first)."""
    if not hasattr(c, "auto"):
        c.auto, c.auto_result = _infer(c, EDIT, {"label": "brain"})
    return c.auto


def _clicks(auto):
    """A foreground click where the automatic answer has background (slice 3), a background click where it has
    brain (slice 4), as Slicer's deepedit flow sends them."""
    k_fg, k_bg = 3, 4
    fg = [int(v) for v in np.argwhere(auto[..., k_fg] == 0)[0]] + [k_fg]
    bg_candidates = np.argwhere(auto[..., k_bg] == 1)
    request = {"label": "brain", "brain": [fg], "background": []}
    if len(bg_candidates):
        request["background"] = [[int(v) for v in bg_candidates[len(bg_candidates) // 2]] + [k_bg]]
    return request


def test_listed_as_3d_deepedit_and_no_clicks_is_the_automatic_mode(ctx):
    info = ctx.client.info()["models"][EDIT]
    assert info["type"] == "deepedit" and info["dimension"] == 3
    assert set(info["labels"]) == {"brain", "background"}
    auto, _ = _infer(ctx, MODEL, {})
    got = _no_clicks(ctx)
    assert ctx.auto_result["probabilities"] == "computed"
    assert (got == auto).mean() > 0.999  # the same network: zero guidance channels, zero-extended weights


def test_clicks_steer_their_slices_within_the_reach_and_repeat_exactly(ctx):
    auto = _no_clicks(ctx)
    request = _clicks(auto)
    got, result = _infer(ctx, EDIT, request)
    assert result["probabilities"] == "cached"  # the automatic logits of the first request: only reached slices ran
    for p in request["brain"]:
        assert got[tuple(p)] == 1
    for p in request["background"]:
        assert got[tuple(p)] == 0
    changed = got != auto
    assert changed.sum() > len(request["background"]) + 1  # the network changed more than the clicked voxels
    last = max(p[2] for p in request["brain"] + request["background"]) + REACH
    assert not changed[..., last + 1 :].any()  # beyond the reach: as it was
    again, _ = _infer(ctx, EDIT, request)
    assert np.array_equal(again, got)  # the same request: the same answer (Slicer's undo is enough)


def test_painted_voxels_outside_the_steered_region_survive_and_roi_limits_the_change(ctx, tmp_path):
    auto = _no_clicks(ctx)
    request = _clicks(auto)
    with_clicks, _ = _infer(ctx, EDIT, request)
    user = auto.copy()
    user[10:30, 10:30, 20:25] = 1  # painted by hand, beyond the clicks' reach
    user[30:50, 30:50, 25:30] = 0  # erased by hand
    src = tmp_path / "segment.nii.gz"
    ref = nib.load(str(ctx.studies / "colin_z.nii.gz"))
    nib.save(nib.Nifti1Image(user, ref.affine), src)
    sent = {k: v for k, v in request.items() if k != "label"}  # a "label" param would replace the file's path
    got, _ = _infer(ctx, EDIT, sent, label_in=str(src))
    last = max(p[2] for p in request["brain"] + request["background"]) + REACH
    assert np.array_equal(got[..., last + 1 :], user[..., last + 1 :])  # the user's work is kept
    assert np.array_equal(got[..., : last + 1], with_clicks[..., : last + 1])  # the network's answer where steered

    roi = [0, 32, 0, 64, 0, 30]  # the half i < 32; the clicks outside it do not steer
    inside = dict(request, brain=[p for p in request["brain"] if p[0] < 32] or [[16, 32, 3]],
                  background=[p for p in request["background"] if p[0] < 32], roi=roi)
    got, _ = _infer(ctx, EDIT, inside)
    assert not (got != auto)[32:].any()
    assert (got != auto)[:32].any()


def test_bad_clicks_get_4xx_and_the_server_stays_up(ctx):
    from monailabel.client.client import MONAILabelClientException, MONAILabelUtils

    for params, message in (
        ({"brain": [[999, 0, 0]]}, "outside the image"),
        ({"brain": [[1, 2]]}, "is not a voxel index"),
        ({"brain": [["a", 2, 3]]}, "is not a voxel index"),
        ({"tumour": [[1, 2, 3]]}, "Unknown option 'tumour'"),  # the allow-list (lib/options.py) answers first
        ({"label": "Segment_1", "brain": [[1, 2, 3]]}, "unknown label 'Segment_1'"),
        ({"brain": [[1, 2, 3]], "roi": [0, "x"]}, "'roi' must be voxel bounds"),
    ):
        with pytest.raises(MONAILabelClientException) as e:
            ctx.client.infer(EDIT, "colin_z", params)
        assert status_of(e.value) == 422 and message in e.value.msg, (params, e.value.msg)
    status, body, _, _ = MONAILabelUtils.http_multipart(
        "POST", ctx.server.url, f"/infer/{EDIT}?image=colin_z", {"params": "{'brain': [[1, 2, 3]"}, {}
    )
    assert status == 422 and "not valid JSON" in json.loads(body)["detail"]
    assert ctx.client.info()["models"][EDIT]  # still serving
    got, _ = _infer(ctx, EDIT, {"brain": [[5, 5, 5]]})
    assert got[5, 5, 5] == 1


def test_graph_cut_after_the_network_is_the_clicks_tasks_inside_the_steered_region_only():
    """refine_edit (medurwkv_edit's last step before the clicked voxels are set): clicks.py's refine_near_seeds on
    the guided network's probabilities where the clicks steer, the network's answer elsewhere. Synthetic: a bright
    ball (radius 8) in a grey shell (radius 12), the network's ball of radius 8, one foreground click at radius 10
    on slice 10; reach 0 slices, so the cut's change on slices 9 and 11 must not come through."""
    import sys
    from pathlib import Path

    app = str(Path(__file__).resolve().parents[1] / "monailabel_app")
    sys.path.insert(0, app)
    try:
        from lib.infers.clicks import ClickRefined, refine_near_seeds
        from lib.infers.edit import refine_edit, steered_region
    finally:
        sys.path.remove(app)
    shape, spacing, affine = (40, 40, 24), np.array([2.0, 2.0, 2.0]), np.diag([2.0, 2.0, 2.0, 1.0])
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.indices(shape), (20, 20, 12))))
    image = np.where(r <= 8, 0.9, np.where(r <= 12, 0.6, 0.1)).astype(np.float32)
    fg_p = 1 / (1 + np.exp(2 * (r - 8)))
    prob = np.stack([1 - fg_p, fg_p]).astype(np.float32)
    network = prob[1] > prob[0]
    opt = ClickRefined()._params({})  # the clicks task's defaults
    click = [30, 20, 10]

    label, info = refine_edit(prob, {"brain": [], "background": []}, np.ones(shape, bool), spacing, None, opt)
    assert np.array_equal(label, network) and info["changed"] == 0  # no clicks: the network's, no image read

    steered = steered_region({"brain": [click]}, affine, affine, shape, reach=0)
    assert steered[..., 10].all() and steered.sum() == 40 * 40
    label, _ = refine_edit(prob, {"brain": [click], "background": []}, steered, spacing, lambda: image, opt)
    seeds = np.zeros(shape, bool)
    seeds[tuple(click)] = True
    cut, _ = refine_near_seeds(prob, spacing, lambda: image, seeds, np.zeros(shape, bool), opt, opt["click_radius_mm"])
    assert np.array_equal(label, np.where(steered, cut, network))  # the clicks task's own function, confined
    assert (cut != network)[..., 9].any() and (cut != network)[..., 11].any()  # the cut alone reaches further
    assert (label != network)[..., 10].any() and not (label != network)[~steered].any()
    assert label[tuple(click)] and not network[tuple(click)]

    roi = [0, 25, 0, 40, 0, 24]  # the click outside the box: it steers nothing
    boxed = steered_region({"brain": [click]}, affine, affine, shape, reach=0, roi=roi)
    label, _ = refine_edit(prob, {"brain": [click], "background": []}, boxed, spacing, lambda: image, opt)
    assert np.array_equal(label, network)


def test_steered_region_is_every_voxel_within_reach_of_a_clicked_slice_on_the_network_grid():
    """steered_region finds each voxel's nearest clicked slice in one pass; the same voxels as the definition
    (|z - z_click| <= reach + 0.5 for some click, z the voxel's slice on the network's grid), for an oblique grid,
    clicks on many slices, one slice, and none."""
    import sys
    from pathlib import Path

    app = str(Path(__file__).resolve().parents[1] / "monailabel_app")
    sys.path.insert(0, app)
    try:
        from lib.infers.edit import steered_region
    finally:
        sys.path.remove(app)
    shape = (20, 18, 30)
    src = np.array([[1.0, 0.1, 0.0, -3.0], [0.0, 0.9, 0.2, 2.0], [0.05, 0.0, 1.1, 1.5], [0, 0, 0, 1]])  # image grid
    dst = np.diag([2.0, 2.0, 2.0, 1.0])  # network grid
    z = (np.linalg.inv(dst) @ src)[2] @ np.concatenate([np.indices(shape).reshape(3, -1), np.ones((1, np.prod(shape)))])
    z = z.reshape(shape)
    rng = np.random.default_rng(0)
    for slices in (sorted(rng.choice(np.arange(-2, 20), 7, replace=False).tolist()), [4], []):
        clicks = {"brain": [[3, 4, s] for s in slices[::2]], "background": [[1, 1, s] for s in slices[1::2]]}
        for reach in (0, 2, 6):
            want = np.zeros(shape, bool)
            for s in slices:
                want |= np.abs(z - s) <= reach + 0.5
            got = steered_region(clicks, src, dst, shape, reach)
            assert np.array_equal(got, want), (slices, reach)
