"""Parity with the official Vision-RWKV models (OpenGVLab/Vision-RWKV @ 0e0e38a).

A checkpoint laid out exactly like the released file (``official_checkpoint.make_official_checkpoint``) is
loaded through the public timm entry point, and our outputs are compared with the official model's outputs on
the same weights and inputs. Those were computed once, outside this repository, by running the official
modules unmodified in float64 (exact Bi-WKV in place of the CUDA kernel, the official pure-PyTorch
deformable attention, SyncBN -> BatchNorm2d, eval mode) and stored as float32 in
``tests/data/official/<variant>.safetensors``; ``<variant>.json`` describes them. The float32 rounding of the
official model itself stays below 2e-5 on these data (``float32_floor`` in the JSON), so the 1e-4 bound
leaves room for a different but exact summation order, while e.g. a ``|t-i|`` instead of ``|t-i|-1`` WKV
distance, a bilinear or antialiased position-embedding resize or a wrong ``ln0`` eps are 10-1000x above it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Optional

import pytest
import torch
from official_checkpoint import DATA_DIR, load_spec, make_input, make_official_checkpoint
from safetensors.torch import load_file

import timm
import medurwkv  # noqa: E402,F401  (registers the models with timm)

ATOL = 1e-4
CLASSIFIERS = ("vrwkv_tiny", "vrwkv_small")
ADAPTER = "vrwkv_adapter_tiny"


def _cases(variants) -> List:
    return [pytest.param(v, name, id=f"{v}-{name}") for v in variants for name in load_spec(v)["inputs"]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Dict[str, str]:
    """Lazily built checkpoint files, one per variant, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("official_ckpt")

    class _Files(dict):
        def __missing__(self, variant: str) -> str:
            self[variant] = str(make_official_checkpoint(variant, root / f"{variant}.pth"))
            return self[variant]

    return _Files()


@pytest.fixture(scope="module")
def models(checkpoints) -> Dict[str, torch.nn.Module]:
    """Lazily created models, loaded from the checkpoint files through timm, float32, eval mode."""

    class _Models(dict):
        def __missing__(self, variant: str) -> torch.nn.Module:
            assert timm.is_model(variant), f"{variant} is not registered with timm by `import medurwkv`"
            model = timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoints[variant]))
            self[variant] = model.float().eval()
            return self[variant]

    return _Models()


def _expected(variant: str) -> Dict[str, torch.Tensor]:
    return load_file(str(DATA_DIR / load_spec(variant)["expected_file"]))


def _error(got: torch.Tensor, expected: torch.Tensor, channels: Optional[torch.Tensor], shape) -> float:
    assert tuple(got.shape) == tuple(shape), f"shape {tuple(got.shape)}, official {tuple(shape)}"
    got = got.detach().float()
    if channels is not None:
        got = got[:, channels]
    return float((got - expected).abs().max())


def _where(got: torch.Tensor, expected: torch.Tensor, channels: Optional[torch.Tensor]) -> str:
    got = got.detach().float()
    if channels is not None:
        got = got[:, channels]
    diff = (got - expected).abs()
    idx = [int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)]
    if channels is not None and len(idx) > 1:
        idx[1] = int(channels[idx[1]])
    return f"worst at index {tuple(idx)}"


def _tokens_to_map(t: torch.Tensor, shape) -> torch.Tensor:
    """forward_features output -> NCHW map of ``shape`` (accepts NLC tokens, NCHW or NHWC maps)."""
    B, C, H, W = shape
    if t.dim() == 3:
        return t.reshape(B, H, W, C).permute(0, 3, 1, 2)
    if tuple(t.shape) == (B, C, H, W):
        return t
    return t.permute(0, 3, 1, 2)


