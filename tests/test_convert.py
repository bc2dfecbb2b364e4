"""`python -m medurwkv convert`: official checkpoint -> tensor-only encoder weights with a report."""

import hashlib
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from medurwkv.checkpoint import CheckpointError
from medurwkv.convert import convert, detect_variant
from medurwkv.nets.medurwkv import MedURWKV

from vrwkv_helpers import randomize, to_official_layout


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    ref = randomize(timm.create_model("vrwkv_tiny"), seed=3).eval()
    path = tmp_path_factory.mktemp("src") / "vrwkv_t_in1k_224.pth"
    torch.save({"state_dict": to_official_layout(ref.state_dict()), "meta": {"epoch": 300}}, path)
    return ref, path


def test_cli_converts_and_reports(official, tmp_path):
    ref, src = official
    dst = tmp_path / "encoder.pt"
    out = subprocess.run(
        [sys.executable, "-m", "medurwkv", "convert", str(src), str(dst), "--in_channels", "1"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    report = out.stdout
    digest = hashlib.sha256(dst.read_bytes()).hexdigest()
    assert f"sha256        : {digest}" in report
    assert "variant       : tiny (plain encoder" in report
    assert "ignored       : head.* (2)" in report and "missing       : 0" in report
    weights = torch.load(dst, weights_only=True)
    assert weights["patch_embed.proj.weight"].shape == (192, 1, 16, 16)
    # the converted file initialises the network exactly like the official checkpoint does
    a = MedURWKV(1, 2, encoder="plain", pretrained_encoder=str(dst))
    b = MedURWKV(1, 2, encoder="plain", pretrained_encoder=str(src))
    for (k, va), vb in zip(a.pretrained_module.state_dict().items(), b.pretrained_module.state_dict().values()):
        assert torch.equal(va, vb), k


def test_safetensors_output_with_metadata(official, tmp_path):
    _, src = official
    dst = tmp_path / "encoder.safetensors"
    report = convert(str(src), str(dst), quiet=True)
    assert report["sha256"] == hashlib.sha256(dst.read_bytes()).hexdigest()
    assert report["mapped"] == len(load_file(str(dst))) == 223
    assert detect_variant(load_file(str(dst)))["variant"] == "tiny"


def test_requested_variant_must_match(official, tmp_path):
    _, src = official
    with pytest.raises(CheckpointError, match="checkpoint is variant 'tiny', but 'small' was requested"):
        convert(str(src), str(tmp_path / "x.pt"), variant="small", quiet=True)
    assert not (tmp_path / "x.pt").exists()


class _Config:  # any user class: unpickling it would import this module
    pass


def test_refuses_pickled_objects_without_writing(tmp_path, official):
    _, src = official
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": torch.load(src, weights_only=True)["state_dict"], "cfg": _Config()}, evil)
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"previous")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        convert(str(evil), str(dst), quiet=True)
    assert dst.read_bytes() == b"previous"  # nothing already written is lost


def test_bundle_network_def_takes_the_official_file_without_converting(official, tmp_path):
    """One route for encoder weights: train.json's network_def loads an official .pth itself (convert.json is an
    optional cache), into exactly the tensors a converted file gives, and the recipe then freezes the encoder."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    ref, src = official
    bundle = Path(__file__).resolve().parents[1] / "bundle"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), "encoder": "plain", "pretrained_encoder_path": str(src)})
    net = parser.get_parsed_content("network_def")
    converted = tmp_path / "encoder.pt"
    convert(str(src), str(converted), in_channels=1, quiet=True)
    expected = MedURWKV(1, 2, encoder="plain", pretrained_encoder=str(converted)).pretrained_module.state_dict()
    got = net.pretrained_module.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    torch.testing.assert_close(got["blocks.0.att.key.weight"], ref.state_dict()["blocks.0.att.key.weight"])
    assert parser.get_parsed_content("train#handlers#1#epochs") == parser.get_parsed_content("freeze_encoder_epochs") > 0
