#!/usr/bin/env python
"""Build the 2D sample data (``sample_data/2d/``) from locally installed sources; nothing is downloaded.

Usage (from the repository root, with the project's venv)::

    python sample_data/build_2d.py [--out sample_data/2d] [--nilearn PATH]

Sources:

* ``sample_data/imagesTr``, ``labelsTr``, ``imagesTs``, ``labelsTs`` of this repository (the Colin27 and ITK
  KmeansTest heads, see ``sample_data/README.md``) -> ``heads/``: axial slices with binary brain masks
  (``NAME.png`` + ``NAME_mask.png``, 0/255, the BUSI layout).
* the MNI ICBM152 2009a (nonlinear symmetric) T1 template and its grey- and white-matter probability maps
  shipped inside the ``nilearn`` wheel (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``)
  -> ``mni152_3class/``: axial slices at 2 mm with index masks 0 background, 1 grey matter, 2 white matter,
  and ``dataset.json`` (split 0.6/0.2/0.2, seed 0, by ``medurwkv.data2d.build_datalist``).
  ``--nilearn`` takes an installed ``nilearn`` package folder, its ``datasets/data`` folder or the wheel
  file itself; by default the installed package is used. nilearn is not in requirements.txt (only this
  script needs it, and only its data files: it is never imported). Get it with ``pip install nilearn==0.14.1``
  or, without its dependencies, ``pip download nilearn==0.14.1 --no-deps -d /tmp/whl`` and
  ``--nilearn /tmp/whl/nilearn-0.14.1-py3-none-any.whl``.
* Debian ``insighttoolkit5-examples`` -> ``rgb/visible_woman_head.png``: a Visible Human (Visible Woman)
  colour cryosection of the head, copied byte for byte. It has no mask: the RGB path is exercised for
  inference only.

The output is deterministic (PNG files carry no time stamp). Provenance and licences: ``sample_data/README.md``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import os
import shutil
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ITK_DATA_DIR = Path(os.environ.get("MEDURWKV_ITK_DATA_DIR", "/usr/share/doc/insighttoolkit5-examples/examples/Data"))
RGB_SOURCE = ITK_DATA_DIR / "VisibleWomanHeadSlice.png"
NILEARN_VERSION = "0.14.1"
MNI_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
# sha256 of the source files the committed 2D sample data was built from (nilearn 0.14.1 wheel;
# insighttoolkit5-examples 5.2.1-5+deb12u1, Debian 12)
SOURCE_SHA256 = {
    MNI_FILES["t1"]: "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    MNI_FILES["gm"]: "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    MNI_FILES["wm"]: "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    RGB_SOURCE.name: "a580fa87ed9928a497f444dd25d79a48784f7070788af82694882fce7d89c8e7",
}
HEADS = {  # case -> (image, mask) in this repository's sample_data, and the number of slices to take
    "colin27_t1": ("imagesTr/colin27_t1.nii.gz", "labelsTr/colin27_t1.nii.gz", 4),
    "itk_kmeanstest_t1": ("imagesTs/itk_kmeanstest_t1.nii.gz", "labelsTs/itk_kmeanstest_t1.nii.gz", 4),
}
MNI_SLICES = 20
MNI_CLASSES = {"0": "background", "1": "grey matter", "2": "white matter"}


class SourceError(RuntimeError):
    pass


def _check_sha(name: str, data: bytes, where: str) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256[name]:
        raise SourceError(f"{where}: sha256 {digest} differs from the file the committed data came from ({SOURCE_SHA256[name]})")
    return data


def nilearn_reader(spec: str | None = None):
    """A function name -> bytes reading the MNI files from an installed nilearn, its data folder or its wheel."""
    if spec is None:
        found = importlib.util.find_spec("nilearn")  # locates the package without importing it
        if found is None or not found.submodule_search_locations:
            raise SourceError(
                f"nilearn is not installed: pip install nilearn=={NILEARN_VERSION} (or pip download nilearn=={NILEARN_VERSION} "
                "--no-deps -d /tmp/whl and pass --nilearn /tmp/whl/nilearn-*.whl)"
            )
        spec = list(found.submodule_search_locations)[0]
    path = Path(spec)
    if path.is_file() and path.suffix == ".whl":
        zf = zipfile.ZipFile(path)
        return lambda name: _check_sha(name, zf.read(f"nilearn/datasets/data/{name}"), f"{path}!{name}")
    data_dir = path / "datasets" / "data" if (path / "datasets").is_dir() else path
    if not (data_dir / MNI_FILES["t1"]).is_file():
        raise SourceError(f"{spec}: no {MNI_FILES['t1']} there (give nilearn's package folder, its datasets/data or the wheel)")
    return lambda name: _check_sha(name, (data_dir / name).read_bytes(), str(data_dir / name))


def _nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def _to_uint8(vol: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(vol, [0.5, 99.5])
    return np.round(np.clip((vol - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _png(arr: np.ndarray) -> np.ndarray:
    """An axial RAS slice (x = right, y = anterior) as a picture: anterior at the top, patient's right on the right."""
    return np.ascontiguousarray(np.flipud(arr.T))


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _pick(areas: np.ndarray, n: int, frac: float) -> list[int]:
    """``n`` evenly spaced slice indices among those whose area is at least ``frac`` of the largest."""
    ok = np.flatnonzero(areas >= frac * areas.max())
    return [int(ok[i]) for i in np.round(np.linspace(0, len(ok) - 1, n)).astype(int)]


