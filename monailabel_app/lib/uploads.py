"""Names, archives and sessions from requests, made safe before they touch the file system.

- :func:`safe_name`: an image id, label tag or upload name is ONE file-name component (no ``/``, ``\\``,
  ``..``, leading ``.``, control characters), so ``join(folder, name)`` stays inside ``folder``. Names 3D
  Slicer gives volume nodes (``3: T1 SAG head``) pass.
- :func:`extract_archive`: a ``.zip`` / ``.tar(.gz)`` is unpacked only if every entry is a regular file or
  folder whose path stays inside the target, and if the entries' total size and count are within
  :class:`~lib.imageio.Limits` (checked while reading, before writing each entry).
- :class:`CheckedSessions`: MONAI Label's ``Sessions`` whose session ids must be the ids it creates (UUIDs),
  so ``session_id=../x`` cannot name, read or delete a folder outside the sessions folder; archives are
  extracted with :func:`extract_archive`, and a session volume passes :func:`~lib.imageio.check_volume_file`.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
import uuid
import zipfile
from typing import Optional

from monailabel.utils.sessions import Sessions

from .errors import BadInput, NotFound, TooLarge, UnsupportedFile
from .imageio import Limits, _mb, _sentence, check_dicom_file, check_volume_file, is_dicom_file

MAX_NAME = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def safe_name(value: Optional[str], what: str) -> str:
    """``value`` if it is a single safe file-name component, else ``BadInput`` (422) saying why."""
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"The {what} is empty.")
    problem = None
    if len(value) > MAX_NAME:
        problem = f"longer than {MAX_NAME} characters"
    elif "/" in value or "\\" in value:
        problem = "it contains a path separator"
    elif value.startswith("."):
        problem = "it starts with '.'"
    elif _CONTROL.search(value):
        problem = "it contains control characters"
    elif value != value.strip():
        problem = "it starts or ends with a space"
    if problem:
        raise BadInput(f"The {what} must be a plain name (one file-name component): {problem}.")
    return value


def is_session_id(value: str) -> bool:
    return isinstance(value, str) and bool(_UUID.match(value))


def _inside(root: str, name: str) -> bool:
    target = os.path.realpath(os.path.join(root, name))
    return target == root or target.startswith(root + os.sep)


def _entries(archive: str, desc: str):
    """(name, declared size, "file" | "dir" | "other", opener) of each entry of a zip or tar, read as a stream."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                mode = (info.external_attr >> 16) & 0o170000  # unix file type, when the archive records one
                kind = "dir" if info.is_dir() else "other" if mode and mode != 0o100000 else "file"
                yield info.filename, info.file_size, kind, (lambda i=info: z.open(i))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as t:
            for m in t:
                kind = "file" if m.isfile() else "dir" if m.isdir() else "other"  # links, devices, fifos: other
                yield m.name, m.size, kind, (lambda m=m: t.extractfile(m))
    else:
        raise UnsupportedFile(f"{_sentence(desc)} is not a .zip or .tar(.gz) archive.")


