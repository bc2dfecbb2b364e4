#!/usr/bin/env python
"""Rebuild the Med-URWKV brain-extraction sample data from locally installed sources.

Usage (from the repository root)::

    python sample_data/build.py [--out sample_data]

Sources (installed by the Debian packages, nothing is downloaded here):

* ``mricron-data`` -> ``/usr/share/mricron/templates/ch2.nii.gz`` (Colin27 T1) and
  ``ch2bet.nii.gz`` (the same volume after brain extraction, same grid).
* ``insighttoolkit5-examples`` -> ``/usr/share/doc/insighttoolkit5-examples/examples/Data/``
  ``KmeansTest_T1UCharRaw.nii.gz`` (a T1 head MRI) and ``KmeansTest_T1RawSkullStrip.nii.gz``
  (its skull-strip map).

Python packages: numpy, scipy, nibabel, pydicom (all in requirements.txt, scipy comes
with monai[skimage]). See sample_data/README.md for provenance, licences and the label
derivation.

Outputs under ``--out``::

    imagesTr/colin27_t1.nii.gz          labelsTr/colin27_t1.nii.gz
    imagesTs/itk_kmeanstest_t1.nii.gz   labelsTs/itk_kmeanstest_t1.nii.gz
    dicom/itk_kmeanstest_t1/IM_0001.dcm ... (cropped copy of the held-out image)
    dataset.json

The output is deterministic: gzip members carry mtime 0 and no file name, DICOM UIDs
are derived from fixed strings, and no dates or times are written.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

MRICRON_DIR = Path(os.environ.get("MEDURWKV_MRICRON_DIR", "/usr/share/mricron/templates"))
ITK_DATA_DIR = Path(
    os.environ.get("MEDURWKV_ITK_DATA_DIR", "/usr/share/doc/insighttoolkit5-examples/examples/Data")
)

SOURCES = {
    "colin27_t1": {
        "package": "mricron-data",
        "image": MRICRON_DIR / "ch2.nii.gz",
        "mask": MRICRON_DIR / "ch2bet.nii.gz",
    },
    "itk_kmeanstest_t1": {
        "package": "insighttoolkit5-examples",
        "image": ITK_DATA_DIR / "KmeansTest_T1UCharRaw.nii.gz",
        "mask": ITK_DATA_DIR / "KmeansTest_T1RawSkullStrip.nii.gz",
    },
}

TRAIN_CASE = "colin27_t1"
TEST_CASE = "itk_kmeanstest_t1"
DICOM_CASE = TEST_CASE
DESCRIP = b"Med-URWKV sample_data/build.py v1"
UID_SALT = "medurwkv-sample-data-v1"


# sha256 of the source files the committed sample data was built from
# (mricron-data 1.2.20211006+dfsg-4, insighttoolkit5-examples 5.2.1-5+deb12u1; Debian 12).
SOURCE_SHA256 = {
    "ch2.nii.gz": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
    "ch2bet.nii.gz": "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1",
    "KmeansTest_T1UCharRaw.nii.gz": "e0e5975587f3f7916804bdd317c493cdb99cdb3703bf2671d458528f62510327",
    "KmeansTest_T1RawSkullStrip.nii.gz": "f3ca85fa9559f7cc4b7c3ca862355cf0e7351505bdc62e3144b7fe6f6da37f3b",
}


def source_paths() -> list[Path]:
    return [p for case in SOURCES.values() for p in (case["image"], case["mask"])]


def sources_present() -> bool:
    return all(p.is_file() for p in source_paths())


def source_mismatches() -> list[str]:
    """Source files whose content differs from the ones the committed data came from."""
    out = []
    for p in source_paths():
        if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() != SOURCE_SHA256[p.name]:
            out.append(str(p))
    return out


# ----------------------------------------------------------------------------- helpers
def _load(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    code = int(img.header["sform_code"]) or int(img.header["qform_code"]) or 1
    return data, img.affine.astype(np.float64), code


def _same_grid(a_shape, a_aff, b_shape, b_aff) -> bool:
    return tuple(a_shape) == tuple(b_shape) and np.allclose(a_aff, b_aff, atol=1e-4)


def _largest_component_filled(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected component of ``mask`` with enclosed cavities filled."""
    lab, n = ndi.label(mask)
    if n == 0:
        raise ValueError("empty mask")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    out = lab == int(np.argmax(sizes))
    return ndi.binary_fill_holes(out)


def _downsample2(vol: np.ndarray) -> np.ndarray:
    """Anti-aliased 2x downsampling that samples exactly at even source voxels.

    A Gaussian of sigma 0.5 voxel (the scikit-image anti-aliasing default for a factor
    of 2) followed by taking every other voxel. Voxel i of the output sits at source
    voxel 2*i, so the new affine is ``A @ diag(2, 2, 2, 1)`` with the same origin.
    """
    smooth = ndi.gaussian_filter(vol.astype(np.float64), sigma=0.5, mode="nearest", truncate=4.0)
    return smooth[::2, ::2, ::2]


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, xform_code: int) -> bytes:
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    img.set_qform(affine, code=xform_code)
    img.set_sform(affine, code=xform_code)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = DESCRIP
    return img.to_bytes()


