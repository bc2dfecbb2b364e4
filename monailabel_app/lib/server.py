"""Adjustments to the running MONAI Label server, applied by the app when it is created inside it.

monailabel 0.8.5 has two behaviours this app cannot accept and no setting to change:

1. ``POST /infer/{model}`` is an ``async def`` endpoint that runs the whole inference synchronously, so the
   event loop is blocked: ``/info/``, ``/train/`` and every other request wait until the volume is segmented
   (``MONAI_LABEL_INFER_CONCURRENCY`` only moves the work to a pool whose result is awaited synchronously).
   :func:`make_infer_non_blocking` replaces that route with the same handler declared as a plain ``def``,
   which FastAPI runs in its worker-thread pool; the infer task bounds how many run at once. It also turns
   requests that cannot work into 4xx answers (no image, file or session given; unknown or expired session).
2. ``start_server`` listens on ``0.0.0.0`` unless ``--host`` is given. :func:`bind_loopback_by_default`
   switches uvicorn's configuration to ``127.0.0.1`` when no ``--host``/``-i`` was given on the command line
   (uvicorn opens its sockets only after the app has started, so this is in time). An explicit
   ``--host 0.0.0.0`` is respected, with a warning.

3. ``POST /train/{model}`` refuses a second training (429) only once the first one's process is registered,
   which happens in a worker thread after the request has been answered; two quick *Train* clicks therefore
   queue a second full training behind the first. :func:`one_training_at_a_time` also counts a training that
   was submitted in the last minutes and has not started its process yet.

All only touch objects that exist in the server process; in training/scoring subprocesses they do nothing.
(No ``from __future__ import annotations`` here: FastAPI must see the endpoint's real annotation objects.)
"""

import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from datetime import datetime
from typing import Optional

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def _host_from_argv(argv) -> Optional[str]:
    for i, a in enumerate(argv):
        if a in ("-i", "--host") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--host="):
            return a.split("=", 1)[1]
    return None


def bind_loopback_by_default() -> Optional[str]:
    """Make uvicorn bind 127.0.0.1 unless the command line chose a host. Returns the host that will be bound."""
    if "start_server" not in sys.argv or "uvicorn" not in sys.modules:
        return None
    explicit = _host_from_argv(sys.argv)
    if explicit:
        if explicit in ("0.0.0.0", "::"):
            logger.warning(
                f"Listening on all interfaces ({explicit}) as requested: anyone on the network can read and "
                f"write the studies. Use --host 127.0.0.1 for local use."
            )
        return explicit
    workers = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--workers"), None)
    if workers and workers.isdigit() and int(workers) > 1:
        logger.warning(
            "With --workers the listening socket is opened before the app starts: it is on monailabel's "
            "default 0.0.0.0. Pass --host 127.0.0.1 explicitly for local use."
        )
        return None
    import uvicorn

    configs = [o for o in gc.get_objects() if isinstance(o, uvicorn.Config)]
    for c in configs:
        if c.host in ("0.0.0.0", "::"):
            c.host = LOOPBACK
    if configs:
        logger.warning(
            f"No --host given: listening on {LOOPBACK} only (monailabel's default is 0.0.0.0). "
            f"Pass --host 0.0.0.0 explicitly to accept connections from other machines."
        )
        return LOOPBACK
    logger.warning("Could not find the uvicorn configuration: pass --host 127.0.0.1 explicitly")
    return None


def _replace_route(router, old_endpoint, new_endpoint) -> int:
    """Swap the route(s) of ``router`` served by ``old_endpoint`` for ``new_endpoint``, in place (same order).

    FastAPI up to ~0.11x copies routes into the app at ``include_router``; newer versions keep the included
    router and read its ``routes`` at request time (versioned). Both the endpoint module's router and the app
    router are patched, so this works either way.
    """
    from fastapi.routing import APIRoute

    replaced = 0
    for i, r in enumerate(list(router.routes)):
        if isinstance(r, APIRoute) and r.endpoint is old_endpoint:
            prefix = getattr(router, "prefix", "") or ""
            path = r.path[len(prefix) :] if prefix and r.path.startswith(prefix) else r.path
            router.add_api_route(
                path, new_endpoint, methods=sorted(r.methods), summary=r.summary, responses=r.responses, name=r.name
            )
            router.routes[i] = router.routes.pop()
            replaced += 1
    if replaced and hasattr(router, "_mark_routes_changed"):
        router._mark_routes_changed()
    return replaced


