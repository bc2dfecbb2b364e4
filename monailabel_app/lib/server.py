"""Adjustments to the running MONAI Label server, applied by the app when it is created inside it.

monailabel 0.8.5 has behaviours this app cannot accept and no setting to change:

1. ``POST /infer/{model}`` is an ``async def`` endpoint that runs the whole inference synchronously, so the
   event loop is blocked: ``/info/``, ``/train/`` and every other request wait until the volume is segmented
   (``MONAI_LABEL_INFER_CONCURRENCY`` only moves the work to a pool whose result is awaited synchronously).
   :func:`make_infer_non_blocking` replaces that route with the same handler declared as a plain ``def``,
   which FastAPI runs in its worker-thread pool; the infer task bounds how many run at once. It also turns
   requests that cannot work into 4xx answers (no image, file or session given; unknown or expired session).
2. ``start_server`` listens on ``0.0.0.0`` unless ``--host`` is given. :func:`bind_loopback_by_default`
   makes uvicorn bind ``127.0.0.1`` when no ``--host``/``-i`` was given on the command line. An explicit
   ``--host 0.0.0.0`` is respected, with a warning.

3. ``POST /train/{model}`` refuses a second training (429) only once the first one's process is registered,
   which happens in a worker thread after the request has been answered; two quick *Train* clicks therefore
   queue a second full training behind the first. :func:`one_training_at_a_time` also counts a training that
   was submitted in the last minutes and has not started its process yet.

4. Requests are hostile (a web page in the annotator's browser can send them to 127.0.0.1 too).
   :func:`secure_server` rebuilds the app's middleware stack (Starlette cannot add middleware once started, and
   the app is created inside the server's lifespan): monailabel's ``CORSMiddleware`` (every origin reflected,
   with credentials) is dropped unless ``--conf cors_origins`` lists origins; Starlette's
   ``TrustedHostMiddleware`` checks ``Host`` against the bind address (DNS rebinding); :class:`RequestGuard`
   refuses requests that a web page sent (an ``Origin`` not listed), serves the login (``lib/auth.py``) and
   requires its token on every other path when ``--conf auth true``, and keeps server paths out of JSON, text
   and error answers. A non-loopback ``--host`` without login is refused unless ``--conf insecure true``.
   :func:`one_training_at_a_time` and the infer route check every request option against the task's
   allow-list (``lib/options.py``) before anything runs. Upload file names are masked in the log.

All only touch objects that exist in the server process; in training/scoring subprocesses they do nothing.
Written for monailabel 0.8.5 (:data:`MONAILABEL_VERSION`): :func:`check_versions` says clearly in the log when
another version is installed; :func:`secure_server` refuses to start the server when the middleware stack it
rebuilds is missing, and :func:`make_infer_non_blocking` warns when the route it replaces is not found.
(No ``from __future__ import annotations`` here: FastAPI must see the endpoint's real annotation objects.)
"""

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from datetime import datetime
from typing import Dict, Iterable, List, Optional

from .studies import IMAGE_2D_SUFFIXES

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
MONAILABEL_VERSION = "0.8.5"


def check_versions(what: str = "the server patches") -> bool:
    """True when the installed monailabel is the one these patches were written against; else a clear error in the
    log naming ``what`` (the patch being installed)."""
    import monailabel

    installed = getattr(monailabel, "__version__", "?")
    if str(installed).split("+")[0] != MONAILABEL_VERSION:
        logger.error(
            f"monailabel {installed} is installed; {what} (monailabel_app/lib/server.py) were written and tested "
            f"for {MONAILABEL_VERSION}. Check each one (README: 'What the app adds') before use."
        )
        return False
    return True


def _host_from_argv(argv) -> Optional[str]:
    for i, a in enumerate(argv):
        if a in ("-i", "--host") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--host="):
            return a.split("=", 1)[1]
    return None


def _host(config) -> Optional[str]:
    value = vars(config).get("host")
    return LOOPBACK if value in ("0.0.0.0", "::") else value


def _set_host(config, value) -> None:
    vars(config)["host"] = value


