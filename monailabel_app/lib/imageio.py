"""Header-level checks of image and label files, so bad uploads fail early with a message instead of a 500.

Only the geometry is read (shape and the voxel-to-RAS affine); pixel data is read for labels, which are small.
NIfTI goes through nibabel, the other formats MONAI Label accepts (NRRD, MetaImage) through SimpleITK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import BadInput, UnsupportedFile

IMAGE_SUFFIXES: Tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


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
            f"{_sentence(_describe(path, desc))} is not a supported volume file: expected one of "
            f"{', '.join(IMAGE_SUFFIXES)} (a DICOM series can be sent as a folder session)."
        )


def _spatial_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    shape = list(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def read_geometry(path: str, desc: Optional[str] = None) -> Geometry:
    """Shape and affine from the file header; ``BadInput`` when the file is not a readable image."""
    check_image_suffix(path, desc)
    try:
        if file_suffix(path) in (".nii", ".nii.gz"):
            import nibabel as nib

            img = nib.load(path)
            return Geometry(_spatial_shape(img.shape), np.asarray(img.affine, dtype=float))
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        size = reader.GetSize()
        spacing = np.asarray(reader.GetSpacing(), dtype=float)
        direction = np.asarray(reader.GetDirection(), dtype=float).reshape(len(size), len(size))
        origin = np.asarray(reader.GetOrigin(), dtype=float)
        n = len(size)
        affine = np.eye(4)
        affine[:n, :n] = direction * spacing[None, :]
        affine[:n, 3] = origin
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK is LPS, NIfTI/MONAI is RAS
        return Geometry(_spatial_shape(size), affine)
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

            data = sitk.GetArrayViewFromImage(sitk.ReadImage(path))
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
