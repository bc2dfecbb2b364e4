"""Figures a person can check at a glance: axial slices of a volume with the predicted (and reference) contours."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["dice_score", "pick_slices", "save_overlay_png"]


def dice_score(pred: np.ndarray, label: np.ndarray) -> float:
    """Dice of two binary masks (foreground = non-zero). 1.0 when both are empty."""
    p, g = np.asarray(pred) > 0, np.asarray(label) > 0
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} != label shape {g.shape}")
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom


def pick_slices(mask: np.ndarray, n: int = 4, axis: int = 2) -> list:
    """``n`` slice indices along ``axis`` spread evenly over the extent of ``mask`` (or of the volume if empty)."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    present = np.flatnonzero(np.asarray(mask).any(axis=other))
    lo, hi = (present[0], present[-1]) if present.size else (0, mask.shape[axis] - 1)
    # stay off the first and last few slices, where there is little to see
    return sorted({int(round(v)) for v in np.linspace(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo), n)})


def save_overlay_png(
    image: np.ndarray,
    pred: np.ndarray,
    path: str,
    label: Optional[np.ndarray] = None,
    slices: Optional[Sequence[int]] = None,
    n: int = 4,
    title: str = "",
    spacing: Optional[Sequence[float]] = None,
) -> str:
    """Write a PNG with ``n`` axial slices of a RAS-oriented volume: the image in grey, the predicted mask's
    contour in red and, if given, the reference contour in green (dashed).

    Args:
        image, pred, label: 3D arrays of the same shape, in RAS orientation (axis 2 is inferior -> superior).
        path: PNG to write (folders are created).
        slices: axial indices to show (default: ``n`` spread over the reference, else the prediction).
        title: figure title (e.g. the case name and Dice).
        spacing: voxel size (x, y, z) in mm, for a correct aspect ratio.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    image, pred = np.asarray(image, dtype=np.float32), np.asarray(pred)
    if image.ndim != 3 or image.shape != pred.shape or (label is not None and np.shape(label) != image.shape):
        raise ValueError(f"image {image.shape}, pred {pred.shape} and label {None if label is None else np.shape(label)} must be 3D and equal")
    ref = label if label is not None and np.any(label) else pred
    idx = list(slices) if slices is not None else pick_slices(ref, n)
    lo, hi = np.percentile(image, [0.5, 99.5])
    aspect = 1.0 if spacing is None else float(spacing[1]) / float(spacing[0])
    fig, axes = plt.subplots(1, len(idx), figsize=(3.2 * len(idx), 3.9), squeeze=False)
    for ax, k in zip(axes[0], idx):
        # x (left -> right) horizontal, y (posterior -> anterior) upwards: a neurological-convention axial view
        ax.imshow(image[:, :, k].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if label is not None and np.any(label[:, :, k]):
            ax.contour(np.asarray(label[:, :, k]).T > 0, levels=[0.5], colors="lime", linewidths=1.2, linestyles="dashed")
        if np.any(pred[:, :, k]):
            ax.contour(pred[:, :, k].T > 0, levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(f"axial slice {k}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=8, va="center")
        ax.text(0.96, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=8, va="center")
        ax.text(0.5, 0.96, "A", color="yellow", transform=ax.transAxes, fontsize=8, ha="center", va="top")
    handles = [Line2D([], [], color="red", lw=1.5, label="prediction")]
    if label is not None:
        handles.append(Line2D([], [], color="lime", lw=1.5, ls="--", label="reference"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95 if title else 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
