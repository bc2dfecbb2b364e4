"""A second training head for Med-URWKV-Edit, from what installs offline: the MNI ICBM152 2009a T1 template in the
``nilearn`` wheel, with a brain mask made from its grey- and white-matter probability maps (GM + WM > 0.5,
closed by 3 voxels, largest component, cavities filled: the brain without the outer CSF, close to Colin27's BET
mask). Writes ``OUT/images/mni152_t1.nii.gz``, ``OUT/labels/mni152_t1.nii.gz`` and ``OUT/datalist.json``
(training: Colin27 from ``sample_data/`` + MNI152; validation: Colin27). The held-out ITK head is not used.

    python scripts/edit_training_data.py --nilearn /tmp/whl/nilearn-0.14.1-py3-none-any.whl --out runs/edit_data

``--nilearn``: as ``sample_data/build_2d.py`` (installed package folder, its ``datasets/data`` folder or the wheel).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, os.path.join(ROOT, "sample_data"))


def main(argv=None) -> str:
    from build_2d import MNI_FILES, nilearn_reader

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nilearn", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "edit_data"))
    args = ap.parse_args(argv)
    read = nilearn_reader(args.nilearn)

    def load(kind):
        raw = read(MNI_FILES[kind])
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        img = nib.Nifti1Image.from_bytes(raw)
        return np.asanyarray(img.dataobj).astype(np.float32), img.affine

    t1, affine = load("t1")
    gm, _ = load("gm")
    wm, _ = load("wm")
    mask = ndi.binary_closing(gm + wm > 0.5, iterations=3)
    lab, n = ndi.label(mask)
    mask = lab == (1 + int(np.argmax(ndi.sum(mask, lab, range(1, n + 1)))))
    mask = ndi.binary_fill_holes(mask)
    ml = float(mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000)
    for sub, arr, dtype in (("images", t1, np.float32), ("labels", mask, np.uint8)):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
        nib.save(nib.Nifti1Image(arr.astype(dtype), affine), os.path.join(args.out, sub, "mni152_t1.nii.gz"))
    sample = os.path.join(ROOT, "sample_data")
    colin = {"image": os.path.join(sample, "imagesTr/colin27_t1.nii.gz"), "label": os.path.join(sample, "labelsTr/colin27_t1.nii.gz")}
    mni = {"image": os.path.abspath(os.path.join(args.out, "images/mni152_t1.nii.gz")),
           "label": os.path.abspath(os.path.join(args.out, "labels/mni152_t1.nii.gz"))}
    path = os.path.join(args.out, "datalist.json")
    with open(path, "w") as f:
        json.dump({"training": [colin, mni], "validation": [colin]}, f, indent=2)
    print(f"MNI152 brain mask {ml:.0f} ml, shape {t1.shape}; datalist {path}")
    return path


if __name__ == "__main__":
    main()