def make_infer_non_blocking() -> bool:
    """Serve ``POST /infer/{model}`` from FastAPI's thread pool instead of the event loop (see module doc)."""
    app_module = sys.modules.get("monailabel.app")
    if app_module is None:  # not inside the server (scripts, training/scoring subprocesses)
        return False

    from typing import Optional as Opt

    from fastapi import BackgroundTasks, Depends, File, Form, UploadFile
    from monailabel.config import settings
    from monailabel.endpoints import infer as infer_endpoint
    from monailabel.endpoints.user.auth import RBAC, User
    from monailabel.interfaces.utils.app import app_instance

    from .errors import BadInput, NotFound

    original = infer_endpoint.api_run_inference
    if getattr(original, "_runs_in_threadpool", False):
        return True

    def api_run_inference(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: Opt[infer_endpoint.ResultType] = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        if not file and not image and not session_id:
            raise BadInput("Give an image id (image=...), a volume file (file) or a session id (session_id=...).")
        session = None
        if session_id:
            sessions = app_instance().sessions()
            session = sessions.get_session(session_id) if sessions is not None else None
            if session is None:
                raise NotFound(
                    f"Session '{session_id}' does not exist or has expired (after "
                    f"{settings.MONAI_LABEL_SESSION_EXPIRY} s): upload the volume again (PUT /session/)."
                )
        try:
            p = json.loads(params) if params else {}
        except ValueError as e:
            raise BadInput(f"'params' is not valid JSON: {e}") from None
        if not isinstance(p, dict):
            raise BadInput("'params' must be a JSON object")
        if file is not None and file.filename:
            p.setdefault("source_name", os.path.basename(file.filename))
        elif session is not None:
            p.setdefault("source_name", f"{os.path.basename(str(session.image))} (session {session_id})")
        return infer_endpoint.run_inference(
            background_tasks, model, image, session_id, json.dumps(p), file, label, output
        )

    api_run_inference._runs_in_threadpool = True  # type: ignore[attr-defined]
    n = _replace_route(infer_endpoint.router, original, api_run_inference)
    n += _replace_route(app_module.app.router, original, api_run_inference)
    if not n:
        logger.warning("Route POST /infer/{model} not found: inference will block the server while it runs")
        return False
    infer_endpoint.api_run_inference = api_run_inference
    app_module.app.openapi_schema = None
    logger.info("POST /infer/{model} runs in the worker-thread pool: the server stays responsive during inference")
    return True


SUBMIT_WINDOW_S = 300  # a submitted task that has not started its process after this long is not waited for


def one_training_at_a_time() -> bool:
    """Make ``AsyncTask.run("train", ...)`` (what ``POST /train/{model}`` calls) atomic: while a training is
    submitted (not started yet) or running, a new one is refused with monailabel's own "Already Running" answer
    (HTTP 429), instead of being queued behind it (see module doc, point 3)."""
    if sys.modules.get("monailabel.app") is None:
        return False
    from monailabel.utils.async_tasks import task as task_module
    from monailabel.utils.async_tasks.utils import processes, tasks

    original = task_module.AsyncTask.run
    if getattr(original, "_one_at_a_time", False):
        return True
    lock = threading.Lock()

    def pending(method: str) -> bool:
        now = datetime.today()
        for t in tasks(method):
            if t.get("status") != "SUBMITTED":
                continue
            try:
                age = (now - datetime.strptime(t.get("start_ts", ""), "%Y-%m-%d %H:%M:%S")).total_seconds()
            except ValueError:
                continue
            if age < SUBMIT_WINDOW_S:
                return True
        return False

    def run(method, request=None, params=None, force_sync=False, enqueue=False):
        if method != "train" or enqueue or force_sync:
            return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)
        with lock:
            if len(processes(method)) or pending(method):
                description = f"++++++++++ {method.capitalize()} Task is Already Running (or about to start)"
                logger.info(description)
                return None, description
            return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    run._one_at_a_time = True  # type: ignore[attr-defined]
    task_module.AsyncTask.run = staticmethod(run)
    return True


# ==================================================================================== files: names, sizes, uploads
# monailabel 0.8.5's upload endpoints (PUT /datastore/image, PUT /datastore/label, PUT /session/, and the file of
# POST /infer/{model}) copy the request body to temporary files they only remove when the request succeeds, use
# request values as file names and paths, read every size the client sends, and (datastore, session) run their
# checks inside ``async`` endpoints, on the event loop. The functions below, wired once each in main.py:
# - limit_request_body: every request body is counted as it arrives; over ``max_upload_mb`` it is a 413 and the
#   rest is not read (a Content-Length over the limit is refused before reading anything);
# - safe_upload_endpoints: the three PUT endpoints re-registered as plain functions (FastAPI runs them in its
#   thread pool, so a 105 MB label check does not stall /info/), writing uploads to a private temporary folder
#   that is removed on every path, success or error, and never logging upload names;
# - infer_inputs_only_from_request: POST /infer/{model} reads its file the same way and checks it before
#   decoding; ``image=`` is a datastore id only. The app's ``infer`` accepts a path only when it is this
#   request's own upload or session volume (:func:`is_request_volume`), never a path a client names.
FILES_PATCHED_VERSIONS = ("0.8.5",)  # what the endpoint signatures below were written against


