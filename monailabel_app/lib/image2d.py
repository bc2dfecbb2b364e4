"""2D images (PNG, JPEG) in the datastore and in requests: sizes checked before decoding, and the grid 3D Slicer
puts them on.

**Sizes before pixels.** :func:`read_header_2d` reads the width, height and channels from the file's first bytes
(the PNG ``IHDR`` chunk; the JPEG ``SOFn`` segment, scanning at most :data:`MAX_JPEG_HEADER` bytes), without any
image library, so a PNG declaring 100000 x 100000 pixels is refused (413, with the numbers) before anything is
allocated. :func:`check_image_2d_file` then decodes the image once (bounded by the declared size), so a truncated
or corrupt file is a 422 that names the problem at upload, not a 500 later.

**The grid.** 3D Slicer reads a PNG/JPEG with ITK as a one-slice volume: voxel ``(i, j, 0)`` is column ``i``,
row ``j`` counted from the top, at ITK's origin / spacing / direction for the file (origin 0, spacing 1 mm and
identity direction in LPS for PNG; JPEG may carry a pixel size). In RAS, the convention of NIfTI and MONAI, that is
``diag(-1, -1, 1)``. :func:`slicer_geometry` returns that grid as a 3D :class:`~lib.imageio.Geometry` of shape
``(W, H, 1)``, so a label Slicer submits for the image (a one-slice NIfTI) is checked against it like any label,
and :func:`write_mask_2d` writes a mask of the image's ``W x H`` on it (or as a PNG of ``W x H`` pixels).
"""

from __future__ import annotations

import os
import struct
import warnings
from typing import Optional, Tuple

import numpy as np

from .errors import BadInput, TooLarge
from .imageio import Geometry, Limits, _check_declared, _describe, _sentence
from .studies import IMAGE_2D_SUFFIXES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel (3: palette index)
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
MAX_JPEG_HEADER = 1 << 20  # EXIF/ICC segments before the frame header: a real camera file stays far below
# PIL refuses more than twice this as a "decompression bomb"; a 2D image beyond it is a whole-slide image
MAX_PIXELS_2D = 89_478_485
MASK_EXTENSIONS = (".png", ".nii.gz", ".nii", ".nrrd", ".mha")


def is_image_2d(path: str) -> bool:
    return not os.path.isdir(path) and os.path.basename(path).lower().endswith(IMAGE_2D_SUFFIXES)


def _png_header(head: bytes, what: str) -> Tuple[int, int, int, int]:
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise BadInput(f"{_sentence(what)} is not a valid PNG: its first chunk is not a complete IHDR header.")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if colour not in _PNG_CHANNELS or depth not in _PNG_DEPTHS[colour]:
        raise BadInput(f"{_sentence(what)} is not a valid PNG: colour type {colour} with bit depth {depth}.")
    return width, height, _PNG_CHANNELS[colour], 2 if depth == 16 else 1


def _jpeg_header(path: str, what: str) -> Tuple[int, int, int, int]:
    with open(path, "rb") as f:
        f.seek(2)
        while f.tell() < MAX_JPEG_HEADER:
            byte = f.read(1)
            if not byte:
                break
            if byte != b"\xff":
                continue  # fill bytes between segments
            marker = f.read(1)
            while marker == b"\xff":
                marker = f.read(1)
            if not marker:
                break
            m = marker[0]
            if m in (0x01, 0xD8) or 0xD0 <= m <= 0xD7:  # markers without a length
                continue
            if m in (0xD9, 0xDA):  # end of image / start of scan before any frame header
                break
            raw = f.read(2)
            if len(raw) < 2:
                break
            length = struct.unpack(">H", raw)[0]
            if length < 2:
                break
            if m in _JPEG_SOF:
                seg = f.read(6)
                if len(seg) < 6:
                    break
                precision, height, width, components = struct.unpack(">BHHB", seg)
                return width, height, components, 2 if precision > 8 else 1
            f.seek(length - 2, os.SEEK_CUR)
    raise BadInput(f"{_sentence(what)} is not a valid JPEG: no frame header (image size) in its first segments.")


def read_header_2d(path: str, desc: Optional[str] = None) -> Tuple[int, int, int, int]:
    """(width, height, channels, bytes per sample) from the header, recognised by content (a PNG named .jpg is
    read as PNG); ``BadInput`` (422) naming the problem when it is neither a PNG nor a JPEG."""
    what = _describe(path, desc)
    with open(path, "rb") as f:
        head = f.read(33)
    if head.startswith(PNG_SIGNATURE):
        width, height, channels, item = _png_header(head, what)
    elif head.startswith(b"\xff\xd8"):
        width, height, channels, item = _jpeg_header(path, what)
    else:
        raise BadInput(f"{_sentence(what)} is neither a PNG nor a JPEG file (its first bytes say otherwise).")
    if width <= 0 or height <= 0 or channels <= 0:
        raise BadInput(f"{_sentence(what)} declares an empty image ({width} x {height} pixels, {channels} channels).")
    return width, height, channels, item


