"""Click guidance of Med-URWKV-Edit (medurwkv/guidance.py): the encoding and its reach across slices, the
automatic model's weights in the click-guided network, slice-limited inference, and the bundle's edit configs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.layers.convutils import gaussian_1d

from medurwkv.checkpoint import CheckpointError
from medurwkv.guidance import (
    AddClickGuidanced,
    RandomClickGuidanced,
    guidance_reach,
    infer_slices_with_clicks,
    load_with_extra_input_channels,
    map_points,
    slices_within_reach,
)
from medurwkv.inferers import SliceWiseInferer
from medurwkv.nets.medurwkv import MedURWKV

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"brain": 1, "background": 0}


def test_click_shows_on_neighbouring_slices_with_documented_decay_and_nowhere_else():
    sigma_slices = 1.5
    t = AddClickGuidanced(label_names=NAMES, sigma=3.0, sigma_slices=sigma_slices)
    reach = guidance_reach(sigma_slices)
    assert reach == t.reach == 6
    z0 = 14
    out = t({"image": torch.rand(1, 40, 36, 30), "guidance": {"brain": [[20, 17, z0]]}})
    x = np.asarray(out["image"])
    assert x.shape == (3, 40, 36, 30)
    g = gaussian_1d(torch.tensor(sigma_slices), 4.0, "erf").numpy()
    g = g / g.max()  # g[reach + dz]: the documented strength at dz slices
    fg, bg = x[1], x[2]
    for z in range(30):
        dz = z - z0
        if abs(dz) <= reach:
            assert fg[20, 17, z] == pytest.approx(g[reach + dz], rel=1e-3, abs=1e-6), dz
            assert fg[..., z].max() == pytest.approx(fg[20, 17, z], rel=1e-5)  # the peak stays at the click
        else:
            assert not fg[..., z].any(), f"guidance {dz} slices away, beyond the reach {reach}"
    assert fg[20, 17, z0] == pytest.approx(1.0) and fg[20, 17, z0 + 1] == pytest.approx(0.807, abs=1e-3)
    assert not bg.any()  # no background clicks: an all-zero channel
    assert slices_within_reach(out["guidance"], 30, reach) == list(range(z0 - reach, z0 + reach + 1))


def test_no_clicks_is_the_automatic_mode_and_bad_clicks_are_refused():
    t = AddClickGuidanced(label_names=NAMES)
    out = t({"image": torch.rand(1, 16, 16, 8)})
    assert out["image"].shape == (3, 16, 16, 8) and not np.asarray(out["image"][1:]).any()
    assert json.loads(out["guidance"]["brain"]) == [] and out["label_names"] == NAMES
    with pytest.raises(ValueError, match="unknown label"):
        t({"image": torch.rand(1, 16, 16, 8), "guidance": {"tumour": [[1, 2, 3]]}})
    with pytest.raises(ValueError, match="2D or 3D"):
        t({"image": torch.rand(1, 16)})


def test_random_click_starts_from_each_samples_own_clicks():
    """MONAI's AddRandomGuidanceDeepEditd, when it does not click, hands on the previous sample's clicks."""
    t = RandomClickGuidanced(keys="NA")
    no_error = [np.zeros((1, 8, 8), np.float32)] * 2
    a = {"guidance": {"brain": "[[0, 1, 1]]", "background": "[]"}, "label_names": NAMES,
         "discrepancy": {"brain": no_error, "background": no_error}, "probability": 1.0, "label": np.zeros((1, 8, 8))}
    b = dict(a, guidance={"brain": "[]", "background": "[[0, 5, 5]]"}, probability=0.0)
    t.set_random_state(0)
    assert t(a)["guidance"] == {"brain": [[0, 1, 1]], "background": []}
    assert t(b)["guidance"] == {"brain": [], "background": [[0, 5, 5]]}


def test_map_points_between_grids():
    src = np.diag([2.0, 2.0, 3.0, 1.0])
    src[:3, 3] = [10, -20, 5]
    dst = np.diag([1.0, 1.0, 1.0, 1.0])
    assert map_points([[1, 2, 3]], src, dst).tolist() == [[12, -16, 14]]
    assert map_points(map_points([[4, 5, 6]], src, dst), dst, src).tolist() == [[4, 5, 6]]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    small = dict(variant="tiny", encoder="plain", bottleneck_depth=1, decoder_depths=(1, 1, 1), drop_path_rate=0.0)
    auto = MedURWKV(in_channels=1, **small).eval()
    edit = MedURWKV(in_channels=3, **small).eval()
    widened = load_with_extra_input_channels(edit, auto.state_dict())
    return auto, edit, widened


def test_edit_network_starts_as_the_automatic_model(nets):
    auto, edit, widened = nets
    assert widened == ["encoder.backbone.patch_embed.proj.weight"]
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        y_edit = edit(torch.cat([x, torch.zeros(2, 2, 64, 64)], 1))
        y_auto = auto(x)
    assert y_edit.shape == (2, 2, 64, 64)
    torch.testing.assert_close(y_edit, y_auto)
    with pytest.raises(CheckpointError, match="missing"):
        load_with_extra_input_channels(edit, {k: v for k, v in auto.state_dict().items() if "head" not in k})


def test_clicks_change_only_the_slices_they_reach_and_the_same_clicks_give_the_same_output(nets):
    _, edit, _ = nets
    net = MedURWKV(in_channels=3, variant="tiny", encoder="plain", bottleneck_depth=1, decoder_depths=(1, 1, 1),
                   drop_path_rate=0.0).eval()
    net.load_state_dict(edit.state_dict())
    with torch.no_grad():  # give the guidance channels weight, as training does
        w = net.encoder.backbone.patch_embed.proj.weight
        w[:, 1:] = torch.randn_like(w[:, 1:])
    t = AddClickGuidanced(label_names=NAMES, sigma=3.0, sigma_slices=0.5)  # reach 2 slices: a short volume
    assert t.reach == 2
    inferer = SliceWiseInferer(spatial_dim=2, roi_size=(64, 64), sw_batch_size=8)
    image = torch.rand(1, 64, 64, 9)
    with torch.no_grad():
        auto = inferer(t({"image": image})["image"][None], net)[0]
    clicks = {"brain": [[30, 30, 2]], "background": []}
    a = infer_slices_with_clicks(net, inferer, image, clicks, auto, t)
    b = infer_slices_with_clicks(net, inferer, image, clicks, auto, t)
    assert a.shape == auto.shape == (2, 64, 64, 9)
    assert torch.equal(a, b)  # the same request twice: the same answer
    changed = [(a[..., z] - auto[..., z]).abs().max().item() > 1e-4 for z in range(9)]
    assert changed == [True] * 5 + [False] * 4  # slices 0..4 are within 2 of slice 2
    assert torch.equal(a[..., 5:], auto[..., 5:])


def test_edit_configs_merge_on_top_of_the_base_configs():
    from monai.bundle import ConfigParser

    for configs, ids in (
        (["train.json", "train_edit.json"], ["train#trainer#iteration_update#max_interactions", "validate#preprocessing"]),
        (["inference.json", "inference_edit.json"], ["preprocessing"]),
    ):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "bundle" / "configs" / c) for c in configs])
        parser["bundle_root"] = str(ROOT / "bundle")
        assert parser.get_parsed_content("network_def#in_channels") == 3
        assert parser["ckpt_dir"].endswith("'/models/edit'")
        pre = parser.get_parsed_content(ids[-1])
        assert isinstance(pre.transforms[-1], AddClickGuidanced) and pre.transforms[-1].label_names == NAMES
        assert type(pre.transforms[0]).__name__ == "LoadVolumed"  # the base config's transforms come first
    train = ConfigParser()
    train.read_config([str(ROOT / "bundle" / "configs" / c) for c in ("train.json", "train_edit.json")])
    assert isinstance(train.get_parsed_content("edit_guidance"), AddClickGuidanced)
    # training slices: the same encoding, with clicks also seen from neighbouring slices (SliceOffsetClickGuidanced)
    train_guidance = train.get_parsed_content("edit_guidance_train")
    assert type(train_guidance).__name__ == "SliceOffsetClickGuidanced" and train_guidance.reach == 6
    assert train["train#random_transforms"][-2:] == ["@edit_boundary_shift", "@edit_guidance_train"]
    shift = train.get_parsed_content("edit_boundary_shift")  # label errors to click on, after the crop to slices
    assert type(shift).__name__ == "RandBoundaryShiftd" and shift.keys == ("label",) and shift.max_shift == 3
    assert train["edit_click_transforms"][-1] == "@edit_guidance_train"
    assert "RandCropByPosNegLabeld" in [t.get("_target_") for t in train["train#random_transforms"][:-2]]
    assert train["train#handlers"][-1]["_target_"] == "medurwkv.guidance.GuidanceLearningRate"


def test_training_clicks_seen_from_neighbouring_slices_get_the_volumes_encoding():
    """SliceOffsetClickGuidanced (train_edit.json): a 2D training slice's click, given an offset dz, is encoded as
    the 3D volume's guidance dz slices from a click at that in-plane position; the offsets survive click rounds."""
    from medurwkv.guidance import SliceOffsetClickGuidanced

    t = SliceOffsetClickGuidanced(label_names=NAMES, sigma=3.0, sigma_slices=1.5, max_offset=3, offset_probability=1.0)
    t.set_random_state(0)
    image = torch.rand(1, 40, 36)
    out = t({"image": image, "guidance": {"brain": [[0, 20, 17]], "background": [[3, 5, 30]]}})  # DeepEdit's [d, i, j]
    dz = json.loads(out["guidance_offsets"])
    assert all(1 <= abs(z[0]) <= 3 for z in dz.values())
    volume = AddClickGuidanced(label_names=NAMES, sigma=3.0, sigma_slices=1.5)
    centre = 10
    ref = volume({"image": torch.zeros(1, 40, 36, 2 * centre + 1),
                  "guidance": {"brain": [[20, 17, centre + dz["brain"][0]]], "background": [[5, 30, centre + dz["background"][0]]]}})
    np.testing.assert_allclose(np.asarray(out["image"][1:]), np.asarray(ref["image"][1:, ..., centre]), atol=1e-6)
    assert torch.equal(out["image"][0], image[0])
    assert float(out["image"][1].max()) < 0.9  # weaker than a click on its own slice (1.0)

    again = t(dict(out, guidance={"brain": [[0, 20, 17], [0, 30, 3]], "background": out["guidance"]["background"]}))
    kept = json.loads(again["guidance_offsets"])
    assert kept["brain"][0] == dz["brain"][0] and len(kept["brain"]) == 2 and kept["background"] == dz["background"]

    same = SliceOffsetClickGuidanced(label_names=NAMES, max_offset=0)({"image": image, "guidance": {"brain": [[0, 20, 17]]}})
    own = AddClickGuidanced(label_names=NAMES)({"image": image, "guidance": {"brain": [[0, 20, 17]]}})
    assert torch.equal(torch.as_tensor(same["image"]), torch.as_tensor(own["image"]))


