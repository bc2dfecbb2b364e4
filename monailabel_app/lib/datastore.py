"""MONAI Label's local datastore, with submitted labels checked against their image before they are stored.

A label that does not lie on its image's grid, or holds classes the model does not have, would only fail much
later inside a training subprocess (or silently train on misaligned masks); here it is refused at submission
with HTTP 422, and an unknown image id gets 404 instead of 500.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import numpy as np
from monailabel.datastore.local import LocalDatastore

from .errors import BadInput, image_not_found
from .imageio import check_label_fits_image, read_geometry, read_label_values

logger = logging.getLogger(__name__)


class CheckedLocalDatastore(LocalDatastore):
    """``LocalDatastore`` whose ``save_label`` validates the file first.

    Args:
        label_values: the class indices a label may contain (``{0: background, 1: brain}`` -> ``{0, 1}``);
            ``None`` skips the value check.
        other args: as ``LocalDatastore``.
    """

    def __init__(self, *args: Any, label_values: Optional[Dict[int, str]] = None, **kwargs: Any):
        self.label_values = label_values
        super().__init__(*args, **kwargs)

    def _require_image(self, image_id: str) -> str:
        uri = self.get_image_uri(image_id)
        if not uri:
            raise image_not_found(image_id)  # never lists the other ids (patient names)
        return uri

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        image_uri = self._require_image(image_id)
        desc = f"the label for image '{image_id}'"
        label = read_geometry(label_filename, desc)
        try:
            image = read_geometry(image_uri, f"the image '{image_id}'")
        except BadInput as e:  # the stored image itself is unreadable: nothing to compare against
            logger.warning(f"Cannot check label against image '{image_id}': {e.detail}")
        else:
            check_label_fits_image(label, image, image_id)

        if self.label_values is not None:
            values = read_label_values(label_filename, desc)
            if not np.all(np.mod(values, 1) == 0):
                raise BadInput(
                    f"The label for image '{image_id}' holds non-integer values: a label map holds class indices."
                )
            allowed = set(int(k) for k in self.label_values)
            extra = sorted(set(int(v) for v in values) - allowed)
            if extra:
                classes = ", ".join(f"{k}: {v}" for k, v in sorted(self.label_values.items()))
                raise BadInput(
                    f"The label for image '{image_id}' holds values {extra} that are not classes of the model "
                    f"({classes})."
                )
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        self._require_image(image_id)
        super().update_image_info(image_id, info)
