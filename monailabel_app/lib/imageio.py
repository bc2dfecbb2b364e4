"""Header-level checks of image and label files, so bad uploads fail early with a message instead of a 500.

Only the geometry is read (shape and the voxel-to-RAS affine); pixel data is read for labels, which are small.
NIfTI goes through nibabel, the other formats MONAI Label accepts (NRRD, MetaImage) through SimpleITK.

:class:`Limits` and :func:`check_volume_file` refuse, before anything is decoded, a file whose header declares
more voxels or decoded bytes than the server accepts (HTTP 413 with the numbers), a gzip stream that inflates
to more than its header declares, a header that names a separate data file (which could be any file on the
server), and a single DICOM slice (not a volume).
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import BadInput, TooLarge, UnsupportedFile
from .studies import IMAGE_2D_SUFFIXES
from .studies import STUDY_SUFFIXES as IMAGE_SUFFIXES  # volumes and 2D images (lib/image2d.py)


@dataclass
class Geometry:
    shape: Tuple[int, ...]  # spatial shape, trailing singleton axes dropped (at least 3D kept for volumes)
    affine: np.ndarray  # 4x4 voxel -> RAS mm

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def file_suffix(path: str) -> str:
    name = os.path.basename(path).lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return os.path.splitext(name)[1]


def _describe(path: str, desc: Optional[str]) -> str:
    """``desc`` is a noun phrase for messages ("the label for image 'x'"); default: the file's name."""
    return desc or f"the file '{os.path.basename(path)}'"


def _sentence(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:]


def check_image_suffix(path: str, desc: Optional[str] = None) -> None:
    """Reject files whose extension is not a volume format (DICOM folders are accepted as they are)."""
    if os.path.isdir(path):
        return
    if file_suffix(path) not in IMAGE_SUFFIXES:
        raise UnsupportedFile(
            f"{_sentence(_describe(path, desc))} is not a supported volume or image file: expected one of "
            f"{', '.join(IMAGE_SUFFIXES)} (a DICOM series can be sent as a folder session)."
        )


def _spatial_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    shape = list(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def _ras_affine(itk_image: Any) -> np.ndarray:
    """Voxel -> RAS affine of a SimpleITK image or ``ImageFileReader`` (after ``ReadImageInformation``)."""
    size = itk_image.GetSize()
    n = len(size)
    spacing = np.asarray(itk_image.GetSpacing(), dtype=float)
    direction = np.asarray(itk_image.GetDirection(), dtype=float).reshape(n, n)
    affine = np.eye(4)
    m = min(n, 3)
    affine[:m, :m] = (direction * spacing[None, :])[:m, :m]
    affine[:m, 3] = np.asarray(itk_image.GetOrigin(), dtype=float)[:m]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK is LPS, NIfTI/MONAI is RAS


def read_geometry(path: str, desc: Optional[str] = None) -> Geometry:
    """Shape and affine from the file header; ``BadInput`` when the file is not a readable image."""
    check_image_suffix(path, desc)
    if file_suffix(path) in IMAGE_2D_SUFFIXES:  # the one-slice volume 3D Slicer makes of it
        from .image2d import slicer_geometry

        return slicer_geometry(path, desc)
    try:
        if file_suffix(path) in (".nii", ".nii.gz"):
            import nibabel as nib

            img = nib.load(path)
            return Geometry(_spatial_shape(img.shape), np.asarray(img.affine, dtype=float))
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        return Geometry(_spatial_shape(reader.GetSize()), _ras_affine(reader))
    except (BadInput, UnsupportedFile):
        raise
    except Exception as e:  # nibabel/ITK raise many types for corrupt headers
        reason = f"{type(e).__name__}: {e}".replace(path, os.path.basename(path))
        raise BadInput(f"{_sentence(_describe(path, desc))} could not be read as an image: {reason}") from None


def read_label_values(path: str, desc: Optional[str] = None) -> np.ndarray:
    """Distinct voxel values of a label file (reads the data, which also catches truncated files)."""
    try:
        if file_suffix(path) in (".nii", ".nii.gz"):
            import nibabel as nib

            data = np.asanyarray(nib.load(path).dataobj)
        else:
            import SimpleITK as sitk

            data = sitk.GetArrayFromImage(sitk.ReadImage(path))  # a copy: a view would outlive its image
        if data.dtype.kind in "iub" and data.size:  # a few classes: a pass per value beats sorting 100 M voxels
            low, high = int(data.min()), int(data.max())
            if high - low < 16:
                return np.array([v for v in range(low, high + 1) if (data == v).any()], dtype=data.dtype)
        return np.unique(data)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".replace(path, os.path.basename(path))
        raise BadInput(f"{_sentence(_describe(path, desc))} could not be read: {reason}") from None


def check_label_fits_image(label: Geometry, image: Geometry, image_id: str) -> None:
    """The label must lie on the image's voxel grid: same shape and, within half a voxel / 0.1 %, same affine."""
    if tuple(label.shape[:3]) != tuple(image.shape[:3]) or len(label.shape) > 3:
        raise BadInput(
            f"The label has shape {list(label.shape)} but image '{image_id}' has shape "
            f"{list(image.shape[:3])}: a label must be saved on its image's voxel grid."
        )
    spacing = image.spacing
    lin_ok = np.allclose(label.affine[:3, :3], image.affine[:3, :3], rtol=0, atol=1e-3 * float(spacing.max()))
    org_ok = np.allclose(label.affine[:3, 3], image.affine[:3, 3], rtol=0, atol=0.5 * float(spacing.min()))
    if not (lin_ok and org_ok):
        raise BadInput(
            f"The label has the right shape but a different position/orientation than image "
            f"'{image_id}' (label affine {np.round(label.affine, 3).tolist()} vs image affine "
            f"{np.round(image.affine, 3).tolist()}): it would be misaligned in training."
        )


# ------------------------------------------------------------------------------------- size limits, uploads
MB = 1 << 20
DETACHED_SUFFIXES = (".nhdr", ".mhd")  # header-only files: the data file they name could be any file
DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_DTYPE_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                      1536: 16, 1792: 16, 2048: 32, 2304: 4}