def test_guidance_learning_rate_is_a_param_group_with_factor_times_the_rate_on_the_guidance_weights():
    """GuidanceLearningRate scales the optimizer's step on the input weights' guidance slices: for AdamW exactly
    what a separate param group at factor x the learning rate would do (checked against one)."""
    from medurwkv.guidance import GuidanceLearningRate

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_channels = 3
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    torch.manual_seed(0)
    net = Stem()
    w_img = torch.nn.Parameter(net.conv.weight.detach()[:, :1].clone())
    w_gui = torch.nn.Parameter(net.conv.weight.detach()[:, 1:].clone())
    bias = torch.nn.Parameter(net.conv.bias.detach().clone())
    lr, factor = 1e-2, 30.0
    opt_a = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    opt_b = torch.optim.AdamW([{"params": [w_img, bias]}, {"params": [w_gui], "lr": lr * factor}], lr=lr, weight_decay=0.01)
    handler = GuidanceLearningRate(net, factor=factor)
    assert [tuple(w.shape) for w in handler.weights()] == [(4, 3, 3, 3)]
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 4, 8, 8)
    for _ in range(5):
        handler._remember()
        opt_a.zero_grad()
        ((net.conv(x) - y) ** 2).mean().backward()
        opt_a.step()
        handler._scale()
        opt_b.zero_grad()
        ((torch.nn.functional.conv2d(x, torch.cat([w_img, w_gui], 1), bias, padding=1) - y) ** 2).mean().backward()
        opt_b.step()
    torch.testing.assert_close(net.conv.weight[:, :1], w_img, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(net.conv.weight[:, 1:], w_gui, atol=1e-6, rtol=1e-5)


def test_boundary_shift_moves_the_label_by_the_drawn_distance_inside_the_disk_only():
    """RandBoundaryShiftd (train_edit.json): the training errors clicks can fix. Checked against scipy's
    chessboard distance: the shifted label is every voxel within |shift| of the label (dilation) or of the
    background (erosion), over the whole slice or inside a disk of the drawn radius; nothing changes outside it;
    every shift 1..3 and both directions are drawn; prob 0 is a no-op; the image is not touched; a MetaTensor
    label keeps its metadata and dtype; a label touching the image's edge is not eroded from the edge."""
    from monai.data import MetaTensor
    from scipy import ndimage as ndi

    from medurwkv.guidance import RandBoundaryShiftd

    yy, xx = np.mgrid[:64, :64]
    disk = ((yy - 32) ** 2 + (xx - 30) ** 2 <= 18**2).astype(np.float32)
    label = MetaTensor(torch.as_tensor(disk[None]), affine=torch.diag(torch.tensor([2.0, 2.0, 1.0, 1.0])), meta={"case": "x"})
    out_dist = ndi.distance_transform_cdt(disk == 0, metric="chessboard")  # distance to the label, outside it
    in_dist = ndi.distance_transform_cdt(disk > 0, metric="chessboard")  # distance to the background, inside it

    assert torch.equal(RandBoundaryShiftd(prob=0.0)({"label": label})["label"], label)
    whole = RandBoundaryShiftd(prob=1.0, max_shift=3, whole_probability=1.0)
    local = RandBoundaryShiftd(prob=1.0, max_shift=3, radius=(4, 8), whole_probability=0.0)
    drawn, spreads = set(), []
    for seed in range(16):
        for t in (whole, local):
            t.set_random_state(seed)
            image = torch.rand(1, 64, 64)
            d = t({"label": label, "image": image})
            assert d["image"] is image
            out = d["label"]
            assert isinstance(out, MetaTensor) and out.dtype == label.dtype and out.meta["case"] == "x"
            assert torch.equal(out.affine, label.affine)
            new = out[0].numpy()
            changed = new != disk
            assert changed.any()
            grew = bool(new[changed].max() == 1)
            assert (new[changed] == (1 if grew else 0)).all()  # one direction per draw
            dist = (out_dist if grew else in_dist)[changed]
            shift = int(dist.max())
            drawn.add(shift if grew else -shift)
            ref = (out_dist <= shift) & (out_dist > 0) if grew else (in_dist <= shift) & (in_dist > 0)
            if t is whole:
                np.testing.assert_array_equal(changed, ref)
            else:  # inside one disk of radius <= 8 around a changed voxel: at most 2 * 8 + 1 voxels across
                ys, xs = np.nonzero(changed)
                assert np.ptp(ys) <= 16 and np.ptp(xs) <= 16
                spreads.append(max(np.ptp(ys), np.ptp(xs)))
                assert changed.sum() < ref.sum() and not (changed & ~ref).any()
    assert drawn == {-3, -2, -1, 1, 2, 3}
    assert max(spreads) > 8  # radii up to 8 are drawn, not only the lower end (4)

    # the label touches the image's left edge: erosion moves the other sides only
    edge = np.zeros((1, 20, 20), np.float32)
    edge[0, 5:15, :10] = 1
    eroded = RandBoundaryShiftd.shifted(torch.as_tensor(edge), -1)[0].numpy()
    np.testing.assert_array_equal(eroded[6:14, :9], 1)
    assert eroded.sum() == 8 * 9
    with pytest.raises(ValueError, match="0/1"):
        RandBoundaryShiftd(prob=0.0)({"label": label * 2})