def build_heads(out: Path) -> list[str]:
    names = []
    for case, (img_rel, lab_rel, n) in HEADS.items():
        img = nib.as_closest_canonical(nib.load(str(HERE / img_rel)))
        lab = nib.as_closest_canonical(nib.load(str(HERE / lab_rel)))
        x = _to_uint8(np.asarray(img.dataobj, dtype=np.float32))
        y = np.asarray(lab.dataobj) > 0
        for z in _pick(y.sum((0, 1)), n, 0.4):
            name = f"{case}_z{z:03d}"
            _save_png(_png(x[:, :, z]), out / "heads" / "images" / f"{name}.png")
            _save_png(_png(y[:, :, z].astype(np.uint8) * 255), out / "heads" / "masks" / f"{name}_mask.png")
            names.append(name)
    return names


def _block_mean2(vol: np.ndarray) -> np.ndarray:
    s = [d // 2 * 2 for d in vol.shape]
    v = vol[: s[0], : s[1], : s[2]].astype(np.float64)
    return v.reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean((1, 3, 5))


def build_mni(out: Path, read) -> list[str]:
    t1, gm, wm = (_nifti(read(MNI_FILES[k])) for k in ("t1", "gm", "wm"))
    for img in (t1, gm, wm):
        if nib.aff2axcodes(img.affine) != ("R", "A", "S") or img.shape != t1.shape:
            raise SourceError(f"unexpected MNI grid {img.shape} {nib.aff2axcodes(img.affine)}")
    x = _to_uint8(_block_mean2(np.asarray(t1.dataobj)))
    g = _block_mean2(np.asarray(gm.dataobj)) / 255.0
    w = _block_mean2(np.asarray(wm.dataobj)) / 255.0
    # each voxel takes its most probable class; CSF and everything outside the brain are background
    label = np.argmax(np.stack([1.0 - g - w, g, w]), axis=0).astype(np.uint8)
    base = out / "mni152_3class"
    names = []
    for z in _pick((label > 0).sum((0, 1)), MNI_SLICES, 0.3):
        name = f"mni152_2009a_z{z:03d}"
        _save_png(_png(x[:, :, z]), base / "images" / f"{name}.png")
        _save_png(_png(label[:, :, z]), base / "labels" / f"{name}.png")
        names.append(name)
    from medurwkv.data2d import build_datalist

    build_datalist(base / "images", base / "labels", base / "dataset.json", split=(0.6, 0.2, 0.2), seed=0, labels=MNI_CLASSES)
    return names


def build_rgb(out: Path) -> Path:
    if not RGB_SOURCE.is_file():
        raise SourceError(f"{RGB_SOURCE}: missing (apt-get install insighttoolkit5-examples)")
    _check_sha(RGB_SOURCE.name, RGB_SOURCE.read_bytes(), str(RGB_SOURCE))
    dst = out / "rgb" / "visible_woman_head.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RGB_SOURCE, dst)
    return dst


def build(out: Path, nilearn: str | None = None) -> dict:
    out = Path(out)
    read = nilearn_reader(nilearn)
    return {"heads": build_heads(out), "mni152_3class": build_mni(out, read), "rgb": str(build_rgb(out))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "2d"))
    p.add_argument("--nilearn", default=None, help="nilearn package folder, its datasets/data folder, or the nilearn wheel")
    a = p.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))  # medurwkv from this checkout
    try:
        made = build(Path(a.out), a.nilearn)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {len(made['heads'])} head slices, {len(made['mni152_3class'])} MNI152 slices, {made['rgb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
