"""Vision-RWKV backbone: registry, official hyper-parameters, Q-Shift, position embedding, checkpoints."""

import os
import pytest
import timm
import torch
import torch.nn.functional as F

import medurwkv  # noqa: F401  (registers the models)
from medurwkv.checkpoint import CheckpointError
from medurwkv.nets.vrwkv import q_shift
from vrwkv_helpers import randomize, to_official_layout


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    model = randomize(timm.create_model("vrwkv_tiny")).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vrwkv_t_in1k_224.pth"
    torch.save({"state_dict": to_official_layout(model.state_dict()), "meta": {"mmcls_version": "0.25.0", "CLASSES": ("a", "b")}}, path)
    return model, path


@pytest.mark.parametrize(
    "name,count",
    [("vrwkv_tiny", 6_155_176), ("vrwkv_small", 23_820_136), ("vrwkv_base", 93_645_544), ("vrwkv_large", 334_881_768)],
)
def test_parameter_counts_match_official_models(name, count):
    # the official README's 6.2 / 23.8 / 93.7 / 334.9 M, to the parameter
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_official_hyper_parameters():
    with torch.device("meta"):
        t, s, l = (timm.create_model(n) for n in ("vrwkv_tiny", "vrwkv_small", "vrwkv_large"))
    assert not t.blocks[0].post_norm and t.blocks[0].gamma1 is None and t.blocks[0].att.key_norm is None
    assert s.blocks[3].post_norm and s.blocks[3].gamma1 is not None
    assert l.blocks[0].att.key_norm is not None and l.blocks[0].ffn.key_norm.normalized_shape == (4096,)
    assert l.pos_embed.shape == (1, 144, 1024)  # pretrained at 192 px
    assert t.blocks[0].ln0 is not None and t.blocks[1].ln0 is None


@pytest.mark.parametrize("H, W, s", [(3, 4, 1), (3, 4, 2), (1, 5, 1), (4, 1, 1), (2, 2, 3)])
def test_q_shift_matches_explicit_loops(H, W, s):
    B, C = 2, 10  # C not a multiple of 4: the last two channels pass through
    x = torch.randn(B, H * W, C, requires_grad=True)
    y = q_shift(x, (H, W), shift_pixel=s)
    g = int(C * 0.25)
    grid = x.view(B, H, W, C)
    ref = torch.zeros(B, H, W, C)
    for i in range(H):
        for j in range(W):
            for c in range(C):
                if c < g:
                    ref[:, i, j, c] = grid[:, i, j - s, c] if j - s >= 0 else 0
                elif c < 2 * g:
                    ref[:, i, j, c] = grid[:, i, j + s, c] if j + s < W else 0
                elif c < 3 * g:
                    ref[:, i, j, c] = grid[:, i - s, j, c] if i - s >= 0 else 0
                elif c < 4 * g:
                    ref[:, i, j, c] = grid[:, i + s, j, c] if i + s < H else 0
                else:
                    ref[:, i, j, c] = grid[:, i, j, c]
    assert torch.equal(y, ref.view(B, H * W, C))
    w = torch.randn_like(y)  # gradients too: every input reaches the output position the loops put it in
    assert torch.equal(torch.autograd.grad((y * w).sum(), x)[0], torch.autograd.grad((ref.view(B, H * W, C) * w).sum(), x)[0])
    with pytest.raises(ValueError, match="does not match"):
        q_shift(x, (H, W + 1))


def test_token_mix_is_the_official_interpolation():
    from medurwkv.nets.vrwkv import token_mix

    x, xx = torch.randn(2, 7, 12, dtype=torch.float64), torch.randn(2, 7, 12, dtype=torch.float64)
    mixes = [torch.rand(1, 1, 12, dtype=torch.float64) for _ in range(3)]
    for got, m in zip(token_mix(x, xx, list(mixes)), mixes):
        torch.testing.assert_close(got, x * m + xx * (1 - m), rtol=0, atol=1e-14)


