"""Med-URWKV network: shapes, gradients, parameter budget, pretrained encoder loading, MC dropout, input errors."""

import pytest
import timm
import torch

from medurwkv.checkpoint import CheckpointError
from medurwkv.nets.medurwkv import MedURWKV, PatchExpand, PatchMerge, UNetEncoder, enable_mc_dropout

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


class _ConvEncoder(UNetEncoder):
    """A non-RWKV encoder written against the interface: four strided convolutions of different widths."""

    def __init__(self, in_channels: int = 1, widths=(8, 16, 24, 32)):
        super().__init__()
        layers, prev = [], in_channels
        for i, w in enumerate(widths):
            layers.append(torch.nn.Conv2d(prev, w, kernel_size=4 if i == 0 else 2, stride=4 if i == 0 else 2))
            prev = w
        self.layers = torch.nn.ModuleList(layers)
        self.out_channels = tuple(widths)
        self.strides = (4, 8, 16, 32)

    def forward(self, x):
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


def test_an_encoder_is_one_class_and_sizes_the_decoder():
    from medurwkv.nets import AdapterEncoder, MedURWKV as Exported, PlainEncoder

    assert Exported is MedURWKV
    adapter, plain = AdapterEncoder("tiny", in_channels=1), PlainEncoder("small", in_channels=1)
    assert (adapter.out_channels, adapter.strides) == ((192,) * 4, (4, 8, 16, 32))
    assert (plain.out_channels, plain.strides) == ((384,) * 4, (4, 8, 16, 32))
    # the default decoder widths follow the built encoder: the paper-sized tiny network keeps its shapes
    tiny = MedURWKV(1, 2, variant="tiny", encoder="adapter")
    assert tiny.bottleneck_proj.weight.shape == (384, 192) and tiny.head.weight.shape == (2, 48, 1, 1)
    assert MedURWKV(1, 2, variant="small", encoder=plain).fuse[0].weight.shape == (384, 384 + 384)
    # a new encoder: the skips' widths come from it (24 at stride 16, 16 at 8, 8 at 4; 32 into the bottleneck)
    torch.manual_seed(0)
    net = MedURWKV(1, 3, encoder=_ConvEncoder(), decoder_dims=(64, 32, 16, 8), drop_path_rate=0.0).eval()
    assert [f.weight.shape[1] for f in net.fuse] == [32 + 24, 16 + 16, 8 + 8]
    assert net.bottleneck_proj.weight.shape == (64, 32)
    with torch.no_grad():
        assert net(torch.randn(2, 1, 64, 96)).shape == (2, 3, 64, 96)
    assert net.encoder_parameters() == list(net.encoder.parameters())


def test_encoder_with_other_strides_is_refused():
    enc = _ConvEncoder()
    enc.strides = (2, 4, 8, 16)
    with pytest.raises(ValueError, match=r"strides \(2, 4, 8, 16\).*needs four maps at strides \(4, 8, 16, 32\)"):
        MedURWKV(1, 2, encoder=enc)
    with pytest.raises(TypeError, match="UNetEncoder"):
        MedURWKV(1, 2, encoder=torch.nn.Identity())


def test_pretrained_encoder_from_safetensors_equals_official_pth(tmp_path):
    """One route for encoder weights: official .pth, safetensors and converted files give the same encoder."""
    from medurwkv.checkpoint import save_weights

    ref = randomize(timm.create_model("vrwkv_tiny")).eval()
    pth = tmp_path / "vrwkv_t_in1k_224.pth"
    torch.save({"state_dict": to_official_layout(ref.state_dict()), "meta": {}}, pth)
    st = tmp_path / "encoder.safetensors"
    save_weights(to_official_layout(ref.state_dict()), st)
    a = MedURWKV(1, 2, encoder="plain", pretrained_encoder=str(pth)).pretrained_module.state_dict()
    b = MedURWKV(1, 2, encoder="plain", pretrained_encoder=str(st)).pretrained_module.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not hasattr(torch.ops.medurwkv, "bi_wkv"), reason="needs the torch.ops.medurwkv.bi_wkv operator (medurwkv.ops)")
@pytest.mark.parametrize("encoder", ["adapter", "plain"])
def test_torchscript_script_saves_loads_and_matches_eager_at_any_size(encoder, tmp_path):
    """torch.jit.script (not a trace): the saved module takes other slice sizes than any example, exactly."""
    torch.manual_seed(0)
    model = MedURWKV(1, 2, encoder=encoder).eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.jit.optimized_execution(False), torch.no_grad():  # no profiling runs: seconds, not a minute
        for shape in ((1, 1, 64, 64), (2, 1, 96, 128)):
            x = torch.randn(*shape)
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(Exception, match="divisible by 32"):
            loaded(torch.randn(1, 1, 100, 128))


@pytest.mark.slow
def test_onnx_export_matches_eager_for_other_batch_sizes(tmp_path):
    """ONNX export of the inference network (adapter encoder, fewer blocks to keep the export to seconds) run
    with onnxruntime against eager PyTorch, for the example batch and another batch size."""
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    from medurwkv.nets import AdapterEncoder

    torch.manual_seed(0)
    encoder = AdapterEncoder("tiny", in_channels=1, embed_dim=96, depth=4, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]])
    model = MedURWKV(1, 2, encoder=encoder, bottleneck_depth=1, decoder_depths=(1, 1, 1)).eval()
    path = tmp_path / "medurwkv.onnx"
    torch.onnx.export(
        model, (torch.rand(1, 1, 64, 64),), str(path), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["pred"], dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 1, 64, 64)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == (batch, 2, 64, 64)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
