"""Active-learning loop from the command line, against a running Med-URWKV MONAI Label server.

Each round does what an annotator does in 3D Slicer, with the correction simulated by the ground truth:

    Next Sample (strategy) -> Auto Segmentation (infer) -> correct (= ground-truth mask) -> Submit Label -> Train

and records the Dice of the prediction on the volume it was given (what the annotator had to correct) and,
after training, the mean Dice on an evaluation set. With ``--clicks N`` it also simulates N SmartEdit clicks on
that prediction with the click-guided model (``<model>_clicks``), each at the deepest voxel of the largest
remaining error (foreground where brain was missed, background where something else was taken), and records
the Dice after each click (``click_dice``); ``--scribbles N`` does the same with N Scribbles strokes
(``<model>_scribbles``, up to 9 voxels each, ``scribble_dice``). The submitted label is still the ground truth.
The curve (Dice against the number of labeled volumes) is written as a PNG, and the numbers as JSON next to it.

    # against a server that is already running (here: started with --studies sample_data)
    python monailabel_app/active_learning_loop.py --server http://127.0.0.1:8000 \\
        --labels sample_data/dataset.json --rounds 2 --max-epochs 10 --out al_curve.png

    # or let the script start (and stop) a server on a free loopback port
    python monailabel_app/active_learning_loop.py --studies ~/brain_studies --labels ~/brain_masks \\
        --eval-images sample_data/imagesTs --eval-labels sample_data/labelsTs --out al_curve.png

``--labels``: a folder with one ground-truth mask per studies image, named like the image (``<id>.nii.gz``), or
a ``dataset.json`` whose entries pair images and labels (``--labels sample_data/dataset.json``); repeatable.
``--eval-images``/``--eval-labels``: held-out volumes (sent as files, never added to the datastore); without
them the evaluation set is the studies volumes that are still unlabeled (at most ``--eval-max``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from medurwkv.visualize import dice_score as dice  # one Dice for the main job and this loop

logger = logging.getLogger("active_learning_loop")

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def image_id(filename: str) -> str:
    name = os.path.basename(filename)
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return os.path.splitext(name)[0]


def index_folder(folder: Optional[str]) -> Dict[str, str]:
    """``{id: path}`` of the volumes in a folder (ids as MONAI Label's local datastore makes them)."""
    if not folder:
        return {}
    return {image_id(f): os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(SUFFIXES)}


def ground_truth(sources: List[str]) -> Dict[str, str]:
    """``{image id: mask path}`` from folders of masks named like their images, or MONAI ``dataset.json``
    datalists (every ``{"image": ..., "label": ...}`` entry, paths relative to the json's folder)."""
    truth: Dict[str, str] = {}
    for src in sources:
        if src.endswith(".json"):
            with open(src) as f:
                datalist = json.load(f)
            base = os.path.dirname(os.path.abspath(src))
            for items in datalist.values():
                for item in items if isinstance(items, list) else []:
                    if (
                        isinstance(item, dict)
                        and isinstance(item.get("image"), str)
                        and isinstance(item.get("label"), str)
                    ):
                        truth.setdefault(image_id(item["image"]), os.path.join(base, item["label"]))
        else:
            truth.update(index_folder(src))
    return truth


def read_mask(path: str) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(path).dataobj) > 0


def next_click(pred: np.ndarray, truth: np.ndarray) -> Optional[tuple]:
    """Where an annotator would click next: the voxel deepest inside the largest connected error region, as
    ``("foreground" | "background", [i, j, k])``; ``None`` when the prediction is already right."""
    from scipy import ndimage as ndi

    errors, n = ndi.label(pred != truth)
    if n == 0:
        return None
    sizes = ndi.sum_labels(np.ones(errors.shape), errors, index=np.arange(1, n + 1))
    region = errors == int(np.argmax(sizes)) + 1
    depth = ndi.distance_transform_edt(np.pad(region, 1))[(slice(1, -1),) * region.ndim]
    voxel = np.unravel_index(int(np.argmax(depth)), region.shape)
    return ("foreground" if truth[voxel] else "background", [int(v) for v in voxel])