_LOOPBACK_HOST = property(_host, _set_host, doc="uvicorn's bind address, monailabel's default 0.0.0.0 read as 127.0.0.1")


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

    # monailabel.main calls uvicorn.run(host=args.host) before this app exists (the app is created in the server's
    # lifespan), so wrapping uvicorn.run or Config.__init__ from here is too late. uvicorn reads Config.host when it
    # opens its sockets, after the lifespan's startup: a ``host`` property on the class, which takes precedence over
    # the value Config.__init__ stored on the instance, answers 127.0.0.1 for monailabel's default 0.0.0.0.
    check_versions("binding 127.0.0.1 by default")
    current = vars(uvicorn.Config).get("host")
    if current is not None and current is not _LOOPBACK_HOST:  # uvicorn's own class-level host: not to be shadowed
        logger.warning(f"uvicorn {uvicorn.__version__} is not patched for the default host: pass --host 127.0.0.1")
        return None
    uvicorn.Config.host = _LOOPBACK_HOST
    logger.warning(
        f"No --host given: listening on {LOOPBACK} only (monailabel's default is 0.0.0.0). "
        f"Pass --host 0.0.0.0 explicitly to accept connections from other machines."
    )
    return LOOPBACK


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

    from .errors import BadInput, NotFound, image_not_found

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
        except RecursionError:
            raise BadInput("'params' is nested too deep.") from None
        if not isinstance(p, dict):
            raise BadInput("'params' must be a JSON object")
        if image and (image in (".", "..") or any(c in image for c in "/\\\x00")):
            raise image_not_found(image)  # ids only: the same answer whether such a server path exists or not
        task = getattr(app_instance(), "_infers", {}).get(model)
        if task is not None and hasattr(task, "check_request"):
            p = task.check_request(p, model)  # options allow-listed; nothing MONAI would evaluate (lib/options.py)
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


def _task_of(method: str, request) -> Optional[object]:
    """The app's train task or scoring method a request is for (None: not found, or another kind of task)."""
    from monailabel.interfaces.utils.app import app_instance

    tasks = {"train": "_trainers", "scoring": "_scoring_methods", "batch_infer": "_infers"}.get(method)
    if not tasks or not isinstance(request, dict):
        return None
    name = request.get("method" if method == "scoring" else "model")
    return getattr(app_instance(), tasks, {}).get(name)


def _check_params(method: str, task, params):
    from .errors import BadInput

    check = getattr(task, "check_request", None)
    if check is None:
        raise BadInput(f"This {method} task takes no options")
    return check(params)  # batch_infer: the options of the model's infer task


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
        if force_sync and method in ("train", "scoring", "batch_infer"):
            from .errors import BadInput

            # ?run_sync=true ran the task inside the server, on its event loop (every request waits), past the
            # one-training check below (a second training then fails on the weights' lock: a 500)
            raise BadInput(f"run_sync is not offered: a {method} task runs in its own process; follow it with GET.")
        task = _task_of(method, request)
        if params and method in ("train", "scoring", "batch_infer"):
            # the options are merged over the request after this check: an unknown task (whose options nothing
            # checks) with {"model": <a real one>} in them would start that one with unchecked options
            key = "method" if method == "scoring" else "model"
            name = request.get(key) if isinstance(request, dict) else None
            if task is None:
                from .errors import NotFound

                raise NotFound(f"There is no {method} task '{str(name)[:40]}' on this server.")
            if isinstance(params, dict) and key in params and params[key] != name:
                from .errors import BadInput

                raise BadInput(f"The options may not name another {key} than the request's ('{str(name)[:40]}').")
        if params and task is not None:  # the client's options: allow-listed before a process is started
            params = _check_params(method, task, params)
        if method != "train" or enqueue or force_sync:
            return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)
        with lock:
            if len(processes(method)) or pending(method):
                description = f"++++++++++ {method.capitalize()} Task is Already Running (or about to start)"
                logger.info(description)
                return None, description
            holder = task.training_lock().holder() if hasattr(task, "training_lock") else None
            if holder is not None:  # a training this server did not start (one left running by a killed server)
                description = (
                    f"A training started earlier (process {holder}, not by this server: it outlived a server that "
                    f"was stopped) is still running and writing the weights. Wait for it to end, or stop that process."
                )
                logger.warning(description)
                return None, description
            return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    run._one_at_a_time = True  # type: ignore[attr-defined]
    task_module.AsyncTask.run = staticmethod(run)
    return True