def _check_monailabel_version(what: str) -> bool:
    import monailabel

    version = getattr(monailabel, "__version__", "?")
    if not str(version).startswith(FILES_PATCHED_VERSIONS):
        logger.warning(f"{what}: written for monailabel {', '.join(FILES_PATCHED_VERSIONS)}, found {version}")
        return False
    return True


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI wrapper: a request body over ``limit`` bytes is answered 413 and not read further."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def _reply_413(self, send, received: Optional[int] = None) -> None:
        from .imageio import _mb

        size = f" ({_mb(received)} or more)" if received else ""
        body = json.dumps(
            {"detail": f"The request body is too large{size}: this server accepts at most {_mb(self.limit)} per "
             f"request (--conf max_upload_mb)."}
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.limit:
                return await self._reply_413(send, declared)
        received, too_big, started = 0, False, False

        async def counted_receive():
            nonlocal received, too_big
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_big = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if too_big:  # the app's own answer to the aborted body is dropped: the 413 below replaces it
                return
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not too_big:
                raise
        if too_big and not started:
            await self._reply_413(send, received)


def limit_request_body(limits) -> bool:
    """Put :class:`BodyLimit` first in the running server's middleware and rebuild its stack (the stack is built
    when the server starts, before the app exists, so Starlette's ``add_middleware`` is too late). It stays in
    ``user_middleware``, so a later rebuild of the stack keeps it."""
    app_module = sys.modules.get("monailabel.app")
    if app_module is None:
        return False
    from starlette.middleware import Middleware

    fastapi_app = app_module.app
    others = [m for m in fastapi_app.user_middleware if getattr(m, "cls", None) is not BodyLimit]
    fastapi_app.user_middleware = [Middleware(BodyLimit, limit=limits.max_upload_bytes + (1 << 20))] + others
    fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    return True


_UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ".seg.nrrd", ".zip", ".tar.gz", ".tgz", ".tar")


