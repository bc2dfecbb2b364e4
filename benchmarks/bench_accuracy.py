"""Accuracy on a 2D task: Med-URWKV-T (adapter, plain) against MONAI's networks, same recipe, data and budget.

    python benchmarks/bench_accuracy.py --size 96 --steps 60 --seeds 0 1 2 --out benchmarks/results
    python benchmarks/bench_accuracy.py --pretrained_encoder upernet_vrwkv_adapter_tiny_512_160k_ade20k.pth \\
        --pretrained_encoder_plain vrwkv_t_in1k_224.pth       # adds the pretrained rows (the paper's ablation)

Data: a MONAI datalist of 2D images and masks (default: the 3-class MNI152 set in ``sample_data/2d``, built
by ``sample_data/build_2d.py``); trains on ``training``, scores ``test``. Every network gets:

* the same input: ``medurwkv.data2d.LoadImage2dd`` (grayscale replicated to RGB; ``--in_channels 1`` gives
  every network a one-channel input instead), resized to ``--size``, ImageNet-normalised (as ``bundle2d``), the same random flips/affine, the same batches in the same order;
* the same recipe: AdamW (``--lr``, weight decay 0.01), DiceCE loss, poly LR decay over ``--steps`` steps of
  ``--batch`` images; with a pretrained encoder, Med-URWKV's encoder is frozen for the first ``--freeze_steps``;
* BatchNorm running statistics recalibrated after training (reset, then a cumulative average over
  ``--recal_batches`` training batches in train mode, no gradient): with a short budget the running averages
  lag behind the weights and an otherwise good network scores near 0 in eval mode. Networks without BatchNorm
  are unaffected;
* the same scoring: logits resized back to each test image's original size (bilinear), argmax, and MONAI's
  ``DiceMetric`` / ``MeanIoU`` per foreground class against the original mask; the mean over classes.

Writes ``bench_accuracy.json`` (every run), ``bench_accuracy.md`` (mean +- std over seeds) and
``bench_accuracy.png`` (DSC and IoU per network, one dot per seed) under ``--out``,
after every run. Seeds can run in parallel (one process or machine each, ``--seeds 1``) and be combined with
``--merge s0/bench_accuracy.json s1/bench_accuracy.json ... --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATALIST = ROOT / "sample_data" / "2d" / "mni152_3class" / "dataset.json"


def networks(n_classes: int, args) -> Dict[str, Callable[[], nn.Module]]:
    from monai.networks.nets import BasicUNet, FlexibleUNet, SegResNet, SwinUNETR

    from medurwkv.nets.medurwkv import MedURWKV

    c = args.in_channels
    nets: Dict[str, Callable[[], nn.Module]] = {
        "Med-URWKV-T (adapter)": lambda: MedURWKV(c, n_classes, "tiny", "adapter"),
        "Med-URWKV-T (plain)": lambda: MedURWKV(c, n_classes, "tiny", "plain"),
    }
    if args.pretrained_encoder:
        nets["Med-URWKV-T (adapter, pretrained)"] = lambda: MedURWKV(c, n_classes, "tiny", "adapter", pretrained_encoder=args.pretrained_encoder)
    if args.pretrained_encoder_plain:
        nets["Med-URWKV-T (plain, pretrained)"] = lambda: MedURWKV(c, n_classes, "tiny", "plain", pretrained_encoder=args.pretrained_encoder_plain)
    nets.update(
        {
            "BasicUNet": lambda: BasicUNet(spatial_dims=2, in_channels=c, out_channels=n_classes),
            "SegResNet": lambda: SegResNet(spatial_dims=2, in_channels=c, out_channels=n_classes, init_filters=16),
            "SwinUNETR (2D, feature 24)": lambda: SwinUNETR(in_channels=c, out_channels=n_classes, feature_size=24, spatial_dims=2),
            "FlexibleUNet (efficientnet-b0)": lambda: FlexibleUNet(c, n_classes, backbone="efficientnet-b0", pretrained=False, spatial_dims=2),
        }
    )
    if args.only:
        nets = {k: v for k, v in nets.items() if any(o.lower() in k.lower() for o in args.only)}
    return nets


def load_cases(datalist: Path, key: str, n_classes: int, channels: int = 3) -> List[dict]:
    from monai.data import load_decathlon_datalist

    from medurwkv.data2d import LoadImage2dd

    loader = LoadImage2dd(["image", "label"], label_keys="label", num_classes=n_classes, channels=channels)
    items = load_decathlon_datalist(str(datalist), True, key, str(datalist.parent))
    return [loader(i) for i in items]


def to_batch(cases: List[dict], size: int) -> tuple:
    """Images (ImageNet-normalised) and masks resized to size x size, as tensors."""
    from medurwkv.data2d import imagenet_stats

    c = cases[0]["image"].shape[0]
    mean, std = (torch.tensor(v).view(1, c, 1, 1) for v in imagenet_stats(c))
    x = torch.stack([F.interpolate(c["image"].as_tensor()[None].float(), (size, size), mode="bilinear", align_corners=False)[0] for c in cases])
    y = torch.stack([F.interpolate(c["label"].as_tensor()[None].float(), (size, size), mode="nearest")[0] for c in cases])
    return (x - mean) / std, y


def augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple:
    """Random flips and a random rotation/scale (the same for every network: one generator per seed)."""
    B = x.shape[0]
    ang = (torch.rand(B, generator=g) - 0.5) * 0.52  # +-15 degrees
    sc = 1 + (torch.rand(B, generator=g) - 0.5) * 0.3
    flip = torch.where(torch.rand(B, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros(B)], 1), torch.stack([sin * flip, cos, torch.zeros(B)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xa = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ya = F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return xa, ya


def recalibrate_bn(net: nn.Module, batches: List[torch.Tensor]) -> int:
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return 0
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for x in batches:
            net(x)
    return len(bns)


def score(net: nn.Module, cases: List[dict], size: int, n_classes: int) -> dict:
    from monai.metrics import DiceMetric, MeanIoU
    from monai.networks.utils import one_hot

    dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    iou = MeanIoU(include_background=False, reduction="mean_batch", ignore_empty=False)
    net.eval()
    with torch.no_grad():
        for c in cases:
            x, _ = to_batch([c], size)
            logits = F.interpolate(net(x), tuple(c["label"].shape[1:]), mode="bilinear", align_corners=False)
            pred = one_hot(logits.argmax(1, keepdim=True), n_classes)
            lab = one_hot(c["label"].as_tensor()[None].long(), n_classes)
            dice(pred, lab)
            iou(pred, lab)
    d, i = dice.aggregate().tolist(), iou.aggregate().tolist()
    return {"dice_per_class": d, "iou_per_class": i, "dice": float(np.mean(d)), "iou": float(np.mean(i))}


def run_one(name: str, make: Callable[[], nn.Module], train: List[dict], test: List[dict], seed: int, args, n_classes: int) -> dict:
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    set_determinism(seed)
    net = make()
    params = sum(p.numel() for p in net.parameters())
    x_all, y_all = to_batch(train, args.size)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in net.parameters()], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=args.steps, power=0.9)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    frozen = getattr(net, "encoder_parameters", lambda: [])() if "pretrained" in name else []
    t0 = time.perf_counter()
    net.train()
    losses = []
    for step in range(args.steps):
        for p in frozen:
            p.requires_grad_(step >= args.freeze_steps)
        idx = torch.randint(0, len(train), (args.batch,), generator=g)
        x, y = augment(x_all[idx], y_all[idx], g)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % max(args.steps // 5, 1) == 0 or step == args.steps - 1:
            print(f"  {name} seed {seed} step {step + 1}/{args.steps} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_s = time.perf_counter() - t0
    recal = [augment(x_all[idx], y_all[idx], g)[0] for idx in (torch.randint(0, len(train), (args.batch,), generator=g) for _ in range(args.recal_batches))]
    n_bn = recalibrate_bn(net, recal)
    res = score(net, test, args.size, n_classes)
    res.update({"network": name, "seed": seed, "params": params, "train_s": train_s, "final_loss": float(np.mean(losses[-5:])), "bn_layers_recalibrated": n_bn})
    print(f"{name} seed {seed}: DSC {res['dice']:.4f} IoU {res['iou']:.4f} train {train_s:.0f} s", flush=True)
    return res


def table(runs: List[dict], classes: List[str]) -> str:
    names = list(dict.fromkeys(r["network"] for r in runs))
    head = "| network | params (M) | DSC mean ± std | IoU mean ± std | " + " | ".join(f"DSC {c}" for c in classes) + " | train s / run |"
    lines = [head, "|" + "---|" * (5 + len(classes))]
    for n in names:
        rs = [r for r in runs if r["network"] == n]
        d, i = np.array([r["dice"] for r in rs]), np.array([r["iou"] for r in rs])
        per = np.array([r["dice_per_class"] for r in rs]).mean(0)
        lines.append(
            f"| {n} | {rs[0]['params'] / 1e6:.2f} | {d.mean():.3f} ± {d.std():.3f} | {i.mean():.3f} ± {i.std():.3f} | "
            + " | ".join(f"{v:.3f}" for v in per)
            + f" | {np.mean([r['train_s'] for r in rs]):.0f} |"
        )
    return "\n".join(lines)


def gray_stem_check(image: str, size: int = 128) -> None:
    """Grayscale rule: the same encoder weights as an RGB stem fed the replicated image (per-channel ImageNet
    statistics) and as timm's adapted one-channel stem (RGB filters summed, averaged statistics), same decoder.
    Prints how far apart the two networks' outputs are."""
    import tempfile

    from medurwkv.data2d import LoadImage2dd, imagenet_stats
    from medurwkv.nets.medurwkv import MedURWKV

    torch.manual_seed(0)
    for enc in ("plain", "adapter"):
        n3 = MedURWKV(3, 3, "tiny", enc).eval()
        with tempfile.TemporaryDirectory() as tmp:
            f = os.path.join(tmp, "encoder.pt")
            torch.save(n3.pretrained_module.state_dict(), f)
            n1 = MedURWKV(1, 3, "tiny", enc, pretrained_encoder=f).eval()
        stem = dict(n1.pretrained_module.named_parameters(prefix="encoder.backbone" if enc == "plain" else "encoder"))
        s1 = n1.state_dict()
        n1.load_state_dict({k: v for k, v in n3.state_dict().items() if k not in stem and v.shape == s1[k].shape}, strict=False)
        out = []
        for net, c in ((n3, 3), (n1, 1)):
            x = LoadImage2dd("image", channels=c)({"image": image})["image"].as_tensor()[None]
            x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False)
            mean, std = (torch.tensor(v).view(1, c, 1, 1) for v in imagenet_stats(c))
            with torch.no_grad():
                out.append(net((x - mean) / std))
        y3, y1 = out
        rel = float((y1 - y3).norm() / y3.norm())
        agree = float((y1.argmax(1) == y3.argmax(1)).float().mean())
        n_diff = sum(p.numel() for p in n3.parameters()) - sum(p.numel() for p in n1.parameters())
        print(f"{enc}: logits relative L2 difference {rel:.4f}, argmax agreement {agree:.4f}, one-channel stem saves {n_diff} parameters")


