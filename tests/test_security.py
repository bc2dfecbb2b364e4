"""Hostile requests against a real MONAI Label server (issue 10: code from requests, browsers, login, privacy,
one training across restarts; issue 15 item 1: train options Slicer can read before any weights exist).

One server per module (``tests/label_server.py``) on 127.0.0.1 with the login on (``--conf auth true``, a user
file written by ``lib/auth.py add-user``); requests go through raw HTTP (``requests``) and through
``monailabel.client.MONAILabelClient`` with the token, as 3D Slicer's module sends them. Every probe's status
and time is recorded and printed at the end of the module (``probes.json`` in the staging folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from label_server import MODEL, load_app_module, stage, status_of, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PASSWORD = "correct horse battery"
PROBES = []  # (what, status, seconds)


def _add_user(c, users: Path, name: str = "annotator", role: str = "annotator") -> None:
    cmd = [sys.executable, str(c.app / "lib" / "auth.py"), "add-user", name, "--users", str(users), "--password-stdin",
           "--role", role]
    subprocess.run(cmd, input=PASSWORD + "\n", text=True, check=True, env=c.env, capture_output=True)


@pytest.fixture(scope="module")
def sec(tmp_path_factory):
    from monailabel.client import MONAILabelClient

    c = stage(tmp_path_factory.mktemp("security"))
    c.users = c.root / "users.json"
    _add_user(c, c.users)
    c.auth_conf = {"auth": "true", "users": str(c.users)}
    c.marker = c.root / "marker_from_expression"
    try:
        c.server.start(host="127.0.0.1", extra_conf=c.auth_conf)
        c.client = MONAILabelClient(c.server.url, tmpdir=str(c.client_dir))
        assert c.client.auth_enabled()
        c.token = c.client.auth_token("annotator", PASSWORD)
        c.client.update_auth(c.token)
        c.headers = {"Authorization": f"Bearer {c.token['access_token']}"}
        _add_user(c, c.users, name="chief", role="admin")
        c.admin_headers = {"Authorization": f"Bearer {c.client.auth_token('chief', PASSWORD)['access_token']}"}
        yield c
    finally:
        c.server.stop()
        (c.root / "probes.json").write_text(json.dumps(PROBES, indent=1))
        print("\nprobe | status | seconds")
        for what, status, seconds in PROBES:
            print(f"{what} | {status} | {seconds}")


def probe(c, what: str, method: str, path: str, expect: int, token: bool = True, **kw) -> requests.Response:
    """One raw request; records (what, status, time); checks the status and that /info/ still answers."""
    headers = dict(kw.pop("headers", {}))
    if token:
        headers.update(c.headers)
    start = time.time()
    r = requests.request(method, c.server.url + path, headers=headers, timeout=120, **kw)
    PROBES.append((what, r.status_code, round(time.time() - start, 3)))
    assert r.status_code == expect, f"{what}: {r.status_code} {r.text[:600]}"
    assert requests.get(c.server.url + "/info/", headers=c.headers, timeout=60).status_code == 200, f"/info/ after {what}"
    return r


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def _no_server_paths(c, obj, what: str) -> None:
    for s in _strings(obj):
        assert str(c.root) not in s and not s.startswith("/"), f"{what} holds a server path: {s!r}"


def _train_status(c) -> dict:
    r = requests.get(c.server.url + "/train/", headers=c.headers, timeout=60)
    return r.json() if r.status_code == 200 else {}


def _wait_training_end(c, timeout: float = 600) -> dict:
    def ended():
        s = _train_status(c)
        return s if s and s.get("status") not in ("SUBMITTED", "RUNNING") else None

    return wait_for(ended, timeout, "the training to end", interval=1.0)


def _lock(c):
    lock_module = load_app_module("app_training_lock", c.app / "lib" / "trainers" / "lock.py")
    return lock_module.TrainingLock(str(c.weights))


# ----------------------------------------------------------------------------------------------------- login
def test_every_endpoint_refuses_a_request_without_the_token(sec):
    spec = probe(sec, "openapi with token", "GET", "/openapi.json", 200).json()
    routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
    routes += [("GET", "/"), ("GET", "/logs/"), ("GET", "/static/favicon.ico"), ("POST", "/reload")]
    assert ("GET", "/info/") in routes and ("POST", "/infer/{model}") in routes and ("GET", "/logs/") in routes
    forged = "Bearer " + sec.token["access_token"][:-4] + "AAAA"
    for method, path in routes:
        if path in ("/auth/", "/auth/token"):
            continue
        url = path.replace("{model}", MODEL).replace("{strategy}", "first").replace("{method}", "mc_dropout")
        url = url.replace("{image}", "colin_a").replace("{session_id}", "x").replace("{label}", "colin_a")
        url = url.replace("{id}", "colin_a").replace("{tag}", "final")
        r = probe(sec, f"{method} {url} without token", method, url, 401, token=False)
        assert r.headers.get("www-authenticate") == "Bearer"
        probe(sec, f"{method} {url} forged token", method, url, 401, token=False, headers={"Authorization": forged})
    # what the Slicer module asks before logging in, and its login
    assert probe(sec, "GET /auth/ without token", "GET", "/auth/", 200, token=False).json()["enabled"] is True
    bad = {"username": "annotator", "password": "wrong password", "grant_type": "password"}
    probe(sec, "POST /auth/token wrong password", "POST", "/auth/token", 401, token=False, data=bad)
    probe(sec, "GET /auth/token/valid", "GET", "/auth/token/valid", 200)
    assert sec.client.auth_valid_token()


def test_password_guessing_is_throttled_per_user_name(sec):
    """Five wrong passwords for one name: that name is refused (429, Retry-After), even with the right password,
    while another user still logs in; the wait doubles per further failure up to 15 min."""
    _add_user(sec, sec.users, name="trainee")  # the user file is read at each login
    form = {"username": "trainee", "password": "wrong password", "grant_type": "password"}
    for i in range(5):
        probe(sec, f"POST /auth/token wrong password #{i + 1}", "POST", "/auth/token", 401, token=False, data=form)
    right = {**form, "password": PASSWORD}
    r = probe(sec, "POST /auth/token right password after 5 wrong", "POST", "/auth/token", 429, token=False, data=right)
    assert 25 <= int(r.headers["retry-after"]) <= 31 and "try again in" in r.json()["detail"]
    assert sec.client.auth_token("annotator", PASSWORD)["access_token"]  # another name is not affected

    auth = load_app_module("app_auth", sec.app / "lib" / "auth.py")
    now = [0.0]
    throttle = auth.LoginThrottle(clock=lambda: now[0])
    waits = []
    for _ in range(9):
        throttle.failed("x")
        with pytest.raises(auth.LoginLocked) if _ >= 4 else contextlib.nullcontext() as locked:
            throttle.check("x")
        waits.append(round(locked.value.seconds) if _ >= 4 else 0)
    assert waits == [0, 0, 0, 0, 30, 60, 120, 240, 480]
    for _ in range(3):
        throttle.failed("x")
    with pytest.raises(auth.LoginLocked) as locked:
        throttle.check("x")
    assert locked.value.seconds == 900  # capped at 15 min
    now[0] += 901
    throttle.check("x")  # the wait is over: one more try
    throttle.succeeded("x")
    throttle.failed("x")
    throttle.check("x")  # a correct login reset the count


def test_only_an_admin_deletes_images_and_labels(sec):
    """Deleting loses data, logs and weights tell about the studies: an annotator gets 403 (what monailabel's own
    RBAC reserves for admins), an admin user (add-user --role admin) deletes; the image stays until then."""
    sec.client.upload_image(str(sec.studies / "colin_a.nii.gz"), image_id="scratch_copy")
    for method, url in (("DELETE", "/datastore/image?id=scratch_copy"), ("DELETE", "/datastore/?id=scratch_copy"),
                        ("DELETE", "/datastore/label?id=scratch_copy&tag=final"), ("POST", "/reload"),
                        ("GET", "/logs/"), ("GET", "/logs/gpu"), ("GET", f"/model/{MODEL}")):
        r = probe(sec, f"{method} {url} as annotator", method, url, 403)
        assert "Only an admin" in r.json()["detail"]
    assert "scratch_copy" in sec.client.datastore()["objects"]
    admin = sec.admin_headers  # a user added with --role admin
    probe(sec, "GET /logs/ as admin", "GET", "/logs/?lines=10", 200, token=False, headers=admin)
    probe(sec, "DELETE image as admin", "DELETE", "/datastore/image?id=scratch_copy", 200, token=False, headers=admin)
    # the listing may lag the delete by a few tens of ms when the upload's own index write is still being
    # reloaded by monailabel's folder watcher (seen: the id listed once, gone 46 ms later)
    wait_for(lambda: "scratch_copy" not in sec.client.datastore()["objects"], 10, "the deleted image to go", interval=0.1)
    assert not (sec.studies / "scratch_copy.nii.gz").exists()


def test_active_learning_loop_logs_in(sec, tmp_path):
    """The loop script speaks to a server with the login on as Slicer does: without a user it stops with what to
    pass; with one it logs in and reads the datastore."""
    al = load_app_module("al_loop_login", sec.app / "active_learning_loop.py")
    with pytest.raises(SystemExit) as e:
        al.Loop(sec.server.url, MODEL, "first", {}, str(tmp_path))
    assert "--user" in str(e.value)
    loop = al.Loop(sec.server.url, MODEL, "first", {}, str(tmp_path), user="annotator", password=PASSWORD)
    assert loop.labeled_count() == sec.client.info()["datastore"]["completed"]


def test_non_loopback_host_without_login_is_refused(tmp_path):
    c = stage(tmp_path)
    with pytest.raises(RuntimeError) as e:
        c.server.start(host="0.0.0.0", timeout=300)
    assert "Refusing to listen on 0.0.0.0 without login" in str(e.value)
    c.server.stop()


# -------------------------------------------------------------------------------------- no code from requests
def test_options_that_monai_would_evaluate_are_refused_and_never_run(sec):
    payload = f"$__import__('pathlib').Path({str(sec.marker)!r}).write_text('ran')"
    train = f"/train/{MODEL}"
    r = probe(sec, "train tracking_uri=$expr", "POST", train, 422, json={"tracking": "mlflow", "tracking_uri": payload})
    assert "evaluate" in r.json()["detail"]
    probe(sec, "train max_epochs=$expr", "POST", train, 422, json={"max_epochs": payload})
    probe(sec, "train @reference", "POST", train, 422, json={"max_epochs": "@network_def"})
    probe(sec, "train %macro", "POST", train, 422, json={"learning_rate": "%configs/train.json#lr"})
    probe(sec, "train _target_", "POST", train, 422, json={"device": {"_target_": "os.system", "command": "id"}})
    r = probe(sec, "train unknown option", "POST", train, 422, json={"max_epochs": 1, "run_id": "initialize"})
    assert "Unknown option 'run_id'" in r.json()["detail"]
    assert all(k in r.json()["detail"] for k in ("max_epochs", "learning_rate", "model_filename"))
    probe(sec, "train model_filename=../x", "POST", train, 422, json={"model_filename": "../../x.pt"})
    probe(sec, "train max_epochs out of range", "POST", train, 422, json={"max_epochs": 10**9})
    probe(sec, "train (all models) nested $expr", "POST", "/train/", 422, json={MODEL: {"tracking_uri": payload}})
    infer = f"/infer/{MODEL}?image=colin_a"
    probe(sec, "infer device=$expr", "POST", infer, 422, files={"params": (None, json.dumps({"device": payload}))})
    r = probe(sec, "infer params image=/etc", "POST", infer, 422, files={"params": (None, '{"image": "/etc/passwd"}')})
    assert "Unknown option 'image'" in r.json()["detail"]
    probe(sec, "infer label_info $expr", "POST", f"/infer/{MODEL}_scribbles?image=colin_a", 422,
          files={"params": (None, json.dumps({"label_info": [{"name": payload, "id": 1}]}))})
    probe(sec, "batch infer device=$expr", "POST", f"/batch/infer/{MODEL}", 422, json={"device": payload})
    probe(sec, "scoring passes=@ref", "POST", "/scoring/mc_dropout", 422, json={"passes": "@network"})
    probe(sec, "scoring force=_target_", "POST", "/scoring/mc_dropout", 422, json={"force": {"_target_": "eval"}})
    probe(sec, "next sample labels=$expr", "POST", "/activelearning/first", 422, json={"labels": payload})
    probe(sec, "next sample unknown option", "POST", "/activelearning/uncertainty", 422, json={"label_tag": "../x"})
    # nothing was started: no training task exists, and the expression never ran
    probe(sec, "train status (no task ever started)", "GET", "/train/", 404)
    time.sleep(2.0)
    assert not sec.marker.exists()


def test_train_options_are_readable_by_slicer_before_any_weights(sec):
    """Issue 15 item 1: Slicer builds the train options with ``{k: v[0] if isinstance(v, list) else v}`` (the
    Slicer plugin of Project-MONAI/MONAILabel, getParamsFromConfig); on a cold start (no model.pt) no list may be
    empty, and what it builds must pass the allow-list."""
    if sec.weights.exists():
        pytest.skip("weights exist already (this test needs the cold start: run it alone or first)")
    info = sec.client.info()
    config = info["trainers"][MODEL]["config"]
    params = {k: v[0] if isinstance(v, list) else v for k, v in config.items()}  # raises IndexError on []
    assert params["model_filename"] == "model.pt" and not any(isinstance(v, list) and not v for v in config.values())
    # the allow-list accepts all that Slicer sends back (checked without starting a training: the options are
    # checked in order, and an unknown one after them is the first refused)
    r = probe(sec, "train Slicer's options + one unknown", "POST", f"/train/{MODEL}", 422,
              json={**params, "not_an_option": 1})
    assert r.json()["detail"].startswith("Unknown option 'not_an_option'"), r.json()["detail"]
    r = probe(sec, "train max_epochs 0", "POST", f"/train/{MODEL}", 422, json={**params, "max_epochs": 0})
    assert "Option 'max_epochs' must be int in [1, 100000], got 0" in r.json()["detail"]


# ----------------------------------------------------------------------------------------------- browsers
def test_web_pages_and_foreign_host_names_are_refused(sec):
    site = {"Origin": "https://some.site"}
    r = probe(sec, "GET /info/ from a web page", "GET", "/info/", 403, headers=site)
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    preflight = {**site, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    r = probe(sec, "OPTIONS preflight from a web page", "OPTIONS", f"/train/{MODEL}", 403, token=False,
              headers=preflight)
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    probe(sec, "POST text/plain from a web page (no preflight)", "POST", f"/train/{MODEL}", 403, token=False,
          headers={**site, "Content-Type": "text/plain"}, data='{"max_epochs": 1}')
    probe(sec, "Origin: null (sandboxed page)", "POST", "/activelearning/first", 403, headers={"Origin": "null"})
    probe(sec, "Host: rebound name (DNS rebinding)", "GET", "/info/", 400, headers={"Host": "attacker.example"})
    probe(sec, "Host: localhost", "GET", "/info/", 200, headers={"Host": f"localhost:{sec.server.port}"})
    probe(sec, "Host: LocalHost (names are case-blind)", "GET", "/info/", 200, headers={"Host": f"LocalHost:{sec.server.port}"})
    probe(sec, "Host: [::1] (IPv6 loopback)", "GET", "/info/", 200, headers={"Host": f"[::1]:{sec.server.port}"})
    probe(sec, "Host: 127.0.0.1.attacker.example", "GET", "/info/", 400, headers={"Host": "127.0.0.1.attacker.example"})
    probe(sec, "GET /ohif/.. (a folder, not a file)", "GET", "/ohif/%2E%2E", 404)
    probe(sec, "GET /static/../main.py", "GET", "/static/%2E%2E/main.py", 404)
    probe(sec, "GET /info/ as Slicer sends it", "GET", "/info/", 200)


# ------------------------------------------------------------------------------------------------- privacy
def test_answers_and_logs_hold_no_server_paths_ids_or_upload_names(sec, tmp_path):
    info = probe(sec, "GET /info/", "GET", "/info/", 200).json()
    _no_server_paths(sec, info, "/info/")
    sample = sec.client.next_sample("first", {})
    assert sample["id"] and "path" not in sample
    _no_server_paths(sec, sample, "next sample")

    # an id that is a server path: the same 404 whether the file exists or not, listing no other id
    answers = []
    for image in ("/etc/passwd", "/no/such/file", "../studies/colin_a", "no_such_image"):
        r = probe(sec, f"infer image={image}", "POST", f"/infer/{MODEL}?image={image}", 404)
        detail = r.json()["detail"]
        answers.append(detail.replace(image, "<id>"))
        assert "colin_b" not in detail and "itk_c" not in detail
    assert len(set(answers)) == 1, answers
    r = probe(sec, "label for unknown image", "PUT", "/datastore/label?image=no_such_image&tag=final", 404,
              files={"label": ("x.nii.gz", (sec.gt / "colin_a.nii.gz").read_bytes())})
    assert "colin_a" not in r.json()["detail"]
    # before any weights: the 409 names the model (issue 15), not where anything is on the server
    if not sec.weights.exists():
        r = probe(sec, "infer without weights", "POST", f"/infer/{MODEL}?image=colin_a", 409)
        assert f"Model '{MODEL}' has no trained weights" in r.json()["detail"] and str(sec.root) not in r.text

    # an upload named after a patient: the name is not in the log (file nor GET /logs/)
    named = tmp_path / "Doe_Jane_19700101.nii.gz"
    named.write_bytes((sec.studies / "colin_a.nii.gz").read_bytes())
    with open(named, "rb") as f:
        probe(sec, "upload a volume named after a patient", "PUT", "/datastore/?image=upload_1", 200,
              files={"file": (named.name, f)})
    with open(named, "rb") as f:
        requests.post(f"{sec.server.url}/infer/{MODEL}", headers=sec.headers, files={"file": (named.name, f)})
    with open(named, "rb") as f:
        probe(sec, "session of a volume named after a patient", "PUT", "/session/", 200,
              files={"files": (named.name, f)})
    logs = probe(sec, "GET /logs/ as admin", "GET", "/logs/?text=true&lines=5000", 200, token=False,
                 headers=sec.admin_headers).text
    assert "Doe_Jane" not in logs and "Doe_Jane" not in sec.server.log()


# -------------------------------------------------------------------------------------------------- training
def test_failed_training_shows_its_real_reason(sec):
    """A training that fails inside the bundle's config (here: a corrupt pretrained encoder file) ends with its
    innermost error as the last line of GET /train/, not MONAI's 'Failed to evaluate ConfigExpression'."""
    sec.client.save_label("colin_a", str(sec.gt / "colin_a.nii.gz"), tag="final")
    encoder = sec.bundle / "models" / "pretrained_encoder.pt"
    encoder.write_bytes(b"this is not a checkpoint")
    try:
        sec.client.train_start(MODEL, {"max_epochs": 1, "pretrained": False})
        status = _wait_training_end(sec)
    finally:
        encoder.unlink()
    details = status.get("details", [])
    assert status["status"] == "ERROR", details[-5:]
    assert details[-1].startswith("lib.trainers.medurwkv.TrainingFailed: "), details[-5:]
    reason = details[-1].split("TrainingFailed: ", 1)[1]
    assert not reason.startswith("RuntimeError: Failed to evaluate"), reason  # the innermost error comes first
    assert reason.startswith("CheckpointError: pretrained_encoder.pt: not a readable PyTorch checkpoint"), reason
    assert not _lock(sec).holder()  # the failed process let go of the training lock