def weights_from_training_only() -> bool:
    """Refuse monailabel's ``PUT /model/{model}`` and ``DELETE /model/{model}``: the first copies any uploaded bytes
    over ``model.pt`` in place (not atomic, unchecked, the trained weights lost, even while a training writes
    them), the second renames the weights away; any client could do either. The weights are written by training
    only (``lib/trainers/lock.py``); ``GET /model/{model}`` still downloads them."""
    app_module = sys.modules.get("monailabel.app")
    if app_module is None:
        return False
    from fastapi import Depends
    from monailabel.config import settings
    from monailabel.endpoints import model as model_endpoint
    from monailabel.endpoints.user.auth import RBAC, User

    from .errors import Forbidden

    def refuse(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        raise Forbidden("This server's weights are written by training only (POST /train/{model}); they cannot "
                        "be uploaded or deleted through the API.")

    n = 0
    for original in (model_endpoint.api_update_model, model_endpoint.api_delete_model):
        n += _replace_route(model_endpoint.router, original, refuse)
        n += _replace_route(app_module.app.router, original, refuse)
    app_module.app.openapi_schema = None
    return n > 0


# ----------------------------------------------------------------------------------- requests are hostile (point 4)
def _json(status: int, body, headers: Optional[Dict[str, str]] = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


class PathScrubber:
    """Replaces server paths under the given roots by their last component (``/srv/.../models/model.pt`` ->
    ``model.pt``) in answers, whatever wrote them (monailabel's own results and messages name files)."""

    def __init__(self, roots: Iterable[str]):
        found = set()
        for r in roots:
            if r:
                for v in (os.path.abspath(r), os.path.realpath(r)):
                    if len(v) > 1:
                        found.add(v.rstrip("/"))
        alternatives = "|".join(re.escape(r) for r in sorted(found, key=len, reverse=True))
        self._re = re.compile(rf"(?:{alternatives})(?![\w.-])(?:/[^\s'\"\\,;:)\]}}]*)?") if alternatives else None

    def __call__(self, text: str) -> str:
        if self._re is None:
            return text
        return self._re.sub(lambda m: os.path.basename(m.group(0).rstrip("/")) or "<server path>", text)

    def json(self, obj):
        """The same for a JSON value; a ``"path"`` entry holding a server path is dropped (3D Slicer loads a
        sample's ``path`` directly when it exists on its own machine: a bare file name must not be taken for it).
        Any absolute ``"path"`` is a server path: a studies volume that is a link has its target's real path there
        (``get_image_info``), in a folder that is none of the roots."""
        if isinstance(obj, str):
            # a whole value that is a path, under a root or not (not a message that starts with one: those are
            # scrubbed below, or a sentence's last "/..." would be taken for a file name)
            name = os.path.basename(obj.rstrip("/"))
            if obj.startswith("/") and name and "\n" not in obj and (not any(c.isspace() for c in obj) or os.path.exists(obj)):
                return name
            return self(obj)
        if isinstance(obj, dict):
            return {
                k: self.json(v)
                for k, v in obj.items()
                if not (k == "path" and isinstance(v, str) and (os.path.isabs(v) or (self._re and self._re.match(v))))
            }
        if isinstance(obj, list):
            return [self.json(v) for v in obj]
        return obj

    def body(self, raw: bytes, content_type: str) -> bytes:
        text = raw.decode("utf-8", errors="replace")
        if content_type.startswith("application/json"):
            try:
                return json.dumps(self.json(json.loads(text))).encode()
            except (ValueError, RecursionError):
                pass
        return self(text).encode()


class RequestGuard:
    """Pure ASGI middleware, in front of every route (see the module doc, point 4).

    Args:
        app: the next ASGI app.
        origins: web origins allowed to send requests (``--conf cors_origins``); any other ``Origin`` is a 403.
        auth: a ``lib.auth.LocalAuth`` when login is on, else None (``/auth/`` then says ``enabled: false``).
        scrub: what keeps server paths out of JSON, text and error answers.
    """

    OPEN_PATHS = ("/auth", "/auth/", "/auth/token")
    MAX_LOGIN_BYTES = 4096

    def __init__(self, app, origins: List[str], auth=None, scrub: Optional[PathScrubber] = None):
        self.app, self.origins, self.auth, self.scrub = app, set(origins), auth, scrub

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            return await _json(
                403,
                {"detail": "Requests from web pages are refused (Origin not allowed; see --conf cors_origins)."},
            )(scope, receive, send)
        path = scope["path"]
        if any(part in (".", "..") for part in path.split("/")):  # no route takes one; /ohif/.. was a 500
            return await _json(404, {"detail": "Not Found"})(scope, receive, send)
        if path in self.OPEN_PATHS:
            return await self._login(scope, receive, send, path)
        if self.auth is not None:
            user = self._user(headers)
            if user is None:
                return await _json(
                    401, {"detail": "Log in first (POST /auth/token)."}, {"WWW-Authenticate": "Bearer"}
                )(scope, receive, send)
            if path == "/auth/token/valid":
                return await _json(200, {"username": user})(scope, receive, send)
            if self.admin_only(scope["method"], path) and self.auth.role(user) != "admin":
                return await _json(403, {"detail": "Only an admin user may do this (deleting images or labels, reload, logs, weights)."})(
                    scope, receive, send
                )
        elif path == "/auth/token/valid":
            return await _json(200, {"username": "local"})(scope, receive, send)
        await self.app(scope, receive, self._scrubbing(send) if self.scrub else send)

    @staticmethod
    def admin_only(method: str, path: str) -> bool:
        """What loses data, changes the server or hands out what was learnt from the studies (``lib/auth.py``,
        roles): what monailabel's own RBAC also reserves for admins."""
        p = path.rstrip("/")
        return (
            (method == "DELETE" and p.startswith("/datastore"))
            or p == "/reload"
            or p in ("/logs", "/model")
            or p.startswith(("/logs/", "/model/"))
        )

    def _user(self, headers) -> Optional[str]:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return self.auth.user(token.strip()) if scheme.lower() == "bearer" and token else None

    async def _login(self, scope, receive, send, path):
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request

        if path != "/auth/token":
            return await _json(200, {"enabled": self.auth is not None, "client_id": None, "realm": None})(
                scope, receive, send
            )
        if scope["method"] != "POST":
            return await _json(405, {"detail": "POST the form username, password"})(scope, receive, send)
        if self.auth is None:
            return await _json(200, {"access_token": None, "token_type": None})(scope, receive, send)
        request = Request(scope, receive)
        length = request.headers.get("content-length")
        if not length or not length.isdigit() or int(length) > self.MAX_LOGIN_BYTES:
            return await _json(413, {"detail": f"A login form has at most {self.MAX_LOGIN_BYTES} bytes"})(
                scope, receive, send
            )
        try:
            form = await request.form()
            username, password = str(form.get("username", "")), str(form.get("password", ""))
        except Exception:
            return await _json(422, {"detail": "Send the form fields username and password"})(scope, receive, send)
        from .auth import LoginLocked

        try:
            token = await run_in_threadpool(self.auth.login, username, password)  # bcrypt: ~0.2 s, off the loop
        except LoginLocked as e:
            logger.warning("Login refused: too many wrong passwords for this user name (throttled)")
            return await _json(429, {"detail": str(e)}, {"Retry-After": str(int(e.seconds) + 1)})(scope, receive, send)
        if token is None:
            logger.warning("Login refused (unknown user or wrong password)")
            return await _json(401, {"detail": "Wrong user name or password"}, {"WWW-Authenticate": "Bearer"})(
                scope, receive, send
            )
        return await _json(200, {"access_token": token, "token_type": "Bearer"})(scope, receive, send)

    def _scrubbing(self, send):
        """``send`` that rewrites JSON and text answers (and every error answer) through the scrubber; files
        and multipart results (volumes) pass unchanged."""
        state: Dict = {}

        async def wrapped(message):
            if message["type"] == "http.response.start":
                ctype = dict(message.get("headers", [])).get(b"content-type", b"").decode().lower()
                if message["status"] >= 400 or ctype.startswith(("application/json", "text/")):
                    state["start"], state["body"], state["type"] = message, b"", ctype
                    return
            if "start" not in state:
                return await send(message)
            if message["type"] == "http.response.body":
                state["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                body = self.scrub.body(state["body"], state["type"])
                start = dict(state.pop("start"))
                start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"] + [
                    (b"content-length", str(len(body)).encode())
                ]
                await send(start)
                return await send({"type": "http.response.body", "body": body})
            return await send(message)

        return wrapped


class UploadNameFilter(logging.Filter):
    """Masks uploaded file names (often patient names) in log lines: monailabel logs ``UploadFile`` objects, the
    infer request (whose ``source_name`` is the upload's name) and session files saved under their upload name
    in a temporary folder (``upload_dirs``: path prefixes; the file name of any path starting with one is
    masked)."""

    PATTERNS = [
        (re.compile(r"""filename=(?:'[^']*'|"[^"]*"|\S+)"""), "filename=<upload>"),
        (re.compile(r"""(['"]source_name['"]:\s*)(?:'[^']*'|"[^"]*")"""), r"\1'<upload>'"),
    ]

    def __init__(self, upload_dirs: Iterable[str] = ()):
        super().__init__()
        dirs = "|".join(re.escape(d.rstrip("/")) for d in sorted({d for d in upload_dirs if d}, key=len, reverse=True))
        self.patterns = list(self.PATTERNS)
        if dirs:
            # the file name may hold spaces (Slicer's node names): masked up to a quote, comma, ';' or line end
            self.patterns.append((re.compile(rf"""((?:{dirs})[^/\s'",;]*(?:/[^/\s'",;]+)*/)[^/'",;\n]+"""), r"\1<file>"))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:
            return True
        masked = text
        for pattern, replacement in self.patterns:
            masked = pattern.sub(replacement, masked)
        if masked != text:
            record.msg, record.args = masked, ()
        return True


def mask_upload_names_in_logs(upload_dirs: Iterable[str] = ()) -> None:
    """Put :class:`UploadNameFilter` on every handler of the root and uvicorn loggers (idempotent)."""
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for h in logging.getLogger(name).handlers:
            if not any(isinstance(f, UploadNameFilter) for f in h.filters):
                h.addFilter(UploadNameFilter(upload_dirs))


def _conf_list(conf: Dict[str, str], key: str) -> List[str]:
    return [v.strip() for v in str(conf.get(key, "")).split(",") if v.strip()]


def secure_server(app_dir: str, conf: Dict[str, str], host: Optional[str], roots: Iterable[str] = ()) -> bool:
    """Install the request guard in the running server (module doc, point 4). Raises (the server does not start)
    on a non-loopback host without login, or a login without users. False outside the server."""
    app_module = sys.modules.get("monailabel.app")
    if app_module is None:
        return False
    from monailabel.config import settings
    from monailabel.utils.others.generic import strtobool
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    check_versions()
    # monailabel saves uploads as tempfile.NamedTemporaryFile().name (<tmp>/tmpXXXX) and in the sessions folder
    # where monailabel's Sessions keeps session volumes (its own default when the setting is empty)
    sessions_path = (settings.MONAI_LABEL_SESSION_PATH or "").strip() or os.path.join(
        os.path.expanduser("~"), ".cache", "monailabel", "sessions"
    )
    mask_upload_names_in_logs([os.path.join(tempfile.gettempdir(), "tmp"), sessions_path])
    app = app_module.app
    if not hasattr(app, "user_middleware") or not hasattr(app, "build_middleware_stack"):
        raise RuntimeError("monailabel's FastAPI app has no middleware stack to secure: unsupported version")

    auth = None
    if strtobool(str(conf.get("auth", "false"))):
        from .auth import LocalAuth

        users = os.path.abspath(os.path.expanduser(conf.get("users") or os.path.join(app_dir, "model", "users.json")))
        auth = LocalAuth(users, float(conf.get("token_hours", "12")))
        os.environ["MEDURWKV_SERVICE_TOKEN"] = auth.service_token()  # training/scoring processes call the server
        logger.info(f"Login required on every endpoint except /auth/ and /auth/token ({len(auth.users())} users)")
    host = host or _host_from_argv(sys.argv) or "0.0.0.0"
    loopback = host in LOOPBACK_NAMES or host.startswith("127.")
    if not loopback and auth is None:
        if not strtobool(str(conf.get("insecure", "false"))):
            raise RuntimeError(
                f"Refusing to listen on {host} without login: anyone on the network could read and change the "
                f"studies. Add users (python monailabel_app/lib/auth.py add-user NAME) and pass --conf auth true, "
                f"or --conf insecure true to accept the risk."
            )
        logger.warning(f"Listening on {host} WITHOUT login (--conf insecure true): anyone on the network has access")

    # starlette compares the lower-cased Host name (brackets and port removed) with these: lower-case them too
    hosts = list(LOOPBACK_NAMES) + [h.lower().strip("[]") for h in _conf_list(conf, "allowed_hosts")]
    if not loopback:
        hosts += [host] if host not in ("0.0.0.0", "::") else []
        if host in ("0.0.0.0", "::") and not _conf_list(conf, "allowed_hosts"):
            hosts = ["*"]
            logger.warning("Any Host header is accepted on 0.0.0.0: list this server's names in --conf allowed_hosts")
    origins = _conf_list(conf, "cors_origins")
    ours = (CORSMiddleware, TrustedHostMiddleware, RequestGuard)  # also when the app is created again (/reload)
    middleware = [m for m in app.user_middleware if getattr(m, "cls", None) not in ours]
    middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=hosts))
    if origins:
        middleware.insert(
            1,
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_credentials=False,
                allow_methods=["GET", "POST", "PUT", "DELETE"],
                allow_headers=["Authorization", "Content-Type"],
            ),
        )
    scrub = PathScrubber(
        [app_dir, settings.MONAI_LABEL_STUDIES, sessions_path, tempfile.gettempdir(), *roots]
    )
    middleware.insert(2 if origins else 1, Middleware(RequestGuard, origins=origins, auth=auth, scrub=scrub))
    app.user_middleware = middleware
    app.middleware_stack = app.build_middleware_stack()
    logger.info(
        f"Requests: Host must be one of {hosts}; web origins allowed: {origins or 'none (no CORS)'}; "
        f"login: {'on' if auth else 'off'}"
    )
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


_UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ".seg.nrrd", ".zip", ".tar.gz", ".tgz", ".tar") + IMAGE_2D_SUFFIXES


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


MAX_JSON_DEPTH = 32


def _json_object(text: str, what: str) -> dict:
    from .errors import BadInput

    try:
        value = json.loads(text) if text else {}
    except (ValueError, RecursionError):  # RecursionError: nested too deep ('[[[[...' fits in a small body)
        raise BadInput(f"'{what}' is not valid JSON (or is nested too deep).") from None
    if not isinstance(value, dict):
        raise BadInput(f"'{what}' must be a JSON object.")
    stack = [(value, 1)]  # stored info is answered again later (scrubbed recursively): bounded nesting
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadInput(f"'{what}' is nested more than {MAX_JSON_DEPTH} levels deep.")
        if isinstance(item, (dict, list)):
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
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
    check_versions("the upload-endpoint patches")
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

    for name in ("update_image_info", "update_label_info"):  # json.loads of the form, then info["user"] = ...
        original = getattr(ds_endpoint, name)
        if not getattr(original, "_info_checked", False):

            def checked(*args, _original=original):  # (image, info, user) / (label, tag, info, user)
                _json_object(args[-2], "info")  # not JSON or not an object: 422, not a 500
                return _original(*args)

            checked._info_checked = True  # type: ignore[attr-defined]
            setattr(ds_endpoint, name, checked)

    def api_download_dataset(limit_cases: Optional[int] = None, user: User = annotator):
        from starlette.background import BackgroundTask
        from starlette.responses import FileResponse

        from .errors import NotFound

        datastore = app_instance().datastore()
        if not datastore.datalist():  # monailabel: an AssertionError (500)
            raise NotFound("No image has a final label yet: there is no dataset to download.")
        path = datastore.get_dataset_archive(limit_cases)  # a copy of every volume, in the temporary folder
        return FileResponse(path, media_type="application/zip", filename="dataset.zip",
                            background=BackgroundTask(os.remove, path))  # monailabel left it there

    _replace_route(ds_endpoint.router, ds_endpoint.api_download_dataset, api_download_dataset)
    _replace_route(app_module.app.router, ds_endpoint.api_download_dataset, api_download_dataset)
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


