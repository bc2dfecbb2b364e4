"""Errors that reach the client with a status code and a message a user can act on.

They subclass FastAPI's ``HTTPException`` so that any endpoint that raises them (directly or from inside the
app, the datastore or a task) answers with that status and ``{"detail": message}`` instead of a bare 500.
Outside the server (training or scoring subprocesses, scripts) they are ordinary exceptions whose ``str()``
is ``"<status>: <message>"``.
"""

from fastapi import HTTPException


def root_message(e: BaseException, limit: int = 400) -> str:
    """The innermost error of a chain (MONAI wraps transform errors several times), as ``Type: message``."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class AppError(HTTPException):
    status = 500

    def __init__(self, message: str):
        super().__init__(status_code=self.status, detail=message)
        self.message = message


class BadInput(AppError):
    """The request's file or parameters cannot be used (unreadable image, label that does not fit its image)."""

    status = 422


class UnsupportedFile(AppError):
    """The uploaded file is not an image format the app reads."""

    status = 415


class NotFound(AppError):
    """Unknown image id, session or model."""

    status = 404


class ModelNotReady(AppError):
    """No trained weights yet: inference is refused rather than serving a randomly initialised network."""

    status = 409


class WeightsError(AppError):
    """``models/model.pt`` exists but cannot be loaded strictly into the bundle's ``network_def``."""

    status = 500


def image_not_found(image_id: str) -> NotFound:
    """The one answer for an image that is not in the datastore, whether the id is unknown or is a server path
    (so that the answer never tells whether a path exists on the server), and without listing the known ids."""
    shown = image_id if len(image_id) <= 80 else image_id[:77] + "..."
    return NotFound(
        f"Image '{shown}' is not in the datastore: give the id of a datastore image, upload the volume "
        f"(PUT /datastore/image) or send it as a file or session."
    )


class Forbidden(AppError):
    """The request would modify something the server only reads (a volume linked from a dataset folder)."""

    status = 403


class Conflict(AppError):
    """The request would replace different data stored under the same name (another patient's volume)."""

    status = 409


class TooLarge(AppError):
    """An upload, a volume (by its header) or an archive is over the server's size limits."""

    status = 413