@pytest.mark.parametrize("variant", CLASSIFIERS + (ADAPTER,))
def test_checkpoint_matches_committed_description(variant, checkpoints):
    """The rebuilt file has the released layout, and its values are the ones the expected outputs were
    computed from (guards against a drift of the deterministic fill)."""
    spec = load_spec(variant)
    ckpt = torch.load(checkpoints[variant], map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict", "meta"}
    sd = ckpt["state_dict"]
    assert list(sd) == list(spec["keys"])
    for key, value in sd.items():
        assert list(value.shape) == spec["keys"][key], key
        assert value.dtype == (torch.int64 if key.endswith("num_batches_tracked") else torch.float32), key
    drift = []
    for key, sums in spec["fill_checksums"].items():
        if key == "what":
            continue
        total, squares = sums
        v = sd[key].double()
        scale = math.sqrt(squares)  # the sum of |values| is at most sqrt(numel) times this
        if not (
            math.isclose(float(v.sum()), total, rel_tol=1e-9, abs_tol=1e-9 * scale * math.sqrt(v.numel()))
            and math.isclose(float((v * v).sum()), squares, rel_tol=1e-9, abs_tol=1e-12)
        ):
            drift.append(key)
    assert not drift, f"fill_tensor no longer reproduces the committed weights for {drift[:5]} ..."


@pytest.mark.parametrize("variant,name", _cases(CLASSIFIERS))
def test_classifier_parity(variant, name, models):
    """Logits, every block output (before the final norm) and the final normed map match the official
    mmcls ImageClassifier(VRWKV) run, at the pretraining size and at other sizes (position embedding
    resized; 120x200 also exercises the bottom/right padding of the patch embedding)."""
    model = models[variant]
    spec = load_spec(variant)["inputs"][name]
    outputs = spec["outputs"]
    expected = _expected(variant)
    x = make_input(variant, name)
    with torch.no_grad():
        logits = model(x)
        blocks = model.forward_intermediates(x, indices=None, norm=False, output_fmt="NCHW", intermediates_only=True)
        final = model.forward_features(x)
    assert len(blocks) == 12

    got = {"logits": logits, "norm": _tokens_to_map(final, outputs["norm"]["shape"])}
    got.update({f"blocks.{i}": b for i, b in enumerate(blocks)})
    errors, where = {}, {}
    for out_name, info in outputs.items():
        ref = expected[f"{name}/{out_name}"]
        channels = expected.get(f"{name}/{out_name}:channels")
        errors[out_name] = _error(got[out_name], ref, channels, info["shape"])
        if errors[out_name] > ATOL:
            where[out_name] = _where(got[out_name], ref, channels)
    bad = {k: v for k, v in errors.items() if v > ATOL}
    report = ", ".join(f"{k}: {v:.2e}" for k, v in errors.items())
    order = [f"blocks.{i}" for i in range(len(blocks))] + ["norm", "logits"]
    first = next((k for k in order if k in bad), None)  # the earliest stage that differs
    assert not bad, (
        f"{variant} {name}: outputs differ from the official model (atol {ATOL}); earliest: {first} "
        f"({where.get(first)}); max abs errors: {report}"
    )


@pytest.mark.parametrize("variant,name", _cases((ADAPTER,)))
def test_adapter_parity(variant, name, models):
    """The four maps [f1, f2, f3, f4] match the official VRWKV_Adapter (ADE20K UperNet backbone)."""
    model = models[variant]
    outputs = load_spec(variant)["inputs"][name]["outputs"]
    expected = _expected(variant)
    x = make_input(variant, name)
    with torch.no_grad():
        feats = model(x)
    assert isinstance(feats, (list, tuple)) and len(feats) == 4
    errors = {}
    for i, (out_name, info) in enumerate(outputs.items()):
        ref = expected[f"{name}/{out_name}"]
        channels = expected.get(f"{name}/{out_name}:channels")
        errors[out_name] = (_error(feats[i], ref, channels, info["shape"]), _where(feats[i], ref, channels))
    bad = {k: v for k, v in errors.items() if v[0] > ATOL}
    assert not bad, f"{variant} {name}: maps differ from the official model (atol {ATOL}): " + ", ".join(
        f"{k}: {e:.2e} ({w})" for k, (e, w) in errors.items()
    )


def _digest(t: torch.Tensor) -> str:
    """Content of a tensor, independent of its name and shape (a [1, 1, C] mix vector stored as [C] still
    matches)."""
    return hashlib.sha1(t.detach().cpu().contiguous().reshape(-1).numpy().tobytes()).hexdigest()


def test_adapter_checkpoint_heads_ignored_and_backbone_keys_used(checkpoints, models):
    """Loading the ADE20K UperNet checkpoint ignores decode_head/auxiliary_head without error, every
    backbone tensor of the file ends up in the model, and every model tensor comes from the file."""
    model = models[ADAPTER]  # created from the full file (heads included) without error
    sd = torch.load(checkpoints[ADAPTER], map_location="cpu", weights_only=True)["state_dict"]
    heads = [k for k in sd if k.startswith(("decode_head.", "auxiliary_head."))]
    assert any(k.startswith("decode_head.") for k in heads) and any(k.startswith("auxiliary_head.") for k in heads)
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.") and v.is_floating_point()}
    assert len(backbone) + len(heads) + sum(k.endswith("num_batches_tracked") for k in sd if k.startswith("backbone.")) == len(sd)

    own = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    own_digests = {_digest(v) for v in own.values()}
    unused = [k for k, v in backbone.items() if _digest(v) not in own_digests]
    assert not unused, f"{len(unused)} backbone tensors of the checkpoint are not in the model, e.g. {unused[:5]}"
    file_digests = {_digest(v) for v in backbone.values()}
    not_loaded = [k for k, v in own.items() if _digest(v) not in file_digests]
    assert not not_loaded, f"{len(not_loaded)} model tensors did not come from the checkpoint, e.g. {not_loaded[:5]}"
    head_digests = {_digest(sd[k]) for k in heads if sd[k].is_floating_point()}
    assert not head_digests & own_digests, "decode/auxiliary head weights ended up in the backbone"
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_bn == sum(k.startswith("backbone.") and k.endswith("running_var") for k in sd)
