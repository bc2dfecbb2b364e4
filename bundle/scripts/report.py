"""Score a saved segmentation against its reference and draw an overlay PNG (used by scripts/run_main_job.sh).

    python bundle/scripts/report.py --image IMG.nii.gz --pred PRED.nii.gz --label LABEL.nii.gz --png OUT.png

Prints the Dice of the foreground, checks that the prediction lies on the image's grid (shape and affine),
and writes a few axial slices with the predicted (red) and reference (green, dashed) contours.
"""

from __future__ import annotations

import argparse
import time

import nibabel as nib
import numpy as np

from medurwkv.visualize import dice_score, save_overlay_png


def _ras(img: nib.Nifti1Image) -> nib.Nifti1Image:
    return nib.as_closest_canonical(img)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True, help="input image (NIfTI)")
    p.add_argument("--pred", required=True, help="predicted label map written by inference.json")
    p.add_argument("--label", required=True, help="reference label map")
    p.add_argument("--png", required=True, help="overlay PNG to write")
    p.add_argument("--start", type=float, default=None, help="UNIX time the job started (prints the elapsed time)")
    a = p.parse_args(argv)

    img, pred, lab = nib.load(a.image), nib.load(a.pred), nib.load(a.label)
    same_grid = img.shape[:3] == pred.shape[:3] and np.allclose(img.affine, pred.affine, atol=1e-4)
    if pred.shape[:3] != lab.shape[:3]:
        raise SystemExit(f"{a.pred}: shape {pred.shape} differs from the reference {a.label} {lab.shape}")
    dice = dice_score(np.asarray(pred.dataobj), np.asarray(lab.dataobj))
    ri, rp, rl = _ras(img), _ras(pred), _ras(lab)
    name = a.image.rstrip("/").split("/")[-1].replace(".nii.gz", "").replace(".nii", "")
    save_overlay_png(
        np.asarray(ri.dataobj, dtype=np.float32),
        np.asarray(rp.dataobj) > 0,
        a.png,
        label=np.asarray(rl.dataobj) > 0,
        title=f"{name} (held out): Med-URWKV brain mask, Dice {dice:.3f}",
        spacing=ri.header.get_zooms()[:3],
    )
    print(f"held-out case      : {a.image}")
    print(f"prediction (NIfTI) : {a.pred}  [{'same' if same_grid else 'DIFFERENT'} shape and affine as the input]")
    print(f"overlay (PNG)      : {a.png}")
    print(f"held-out Dice      : {dice:.4f}")
    if a.start is not None:
        print(f"elapsed            : {time.time() - a.start:.0f} s")
    if not same_grid:
        raise SystemExit("the prediction is not on the input's grid")
    return dice


if __name__ == "__main__":
    main()
