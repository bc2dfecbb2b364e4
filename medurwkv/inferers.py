"""Slice-wise inference of the 2D Med-URWKV on 3D volumes (and on 2D images with the same settings)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from monai.inferers import SliceInferer, SlidingWindowInferer

__all__ = ["SliceWiseInferer"]


class SliceWiseInferer(SliceInferer):
    """MONAI's ``SliceInferer`` that also takes 2D images.

    3D inputs (B, C, H, W, D) are cut into 2D slices along ``spatial_dim`` (2: axial slices of a RAS volume);
    ``sw_batch_size`` slices (windows of ``roi_size``) go through the network at once, so memory depends on
    the batch and the ROI, not on the number of slices. Slices smaller than ``roi_size`` are zero-padded to it
    and larger ones are covered by overlapping windows (``overlap``), so the network always sees
    ``roi_size`` inputs (multiples of 32 for Med-URWKV). 2D inputs (B, C, H, W) are handled the same way
    with ``roi_size`` windows.

    Args: as ``monai.inferers.SliceInferer`` (``roi_size`` is 2D).
    """

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if inputs.dim() == 4:  # (B, C, H, W): a 2D image
            self.roi_size = tuple(self.orig_roi_size)
            return SlidingWindowInferer.__call__(self, inputs, network, *args, **kwargs)
        if inputs.dim() != 5:
            raise ValueError(f"SliceWiseInferer expects (B, C, H, W) or (B, C, H, W, D) inputs, got shape {tuple(inputs.shape)}")
        return super().__call__(inputs, network, *args, **kwargs)
