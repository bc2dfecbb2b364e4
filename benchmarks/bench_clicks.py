"""Dice after N simulated clicks on a held-out volume: Med-URWKV-Edit (the click-guided network) against
today's graph-cut clicks (``medurwkv_clicks``: the automatic network, then ``ClickRefined``), in one run.

Four curves: graph-cut clicks on the automatic model; the click-guided network alone (clicks into the network,
each clicked voxel set to its class); the graph cut on the click-guided network's automatic mode (clicks not
into the network); and ``medurwkv_edit`` as served: clicks into the network, then the same graph cut on its
guided probabilities inside the slices the clicks reach (``monailabel_app/lib/infers/edit.py::refine_edit``).

The simulated annotator is the active-learning loop's (``monailabel_app/active_learning_loop.py::next_click``):
each click at the deepest voxel of the largest remaining error, foreground where brain is missed, background
where something else is taken; clicks accumulate. Both methods are scored on the image's own grid.

    python benchmarks/bench_clicks.py --auto-model runs/main_job/models/model.pt \\
        --edit-model runs/edit/models/model.pt --out runs/edit/bench_clicks   # writes .json and .png

``--auto-model``: the automatic bundle's weights (graph-cut clicks refine its output); ``--edit-model``:
``train_edit.json``'s (``in_channels`` 3). Defaults: the held-out ITK head of ``sample_data/``, 10 clicks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, ROOT)


def bundle_parts(bundle: str, configs: list, weights: str):
    """Preprocessing, inferer and network (weights loaded strictly, eval mode, CPU) of the bundle's configs."""
    from monai.bundle import ConfigParser

    from medurwkv.checkpoint import load_weights

    parser = ConfigParser()
    parser.read_config([os.path.join(bundle, "configs", c) for c in configs])
    parser["bundle_root"] = bundle
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(load_weights(weights), strict=True)
    net.eval()
    edit = parser.get_parsed_content("edit_guidance") if "edit_guidance" in parser else None
    return parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer"), net, edit


