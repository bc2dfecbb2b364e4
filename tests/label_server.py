"""A real MONAI Label server for the tests: the app and the bundle staged in a temporary folder.

``stage(root)`` copies ``monailabel_app/`` and ``bundle/`` into ``root`` (nothing is written into the repository),
cuts tiny studies from ``sample_data/``, and returns a :class:`Ctx` whose ``server`` is a
``python -m monailabel.main start_server`` subprocess (own process group) on 127.0.0.1 and a free port. For speed
only, the bundle copy uses 64 x 64 slice windows (``roi_size``), 2 training slices per volume and no data-loader
workers; everything else is the shipped bundle.

Every process of the server (training and scoring subprocesses included) runs with a ``sitecustomize`` that refuses
and records any connection or name lookup outside loopback, which checks that the server works offline.
Used by every test module that needs a server; each module starts its own (module-scoped fixture).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "monailabel_app"
BUNDLE = ROOT / "bundle"
SAMPLE = ROOT / "sample_data"
MODEL = "medurwkv"

# id -> (source volume under sample_data/, crop in voxel indices); colin27 is RAS, the ITK head is LSA
VOLUMES = {
    "colin_a": ("colin27_t1", "Tr", ((14, 78), (22, 86), (40, 44))),
    "colin_b": ("colin27_t1", "Tr", ((14, 78), (22, 86), (52, 56))),
    "itk_c": ("itk_kmeanstest_t1", "Ts", ((32, 96), (30, 33), (8, 30))),
}
HELD_OUT = {"colin_eval": ("colin27_t1", "Tr", ((14, 78), (22, 86), (60, 63)))}

NETGUARD = """
import os, socket
_log = os.environ.get("MEDURWKV_NETGUARD_LOG")
_ok = ("127.", "::1", "localhost", "0.0.0.0", "::")
def _check(host):
    if host is None or isinstance(host, int):
        return
    h = host.decode() if isinstance(host, bytes) else str(host)
    if h == "" or h.startswith(_ok):
        return
    if _log:
        with open(_log, "a") as f:
            f.write(f"{os.getpid()} {h}\\n")
    raise OSError(f"network access to {h} refused by the test")
_connect, _connect_ex, _gai = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address[0])
    return _connect(self, address)
def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address[0])
    return _connect_ex(self, address)
def getaddrinfo(host, *args, **kwargs):
    _check(host)
    return _gai(host, *args, **kwargs)
socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
"""


# ----------------------------------------------------------------------------------------------- helpers
def load_app_module(name: str, path: Path):
    """Import one file of the app without writing bytecode next to it (tests never write into the repo)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    flag, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = flag
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def crop(src: Path, box, dst: Path) -> None:
    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)[tuple(slice(a, b) for a, b in box)]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([a for a, _ in box], dtype=float) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data, affine, img.header), str(dst))