def _write_gz(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 and no embedded file name -> same bytes on every rebuild (same zlib).
    path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))


def _brain_volume_ml(brain: np.ndarray, aff: np.ndarray) -> float:
    """Volume of the mask in ml; refuses an implausible adult brain (a wrong mask or grid)."""
    vox_ml = abs(np.linalg.det(aff[:3, :3])) / 1000.0
    vol_ml = float(brain.sum() * vox_ml)
    if not 1000.0 < vol_ml < 2200.0:
        raise ValueError(f"implausible brain volume {vol_ml:.0f} ml")
    return vol_ml


# ----------------------------------------------------------------------------- cases
def build_colin27() -> tuple[np.ndarray, np.ndarray, np.ndarray, int, dict]:
    src = SOURCES["colin27_t1"]
    img, aff, code = _load(src["image"])
    bet, bet_aff, _ = _load(src["mask"])
    if not _same_grid(img.shape, aff, bet.shape, bet_aff):
        raise ValueError("ch2bet is not on the ch2 grid")
    brain = bet > 0
    # ch2bet must be ch2 with non-brain voxels zeroed; otherwise it is not "the brain of ch2".
    if not np.array_equal(bet[brain], img[brain]):
        raise ValueError("ch2bet is not a masked copy of ch2")
    brain = _largest_component_filled(brain)
    vol_ml = _brain_volume_ml(brain, aff)

    img2 = np.clip(np.rint(_downsample2(img)), 0, 255).astype(np.uint8)
    lab2 = _downsample2(brain.astype(np.float64)) >= 0.5
    lab2 = _largest_component_filled(lab2).astype(np.uint8)
    aff2 = aff @ np.diag([2.0, 2.0, 2.0, 1.0])
    info = {"source_shape": list(img.shape), "source_brain_ml": round(vol_ml, 1)}
    return img2, lab2, aff2, code, info


def build_itk_kmeanstest() -> tuple[np.ndarray, np.ndarray, np.ndarray, int, dict]:
    src = SOURCES["itk_kmeanstest_t1"]
    img, aff, code = _load(src["image"])
    strip, s_aff, _ = _load(src["mask"])
    if not _same_grid(img.shape, aff, strip.shape, s_aff):
        raise ValueError("skull-strip map is not on the T1 grid")
    # ITK's own test (itkScalarImageKmeansImageFilter3DTest) takes values >= 5 of this
    # "3DSkullStrip" map as the brain clipping mask (values are 0, 4, 5, 6; 4 has 126 voxels).
    brain = _largest_component_filled(strip >= 5)
    vol_ml = _brain_volume_ml(brain, aff)
    if img.min() < -32768 or img.max() > 32767:
        raise ValueError("image does not fit int16")
    # Native grid is already modest (128 x 128 x 62 at 2 x 2 x 3 mm); it is kept as is so
    # that no data is invented along the 3 mm axis.
    info = {"source_shape": list(img.shape), "source_brain_ml": round(vol_ml, 1)}
    return img.astype(np.int16), brain.astype(np.uint8), aff, code, info