class _Received:
    """The uploaded file(s) of one request in a private temporary folder, removed when the block ends."""

    def __init__(self, limits):
        self.limits = limits
        self.folder = tempfile.mkdtemp(prefix="medurwkv-upload-")

    def take(self, upload, index: int = 0) -> str:
        from .errors import TooLarge
        from .imageio import _mb

        name = os.path.basename((upload.filename or "").replace("\\", "/")).lower()
        suffix = next((s for s in sorted(_UPLOAD_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")
        if not suffix and name.endswith((".nhdr", ".mhd")):  # refused later with a message, by its suffix
            suffix = os.path.splitext(name)[1]
        path = os.path.join(self.folder, f"upload{index}{suffix}")
        written = 0
        with open(path, "xb") as out:
            while True:
                block = upload.file.read(1 << 20)
                if not block:
                    break
                written += len(block)
                if written > self.limits.max_upload_bytes:
                    raise TooLarge(f"The upload is larger than {_mb(self.limits.max_upload_bytes)} (--conf max_upload_mb).")
                out.write(block)
        return path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.folder, ignore_errors=True)
        return False


def _json_object(text: str, what: str) -> dict:
    from .errors import BadInput

    try:
        value = json.loads(text) if text else {}
    except ValueError:
        raise BadInput(f"'{what}' is not valid JSON.") from None
    if not isinstance(value, dict):
        raise BadInput(f"'{what}' must be a JSON object.")
    return value


def _described(upload, what: str) -> str:
    """"the uploaded file 'x.nii.gz'" for messages to the client that sent it (never logged)."""
    name = os.path.basename((upload.filename or "").replace("\\", "/"))
    return f"the uploaded file '{name}'" if name else f"the uploaded {what}"


def _id_from_filename(filename: Optional[str]) -> str:
    name = os.path.basename((filename or "").replace("\\", "/"))
    for s in sorted(_UPLOAD_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def safe_upload_endpoints(limits) -> bool:
    """Re-register PUT /datastore/image (and its deprecated PUT /datastore/), PUT /datastore/label and
    PUT /session/ (see the block comment above)."""
    app_module = sys.modules.get("monailabel.app")
    if app_module is None:
        return False
    _check_monailabel_version("safe_upload_endpoints")
    from typing import List

    from fastapi import BackgroundTasks, Depends, File, Form, UploadFile
    from monailabel.config import settings
    from monailabel.endpoints import datastore as ds_endpoint
    from monailabel.endpoints import session as session_endpoint
    from monailabel.endpoints.user.auth import RBAC, User
    from monailabel.interfaces.utils.app import app_instance

    from fastapi import HTTPException

    from .errors import BadInput

    annotator = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))

    def api_add_image(
        background_tasks: BackgroundTasks,
        image: Optional[str] = None,
        params: str = Form("{}"),
        file: UploadFile = File(...),
        user: User = annotator,
    ):
        save_params = _json_object(params, "params")
        if user and user.username:
            save_params["user"] = user.username
        with _Received(limits) as received:
            path = received.take(file)
            image_id = app_instance().datastore().add_image(image or _id_from_filename(file.filename), path, save_params)
        return {"image": image_id}

    def api_save_label(
        background_tasks: BackgroundTasks,
        image: str,
        params: str = Form("{}"),
        tag: str = "final",
        label: UploadFile = File(...),
        user: User = annotator,
    ):
        save_params = _json_object(params, "params")
        instance = app_instance()
        with _Received(limits) as received:
            path = received.take(label)
            label_id = instance.datastore().save_label(image, path, tag or "final", save_params)
        res = instance.on_save_label(image, label_id) or {}
        res.update({"image": image, "label": label_id})
        return res

    def api_create_session(
        background_tasks: BackgroundTasks,
        uncompress: bool = False,
        expiry: int = 0,
        files: List[UploadFile] = File(...),
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        sessions = app_instance().sessions()
        if sessions is None:
            raise HTTPException(status_code=406, detail="Sessions are not enabled on this server.")
        if not files:
            raise BadInput("No file was sent.")
        with _Received(limits) as received:
            paths = [received.take(f, i) for i, f in enumerate(files)]
            session_id, info = sessions.add_session(paths[0] if len(paths) == 1 else received.folder, expiry, uncompress)
        return {"session_id": session_id, "session_info": info.to_json()}

    n = _replace_route(ds_endpoint.router, ds_endpoint.api_add_image, api_add_image)
    n += _replace_route(app_module.app.router, ds_endpoint.api_add_image, api_add_image)
    n += _replace_route(ds_endpoint.router, ds_endpoint.api_save_label, api_save_label)
    n += _replace_route(app_module.app.router, ds_endpoint.api_save_label, api_save_label)
    n += _replace_route(session_endpoint.router, session_endpoint.api_create_session, api_create_session)
    n += _replace_route(app_module.app.router, session_endpoint.api_create_session, api_create_session)
    app_module.app.openapi_schema = None
    if n < 4:
        logger.warning(f"safe_upload_endpoints: only {n} of the upload routes were found and replaced")
        return False
    return True


_request_volumes = threading.local()
REQUEST_FILE_KEYS = {"image", "label", "session", "image_path", "file", "model_filename"}  # paths in a request


def is_request_volume(path: str) -> bool:
    """Whether ``path`` is the uploaded file or the session volume of the inference request being served in
    this thread (the only server paths ``infer`` may read besides datastore images)."""
    allowed = getattr(_request_volumes, "paths", ())
    return isinstance(path, str) and os.path.isabs(path) and os.path.realpath(path) in allowed


def infer_inputs_only_from_request(limits) -> bool:
    """Wrap ``monailabel.endpoints.infer.run_inference`` (what POST /infer/{model} calls; see the block comment)."""
    if sys.modules.get("monailabel.app") is None:
        return False
    _check_monailabel_version("infer_inputs_only_from_request")
    from monailabel.endpoints import infer as infer_endpoint
    from monailabel.interfaces.utils.app import app_instance

    from .errors import BadInput
    from .imageio import check_volume_file
    from .uploads import safe_name

    original = infer_endpoint.run_inference
    if getattr(original, "_inputs_from_request", False):
        return True

    def run_inference(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None):
        if image and not file and not session_id:
            safe_name(image, "image id")
        named = sorted(set(_json_object(params, "params")) & REQUEST_FILE_KEYS)
        if named:  # monailabel copies params over the request: they would replace the files it was given
            raise BadInput(f"'params' may not set {', '.join(named)}: send the volume or label as a file or session.")
        with _Received(limits) as received:
            allowed = set()
            if file:
                path = received.take(file)
                check_volume_file(path, limits, _described(file, "volume"))
                allowed.add(os.path.realpath(path))
                image = path
            if label and not (label.filename or "").lower().endswith(".bin"):  # strokes or segment (Slicer)
                check_volume_file(received.take(label, 1), limits, _described(label, "label"))
                label.file.seek(0)  # monailabel's own copy follows
            if session_id:
                sessions = app_instance().sessions()
                session = sessions.get_session(session_id, update_ts=False) if sessions is not None else None
                if session is not None:
                    allowed.add(os.path.realpath(session.image))
            _request_volumes.paths = allowed
            try:
                return original(background_tasks, model, image, session_id, params, None, label, output)
            finally:
                _request_volumes.paths = ()

    run_inference._inputs_from_request = True  # type: ignore[attr-defined]
    infer_endpoint.run_inference = run_inference
    return True