def extract_archive(archive: str, target: str, limits: Limits, desc: str = "the archive") -> None:
    """Unpack a zip or tar archive into the empty folder ``target`` (see the module doc); on any refusal the
    partly extracted files are removed and ``BadInput`` (422) / ``TooLarge`` (413) / ``UnsupportedFile`` (415)
    says which entry and why."""
    root = os.path.realpath(target)
    total, count = 0, 0

    def admit(name: str, size: int) -> None:
        nonlocal total, count
        count += 1
        total += max(int(size), 0)
        escapes = os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in re.split(r"[\\/]", name)
        if escapes or not _inside(root, name):
            raise BadInput(f"{_sentence(desc)} holds an entry outside its folder: refused.")
        if count > limits.max_archive_files:
            raise TooLarge(f"{_sentence(desc)} holds more than {limits.max_archive_files:,} entries.")
        if total > limits.max_archive_bytes:
            raise TooLarge(
                f"{_sentence(desc)} unpacks to more than {_mb(limits.max_archive_bytes)} "
                f"(--conf max_archive_mb)."
            )

    try:
        for name, size, kind, open_entry in _entries(archive, desc):
            if kind == "other":
                raise BadInput(f"{_sentence(desc)} holds a link or special file: refused.")
            admit(name, size)
            dest = os.path.join(root, name)
            if kind == "dir":
                os.makedirs(dest, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            written = 0
            with open_entry() as src, open(dest, "xb") as out:
                while True:  # the declared size can lie: count what really comes out
                    block = src.read(1 << 20)
                    if not block:
                        break
                    written += len(block)
                    if written > size:
                        raise TooLarge(f"{_sentence(desc)} holds an entry larger than it declares.")
                    out.write(block)
    except (BadInput, TooLarge, UnsupportedFile):
        shutil.rmtree(root, ignore_errors=True)
        raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, RuntimeError) as e:
        shutil.rmtree(root, ignore_errors=True)
        raise BadInput(f"{_sentence(desc)} could not be unpacked: {type(e).__name__}") from None


def check_session_input(path: str, limits: Limits, desc: str) -> None:
    """A session volume: one volume file, or a folder holding one DICOM series (at least two slices)."""
    if not os.path.isdir(path):
        check_volume_file(path, limits, desc)
        return
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    dicoms = [f for f in files if is_dicom_file(f)]
    if not dicoms:
        volumes = [f for f in files if not os.path.basename(f).startswith(".")]
        if len(volumes) == 1:
            check_volume_file(volumes[0], limits, desc)
            return
        raise BadInput(f"{_sentence(desc)} holds {len(volumes)} files and no DICOM series.")
    total, frames = 0, 0
    for f in dicoms:
        n, nbytes = check_dicom_file(f, limits, desc)
        frames, total = frames + n, total + nbytes
        if total > limits.max_image_bytes:
            raise TooLarge(
                f"{_sentence(desc)} holds a DICOM series of more than {_mb(limits.max_image_bytes)} "
                f"decoded (--conf max_image_mb)."
            )
    if frames <= 1:
        raise UnsupportedFile(
            f"{_sentence(desc)} holds a single DICOM slice, not a volume: send the whole series."
        )


class CheckedSessions(Sessions):
    """``Sessions`` that only knows ids it can have created, unpacks archives safely and checks the volume."""

    def __init__(self, store_path: str = "", expiry: int = 3600, limits: Optional[Limits] = None):
        super().__init__(store_path, expiry)
        self.limits = limits or Limits()

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        if not is_session_id(session_id):
            return None
        return super().get_session(session_id, update_ts=update_ts, fetch_cache=fetch_cache)

    def remove_session(self, session_id: str):
        if not is_session_id(session_id):
            raise NotFound("No such session.")
        return super().remove_session(session_id)

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        if session_id is not None and not is_session_id(session_id):
            raise BadInput("A session id is a UUID.")
        os.makedirs(self.store_path, exist_ok=True)
        if uncompress and not os.path.isdir(data_file):
            unpacked = tempfile.mkdtemp(prefix="monailabel-unpack-")  # not in the sessions folder: not a session
            try:
                extract_archive(data_file, unpacked, self.limits, "the uploaded archive")
                entries = os.listdir(unpacked)
                data = os.path.join(unpacked, entries[0]) if len(entries) == 1 else unpacked  # one file or folder
                check_session_input(data, self.limits, "the uploaded archive")
                return super().add_session(data, expiry, False, session_id or str(uuid.uuid4()))
            finally:
                shutil.rmtree(unpacked, ignore_errors=True)
        check_session_input(data_file, self.limits, "the uploaded volume")
        return super().add_session(data_file, expiry, False, session_id or str(uuid.uuid4()))
