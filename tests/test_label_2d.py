"""The 2D model ``medurwkv2d`` of the MONAI Label app (lib/configs/medurwkv2d.py, lib/infers/medurwkv2d.py,
lib/image2d.py) on a real server (tests/label_server.py), through ``MONAILabelClient`` as 3D Slicer's module uses it.

The staged 2D bundle is the shipped ``bundle2d/`` with, for speed only, 64 x 64 network input (batches of 2 in
training), and, to show that
the names come from the bundle, other class names in its ``metadata.json``. Its ``models/model.pt`` is a randomly
initialised (seeded) Med-URWKV saved here: only the mechanics are checked (sizes, grid, orientation, values), not
segmentation quality. The reference for the masks is computed here independently of MONAI and of the app: PIL
pixels (rows, columns), torch ``interpolate`` and the same network, in the 2D bundle's documented layout (arrays
in (W, H) order, ``medurwkv/data2d.py``). The images are non-square crops whose masks are asymmetric, so a swap of
rows and columns changes the shape and a flip changes most pixels.
"""

from __future__ import annotations

import json
import tempfile
import types
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from label_server import ROOT, VOLUMES, http, serving, stage, status_of, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL_2D = "medurwkv2d"
MNI = ROOT / "sample_data" / "2d" / "mni152_3class"  # 116 x 98 grayscale slices with 0/1/2 masks
BUNDLE2D = ROOT / "bundle2d"
RGB = ROOT / "sample_data" / "2d" / "rgb" / "visible_woman_head.png"  # 142 x 167 RGB
GRAY = ROOT / "sample_data" / "2d" / "heads" / "images" / "itk_kmeanstest_t1_z088.png"  # 128 x 62 grayscale
CLASSES = {"0": "background", "1": "lesion", "2": "vessel"}  # the staged bundle's channel_def
SIZE = 64  # the staged network input (image_size)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from PIL import Image

    from medurwkv.checkpoint import save_weights
    from medurwkv.nets.medurwkv import MedURWKV

    c = stage(tmp_path_factory.mktemp("label_2d"), volumes={"colin_a": VOLUMES["colin_a"]}, held_out={})
    c.bundle2d = c.root / "bundle2d"
    shutil.copytree(BUNDLE2D, c.bundle2d, ignore=shutil.ignore_patterns("eval", "logs", "__pycache__", "*.pt"))
    for name in ("inference.json", "train.json"):  # speed only: 64 x 64 input, batches of 2, no loader workers
        cfg_path = c.bundle2d / "configs" / name
        cfg = json.loads(cfg_path.read_text())
        cfg.update(image_size=[SIZE, SIZE], num_workers=0, **({"batch_size": 2} if "train" in cfg else {}))
        cfg_path.write_text(json.dumps(cfg, indent=2))
    meta_path = c.bundle2d / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["outputs"]["pred"]["channel_def"] = CLASSES
    meta_path.write_text(json.dumps(meta, indent=2))
    torch.manual_seed(0)
    c.net = MedURWKV(in_channels=3, out_channels=3, variant="tiny", encoder="adapter").eval()
    save_weights(c.net.state_dict(), c.bundle2d / "models" / "model.pt")

    # non-square crops (W x H): RGB 120 x 72 of the cryosection, grayscale 128 x 62 head slice; one PNG in the studies
    c.rgb = c.root / "rgb_crop.png"
    Image.open(RGB).convert("RGB").crop((10, 40, 130, 112)).save(c.rgb)
    c.gray = c.root / "gray.png"
    shutil.copy(GRAY, c.gray)
    c.jpeg = c.root / "rgb_crop.jpg"
    Image.open(c.rgb).save(c.jpeg, quality=90)
    shutil.copy(GRAY, c.studies / "a_head_slice.png")
    with serving(c, extra_conf={"bundle2d": str(c.bundle2d)}):
        yield c


