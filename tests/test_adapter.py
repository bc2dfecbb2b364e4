"""VRWKV ViT-Adapter: shapes and strides, input checks, deformable attention against an explicit float64
reference, parameter count, and loading checkpoints in the official layout."""

import math
import re

import pytest
import timm
import torch

import medurwkv  # noqa: F401  (registers the timm models)
from medurwkv.checkpoint import CheckpointError
from medurwkv.nets.adapter import ADAPTER_VARIANTS, MSDeformAttn, VisionRWKVAdapter, deform_inputs

TINY_PARAMS = 8_404_592  # paper-and-vrwkv.md §1.2 arithmetic; README: 8.4 M


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight and BN statistic away from its initial value (injector gammas start at 0, BN at
    identity), so that a load that skipped or mixed up any tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tiny() -> VisionRWKVAdapter:
    return _perturb(timm.create_model("vrwkv_adapter_tiny")).eval()


def _official_layout(model: torch.nn.Module) -> dict:
    """Our state dict as the released mmseg file stores it, with UperNet heads next to the backbone."""
    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace("blocks.", "layers.", 1) if k.startswith("blocks.") else k
        k = k.replace("patch_embed.proj.", "patch_embed.projection.")
        sd["backbone." + k] = v.clone()
    sd["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1)
    sd["decode_head.conv_seg.bias"] = torch.randn(150)
    sd["decode_head.bottleneck.bn.num_batches_tracked"] = torch.tensor(160000)
    sd["auxiliary_head.conv_seg.weight"] = torch.randn(150, 256, 1, 1)
    return {"state_dict": sd, "meta": {"mmseg_version": "0.30.0", "iter": 160000}}


def _small_adapter(**kwargs) -> VisionRWKVAdapter:
    """A narrow, shallow adapter for tests that do not need the real width."""
    return VisionRWKVAdapter(embed_dim=96, depth=4, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], **kwargs)