def status_of(e) -> int:
    m = re.search(r"Status: (\d+)", str(getattr(e, "msg", e)))
    return int(m.group(1)) if m else -1


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    start = time.time()
    while time.time() - start < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class Server:
    """``python -m monailabel.main start_server`` as a subprocess in its own process group."""

    def __init__(self, root: Path, app: Path, studies: Path, bundle: Path, port: int, env: dict):
        self.root, self.app, self.studies, self.bundle, self.port, self.env = root, app, studies, bundle, port, env
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = root / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(
        self, host: Optional[str] = "127.0.0.1", conf: bool = True, timeout: float = 420.0, extra_conf: dict = None
    ) -> None:
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(self.app)]
        cmd += ["--studies", str(self.studies), "--port", str(self.port)]
        if conf:  # without: the app finds the bundle next to it (<root>/app/../bundle), as in the repository
            cmd += ["--conf", "bundle", str(self.bundle), "--conf", "mc_passes", "3", "--conf", "mc_slices", "3"]
        for k, v in (extra_conf or {}).items():  # more --conf KEY VALUE (e.g. auth true)
            cmd += ["--conf", str(k), str(v)]
        if host:
            cmd += ["--host", host]
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.root), start_new_session=True
        )
        log.close()
        import requests

        start = time.time()
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", timeout=10).status_code in (200, 401):  # 401: login is on
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group holds the server and its train/scoring children
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the server (a training subprocess)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None

    def log(self, since_start: bool = False) -> str:
        text = self.log_path.read_bytes() if self.log_path.exists() else b""
        return text[self.log_start :].decode(errors="replace") if since_start else text.decode(errors="replace")

    def listening_addresses(self) -> set:
        import psutil

        return {
            c.laddr.ip
            for c in psutil.Process(self.proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }


class Ctx:
    """Paths, server and client of one staged app (and whatever a test module carries between its tests)."""


def stage(root: Path, volumes: dict = VOLUMES, held_out: dict = HELD_OUT) -> Ctx:
    """Copy the app and the bundle into ``root``, cut the studies, and prepare (not start) the server."""
    c = Ctx()
    c.root = root
    c.app = root / "app"
    shutil.copytree(APP, c.app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    c.bundle = root / "bundle"
    shutil.copytree(
        BUNDLE, c.bundle, ignore=shutil.ignore_patterns("eval", "logs", "__pycache__", "*.pt", "*.ts", "*.safetensors")
    )
    for name in ("inference.json", "train.json"):  # speed only: 64 x 64 windows, 2 training slices, no workers
        path = c.bundle / "configs" / name
        cfg = json.loads(path.read_text())
        cfg["roi_size"] = [64, 64]
        cfg["num_workers"] = 0
        if "train" in cfg:
            cfg["train"]["num_slices"] = 2
        path.write_text(json.dumps(cfg, indent=2))
    c.weights = c.bundle / "models" / "model.pt"

    c.studies, c.gt = root / "studies", root / "gt"
    c.eval_images, c.eval_labels = root / "eval_images", root / "eval_labels"
    for d in (c.studies, c.gt, c.eval_images, c.eval_labels):
        d.mkdir()
    for vols, img_dir, lab_dir in ((volumes, c.studies, c.gt), (held_out, c.eval_images, c.eval_labels)):
        for vid, (src, split, box) in vols.items():
            crop(SAMPLE / f"images{split}" / f"{src}.nii.gz", box, img_dir / f"{vid}.nii.gz")
            crop(SAMPLE / f"labels{split}" / f"{src}.nii.gz", box, lab_dir / f"{vid}.nii.gz")

    guard = root / "netguard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NETGUARD)
    c.netlog = root / "network_attempts.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(guard)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["MEDURWKV_NETGUARD_LOG"] = str(c.netlog)
    env["MONAI_LABEL_SESSION_PATH"] = str(root / "sessions")
    env.pop("MONAI_LABEL_APP_CONF", None)
    c.env = env

    c.client_dir = root / "client"
    c.client_dir.mkdir()
    c.results = {}
    c.server = Server(root, c.app, c.studies, c.bundle, free_port(), env)
    return c


def http(c, method: str, selector: str, body=None):
    """One request with monailabel's own client helper; (status, parsed JSON or raw body)."""
    from monailabel.client.client import MONAILabelUtils

    status, response, _, _ = MONAILabelUtils.http_method(method, c.server.url, selector, body)
    try:
        return status, json.loads(response) if response else None
    except ValueError:  # a file
        return status, response


@contextlib.contextmanager
def serving(c: Ctx, **start_kwargs):
    """Start ``c.server`` on loopback, give ``c`` a ``MONAILabelClient`` (as 3D Slicer's module uses) and stop the
    server when the block ends: the body of every module-scoped server fixture."""
    from monailabel.client import MONAILabelClient

    try:
        c.server.start(host="127.0.0.1", **start_kwargs)
        c.client = MONAILabelClient(c.server.url, tmpdir=str(c.client_dir))
        yield c
    finally:
        c.server.stop()
