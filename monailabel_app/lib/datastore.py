"""MONAI Label's local datastore, made safe for what arrives over HTTP and for crashes.

- Names: image ids and label tags must be plain names (:func:`~lib.uploads.safe_name`); anything else is a 422,
  so no request can write or delete outside the studies folder.
- Sizes: an uploaded volume or label is checked from its header before it is decoded
  (:func:`~lib.imageio.check_volume_file`: 413 with the numbers, 415 for a single DICOM slice).
- No silent replacement: uploading a volume under an existing id with different content is a 409 (3D Slicer
  reuses node names across patients, and its plugin keeps using the name it sent, so a new id would make it
  segment, and attach labels to, the old volume); the same content again is accepted and changes nothing.
- Read-only datasets: a volume linked from a dataset folder (``--studies sample_data``) cannot be deleted
  (403); nothing ever writes through the link.
- Labels: checked against their image (grid, classes; an empty final label is a 422), then written to a
  temporary file, fsynced and renamed, so ``kill -9`` leaves the old or the new label, never a broken one.
- The index ``datastore_v2.json`` is written the same way, with a copy ``datastore_v2.json.bak``; a start
  that finds the index unreadable (truncated by an older server or a full disk) restores that copy, or
  rebuilds the index from the files on disk, instead of refusing to start.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Optional

import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel

from medurwkv.files import atomic_copy, atomic_write_bytes

from .errors import BadInput, Conflict, Forbidden, NotFound, image_not_found
from .image2d import is_image_2d
from .imageio import Limits, check_label_fits_image, check_volume_file, read_geometry, read_label_values, same_volume
from .uploads import safe_name

logger = logging.getLogger(__name__)

FINAL = "final"


class CheckedLocalDatastore(LocalDatastore):
    """``LocalDatastore`` with the checks and crash safety of the module doc.

    Args:
        label_values: the class indices a label may contain (``{0: background, 1: brain}`` -> ``{0, 1}``);
            ``None`` skips the value check.
        label_values_2d: the same for labels of 2D (PNG/JPEG) images, the 2D model's classes (default:
            ``label_values``).
        limits: size limits of uploaded volumes and labels (default: :class:`~lib.imageio.Limits`).
        other args: as ``LocalDatastore``.
    """

    def __init__(
        self,
        *args: Any,
        label_values: Optional[Dict[int, str]] = None,
        limits: Optional[Limits] = None,
        label_values_2d: Optional[Dict[int, str]] = None,
        **kwargs: Any,
    ):
        self.label_values = label_values
        self.label_values_2d = label_values_2d if label_values_2d is not None else label_values
        self.limits = limits or Limits()
        super().__init__(*args, **kwargs)
        handler = getattr(self, "_handler", None)  # auto-reload: the index now arrives by rename, not in place
        if handler is not None:
            handler.on_moved = self._on_index_replaced

    def _on_index_replaced(self, event) -> None:
        """Another process (training, scoring) replaced the index: reload it (a no-op for our own writes, whose
        mtime is already known)."""
        if os.path.realpath(getattr(event, "dest_path", "") or "") == os.path.realpath(self._datastore_config_path):
            self._init_from_datastore_file()

    # ------------------------------------------------------------------------------------------ the index
    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str).encode()
            atomic_write_bytes(self._datastore_config_path, text)
            atomic_write_bytes(self._datastore_config_path + ".bak", text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        try:
            super()._init_from_datastore_file(throw_exception=True)
        except ValueError:
            self._recover_index()

    def _recover_index(self) -> None:
        index, backup = self._datastore_config_path, self._datastore_config_path + ".bak"
        with FileLock(self._lock_file):
            try:
                with open(backup) as f:
                    model = LocalDatastoreModel.model_validate_json(f.read())
                source = "its last good copy (datastore_v2.json.bak)"
            except (OSError, ValueError):
                model = LocalDatastoreModel(
                    name=self._datastore.name,
                    description=self._datastore.description,
                    images_dir=self._datastore.images_dir,
                    labels_dir=self._datastore.labels_dir,
                )
                source = "the volumes and labels on disk (image and label infos such as scores are lost)"
            broken = f"{index}.broken-{int(time.time())}"
            os.replace(index, broken)
            model.base_path = self._datastore_path
            self._datastore = model
            self._update_datastore_file(lock=False)
        logger.warning(f"The datastore index was unreadable (kept as {os.path.basename(broken)}); restored from {source}")

    def remove_stale_temp_files(self) -> int:
        """Remove the temporary files of writes that a killed server left behind (``.<name>.<random>.tmp``, see
        ``medurwkv/files.py``). Only the server calls this, at start: no write of its own is in flight then."""
        removed = 0
        folders = [self._datastore_path, self._datastore.image_path(), self._datastore.label_path(None)]
        labels = self._datastore.label_path(None)
        folders += [os.path.join(labels, d) for d in os.listdir(labels) if os.path.isdir(os.path.join(labels, d))]
        for folder in dict.fromkeys(os.path.realpath(f) for f in folders):
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(path) and not os.path.islink(path):
                    os.remove(path)
                    removed += 1
        if removed:
            logger.warning(f"Removed {removed} temporary file(s) of writes interrupted by a previous stop")
        return removed

    # ------------------------------------------------------------------------------------------ images
    def _require_image(self, image_id: str) -> str:
        uri = self.get_image_uri(image_id) if isinstance(image_id, str) else ""
        if not uri:
            raise image_not_found(image_id)  # never lists the other ids (patient names)
        return uri

    def _stored_path(self, image_id: str) -> str:
        """The image's entry in the studies folder (not resolved: it may be a link into a dataset folder)."""
        obj = self._datastore.objects[image_id]
        return os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext))

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        derived, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = safe_name(image_id or derived, "image id")
        check_volume_file(image_filename, self.limits, "the uploaded volume")
        with FileLock(self._lock_file):
            if image_id in self._datastore.objects:
                existing = self._require_image(image_id)
                if same_volume(existing, image_filename):
                    logger.info(f"Image '{image_id}' uploaded again with the same content: kept as it is")
                    return image_id
                raise Conflict(
                    f"An image named '{image_id}' already exists with different content (another volume, perhaps "
                    f"another patient): it is not replaced. Give the volume another name (in 3D Slicer: rename the "
                    f"volume node) and upload it again."
                )
            name = self._filename(image_id, image_ext)
            atomic_copy(image_filename, os.path.join(self._datastore.image_path(), name))
            info = dict(image_info or {})
            info.update({"ts": int(time.time()), "name": name})
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._update_datastore_file(lock=False)
        logger.info(f"Added image '{image_id}'")
        return image_id

    def remove_image(self, image_id: str) -> None:
        self._require_image(image_id)
        stored = self._stored_path(image_id)
        root = os.path.realpath(self._datastore.image_path())
        if os.path.islink(stored) or not os.path.realpath(stored).startswith(root + os.sep):
            raise Forbidden(
                f"Image '{image_id}' is a volume of the dataset folder, which this server only reads: it is not "
                f"deleted. Remove it from the dataset folder (and its dataset.json) and restart the server."
            )
        super().remove_image(image_id)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        self._require_image(image_id)
        if not isinstance(info, dict):
            raise BadInput("The image info must be a JSON object.")
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        if not isinstance(info, dict):
            raise BadInput("The label info must be a JSON object.")
        if not isinstance(label_id, str) or not isinstance(label_tag, str) or not self._datastore.label(label_id, label_tag):
            raise NotFound(f"There is no label '{str(label_tag)[:40]}' of image '{str(label_id)[:128]}'.")
        super().update_label_info(label_id, label_tag, info)

    # ------------------------------------------------------------------------------------------ labels
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        label_tag = safe_name(label_tag, "label tag")
        image_uri = self._require_image(image_id)
        desc = f"the label for image '{image_id}'"
        label = check_volume_file(label_filename, self.limits, desc)
        try:
            image = read_geometry(image_uri, f"the image '{image_id}'")
        except BadInput as e:  # the stored image itself is unreadable: nothing to compare against
            logger.warning(f"Cannot check label against image '{image_id}': {e.detail}")
        else:
            check_label_fits_image(label, image, image_id)

        values = read_label_values(label_filename, desc)
        label_values = self.label_values_2d if is_image_2d(image_uri) else self.label_values
        if label_values is not None:
            if not np.all(np.mod(values, 1) == 0):
                raise BadInput(
                    f"The label for image '{image_id}' holds non-integer values: a label map holds class indices."
                )
            allowed = set(int(k) for k in label_values)
            extra = sorted(set(int(v) for v in values) - allowed)
            if extra:
                classes = ", ".join(f"{k}: {v}" for k, v in sorted(label_values.items()))
                raise BadInput(
                    f"The label for image '{image_id}' holds values {extra} that are not classes of the model "
                    f"({classes})."
                )
        if label_tag == FINAL and not np.any(values != 0):
            raise BadInput(
                f"The label for image '{image_id}' is empty (every voxel is 0, background): a training cannot "
                f"learn from it, so it is not stored. Draw the structure, then submit again."
            )
        return self._store_label(image_id, label_filename, label_tag, label_info)

    def _store_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        """``LocalDatastore.save_label``, with the file written atomically (temp + fsync + rename)."""
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_dir = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        with FileLock(self._lock_file):
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise NotFound(f"Image '{image_id}' is not in the datastore.")
            os.makedirs(label_dir, exist_ok=True)
            atomic_copy(label_filename, os.path.join(label_dir, name))
            previous = obj.labels.get(label_tag)
            info = dict(label_info or {})
            info.update({"ts": int(time.time()), "name": name})
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._update_datastore_file(lock=False)
            if previous is not None and previous.ext != label_ext:  # the old label in another format
                old = os.path.join(label_dir, self._filename(image_id, previous.ext))
                if os.path.isfile(old) and not os.path.islink(old):
                    os.remove(old)
        logger.info(f"Saved label '{label_tag}' of image '{image_id}'")
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        safe_name(label_tag, "label tag")
        super().remove_label(label_id, label_tag)

