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
import sys
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