def main(argv=None) -> dict:
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from medurwkv.guidance import infer_slices_with_clicks, map_points
    from medurwkv.visualize import dice_score
    from monailabel_app.active_learning_loop import next_click, read_mask
    from monailabel_app.lib.infers.clicks import ClickRefined, _spacing
    from monailabel_app.lib.infers.edit import refine_edit, steered_region

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=os.path.join(ROOT, "bundle"))
    ap.add_argument("--auto-model", required=True)
    ap.add_argument("--edit-model", required=True)
    ap.add_argument("--image", default=os.path.join(ROOT, "sample_data/imagesTs/itk_kmeanstest_t1.nii.gz"))
    ap.add_argument("--label", default=os.path.join(ROOT, "sample_data/labelsTs/itk_kmeanstest_t1.nii.gz"))
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--out", default="bench_clicks", help="output prefix: <out>.json and <out>.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    truth = read_mask(args.label)

    pre_auto, inferer_auto, net_auto, _ = bundle_parts(args.bundle, ["inference.json"], args.auto_model)
    pre_edit, inferer_edit, net_edit, guidance_tf = bundle_parts(
        args.bundle, ["inference.json", "inference_edit.json"], args.edit_model
    )
    names = list(guidance_tf.label_names)  # foreground name first, "background" last
    fg_name = next(n for n in names if n != "background")

    def on_image_grid(logits: torch.Tensor, data: dict, preprocessing) -> MetaTensor:
        """Softmax probabilities inverted to the image's grid (the bundle's Invertd)."""
        img = data["image"]
        pred = MetaTensor(torch.softmax(logits.float(), 0), affine=img.affine, meta=dict(img.meta))
        pred.applied_operations = list(img.applied_operations)
        out = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(
            {"image": img, "pred": pred}
        )
        return out["pred"]

    def argmax(prob) -> np.ndarray:
        return np.asarray(prob[1] > prob[0])

    with torch.no_grad():
        refiner = ClickRefined(keys="pred")

        def graph_cut_curve(prob) -> tuple:
            """Dice after each click of ClickRefined (as medurwkv_clicks) on one network's probabilities."""
            clicks = {"foreground": [], "background": []}
            seg = argmax(prob)
            dice, times = [dice_score(seg, truth)], []
            for n in range(args.clicks):
                click = next_click(seg, truth)
                if click is None:
                    dice.append(dice[-1])
                    continue
                clicks[click[0]].append(click[1])
                t0 = time.perf_counter()
                seg = argmax(refiner({"pred": prob.clone(), "image_path": args.image, **clicks})["pred"])
                times.append(time.perf_counter() - t0)
                dice.append(dice_score(seg, truth))
                print(f"graph cut, click {n + 1}: Dice {dice[-1]:.4f}", file=sys.stderr, flush=True)
            return dice, times

        # graph-cut clicks: the automatic network once, then ClickRefined per click (as medurwkv_clicks)
        d_auto = pre_auto({"image": args.image})
        t0 = time.perf_counter()
        prob_auto = on_image_grid(inferer_auto(d_auto["image"][None], net_auto)[0], d_auto, pre_auto)
        t_auto = time.perf_counter() - t0
        gc, t_gc = graph_cut_curve(prob_auto)

        # Med-URWKV-Edit: automatic mode, then all clicks so far on the slices they reach
        d_edit = pre_edit({"image": args.image})
        image = d_edit["image"]
        t0 = time.perf_counter()
        logits0 = inferer_edit(image[None], net_edit)[0]
        prob = on_image_grid(logits0, d_edit, pre_edit)
        t_edit_auto = time.perf_counter() - t0
        # the same graph-cut clicks on Med-URWKV-Edit's automatic mode: the same network and training budget
        gc_edit, _ = graph_cut_curve(prob)
        img_affine, pre_affine = np.asarray(prob.affine), np.asarray(image.affine)
        spatial = tuple(prob.shape[1:])

        def edit_curve(graph_cut: bool) -> tuple:
            """Clicks into the network (on the slices they reach), then, when ``graph_cut``, refine_edit as
            medurwkv_edit serves it; every clicked voxel gets its click's class."""
            what = "Med-URWKV-Edit + graph cut" if graph_cut else "Med-URWKV-Edit alone"
            guidance = {n: [] for n in names}  # on the network's grid
            on_image = {n: [] for n in names}  # the same clicks on the image's grid
            seg = argmax(prob)
            dice, times, clicks = [dice_score(seg, truth)], [], []
            for _ in range(args.clicks):
                click = next_click(seg, truth)
                if click is None:
                    dice.append(dice[-1])
                    continue
                kind, ijk = click
                clicks.append(click)
                name = fg_name if kind == "foreground" else "background"
                t0 = time.perf_counter()
                guidance[name].append(map_points([ijk], img_affine, pre_affine)[0].tolist())
                on_image[name].append([int(x) for x in ijk])
                logits = infer_slices_with_clicks(net_edit, inferer_edit, image, guidance, logits0, guidance_tf)
                p = on_image_grid(logits, d_edit, pre_edit)
                if graph_cut:
                    steered = steered_region(guidance, img_affine, pre_affine, spatial, guidance_tf.reach)
                    seg, _ = refine_edit(np.asarray(p), on_image, steered, _spacing(p, 3),
                                         lambda: refiner._image({"image_path": args.image}, spatial), refiner._params({}))
                else:
                    seg = argmax(p)
                for k, v in clicks:  # as medurwkv_edit serves it: every clicked voxel gets its click's class
                    seg[tuple(v)] = k == "foreground"
                times.append(time.perf_counter() - t0)
                dice.append(dice_score(seg, truth))
                print(f"{what}, click {len(dice) - 1}: Dice {dice[-1]:.4f}", file=sys.stderr, flush=True)
            return dice, times, clicks

        ed, t_ed, clicks_ed = edit_curve(graph_cut=False)
        edc, t_edc, clicks_edc = edit_curve(graph_cut=True)

    steps = [n for n in (0, 1, 3, 5, 10) if n <= args.clicks]
    result = {
        "image": os.path.relpath(args.image, ROOT),
        "auto_model": args.auto_model,
        "edit_model": args.edit_model,
        "threads": args.threads,
        "reach_slices": guidance_tf.reach,
        "dice_graph_cut": gc,
        "dice_edit": ed,
        "dice_graph_cut_on_edit_auto": gc_edit,
        "dice_edit_graph_cut": edc,
        "table": {
            str(n): {"graph_cut": round(gc[n], 4), "edit": round(ed[n], 4), "graph_cut_on_edit_auto": round(gc_edit[n], 4),
                     "edit_graph_cut": round(edc[n], 4)}
            for n in steps
        },
        "largest_drop_graph_cut": round(max([0.0] + [a - b for a, b in zip(gc, gc[1:])]), 4),
        "largest_drop_edit": round(max([0.0] + [a - b for a, b in zip(ed, ed[1:])]), 4),
        "largest_drop_graph_cut_on_edit_auto": round(max([0.0] + [a - b for a, b in zip(gc_edit, gc_edit[1:])]), 4),
        "largest_drop_edit_graph_cut": round(max([0.0] + [a - b for a, b in zip(edc, edc[1:])]), 4),
        "edit_clicks": clicks_ed,
        "edit_graph_cut_clicks": clicks_edc,
        "seconds": {
            "auto_network_volume": round(t_auto, 2),
            "edit_network_volume": round(t_edit_auto, 2),
            "graph_cut_per_click_median": round(float(np.median(t_gc)), 3) if t_gc else None,
            "edit_per_click_median": round(float(np.median(t_ed)), 3) if t_ed else None,
            "edit_graph_cut_per_click_median": round(float(np.median(t_edc)), 3) if t_edc else None,
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(gc, ed, gc_edit, edc, args.out + ".png", os.path.basename(args.image))
    print(json.dumps({k: v for k, v in result.items() if k == "table" or k.startswith(("largest_drop", "seconds"))}, indent=2))
    return result


def plot(gc, ed, gc_edit, edc, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(range(len(edc)), edc, "D-", label="medurwkv_edit as served (clicks into the network, then graph cut)")
    ax.plot(range(len(ed)), ed, "o-", label="Med-URWKV-Edit network alone (clicks into the network)")
    ax.plot(range(len(gc)), gc, "s--", label="graph-cut clicks on the automatic model (medurwkv_clicks)")
    ax.plot(range(len(gc_edit)), gc_edit, "^:", label="graph-cut clicks on Med-URWKV-Edit's automatic mode")
    ax.axhline(0.93, color="grey", lw=0.8, ls=":", label="target after 5 clicks (0.93)")
    ax.set_xlabel("simulated clicks (deepest voxel of the largest error)")
    ax.set_ylabel("Dice")
    ax.set_title(f"Interactive correction, held-out {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