def _check_binary_label(label, image: str) -> None:
    """A ``.bin`` label (OHIF's raw scribbles) is reshaped by monailabel to its datastore image's grid: without
    such an image, or with another byte count, that was a 500; now a 422 / 404 before it is read."""
    import numpy as np
    from monailabel.interfaces.utils.app import app_instance

    from .errors import BadInput, image_not_found
    from .imageio import read_geometry

    if not image:
        raise BadInput("A .bin label (raw voxels) goes with a datastore image (image=...), not a file or session.")
    uri = app_instance().datastore().get_image_uri(image)
    if not uri:
        raise image_not_found(image)
    voxels = int(np.prod(read_geometry(uri, f"the image '{image}'").shape))
    label.file.seek(0, os.SEEK_END)
    size = label.file.tell()
    label.file.seek(0)
    if size != voxels:
        raise BadInput(f"The .bin label has {size:,} bytes; image '{image}' has {voxels:,} voxels (one byte each).")


def infer_inputs_only_from_request(limits) -> bool:
    """Wrap ``monailabel.endpoints.infer.run_inference`` (what POST /infer/{model} calls; see the block comment)."""
    if sys.modules.get("monailabel.app") is None:
        return False
    check_versions("the infer-input patches")
    from monailabel.endpoints import infer as infer_endpoint
    from monailabel.interfaces.utils.app import app_instance

    from .errors import BadInput
    from .imageio import check_volume_file
    from .uploads import safe_name

    original = infer_endpoint.run_inference
    if getattr(original, "_inputs_from_request", False):
        return True
    convert = infer_endpoint.binary_to_image

    def binary_to_image(*args, **kwargs):  # monailabel never removes the volume it converts a .bin label to
        out = convert(*args, **kwargs)
        getattr(_request_volumes, "converted", []).append(out)
        return out

    infer_endpoint.binary_to_image = binary_to_image

    def run_inference(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None):
        if image and not file and not session_id:
            safe_name(image, "image id")
        p = _json_object(params, "params")
        named = sorted(set(p) & REQUEST_FILE_KEYS - {"label"})
        if named:  # monailabel copies params over the request: they would replace the files it was given
            raise BadInput(f"'params' may not set {', '.join(named)}: send the volume or label as a file or session.")
        if "label" in p:  # 3D Slicer's SmartEdit names the segment here (MONAILabel.py: params["label"]): a name only
            if p["label"] is not None:
                safe_name(p["label"], "segment name in 'params' (label)")
            if label is not None:  # an uploaded label file: its path must not be replaced by the name
                del p["label"]
                params = json.dumps(p)
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
            if label and (label.filename or "").lower().endswith(".bin"):
                _check_binary_label(label, image if not file and not session_id else "")
            if label:  # monailabel names its copy tmpXXXX<every suffix of the client's name>: a long name or a
                # NUL in it was an OSError / ValueError (500); the copy gets a known suffix only
                lname = (label.filename or "").lower()
                label.filename = "label" + next(
                    (s for s in sorted(_UPLOAD_SUFFIXES + (".bin",), key=len, reverse=True) if lname.endswith(s)), ""
                )
            if session_id:
                sessions = app_instance().sessions()
                session = sessions.get_session(session_id, update_ts=False) if sessions is not None else None
                if session is not None:
                    allowed.add(os.path.realpath(session.image))
            _request_volumes.paths, _request_volumes.converted = allowed, []
            try:
                return original(background_tasks, model, image, session_id, params, None, label, output)
            finally:
                _request_volumes.paths = ()
                for path in _request_volumes.converted:  # the inference has read it: the answer is computed
                    with contextlib.suppress(OSError):
                        os.remove(path)
                _request_volumes.converted = []

    run_inference._inputs_from_request = True  # type: ignore[attr-defined]
    infer_endpoint.run_inference = run_inference
    return True