# ----------------------------------------------------------------------------- DICOM
def _ds(v: float) -> str:
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def write_dicom_series(image: np.ndarray, affine: np.ndarray, out_dir: Path, name: str) -> dict:
    """Write a cropped copy of ``image`` as an MR Image Storage series.

    The series follows the usual scanner convention for this coronal acquisition:
    columns run to patient left, rows run from superior to inferior and slices are
    stacked along +posterior (LPS), so the DICOM voxel order is the NIfTI order with the
    second and third axes reversed. The geometry is written so that ITK/GDCM rebuilds
    exactly the same physical grid as the NIfTI crop.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    nz = np.argwhere(image != 0)
    start = nz.min(0)
    stop = nz.max(0) + 1
    crop = image[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    crop_aff = affine.copy()
    crop_aff[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    if crop.min() < 0 or crop.max() > 65535:
        raise ValueError("crop does not fit uint16")

    # Reorder to the DICOM voxel order: axis 1 reversed (rows superior->inferior),
    # axis 2 reversed (slices anterior->posterior).
    ni, nj, nk = crop.shape
    flip = np.array(
        [[1, 0, 0, 0], [0, -1, 0, nj - 1], [0, 0, -1, nk - 1], [0, 0, 0, 1]], dtype=np.float64
    )
    d_aff_ras = crop_aff @ flip
    d_vol = crop[:, ::-1, ::-1]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ d_aff_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    dirs = lps[:3, :3] / spacing
    row_cos, col_cos, slice_dir = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    if not np.allclose(np.cross(row_cos, col_cos), slice_dir, atol=1e-6):
        raise ValueError("DICOM slice direction is not row x column (left-handed grid)")

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.dcm"):
        old.unlink()

    uid = lambda *parts: generate_uid(entropy_srcs=[UID_SALT, name, *map(str, parts)])  # noqa: E731
    study_uid, series_uid, for_uid = uid("study"), uid("series"), uid("frame-of-reference")
    impl_uid = uid("implementation")

    for s in range(d_vol.shape[2]):
        pix = np.ascontiguousarray(d_vol[:, :, s].T.astype("<u2"))  # rows x columns
        sop_uid = uid("instance", s)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = impl_uid
        meta.ImplementationVersionName = "MEDURWKV_SD_1"
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.Manufacturer = ""
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Med-URWKV sample data"
        ds.SeriesDescription = f"{name} T1w (cropped copy of the NIfTI)"[:64]
        ds.PatientName = "MedURWKV^Sample"
        ds.PatientID = f"MEDURWKV-{name}"
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.PatientIdentityRemoved = "YES"
        ds.BodyPartExamined = "HEAD"
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
        ds.SliceThickness = _ds(spacing[2])
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = s + 1
        pos = lps[:3, :3] @ np.array([0.0, 0.0, float(s)]) + lps[:3, 3]
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(pos, slice_dir)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pix.shape
        # PixelSpacing = (distance between rows, distance between columns)
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = "128"
        ds.WindowWidth = "256"
        ds.PixelData = pix.tobytes()
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        pydicom.dcmwrite(str(out_dir / f"IM_{s + 1:04d}.dcm"), ds, write_like_original=False)

    return {
        "crop_start": [int(v) for v in start],
        "crop_stop": [int(v) for v in stop],
        "num_slices": int(d_vol.shape[2]),
        "rows_columns": [int(nj), int(ni)],
        "voxel_order": "DICOM index (column, row, slice) = NIfTI crop (i, nj-1-j, nk-1-k)",
    }


# ----------------------------------------------------------------------------- main
def build(out: Path) -> dict:
    missing = [str(p) for p in source_paths() if not p.is_file()]
    if missing:
        raise SystemExit(
            "missing source files (apt-get install mricron-data insighttoolkit5-examples):\n  "
            + "\n  ".join(missing)
        )
    changed = source_mismatches()
    if changed:
        print(
            "warning: these sources differ from the ones the committed sample data was built "
            "from, so the output will differ too:\n  " + "\n  ".join(changed),
            file=sys.stderr,
        )
    out = Path(out)
    cases = {
        "colin27_t1": build_colin27(),
        "itk_kmeanstest_t1": build_itk_kmeanstest(),
    }
    summary = {}
    for name, (img, lab, aff, code, info) in cases.items():
        sub = "Tr" if name == TRAIN_CASE else "Ts"
        _write_gz(out / f"images{sub}" / f"{name}.nii.gz", _nifti_bytes(img, aff, code))
        _write_gz(out / f"labels{sub}" / f"{name}.nii.gz", _nifti_bytes(lab, aff, code))
        zooms = np.linalg.norm(aff[:3, :3], axis=0)
        summary[name] = {
            "shape": list(img.shape),
            "spacing_mm": [round(float(z), 4) for z in zooms],
            "axcodes": "".join(nib.aff2axcodes(aff)),
            "image_dtype": str(img.dtype),
            "brain_fraction": round(float(lab.mean()), 4),
            "brain_ml": round(float(lab.sum() * np.prod(zooms) / 1000.0), 1),
            **info,
        }

    test_img, _, test_aff, _, _ = cases[DICOM_CASE]
    dicom_dir = Path("dicom") / DICOM_CASE
    dicom_info = write_dicom_series(test_img, test_aff, out / dicom_dir, DICOM_CASE)

    def entry(name: str) -> dict:
        sub = "Tr" if name == TRAIN_CASE else "Ts"
        return {"image": f"images{sub}/{name}.nii.gz", "label": f"labels{sub}/{name}.nii.gz"}

    dataset = {
        "name": "medurwkv_brain_extraction_sample",
        "description": (
            "Two real T1-weighted head MRIs with brain masks, for smoke-testing brain-extraction "
            "training and inference on CPU. Only two independent heads are available offline: "
            "'training' holds Colin27; 'test' holds the ITK KmeansTest subject, never trained on. "
            "'validation' repeats the training volume (a training-fit monitor, NOT a held-out "
            "estimate) so that checkpoint selection never sees the test volume."
        ),
        "reference": "sample_data/README.md",
        "licence": "see sample_data/README.md (Colin27: MNI/McGill notice + MRIcron BSD-3-Clause; ITK data: Apache-2.0)",
        "tensorImageSize": "3D",
        "modality": {"0": "T1w MRI"},
        "labels": {"0": "background", "1": "brain"},
        "numTraining": 1,
        "numTest": 1,
        "training": [entry(TRAIN_CASE)],
        "validation": [entry(TRAIN_CASE)],
        "test": [entry(TEST_CASE)],
        "dicom": [
            {
                "series": dicom_dir.as_posix(),
                "source_image": entry(DICOM_CASE)["image"],
                "source_label": entry(DICOM_CASE)["label"],
                **dicom_info,
            }
        ],
        "cases": summary,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="output folder")
    args = ap.parse_args(argv)
    ds = build(Path(args.out))
    for name, info in ds["cases"].items():
        print(f"{name}: {info}")
    print(f"wrote {Path(args.out) / 'dataset.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