@pytest.fixture(scope="module")
def trained(sec):
    """A 1-epoch training started through MONAILabelClient with the token (writes model.pt)."""
    if not sec.weights.exists():
        sec.client.save_label("colin_a", str(sec.gt / "colin_a.nii.gz"), tag="final")
        sec.client.train_start(MODEL, {"max_epochs": 1, "val_interval": 1, "pretrained": False})
        status = _wait_training_end(sec)
        assert status["status"] == "DONE", status.get("details")
    assert sec.weights.exists()
    return sec


def test_client_with_the_token_does_the_whole_loop(trained):
    c = trained
    path, params = c.client.infer(MODEL, "colin_b", {})
    assert Path(path).stat().st_size > 0 and params["weights"]["available"] is True
    _no_server_paths(c, params, "infer result")
    c.client.save_label("colin_b", str(c.gt / "colin_b.nii.gz"), tag="final")
    sample = c.client.next_sample("first", {})
    assert sample["id"] not in ("colin_a", "colin_b") and "path" not in sample
    # after the training monailabel's training process asked the server to score (a request of its own):
    # with the login on it carries the service token, so the scoring was not refused
    log = c.server.log()
    assert "Failed to trigger" not in log
    _no_server_paths(c, c.client.info(), "/info/ with weights")