def reference_mask(c, png: Path) -> np.ndarray:
    """The mask (rows, columns) computed without MONAI: PIL pixels in [0, 1] (grayscale replicated), the bundle's
    (W, H) layout, bilinear resize to SIZE, ImageNet normalisation, network, softmax, bilinear resize back, argmax."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    height, width = rgb.shape[:2]
    x = torch.from_numpy(rgb).permute(2, 1, 0)[None]  # (1, 3, W, H)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False) - mean) / std
    with torch.no_grad():
        p = torch.softmax(c.net(x), 1)
    p = torch.nn.functional.interpolate(p, size=(width, height), mode="bilinear", align_corners=False)
    mask = p.argmax(1)[0].numpy().T  # (H, W)
    # the test can see a flip or a transpose: the mask is not symmetric
    assert (mask != mask[::-1]).mean() > 0.1 and (mask != mask[:, ::-1]).mean() > 0.1, "reference mask too symmetric"
    return mask


def assert_same_mask(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape  # (H, W): rows and columns not swapped
    assert set(np.unique(got).tolist()) <= {0, 1, 2}  # the bundle's classes
    assert (got == ref).mean() > 0.995, f"agreement {(got == ref).mean():.3f}"  # not flipped


def slicer_volume(png: Path):
    """What 3D Slicer loads: the PNG read by ITK (one slice; column i, row j from the top)."""
    import SimpleITK as sitk

    return sitk.ReadImage(str(png))


def test_info_lists_the_2d_model_with_the_bundles_labels(ctx):
    info = ctx.client.info()
    model = info["models"][MODEL_2D]
    assert model["labels"] == {"lesion": 1, "vessel": 2}  # the staged metadata's channel_def, background dropped
    assert model["dimension"] == 2 and model["type"] == "segmentation"
    assert model["weights"]["available"] is True
    assert MODEL_2D in info["trainers"]
    assert "medurwkv" in info["models"]  # the 3D model is still served
    assert "a_head_slice" in ctx.client.datastore()["objects"]  # a PNG in the studies folder is listed
    # Next Sample: Slicer's plugin downloads the image to a file named after "name", whose extension picks the reader
    sample = ctx.client.next_sample("first", {})
    assert sample["id"] == "a_head_slice" and sample["name"] == "a_head_slice.png" and "path" not in sample


def test_uploaded_rgb_png_gets_a_mask_of_its_size_on_slicers_grid(ctx):
    import SimpleITK as sitk
    from PIL import Image

    ref = reference_mask(ctx, ctx.rgb)
    assert ref.shape == (72, 120)
    image_id = ctx.client.upload_image(str(ctx.rgb), "rgb_case")["image"]
    assert image_id == "rgb_case" and image_id in ctx.client.datastore()["objects"]
    status, body = http(ctx, "GET", "/datastore/image?image=rgb_case")  # Next Sample downloads the same bytes
    assert status == 200 and body == ctx.rgb.read_bytes()

    path, result = ctx.client.infer(MODEL_2D, "rgb_case", {"result_extension": ".png"})
    assert path.endswith(".png") and result["image_size"] == {"width": 120, "height": 72}
    assert result["label_names"] == {"lesion": 1, "vessel": 2}
    with Image.open(path) as im:
        assert im.size == (120, 72) and im.mode == "L"
        assert_same_mask(np.asarray(im), ref)

    # as Slicer asks (result_extension .nrrd, uint8): a one-slice volume on the grid of the PNG it loaded
    path, result = ctx.client.infer(MODEL_2D, "rgb_case", {"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert result["probabilities"] == "cached"  # the network ran once for this image
    volume, answer = slicer_volume(ctx.rgb), sitk.ReadImage(path)
    assert answer.GetSize() == volume.GetSize() + (1,)
    assert answer.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(answer.GetOrigin()[:2], volume.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(answer.GetSpacing()[:2], volume.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(np.reshape(answer.GetDirection(), (3, 3))[:2, :2],
                               np.reshape(volume.GetDirection(), (2, 2)), atol=1e-6)
    assert_same_mask(sitk.GetArrayFromImage(answer)[0], ref)  # (k, j, i): slice 0 is (rows, columns)

    # Submit Label: the answer, as Slicer saves the segmentation (on the image's grid), is accepted; a class the
    # bundle does not have is refused, naming the classes
    assert ctx.client.save_label("rgb_case", path, tag="final")["label"] == "rgb_case"
    bad = sitk.GetArrayFromImage(answer)
    bad[0, 0, 0] = 7
    wrong = sitk.GetImageFromArray(bad)
    wrong.CopyInformation(answer)
    bad_path = str(ctx.client_dir / "bad_label.nrrd")
    sitk.WriteImage(wrong, bad_path)
    status, body = http(ctx, "GET", "/info/")
    assert status == 200
    from monailabel.client.client import MONAILabelClientException

    with pytest.raises(MONAILabelClientException) as e:
        ctx.client.save_label("rgb_case", bad_path, tag="final")
    assert status_of(e.value) == 422 and "[7]" in str(e.value) and "vessel" in str(e.value)


def test_grayscale_png_sent_as_a_file_gets_a_nifti_mask_on_the_same_grid(ctx):
    import nibabel as nib

    ref = reference_mask(ctx, ctx.gray)
    assert ref.shape == (62, 128)
    path, result = ctx.client.infer(MODEL_2D, "", {"result_extension": ".nii.gz"}, file=str(ctx.gray))
    img = nib.load(path)
    assert img.shape == (128, 62, 1)  # (W, H, 1): Slicer's one-slice volume
    # ITK's PNG grid (origin 0, spacing 1, identity direction in LPS) is diag(-1, -1, 1) in RAS
    np.testing.assert_allclose(img.affine, np.diag([-1.0, -1.0, 1.0, 1.0]), atol=1e-6)
    assert_same_mask(np.asarray(img.dataobj)[:, :, 0].T, ref)


def test_uploaded_jpeg_is_listed_and_gets_a_png_mask_not_a_lossy_one(ctx):
    from PIL import Image

    ref = reference_mask(ctx, ctx.jpeg)  # PIL decodes the JPEG as the server's loader does
    assert ctx.client.upload_image(str(ctx.jpeg), "jpeg_case")["image"] == "jpeg_case"
    assert ctx.client.datastore()["objects"]["jpeg_case"]["image"]["ext"] == ".jpg"
    path, _ = ctx.client.infer(MODEL_2D, "jpeg_case", {})
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (120, 72)
        assert_same_mask(np.asarray(im), ref)


# ----------------------------------------------------------------------------------------------- no server needed
@pytest.fixture(scope="module")
def image2d():
    import sys

    app, flag = str(ROOT / "monailabel_app"), sys.dont_write_bytecode
    sys.path.insert(0, app)
    sys.dont_write_bytecode = True  # nothing written into the repository
    try:
        from lib import image2d

        yield image2d
    finally:
        sys.path.remove(app)
        sys.dont_write_bytecode = flag


def test_headers_give_pils_sizes_and_masks_land_on_itks_grid(image2d, tmp_path):
    import SimpleITK as sitk
    from PIL import Image

    rng = np.random.default_rng(0)
    cases = {"L": 1, "RGB": 3, "RGBA": 4, "I;16": 1, "P": 1, "LA": 2}
    for mode, channels in cases.items():
        path = tmp_path / f"{mode.replace(';', '')}.png"
        Image.new(mode, (37, 21)).save(path)
        width, height, n, item = image2d.read_header_2d(str(path))
        assert (width, height) == Image.open(path).size == (37, 21) and n == channels
        assert item == (2 if mode == "I;16" else 1)
    jpeg = tmp_path / "photo.jpg"  # EXIF before the frame header, progressive, 0.1 mm pixels
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000
    Image.fromarray(rng.integers(0, 255, (21, 37, 3), dtype=np.uint8)).save(
        jpeg, exif=exif, progressive=True, dpi=(254, 254))
    assert image2d.read_header_2d(str(jpeg)) == (37, 21, 3, 1)

    # a (W, H) mask written for the JPEG: a PNG of W x H, a one-slice NRRD on ITK's grid of the JPEG (spacing too)
    mask = rng.integers(0, 3, (37, 21))
    image2d.write_mask_2d(mask, str(jpeg), str(tmp_path / "m.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), mask.T)
    image2d.write_mask_2d(mask, str(jpeg), str(tmp_path / "m.nrrd"))
    out, ref = sitk.ReadImage(str(tmp_path / "m.nrrd")), sitk.ReadImage(str(jpeg))
    assert out.GetSize() == (37, 21, 1)
    np.testing.assert_allclose(out.GetSpacing()[:2], ref.GetSpacing(), atol=1e-9)
    assert ref.GetSpacing()[0] == pytest.approx(0.1)
    assert np.array_equal(sitk.GetArrayFromImage(out)[0], mask.T)
    geometry = image2d.slicer_geometry(str(jpeg))
    assert geometry.shape == (37, 21, 1)
    np.testing.assert_allclose(geometry.affine, np.diag([-0.1, -0.1, 1.0, 1.0]), atol=1e-9)  # LPS -> RAS


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_malformed_and_oversized_pngs_are_4xx_naming_the_problem_and_the_server_stays_up(ctx, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    huge = tmp_path / "huge.png"  # a valid header declaring 100000 x 100000 RGB (30 GB decoded), 60 bytes on disk
    huge.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    huge_jpeg = tmp_path / "huge_jpeg.jpg"  # a JPEG frame header declaring 60000 x 60000, 3 components
    huge_jpeg.write_bytes(b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
                          + b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, 60000, 60000, 3) + b"\x01\x11\x00" * 3
                          + b"\xff\xd9")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(ctx.rgb.read_bytes()[:200])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"GIF89a not a png at all" * 4)
    cases = [(huge, 413, "100000 x 100000"), (huge_jpeg, 413, "60000 x 60000"),
             (truncated, 422, "could not be decoded"), (garbage, 422, "neither a PNG nor a JPEG")]
    import psutil

    server = psutil.Process(ctx.server.proc.pid)
    rss = server.memory_info().rss
    for path, status, words in cases:
        start = time.time()
        with pytest.raises(MONAILabelClientException) as e:
            ctx.client.upload_image(str(path), path.stem)
        assert status_of(e.value) == status and words in str(e.value), str(e.value)
        with pytest.raises(MONAILabelClientException) as e:
            ctx.client.infer(MODEL_2D, "", {}, file=str(path))
        assert status_of(e.value) == status and words in str(e.value), str(e.value)
        assert time.time() - start < 30
        assert str(tmp_path) not in str(e.value)  # no server or client path in the answer
    assert server.memory_info().rss - rss < 300 * 2**20  # nothing of the declared 30 GB / 10 GB was allocated
    objects = ctx.client.datastore()["objects"]
    assert not {"huge", "huge_jpeg", "truncated", "garbage"} & set(objects)

    # a volume to the 2D model, a PNG to the 3D model: 415 naming the right model
    with pytest.raises(MONAILabelClientException) as e:
        ctx.client.infer("medurwkv", "a_head_slice", {})
    assert status_of(e.value) == 415 and MODEL_2D in str(e.value)
    with pytest.raises(MONAILabelClientException) as e:
        ctx.client.infer(MODEL_2D, "colin_a", {})
    assert status_of(e.value) == 415 and "is a volume" in str(e.value)
    with pytest.raises(MONAILabelClientException) as e:
        ctx.client.infer(MODEL_2D, "", {"result_extension": ".exe"}, file=str(ctx.gray))
    assert status_of(e.value) == 422 and "result_extension" in str(e.value)

    assert ctx.server.proc.poll() is None
    assert http(ctx, "GET", "/info/")[0] == 200
    path, _ = ctx.client.infer(MODEL_2D, "a_head_slice", {})  # still segments
    assert Path(path).stat().st_size > 0


def test_training_on_submitted_2d_labels_writes_weights_that_inference_reloads(ctx):
    """Labels as Slicer submits them (a one-slice NRRD on the image's grid) and as a PNG; one epoch from scratch."""
    import SimpleITK as sitk

    weights = ctx.bundle2d / "models" / "model.pt"
    before = weights.stat().st_mtime_ns
    for i, z in enumerate(("040", "048")):
        image_id = f"mni_{z}"
        ctx.client.upload_image(str(MNI / "images" / f"mni152_2009a_z{z}.png"), image_id)
        label_png = MNI / "labels" / f"mni152_2009a_z{z}.png"
        if i == 0:
            label = str(ctx.client_dir / f"{image_id}.nrrd")
            sitk.WriteImage(sitk.JoinSeries(sitk.ReadImage(str(label_png))), label)  # (W, H, 1), the PNG's grid
        else:
            label = str(label_png)
        assert ctx.client.save_label(image_id, label, tag="final")["label"] == image_id
    def finished():
        s = ctx.client.train_status()
        return s if s["status"] not in ("SUBMITTED", "RUNNING") else None

    ctx.client.train_start("medurwkv", {"max_epochs": 1})  # the 3D trainer takes volumes only: none is labeled
    status = wait_for(finished, 300, "the 3D training")
    assert status["status"] == "ERROR"
    assert "No volume has a final label yet" in "\n".join(status["details"][-5:])
    ctx.client.train_start(MODEL_2D, {"max_epochs": 1, "pretrained": False, "val_split": 0.5})
    status = wait_for(finished, 400, "the 2D training")
    assert status["status"] == "DONE", status.get("details", [])[-10:]
    assert weights.stat().st_mtime_ns != before
    try:
        path, result = ctx.client.infer(MODEL_2D, "mni_040", {})
        assert result["weights"]["loaded_mtime_ns"] == weights.stat().st_mtime_ns  # hot-reloaded
        assert ctx.client.info()["trainers"][MODEL_2D]["config"]["max_epochs"] == 100  # the bundle's epochs
    finally:  # the other tests' reference is the random network
        from medurwkv.checkpoint import save_weights

        save_weights(ctx.net.state_dict(), weights)


def test_label_pngs_of_a_killed_2d_training_are_removed_by_the_next_one(tmp_path, monkeypatch):
    """Stop Training (DELETE /train/) kills the training process: its ``finally`` never ran, so every stopped 2D
    training left its folder of label masks (patient data) in the temporary folder for good. The next training,
    holding the training lock, removes what a killed one left."""
    import SimpleITK as sitk

    monkeypatch.syspath_prepend(str(ROOT / "monailabel_app"))
    from lib.trainers import medurwkv as train3d
    from lib.trainers import medurwkv2d

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    bundle = tmp_path / "bundle2d"
    shutil.copytree(BUNDLE2D, bundle, ignore=shutil.ignore_patterns("eval", "logs", "__pycache__", "*.pt"))
    image = MNI / "images" / "mni152_2009a_z040.png"
    label = tmp_path / "label.nrrd"
    sitk.WriteImage(sitk.JoinSeries(sitk.ReadImage(str(MNI / "labels" / "mni152_2009a_z040.png"))), str(label))
    datastore = types.SimpleNamespace(datalist=lambda: [{"image": str(image), "label": str(label)}])
    written = []

    def training(self, request, datastore):  # as far as a training gets before it is stopped
        written.extend(d["label"] for d in self._fetch_datalist(request, datastore))
        return {}

    monkeypatch.setattr(train3d.BundleTrainTask, "__call__", training)
    monkeypatch.setattr(train3d.MedURWKVTrain, "check_request", lambda self, request: request)
    trainer = medurwkv2d.MedURWKV2dTrain(str(bundle), {})
    with monkeypatch.context() as killed:  # kill -9: no cleanup ran
        killed.setattr(medurwkv2d.shutil, "rmtree", lambda *a, **k: None)
        trainer({"model": MODEL_2D}, datastore)
    assert Path(written[0]).is_file()
    trainer({"model": MODEL_2D}, datastore)
    assert not Path(written[0]).exists() and not Path(written[1]).exists()
    left = [p for p in list(tmp_path.rglob("*.png")) if "bundle2d" in str(p) or "tmp" in p.parts]
    assert not left, left