# --- shapes and input checks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(224, 224), (192, 256)])
def test_tiny_pyramid_shapes(tiny, hw):
    H, W = hw
    with torch.no_grad():
        feats = tiny(torch.randn(1, 3, H, W))
    assert [tuple(f.shape) for f in feats] == [(1, 192, H // s, W // s) for s in (4, 8, 16, 32)]
    assert all(torch.isfinite(f).all() for f in feats)
    assert [i["reduction"] for i in tiny.feature_info] == [4, 8, 16, 32]


def test_parameter_count(tiny):
    assert sum(p.numel() for p in tiny.parameters()) == TINY_PARAMS
    # no final LayerNorm and no classifier: the adapter ends with the four BatchNorms
    assert not any(k.startswith(("norm.", "head.")) for k in tiny.state_dict())


@pytest.mark.parametrize("shape", [(1, 3, 200, 224), (1, 3, 224, 100), (1, 3, 16, 32)])
def test_size_not_multiple_of_32_is_refused(tiny, shape):
    with pytest.raises(ValueError, match=r"multiples of 32.*" + re.escape(str(shape))):
        tiny(torch.randn(*shape))


def test_wrong_channel_count_is_refused(tiny):
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 1"):
        tiny(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        tiny(torch.randn(3, 64, 64))


def test_bad_interaction_indexes_are_refused():
    with pytest.raises(ValueError, match="interaction_indexes"):
        VisionRWKVAdapter(embed_dim=96, depth=4, interaction_indexes=[[0, 1], [3, 3]])


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for enable in (False, True):
        tiny.set_grad_checkpointing(enable)
        xi = x.clone().requires_grad_(True)
        sum(f.square().mean() for f in tiny(xi)).backward()
        grads.append(xi.grad)
        tiny.zero_grad(set_to_none=True)
    tiny.set_grad_checkpointing(False)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_drop_path_is_stochastic_in_training_only():
    model = _small_adapter(drop_path_rate=0.5)
    assert model.interactions[0].extractor.drop_path.drop_prob == 0.5  # constant in the adapter, as official
    assert model.blocks[-1].drop_path.drop_prob == 0.5  # linear over the VRWKV blocks
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        a, b = model(x)[2], model(x)[2]
        torch.testing.assert_close(a, b)
        model.train()
        torch.manual_seed(0)
        c = model(x)[2]
        torch.manual_seed(1)
        d = model(x)[2]
    assert not torch.allclose(c, d)


# --- deformable attention ---------------------------------------------------------------------------------------
def _reference_ms_deform_attn(attn: MSDeformAttn, query, reference_points, value_in, shapes):
    """Explicit float64 loops: project, softmax, bilinear sampling with pixel centres at half-integers and
    zero outside the map (the CUDA op's semantics), weighted sum, output projection."""
    q, v_in = query.double(), value_in.double()
    lin = lambda layer, t: t @ layer.weight.double().T + layer.bias.double()  # noqa: E731
    value = lin(attn.value_proj, v_in)
    N, Lq, _ = q.shape
    M, L, P = attn.n_heads, attn.n_levels, attn.n_points
    D = value.shape[-1] // M
    offsets = lin(attn.sampling_offsets, q).reshape(N, Lq, M, L, P, 2)
    logits = lin(attn.attention_weights, q).reshape(N, Lq, M, L * P)
    weights = (logits.exp() / logits.exp().sum(-1, keepdim=True)).reshape(N, Lq, M, L, P)
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(L)]
    out = torch.zeros(N, Lq, M * D, dtype=torch.float64)
    for n in range(N):
        for i in range(Lq):
            for m in range(M):
                for lvl, (h, w) in enumerate(shapes):
                    ref = reference_points[n if reference_points.shape[0] > 1 else 0, i, lvl if reference_points.shape[2] > 1 else 0].double()
                    for p in range(P):
                        px = (ref[0].item() + offsets[n, i, m, lvl, p, 0].item() / w) * w - 0.5
                        py = (ref[1].item() + offsets[n, i, m, lvl, p, 1].item() / h) * h - 0.5
                        x0, y0 = math.floor(px), math.floor(py)
                        for yy in (y0, y0 + 1):
                            for xx in (x0, x0 + 1):
                                if 0 <= xx < w and 0 <= yy < h:
                                    bil = (1 - abs(px - xx)) * (1 - abs(py - yy))
                                    row = value[n, starts[lvl] + yy * w + xx, m * D : (m + 1) * D]
                                    out[n, i, m * D : (m + 1) * D] += weights[n, i, m, lvl, p] * bil * row
    return lin(attn.output_proj, out)


@pytest.mark.parametrize("per_level_reference", [False, True])
def test_ms_deform_attn_matches_explicit_bilinear_reference(per_level_reference):
    torch.manual_seed(0)
    shapes = ((3, 4), (2, 3))
    attn = MSDeformAttn(dim=8, n_levels=2, n_heads=2, n_points=3, ratio=0.5)
    with torch.no_grad():  # offsets of a few pixels: points between pixels and outside the border
        for p in attn.parameters():
            p.normal_()
        attn.sampling_offsets.bias.mul_(2.0)
    attn = attn.double()
    N, Lq = 2, 5
    query = torch.randn(N, Lq, 8, dtype=torch.float64)
    value = torch.randn(N, sum(h * w for h, w in shapes), 8, dtype=torch.float64)
    reference = torch.rand(N, Lq, 2 if per_level_reference else 1, 2, dtype=torch.float64)
    got = attn(query, reference, value, shapes)
    expected = _reference_ms_deform_attn(attn, query, reference, value, shapes)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_ms_deform_attn_float32_and_init():
    attn = MSDeformAttn(dim=12, n_levels=3, n_heads=6, n_points=4)
    # Deformable-DETR init: head 0 looks right (+x), point p at p+1 pixels, uniform attention weights
    bias = attn.sampling_offsets.bias.view(6, 3, 4, 2)
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(bias[0, 0, :, 1], torch.zeros(4), atol=1e-6, rtol=0)
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.sampling_offsets.weight.abs().sum() == 0
    x = torch.randn(1, 1, 64, 96)
    inject, _ = deform_inputs(x)
    c = torch.randn(2, 8 * 12 + 4 * 6 + 2 * 3, 12)
    out = attn(torch.randn(2, 4 * 6, 12), inject.reference_points, c, inject.value_shapes)
    assert out.shape == (2, 24, 12) and out.dtype == torch.float32


def test_deform_inputs_geometry():
    inject, extract = deform_inputs(torch.randn(1, 1, 64, 96))
    assert inject.value_shapes == [(8, 12), (4, 6), (2, 3)] and inject.query_shapes == [(4, 6)]
    assert extract.value_shapes == [(4, 6)] and extract.query_shapes == [(8, 12), (4, 6), (2, 3)]
    assert inject.reference_points.shape == (1, 24, 1, 2) and extract.reference_points.shape == (1, 96 + 24 + 6, 1, 2)
    # pixel centres, x first, row-major
    torch.testing.assert_close(inject.reference_points[0, :2, 0], torch.tensor([[0.5 / 6, 0.5 / 4], [1.5 / 6, 0.5 / 4]]))
    torch.testing.assert_close(extract.reference_points[0, 96, 0], torch.tensor([0.5 / 6, 0.5 / 4]))  # first stride-16 token
    torch.testing.assert_close(extract.reference_points[0, -1, 0], torch.tensor([2.5 / 3, 1.5 / 2]))


# --- checkpoints ------------------------------------------------------------------------------------------------
def test_official_layout_round_trip(tiny, tmp_path):
    path = tmp_path / "upernet_vrwkv_adapter_tiny_512_160k_ade20k.pth"
    torch.save(_official_layout(tiny), path)
    loaded = timm.create_model("vrwkv_adapter_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(tiny(x), loaded(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_official_layout_into_one_channel_model_with_other_img_size(tiny, tmp_path):
    path = tmp_path / "adapter.pth"
    torch.save(_official_layout(tiny), path)
    model = timm.create_model("vrwkv_adapter_tiny", pretrained=True, in_chans=1, img_size=256, pretrained_cfg_overlay=dict(file=str(path))).eval()
    # both stems adapted (timm adapt_input_conv: RGB weights summed), position embedding resampled to 16x16
    torch.testing.assert_close(model.spm.stem[0].weight, tiny.spm.stem[0].weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.patch_embed.proj.weight, tiny.patch_embed.proj.weight.sum(1, keepdim=True))
    assert model.pos_embed.shape == (1, 256, 192)
    with torch.no_grad():
        feats = model(torch.randn(2, 1, 96, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 192, 96 // s, 64 // s) for s in (4, 8, 16, 32)]


def test_checkpoint_of_another_width_names_file_and_widths(tmp_path):
    path = tmp_path / "narrow_adapter.pth"
    torch.save(_official_layout(VisionRWKVAdapter(embed_dim=96, depth=12)), path)
    with pytest.raises(CheckpointError) as err:
        timm.create_model("vrwkv_adapter_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    msg = str(err.value)
    assert str(path) in msg and "embed_dim=96" in msg and "embed_dim=192" in msg


def test_imagenet_vrwkv_checkpoint_loads_non_strictly(tiny, tmp_path):
    # an ImageNet VRWKV-T classifier file: backbone.layers (no layer scale), final ln1, linear head
    cls_sd = {}
    for k, v in tiny.state_dict().items():
        if k.startswith("blocks.") and not k.endswith(("gamma1", "gamma2")):
            cls_sd["backbone.layers." + k[len("blocks.") :]] = v.clone()
        elif k.startswith(("patch_embed.", "pos_embed")):
            cls_sd["backbone." + k.replace("patch_embed.proj.", "patch_embed.projection.")] = v.clone()
    cls_sd.update({"backbone.ln1.weight": torch.ones(192), "backbone.ln1.bias": torch.zeros(192)})
    cls_sd.update({"head.fc.weight": torch.randn(1000, 192), "head.fc.bias": torch.zeros(1000)})
    path = tmp_path / "vrwkv_t_in1k_224.pth"
    torch.save({"state_dict": cls_sd, "meta": {}}, path)

    with pytest.raises(CheckpointError, match="embed_dim=192"):  # another width is refused even when not strict
        _small_adapter().load_pretrained(path, strict=False)

    model = VisionRWKVAdapter(**ADAPTER_VARIANTS["tiny"])
    with pytest.raises(CheckpointError, match=r"strict=False"):
        model.load_pretrained(path)  # strict: a plain VRWKV file is not an adapter checkpoint
    report = model.load_pretrained(path, strict=False)
    own = tiny.state_dict()
    for k in report.loaded:
        torch.testing.assert_close(model.state_dict()[k], own[k], rtol=0, atol=0)
    assert len(report.loaded) == len(cls_sd) - 4  # everything but ln1 and the classifier
    assert report.ignored == ["norm.bias", "norm.weight"]
    missing = set(report.missing)
    assert {"level_embed", "up.weight", "spm.stem.0.weight", "norm4.running_var", "blocks.0.gamma1"} <= missing
    assert all(k.startswith(("spm.", "interactions.", "level_embed", "up.", "norm")) or k.endswith(("gamma1", "gamma2")) for k in missing)
    assert "kept as initialised" in str(report) and "blocks.*.gamma1 (12)" in str(report)