def test_killed_server_restarted_refuses_training_while_the_orphan_runs(trained):
    """kill -9 of the server during a training; the training process outlives it; after a restart, Train is
    refused (429) while that orphan runs, so only one process ever writes model.pt; once it ends, Train works."""
    import psutil
    from monailabel.client.client import MONAILabelClientException

    c = trained
    lock = _lock(c)
    c.client.train_start(MODEL, {"max_epochs": 500, "val_interval": 500})
    orphan = wait_for(lambda: lock.holder(), 120, "the training process to take the lock", interval=0.5)
    os.kill(c.server.proc.pid, signal.SIGKILL)
    c.server.proc.wait(timeout=30)
    c.server.proc = None
    try:
        assert psutil.pid_exists(orphan) and psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE
        c.server.start(host="127.0.0.1", extra_conf=c.auth_conf)
        assert psutil.Process(orphan).is_running(), "the orphaned training ended before the restart"
        start = time.time()
        with pytest.raises(MONAILabelClientException) as e:
            c.client.train_start(MODEL, {"max_epochs": 1})
        PROBES.append(("train after kill -9 + restart, orphan running", status_of(e.value), round(time.time() - start, 3)))
        assert status_of(e.value) == 429 and f"process {orphan}" in e.value.msg, e.value.msg
        trainers = {
            p.pid: p.info["ppid"]
            for p in psutil.process_iter(["cmdline", "ppid", "cwd"])
            if p.info["cmdline"] and "monailabel.interfaces.utils.app" in p.info["cmdline"] and "train" in p.info["cmdline"]
            and p.info["cwd"] == str(c.root)  # this module's server only (other suites may train on this machine)
        }
        roots = [pid for pid, parent in trainers.items() if parent not in trainers]  # forked workers: same cmdline
        assert roots == [orphan], trainers  # one training writes model.pt
    finally:
        try:
            os.kill(orphan, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: lock.holder() is None, 30, "the lock to be released")
    started = c.client.train_start(MODEL, {"max_epochs": 1})
    assert started["status"] in ("SUBMITTED", "RUNNING")
    wait_for(lambda: _train_status(c).get("status") == "RUNNING", 60, "the new training")
    c.client.train_stop()