def next_stroke(pred: np.ndarray, truth: np.ndarray, length: int = 9) -> Optional[tuple]:
    """A Scribbles stroke where an annotator would paint next: up to ``length`` voxels along the first axis through
    :func:`next_click`'s voxel, inside the error it points at, as ``("foreground" | "background", mask)``."""
    click = next_click(pred, truth)
    if click is None:
        return None
    kind, voxel = click
    stroke = np.zeros(truth.shape, bool)
    index = [slice(v, v + 1) for v in voxel]
    index[0] = slice(max(voxel[0] - length // 2, 0), voxel[0] + length // 2 + 1)
    stroke[tuple(index)] = True
    return kind, stroke & (pred != truth) & (truth == (kind == "foreground"))


def plot_curve(rows: List[dict], out_png: str, title: str = "Med-URWKV active learning") -> None:
    """Dice against the number of labeled volumes: evaluation mean Dice and Dice on each new sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ev = [(r["labeled"], r["eval_dice"]) for r in rows if r.get("eval_dice") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", label="mean Dice, evaluation set (after training)")
    nxt = [(r["labeled"] - 1, r["sample_dice"]) for r in rows if r.get("sample_dice") is not None]
    if nxt:
        ax.plot(*zip(*nxt), "s--", label="Dice on the next sample, before correction")
    ax.set_xlabel("labeled volumes")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1.02)
    xs = [r["labeled"] for r in rows] + [x for x, _ in nxt]
    if xs:
        ax.set_xticks(range(min(xs), max(xs) + 1))
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if ev or nxt:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


class Loop:
    def __init__(
        self, server: str, model: str, strategy: str, truth: Dict[str, str], tmpdir: str, user: Optional[str] = None,
        password: Optional[str] = None,
    ):
        from monailabel.client import MONAILabelClient

        self.client = MONAILabelClient(server, tmpdir=tmpdir)
        if self.client.auth_enabled():  # the server's login (--conf auth true): as Slicer's module logs in
            if not user or password is None:
                raise SystemExit("The server requires a login: pass --user NAME (password from MEDURWKV_PASSWORD or a prompt)")
            self.client.update_auth(self.client.auth_token(user, password))
        self.model = model
        self.strategy = strategy
        self.truth = truth
        self.tmpdir = tmpdir
        self.affine: Dict[str, np.ndarray] = {}

    def labeled_count(self) -> int:
        return int(self.client.info().get("datastore", {}).get("completed", 0))

    def infer_mask(self, model: str, image: str, params: dict, **kw) -> np.ndarray:
        """One inference with ``model``: the result as a boolean mask (the result file is removed); its affine,
        which is the image's grid, is remembered per image for the stroke volumes."""
        import nibabel as nib

        out, _ = self.client.infer(model, image, params, **kw)
        try:
            if image:
                self.affine[image] = nib.load(out).affine
            return read_mask(out)
        finally:
            os.remove(out)

    def predict(self, image: str = "", file: Optional[str] = None) -> Optional[np.ndarray]:
        from monailabel.client.client import MONAILabelClientException

        try:
            return self.infer_mask(self.model, image, {}, file=file)
        except MONAILabelClientException as e:
            if "Status: 409" in str(e.msg):  # no trained weights yet
                return None
            raise

    def click_correct(self, image: str, pred: np.ndarray, truth: np.ndarray, clicks: int) -> List[float]:
        """Dice against ``truth`` after each of up to ``clicks`` simulated clicks (see :func:`next_click`)."""
        points: Dict[str, list] = {"foreground": [], "background": []}
        scores = []
        for _ in range(clicks):
            click = next_click(pred, truth)
            if click is None:
                break
            points[click[0]].append(click[1])
            pred = self.infer_mask(f"{self.model}_clicks", image, dict(points))
            scores.append(dice(pred, truth))
        return scores

    def scribble_correct(self, image: str, pred: np.ndarray, truth: np.ndarray, strokes: int) -> List[float]:
        """Dice against ``truth`` after each of up to ``strokes`` simulated Scribbles strokes (:func:`next_stroke`),
        sent as Slicer sends them: the segment being edited (the last result) with all strokes painted over it."""
        import nibabel as nib

        painted = np.zeros(truth.shape, np.uint8)
        info = [{"name": "brain", "id": 1}, {"name": "background_scribbles", "id": 2}, {"name": "foreground_scribbles", "id": 3}]
        src = os.path.join(self.tmpdir, "strokes.nii.gz")
        scores = []
        for _ in range(strokes):
            stroke = next_stroke(pred, truth)
            if stroke is None:
                break
            painted[stroke[1]] = 3 if stroke[0] == "foreground" else 2
            values = np.where(painted > 0, painted, pred.astype(np.uint8))
            nib.save(nib.Nifti1Image(values, self.affine[image]), src)
            params = {"label_info": info, "selected_label_name": "brain", "roi": []}
            pred = self.infer_mask(f"{self.model}_scribbles", image, params, label_in=src)
            scores.append(dice(pred, truth))
        return scores

    def train(self, max_epochs: int, timeout: float) -> dict:
        self.client.train_start(self.model, {"max_epochs": max_epochs})
        start = time.time()
        while True:
            time.sleep(2.0)
            status = self.client.train_status()
            if status.get("status") not in ("SUBMITTED", "RUNNING"):
                break
            if time.time() - start > timeout:
                self.client.train_stop()
                raise TimeoutError(f"training did not finish within {timeout} s")
        if status.get("status") != "DONE":
            details = "\n".join(status.get("details", [])[-10:])
            raise RuntimeError(f"training ended with {status.get('status')}:\n{details}")
        return status

    def evaluate(self, eval_set: Dict[str, str], eval_truth: Dict[str, str], max_cases: int) -> Optional[float]:
        """Mean Dice over held-out files, or else over still-unlabeled datastore volumes."""
        scores = []
        if eval_set:
            for i, path in list(eval_set.items())[:max_cases] if max_cases else eval_set.items():
                pred = self.predict(file=path)
                if pred is None:
                    return None
                scores.append(dice(pred, read_mask(eval_truth[i])))
        else:
            unlabeled = [
                k for k, v in self.client.datastore().get("objects", {}).items() if "final" not in v.get("labels", {})
            ]
            for i in [u for u in unlabeled if u in self.truth][: max_cases or None]:
                pred = self.predict(image=i)
                if pred is None:
                    return None
                scores.append(dice(pred, read_mask(self.truth[i])))
        return float(np.mean(scores)) if scores else None

    def run(
        self, rounds: int, max_epochs: int, eval_set, eval_truth, eval_max: int, train_timeout: float, clicks: int = 0,
        strokes: int = 0,
    ) -> List[dict]:
        rows: List[dict] = []
        for r in range(1, rounds + 1):
            sample = self.client.next_sample(self.strategy, {})
            if not sample or not sample.get("id"):
                logger.info("No unlabeled volume left")
                break
            sid = sample["id"]
            if sid not in self.truth:
                raise KeyError(f"no ground truth for '{sid}' in --labels")
            t0 = time.time()
            pred = self.predict(image=sid)
            sample_dice = dice(pred, read_mask(self.truth[sid])) if pred is not None else None
            click_dice = self.click_correct(sid, pred, read_mask(self.truth[sid]), clicks) if pred is not None else []
            scribble_dice = self.scribble_correct(sid, pred, read_mask(self.truth[sid]), strokes) if pred is not None else []
            self.client.save_label(sid, self.truth[sid], tag="final")  # the simulated correction
            self.train(max_epochs, train_timeout)
            row = {
                "round": r,
                "sample": sid,
                "uncertainty": sample.get("uncertainty", sample.get("mc_dropout_score")),
                "sample_dice": sample_dice,
                "click_dice": click_dice,
                "scribble_dice": scribble_dice,
                "labeled": self.labeled_count(),
                "eval_dice": self.evaluate(eval_set, eval_truth, eval_max),
                "seconds": round(time.time() - t0, 1),
            }
            rows.append(row)
            logger.info(json.dumps(row))
        return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: str, studies: str, conf: List[List[str]], timeout: float = 300.0):
    """``python -m monailabel.main start_server`` on 127.0.0.1 and a free port; returns (process, url)."""
    import requests

    port = free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", app, "--studies", studies]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    for k, v in conf:
        cmd += ["--conf", k, v]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code in (200, 401):  # 401: up, login on
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(1.0)
    proc.terminate()
    raise TimeoutError(f"server did not answer within {timeout} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="URL of a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--studies", help="start a server on these studies (127.0.0.1, free port)")
    parser.add_argument("--app", default=os.path.dirname(os.path.abspath(__file__)), help="app dir (with --studies)")
    parser.add_argument(
        "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="server --conf (with --studies)"
    )
    parser.add_argument(
        "--labels",
        required=True,
        action="append",
        help="ground truth: a folder of masks named like the studies images, or a dataset.json (repeatable)",
    )
    parser.add_argument("--model", default="medurwkv")
    parser.add_argument("--strategy", default="uncertainty")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--eval-images", help="held-out volumes (sent as files)")
    parser.add_argument("--eval-labels", help="their ground-truth masks")
    parser.add_argument("--eval-max", type=int, default=5, help="evaluate at most this many volumes (0: all)")
    parser.add_argument("--train-timeout", type=float, default=3600.0)
    parser.add_argument("--clicks", type=int, default=0, help="simulated SmartEdit clicks per sample (0: none)")
    parser.add_argument("--scribbles", type=int, default=0, help="simulated Scribbles strokes per sample (0: none)")
    parser.add_argument("--out", default="active_learning_dice.png", help="PNG; the numbers go to the same name .json")
    parser.add_argument("--user", help="user name, when the server has its login on (password: MEDURWKV_PASSWORD or asked)")
    args = parser.parse_args(argv)
    password = None
    if args.user:
        password = os.environ.get("MEDURWKV_PASSWORD")
        if password is None:
            import getpass

            password = getpass.getpass(f"Password for {args.user}: ")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")

    truth = ground_truth(args.labels)
    eval_set, eval_truth = index_folder(args.eval_images), index_folder(args.eval_labels)
    missing = sorted(set(eval_set) - set(eval_truth))
    if missing:
        parser.error(f"no --eval-labels mask for {missing}")

    proc = None
    server = args.server
    if args.studies:
        proc, server = start_server(args.app, args.studies, args.conf)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            loop = Loop(server, args.model, args.strategy, truth, tmp, user=args.user, password=password)
            rows = loop.run(
                args.rounds, args.max_epochs, eval_set, eval_truth, args.eval_max, args.train_timeout, args.clicks,
                args.scribbles,
            )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)

    out_json = os.path.splitext(args.out)[0] + ".json"
    with open(out_json, "w") as f:
        json.dump(
            {"server": server, "strategy": args.strategy, "max_epochs": args.max_epochs, "rounds": rows}, f, indent=2
        )
    plot_curve(rows, args.out, title=f"Med-URWKV active learning ({args.strategy})")
    print(f"wrote {args.out} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