def check_header_2d(path: str, limits: Limits, desc: Optional[str] = None) -> Tuple[int, int]:
    """Width and height, after refusing (413) a declared size over the server's limits; nothing is decoded."""
    what = _describe(path, desc)
    width, height, channels, item = read_header_2d(path, desc)
    if width * height > MAX_PIXELS_2D:
        raise TooLarge(
            f"{_sentence(what)} declares {width} x {height} = {width * height:,} pixels; this server accepts 2D "
            f"images of at most {MAX_PIXELS_2D:,} pixels (larger images are whole-slide images)."
        )
    _check_declared([width, height, channels], item, what, limits)
    return width, height


def slicer_geometry(path: str, desc: Optional[str] = None) -> Geometry:
    """The one-slice volume 3D Slicer makes of the image (ITK's reading, see the module doc): shape ``(W, H, 1)``
    and its voxel -> RAS affine. Reads the header only."""
    from .imageio import _ras_affine

    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        width, height = reader.GetSize()[:2]
        affine = _ras_affine(reader)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".replace(path, os.path.basename(path))
        raise BadInput(f"{_sentence(_describe(path, desc))} could not be read as an image: {reason[:300]}") from None
    return Geometry((int(width), int(height), 1), affine)


def check_image_2d_file(path: str, limits: Limits, desc: Optional[str] = None) -> Geometry:
    """Everything checked on an uploaded PNG/JPEG: the declared size (413 before decoding), one full decode
    (422 when truncated or corrupt), and its grid (:func:`slicer_geometry`)."""
    what = _describe(path, desc)
    width, height = check_header_2d(path, limits, desc)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=("PNG", "JPEG")) as im:  # the formats the header check recognised
                if im.size != (width, height):
                    raise BadInput(
                        f"{_sentence(what)} declares two sizes ({width} x {height} and {im.size[0]} x {im.size[1]})."
                    )
                im.load()
    except BadInput:
        raise
    except Exception as e:  # PIL: "image file is truncated", "broken data stream", ...
        reason = f"{type(e).__name__}: {e}".replace(path, os.path.basename(path))
        raise BadInput(f"{_sentence(what)} could not be decoded: {reason[:300]}") from None
    return slicer_geometry(path, desc)


def write_mask_2d(mask_wh: np.ndarray, image_path: str, out_path: str, dtype: str = "uint8") -> None:
    """Write a class mask of shape ``(W, H)`` (MONAI's order: ``mask_wh[i, j]`` is column ``i``, row ``j``) for the
    2D image ``image_path``: a ``.png`` of ``W x H`` pixels, or a one-slice volume (``.nii.gz``, ``.nrrd``, ...)
    on the grid 3D Slicer gives the image (:func:`slicer_geometry`), which is what Slicer overlays it on."""
    mask_wh = np.asarray(mask_wh)
    if out_path.lower().endswith(".png"):
        from PIL import Image

        rows = np.ascontiguousarray(mask_wh.T)  # PIL wants rows first
        if rows.max(initial=0) > 255 or dtype not in ("uint8", "int8"):
            Image.fromarray(rows.astype(np.uint16)).save(out_path)  # 16-bit grey PNG ("I;16")
        else:
            Image.fromarray(rows.astype(np.uint8), mode="L").save(out_path)
        return
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(image_path)
    reader.ReadImageInformation()
    if tuple(reader.GetSize()[:2]) != tuple(mask_wh.shape):
        raise ValueError(f"mask of shape {mask_wh.shape} for an image of {reader.GetSize()[:2]} pixels")
    rows = np.ascontiguousarray(mask_wh.T[None]).astype(np.dtype(dtype))  # (k, j, i): ITK size (W, H, 1)
    img = sitk.GetImageFromArray(rows)
    sx, sy = reader.GetSpacing()[:2]
    ox, oy = reader.GetOrigin()[:2]
    d = np.asarray(reader.GetDirection(), dtype=float).reshape(2, 2)
    direction = np.eye(3)
    direction[:2, :2] = d
    img.SetSpacing((float(sx), float(sy), 1.0))
    img.SetOrigin((float(ox), float(oy), 0.0))
    img.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(img, out_path, useCompression=out_path.lower().endswith((".gz", ".nrrd", ".mha")))