def _memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # psutil comes with MONAI Label; a fallback that admits the 512 x 512 x 2000 CT anyway
        return 16 << 30


@dataclass(frozen=True)
class Limits:
    """What one uploaded volume, label or archive may be. Defaults admit a 512 x 512 x 2000 CT (524 M voxels)
    and refuse what would not fit in memory: the decoded data may use at most a quarter of the machine's RAM.

    ``--conf`` keys: ``max_voxels``, ``max_image_mb`` (decoded bytes of one volume), ``max_upload_mb`` (one
    request body), ``max_archive_mb`` (an archive's content after extraction), ``max_archive_files``."""

    max_voxels: int = 600_000_000
    max_image_bytes: int = 0  # 0: a quarter of the RAM
    max_upload_bytes: int = 0  # 0: max_image_bytes
    max_archive_bytes: int = 0  # 0: max_image_bytes
    max_archive_files: int = 10_000

    def __post_init__(self):
        image = self.max_image_bytes or _memory_bytes() // 4
        object.__setattr__(self, "max_image_bytes", image)
        object.__setattr__(self, "max_upload_bytes", self.max_upload_bytes or image)
        object.__setattr__(self, "max_archive_bytes", self.max_archive_bytes or image)

    @classmethod
    def from_conf(cls, conf: Dict[str, str]) -> "Limits":
        def number(key: str, scale: int = 1) -> int:
            value = conf.get(key)
            if value in (None, ""):
                return 0
            try:
                n = float(value)
            except ValueError:
                raise ValueError(f"--conf {key} must be a number, got {value!r}") from None
            if n <= 0:
                raise ValueError(f"--conf {key} must be positive, got {value!r}")
            return int(n * scale)

        return cls(
            max_voxels=number("max_voxels") or cls.max_voxels,
            max_image_bytes=number("max_image_mb", MB),
            max_upload_bytes=number("max_upload_mb", MB),
            max_archive_bytes=number("max_archive_mb", MB),
            max_archive_files=number("max_archive_files") or cls.max_archive_files,
        )


def _mb(n: float) -> str:
    return f"{n / MB:,.0f} MB" if n >= MB else f"{int(n):,} bytes"


def _check_declared(shape: Sequence[int], item_bytes: int, what: str, limits: Limits) -> int:
    """Refuse (413) a declared size over the limits; returns the decoded bytes."""
    shape = [int(s) for s in shape]
    voxels = int(np.prod([max(s, 0) for s in shape], dtype=object))
    nbytes = voxels * max(int(item_bytes), 1)
    if voxels > limits.max_voxels or nbytes > limits.max_image_bytes:
        raise TooLarge(
            f"{_sentence(what)} declares {' x '.join(str(s) for s in shape)} = {voxels:,} voxels "
            f"({_mb(nbytes)} decoded); this server accepts at most {limits.max_voxels:,} voxels and "
            f"{_mb(limits.max_image_bytes)} per volume (--conf max_voxels, max_image_mb)."
        )
    return nbytes


