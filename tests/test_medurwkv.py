"""Med-URWKV network: shapes, gradients, parameter budget, pretrained encoder loading, MC dropout, input errors."""

import pytest
import timm
import torch

from medurwkv.checkpoint import CheckpointError
from medurwkv.nets.medurwkv import MedURWKV, PatchExpand, PatchMerge, enable_mc_dropout

from vrwkv_helpers import randomize, to_official_layout


@pytest.mark.parametrize("variant", ["tiny", "small"])
@pytest.mark.parametrize("encoder", ["plain", "adapter"])
@pytest.mark.parametrize("in_channels,size", [(1, 224), (3, 256)])
def test_forward_backward(variant, encoder, in_channels, size):
    torch.manual_seed(0)
    # no stochastic depth: with batch 1 a dropped residual branch would get no gradient by design
    model = MedURWKV(in_channels, 3, variant=variant, encoder=encoder, drop_path_rate=0.0).train()
    x = torch.randn(1, in_channels, size, size)
    y = model(x)
    assert y.shape == (1, 3, size, size) and torch.isfinite(y).all()
    y.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    # the gradient reaches the first layer of the encoder and the decoder's first stage
    assert model.pretrained_module.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.stages[0].blocks[0].att.spatial_decay.grad.abs().sum() > 0


def test_non_square_input():
    model = MedURWKV(1, 2, encoder="plain").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 96, 160)).shape == (2, 2, 96, 160)


def test_tiny_adapter_parameter_budget_matches_paper():
    counts = MedURWKV(3, 2, variant="tiny", encoder="adapter").parameter_count()
    # paper: 14.33 M for Med-URWKV (encoder = VRWKV-T + ViT-Adapter, 8.40 M)
    assert counts["encoder"] == 8_404_592
    assert abs(counts["total"] - 14.33e6) / 14.33e6 <= 0.10, counts


def test_patch_expand_and_merge_are_exact_rearrangements():
    x = torch.randn(2, 3, 5, 4)
    pe = PatchExpand(4, 4, scale=2)
    with torch.no_grad():
        pe.expand.weight.copy_(torch.cat([torch.eye(4)] * 4))  # output = the input four times
        pe.norm = torch.nn.Identity()
        y = pe(x)  # each 2x2 block repeats the input pixel
    assert y.shape == (2, 6, 10, 4)
    for a in range(2):
        for b in range(2):
            torch.testing.assert_close(y[:, a::2, b::2], x)
    pm = PatchMerge(4, 16)
    with torch.no_grad():
        pm.norm = torch.nn.Identity()
        pm.reduction.weight.copy_(torch.eye(16))
        z = pm(y)
    assert z.shape == (2, 3, 5, 16)
    for q in range(4):  # the four neighbours of the merged patch are the repeated pixel
        torch.testing.assert_close(z[..., 4 * q : 4 * q + 4], x)


def test_load_pretrained_encoder_from_official_imagenet_checkpoint(tmp_path):
    ref = randomize(timm.create_model("vrwkv_tiny")).eval()
    path = tmp_path / "vrwkv_t_in1k_224.pth"
    torch.save({"state_dict": to_official_layout(ref.state_dict()), "meta": {}}, path)
    model = MedURWKV(1, 2, encoder="plain", pretrained_encoder=str(path)).eval()
    grey = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        ours = model.pretrained_module.forward_features(grey)
        theirs = ref.forward_features(grey.expand(1, 3, 64, 64))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the adapter encoder refuses a classification checkpoint and says which file it wants
    with pytest.raises(CheckpointError, match="upernet_vrwkv_adapter"):
        MedURWKV(1, 2, encoder="adapter").load_pretrained_encoder(str(path))


def test_mc_dropout_is_stochastic_but_eval_is_not():
    model = MedURWKV(1, 2, encoder="plain", dropout=0.0).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        model.dropout = 0.3  # what MONAI Label's epistemic scoring does
        enable_mc_dropout(model)
        assert not model.training and model.drop.training
        c, d = model(x), model(x)
    assert not torch.equal(c, d)
    with pytest.raises(ValueError, match="dropout"):
        model.dropout = 1.5


def test_bad_input_is_reported_clearly():
    model = MedURWKV(1, 2, encoder="plain")
    with pytest.raises(ValueError, match="divisible by 32, got 100x128"):
        model(torch.randn(1, 1, 100, 128))
    with pytest.raises(ValueError, match="built for 1 input channel"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(1, 64, 64))
    with pytest.raises(ValueError, match="encoder must be"):
        MedURWKV(1, 2, encoder="resnet")
    with pytest.raises(ValueError, match="variant must be"):
        MedURWKV(1, 2, variant="huge")