def _write(out: Path, setup: dict, runs: List[dict], classes: List[str]) -> str:
    md = table(runs, classes)
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in (("bench_accuracy.json", json.dumps({"setup": setup, "runs": runs}, indent=2)), ("bench_accuracy.md", md + "\n")):
        tmp = out / f".{fname}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / fname)
    _plot(out / "bench_accuracy.png", runs, setup)
    return md


def _plot(path: Path, runs: List[dict], setup: dict) -> None:
    """Bar chart of DSC and IoU per network (mean over seeds, one dot per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["network"] for r in runs))
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    for j, (metric, color) in enumerate((("dice", "tab:blue"), ("iou", "tab:orange"))):
        for i, n in enumerate(names):
            v = [r[metric] for r in runs if r["network"] == n]
            ax.bar(i + (j - 0.5) * 0.38, np.mean(v), 0.36, color=color, alpha=0.7, label=metric.upper() if i == 0 else None)
            ax.plot([i + (j - 0.5) * 0.38] * len(v), v, "k.", ms=4)
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean over foreground classes")
    ax.set_title(f"{Path(setup['datalist']).parent.name}: {setup['steps']} steps x {setup['batch']}, {setup['size']} px, seeds {setup['seeds']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def merge(files: List[str], out: Path) -> None:
    parts = [json.loads(Path(f).read_text()) for f in files]
    keys = ("datalist", "size", "steps", "batch", "lr", "recal_batches", "freeze_steps", "in_channels", "classes")
    first = parts[0]["setup"]
    for f, p in zip(files, parts):
        diff = [k for k in keys if p["setup"].get(k) != first.get(k)]
        if diff:
            raise SystemExit(f"{f}: settings {diff} differ from {files[0]}'s; only runs of one setup can be merged")
    runs = [r for p in parts for r in p["runs"]]
    setup = {**first, "seeds": sorted({r["seed"] for r in runs}), "merged_from": [p["setup"]["command"] for p in parts],
             "wall_s": max(p["setup"].get("wall_s", 0) for p in parts)}
    print(_write(out, setup, runs, first["classes"]))


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", default=str(DEFAULT_DATALIST))
    ap.add_argument("--classes", type=int, default=None, help="classes incl. background (default: the datalist's 'labels')")
    ap.add_argument("--size", type=int, default=96, help="training/inference size (a multiple of 32)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recal_batches", type=int, default=20)
    ap.add_argument("--freeze_steps", type=int, default=0, help="steps with the pretrained encoder frozen")
    ap.add_argument("--pretrained_encoder", default=None, help="official adapter checkpoint: adds a pretrained Med-URWKV (adapter) row")
    ap.add_argument("--pretrained_encoder_plain", default=None, help="official ImageNet checkpoint: adds a pretrained Med-URWKV (plain) row")
    ap.add_argument("--only", nargs="*", default=None, help="run only networks whose name contains one of these")
    ap.add_argument("--in_channels", type=int, default=3, choices=(1, 3), help="3: grayscale replicated to RGB (bundle2d's rule); 1: one-channel stems")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="combine bench_accuracy.json files of runs made "
                    "with the same settings (e.g. one seed per machine) into one table; trains nothing")
    ap.add_argument("--gray_stem_check", default=None, metavar="IMAGE", help="compare the two grayscale rules on IMAGE "
                    "at init with the same weights (replicated RGB vs one-channel stem); trains nothing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gray_stem_check:
        return gray_stem_check(args.gray_stem_check)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.size % 32:
        ap.error("--size must be a multiple of 32 (Med-URWKV and SwinUNETR need it)")
    torch.set_num_threads(args.threads)
    datalist = Path(args.datalist)
    meta = json.loads(datalist.read_text())
    labels = meta.get("labels") or {}
    n_classes = args.classes or len(labels)
    if n_classes < 2:
        ap.error("give --classes (the datalist has no 'labels')")
    classes = [labels.get(str(c), f"class {c}") for c in range(1, n_classes)]
    train = load_cases(datalist, "training", n_classes, args.in_channels)
    test = load_cases(datalist, "test", n_classes, args.in_channels)
    print(f"{datalist}: {len(train)} training / {len(test)} test images, {n_classes} classes, size {args.size}", flush=True)
    out = Path(args.out)
    setup = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "datalist": str(datalist),
        "train_images": len(train),
        "test_images": len(test),
        "classes": classes,
        **{k: getattr(args, k) for k in ("size", "steps", "batch", "lr", "seeds", "recal_batches", "freeze_steps", "in_channels", "threads")},
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    runs: List[dict] = []
    t0 = time.time()
    for seed in args.seeds:
        for name, make in networks(n_classes, args).items():
            runs.append(run_one(name, make, train, test, seed, args, n_classes))
            setup["wall_s"] = time.time() - t0
            md = _write(out, setup, runs, classes)  # after every run: an interrupted benchmark keeps what it measured
    print(md)


if __name__ == "__main__":
    main()