def test_position_embedding_resized_bicubic_without_antialias():
    model = randomize(timm.create_model("vrwkv_tiny")).eval()
    x = torch.randn(1, 3, 160, 96)
    tokens, hw = model.embed(x)
    assert hw == (10, 6)
    patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    grid = model.pos_embed.reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    pos = F.interpolate(grid, size=(10, 6), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, patches + pos, rtol=1e-5, atol=1e-6)


def test_inputs_not_multiple_of_patch_are_padded_bottom_right():
    model = timm.create_model("vrwkv_tiny", num_classes=0).eval()
    x = torch.randn(1, 3, 40, 50)
    padded = F.pad(x, (0, 14, 0, 8))  # to 48 x 64, as mmcv's padding='corner'
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded))


def test_forward_intermediates_follows_timm_convention():
    model = timm.create_model("vrwkv_tiny").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        inter = model.forward_intermediates(x, intermediates_only=True)
        assert len(inter) == 12 and inter[0].shape == (2, 192, 4, 6)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last2[1], inter[11])
        final, picked = model.forward_intermediates(x, indices=[0, 11], norm=True, output_fmt="NLC")
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(picked[1], final)  # final norm applied to the last block == features
        torch.testing.assert_close(picked[0], model.norm(inter[0].flatten(2).transpose(1, 2)))
    kept = model.prune_intermediate_layers(indices=[3])
    assert kept == [3] and len(model.blocks) == 4


def test_official_checkpoint_loads_unchanged(official_tiny):
    ref, path = official_tiny
    model = timm.create_model("vrwkv_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_checkpoint_adapted_to_one_channel_new_classes_and_size(official_tiny):
    ref, path = official_tiny
    model = timm.create_model(
        "vrwkv_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=1, num_classes=3, img_size=256
    ).eval()
    # one input channel: the RGB kernels are summed (grey image == the same image in all three channels)
    torch.testing.assert_close(model.patch_embed.proj.weight, ref.patch_embed.proj.weight.sum(1, keepdim=True))
    # the position embedding was resampled to the 16 x 16 grid
    grid = ref.pos_embed.reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.pos_embed, expected, rtol=1e-5, atol=1e-6)
    # other class count: the classifier keeps its fresh initialisation, the features are pretrained
    grey = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(grey), ref.forward_features(grey.expand(1, 3, 256, 256)), rtol=1e-4, atol=1e-4)
    assert model(grey).shape == (1, 3)


def _load(path, name="vrwkv_tiny"):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_checkpoint_of_another_width_is_refused(official_tiny):
    _, path = official_tiny
    with pytest.raises(CheckpointError, match=r"embed_dim=192.*variant tiny.*vrwkv_small.*embed_dim=384") as e:
        _load(path, "vrwkv_small")
    assert str(path) in str(e.value)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}}, path)
    with pytest.raises(CheckpointError, match="not a Vision-RWKV checkpoint"):
        _load(path)


def test_truncated_and_missing_files_are_refused(official_tiny, tmp_path):
    _, path = official_tiny
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _load(cut)
    with pytest.raises(CheckpointError, match="no such weights file"):
        _load(tmp_path / "absent.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        _load(empty)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would call os.makedirs(marker)
        return (os.makedirs, (self.marker,))


def test_pickled_objects_are_refused_and_never_executed(official_tiny, tmp_path):
    _, path = official_tiny
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    sd = torch.load(path, weights_only=True)["state_dict"]
    torch.save({"state_dict": sd, "meta": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="pickled Python objects") as e:
        _load(evil)
    assert "makedirs" in str(e.value)  # names the offending global
    assert not marker.exists()


def test_partial_checkpoint_reports_missing_keys(official_tiny, tmp_path):
    _, path = official_tiny
    sd = torch.load(path, weights_only=True)["state_dict"]
    sd.pop("backbone.layers.3.att.key.weight")
    sd["backbone.layers.3.att.extra"] = torch.zeros(1)
    partial = tmp_path / "partial.pth"
    torch.save({"state_dict": sd}, partial)
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. blocks.3.att.key.weight\); 1 unexpected"):
        _load(partial)


def test_wrong_input_is_reported_clearly():
    model = timm.create_model("vrwkv_tiny")
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))


def test_pretrained_without_file_never_downloads():
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("vrwkv_tiny", pretrained=True)