def test_concurrent_wrong_passwords_do_not_pass_the_throttle(tmp_path, monkeypatch):
    """The throttle was checked before bcrypt (~0.2 s) and counted after it: 20 guesses sent at once (the server
    checks up to 40 logins in parallel) all passed the check, so each lock let a burst of guesses through, not 5."""
    import threading

    from label_server import APP

    auth = load_app_module("app_auth_race", APP / "lib" / "auth.py")
    auth.add_user(str(tmp_path / "users.json"), "admin", PASSWORD, "admin")
    local = auth.LocalAuth(str(tmp_path / "users.json"))
    checked = []
    slow_checkpw = auth.bcrypt.checkpw

    def checkpw(password, stored):  # every guess that reaches the password check is one the throttle let through
        checked.append(1)
        time.sleep(0.3)
        return slow_checkpw(password, stored)

    monkeypatch.setattr(auth.bcrypt, "checkpw", checkpw)
    answers, start = [], threading.Barrier(20)

    def guess(i):
        start.wait()
        try:
            answers.append(local.login("admin", f"guess number {i}"))
        except auth.LoginLocked:
            answers.append("locked")

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(checked) == auth.LoginThrottle.FREE and answers.count("locked") == 20 - auth.LoginThrottle.FREE
    with pytest.raises(auth.LoginLocked):
        local.login("admin", PASSWORD)


def test_a_spray_of_other_names_does_not_unlock_a_name():
    """The throttle keeps at most MAX_NAMES names and dropped the oldest: the name being guessed, locked first,
    was forgotten after that many wrong logins for made-up names, and its guessing could start again."""
    from label_server import APP

    auth = load_app_module("app_auth_spray", APP / "lib" / "auth.py")
    throttle = auth.LoginThrottle(clock=lambda: 0.0)
    throttle.MAX_NAMES = 50
    for _ in range(throttle.FREE):
        throttle.failed("admin")
    for i in range(3 * throttle.MAX_NAMES):
        throttle.failed(f"made-up-{i}")
    assert len(throttle.failures) <= throttle.MAX_NAMES
    with pytest.raises(auth.LoginLocked):
        throttle.check("admin")