def _check_inflated_size(path: str, cap: int, what: str) -> None:
    """Inflate a gzip file in a streaming way and stop as soon as it exceeds ``cap`` bytes (memory stays
    constant): a small file that inflates far beyond what its header declares is refused, not decoded."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while True:
                block = f.read(4 * MB)
                if not block:
                    return
                total += len(block)
                if total > cap:
                    raise TooLarge(
                        f"{_sentence(what)} inflates to more than {_mb(cap)}, more than its header declares "
                        f"(a compressed file that expands without bound is refused)."
                    )
    except (OSError, EOFError, zlib.error) as e:
        raise BadInput(f"{_sentence(what)} is not a valid gzip file: {type(e).__name__}: {e}") from None


def _text_header(path: str, limit: int = 64 * 1024) -> str:
    with open(path, "rb") as f:
        head = f.read(limit)
    return head.split(b"\n\n", 1)[0].decode("latin-1")


def is_dicom_file(path: str) -> bool:
    if os.path.isdir(path):
        return False
    if os.path.basename(path).lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def check_dicom_file(path: str, limits: Limits, desc: Optional[str] = None) -> Tuple[int, int]:
    """(frames, decoded bytes) of one DICOM file from its header; 422 when it is not DICOM, 413 when too big."""
    what = _describe(path, desc)
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except Exception as e:
        raise BadInput(f"{_sentence(what)} could not be read as DICOM: {type(e).__name__}") from None
    nbytes = _check_declared([cols, rows, frames * samples], (bits + 7) // 8, what, limits)
    return frames, nbytes


def check_volume_file(path: str, limits: Limits, desc: Optional[str] = None) -> Geometry:
    """Everything that can be checked before decoding an uploaded volume or label (see the module doc).

    Returns its geometry. A single DICOM file is refused (415): it is one slice, not a volume."""
    what = _describe(path, desc)
    if is_dicom_file(path):
        frames, _ = check_dicom_file(path, limits, desc)
        if frames <= 1:
            raise UnsupportedFile(
                f"{_sentence(what)} is a single DICOM slice, not a volume. Send the whole series (all its files "
                f"in one session, or a .zip of the folder with PUT /session/?uncompress=true), or the volume as "
                f".nii.gz/.nrrd. In 3D Slicer: turn off 'Include DICOM files' in the MONAI Label settings."
            )
        raise UnsupportedFile(f"{_sentence(what)} is a multi-frame DICOM file: send the volume as .nii.gz/.nrrd.")
    suffix = file_suffix(path)
    if suffix in IMAGE_2D_SUFFIXES:  # PNG/JPEG: header sizes, then one bounded decode
        from .image2d import check_image_2d_file

        return check_image_2d_file(path, limits, desc)
    if suffix in DETACHED_SUFFIXES:
        raise UnsupportedFile(
            f"{_sentence(what)} is a header that names a separate data file ({suffix}): send a single-file "
            f"volume (.nii.gz, .nii, .nrrd, .mha)."
        )
    geometry = read_geometry(path, desc)  # suffix check, header parse (422 when unreadable)
    try:
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            header = nib.load(path).header
            full_shape = header.get_data_shape()
            item = header.get_data_dtype().itemsize
            offset = int(float(header["vox_offset"]))
        else:
            head = _text_header(path).lower()
            if suffix == ".nrrd" and any(line.startswith(("data file:", "datafile:")) for line in head.split("\n")):
                raise UnsupportedFile(f"{_sentence(what)} names a separate data file: send a single-file volume.")
            if suffix == ".mha":
                edf = [ln.split("=", 1)[1].strip() for ln in head.split("\n") if ln.startswith("elementdatafile")]
                if edf and edf[0] != "local":
                    raise UnsupportedFile(f"{_sentence(what)} names a separate data file: send a single-file volume.")
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
            full_shape = reader.GetSize()
            kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())  # "16-bit signed integer", "vector of ..."
            bits = re.search(r"(\d+)-bit", kind)
            item = (int(bits.group(1)) if bits else 64) // 8 * max(reader.GetNumberOfComponents(), 1)
            item *= 2 if "complex" in kind else 1
            offset = 0
    except (BadInput, UnsupportedFile):
        raise
    except Exception as e:
        raise BadInput(f"{_sentence(what)} could not be read as an image: {type(e).__name__}") from None
    nbytes = _check_declared(full_shape, item, what, limits)
    if path.lower().endswith(".gz"):
        _check_inflated_size(path, min(nbytes + offset + MB, limits.max_image_bytes + MB), what)
    return geometry


def read_volume(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """The voxel array (index order i, j, k; trailing singleton axes dropped) and the voxel -> RAS affine."""
    if file_suffix(path) in (".nii", ".nii.gz"):
        import nibabel as nib

        img = nib.load(path)
        data, affine = np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=float)
    else:
        import SimpleITK as sitk

        img = sitk.ReadImage(path)
        data = sitk.GetArrayFromImage(img)
        data = data.transpose(tuple(range(img.GetDimension()))[::-1] + tuple(range(img.GetDimension(), data.ndim)))
        affine = _ras_affine(img)
    return data.reshape(_spatial_shape(data.shape)), affine


def same_volume(a: str, b: str) -> bool:
    """Whether two volume files hold the same image: same bytes, or (in any format) the same voxel values on
    the same grid (a volume re-saved by 3D Slicer on every *Run* is the same image)."""
    if os.path.getsize(a) == os.path.getsize(b):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x, y = fa.read(4 * MB), fb.read(4 * MB)
                if x != y:
                    break
                if not x:
                    return True
    try:
        da, aa = read_volume(a)
        db, ab = read_volume(b)
    except Exception:
        return False
    if da.shape != db.shape:
        return False
    spacing = float(np.linalg.norm(aa[:3, :3], axis=0).min()) or 1.0
    return bool(np.allclose(aa, ab, rtol=0, atol=1e-3 * spacing) and np.array_equal(da, db))
