"""Does segmentation emerge on real photos? CRATE and a matched ViT trained on Imagenette, scored on horses and COCO.

What is scored, per model, per layer and per head, on every image of each ground truth (the model input is the
photo resized so its short side is ``size``, aspect ratio kept, :mod:`crate_vis.data.image_geometry`):

* **DINO masks** (the most-attended patches holding 60 % of the CLS attention): per head, the mean over heads of the
  per-head Jaccard, the union of the heads' masks, the best head per image (an oracle), and the mask of the
  head-averaged attention (what ``crate-vis segment --method dino`` writes);
* **TokenCut** (one normalized cut of the layer's features, the official TokenCut rule) and **MaskCut** (up to 3
  cuts): Jaccard of the TokenCut mask, class-agnostic COCO AP / AP50 of the MaskCut masks (pycocotools);
* **CorLoc** of the TokenCut mask's box;
* **attention mass on the object**: the share of each head's CLS attention that falls on object patches
  (:mod:`crate_vis.metrics.attention_mass`), averaged over heads.

Beside the trained models: the same architectures at random initialisation, and a **centred ellipse** of the mean
object area that ignores the image. Models trained with several seeds are summarised by the mean and a 95 %
t-interval over seeds; single models by a 95 % bootstrap interval over images.

:func:`run_real_photos` writes ``real_photos.json`` (every number), ``real_photos.md`` (the tables and the
findings) and the figures.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..data.image_geometry import prepare_image
from ..hooks import AttentionRecorder, FeatureRecorder, model_layers
from ..io.coco import mask_bbox, masks_to_results
from ..io.images import load_image
from ..metrics import attention_mass_inside, binary_iou, box_iou, coco_ap
from ..models.geometry import ViTLike, model_patch_size, token_geometry
from ..segmentation.dino import dino_foreground, dino_masks
from ..segmentation.maskcut import maskcut, tokencut

__all__ = [
    "ModelRun", "RealPhotoSettings", "evaluate_model", "ellipse_prior", "run_real_photos", "interval",
    "sweep_segment_defaults", "segment_settings", "write_report", "layer_curves", "findings", "default_findings",
    "group_scores",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class ModelRun:
    """One model to score: a label, its group (several seeds of one setting share a group) and its weights."""

    label: str
    group: str
    weights: str | None  # a run folder / checkpoint, or None for a random initialisation of ``architecture``
    architecture: str | None = None  # the run whose architecture a random init copies
    seed: int = 0


@dataclass
class RealPhotoSettings:
    """What to score and where to write."""

    runs: list[ModelRun]
    grounds: dict[str, str]  # name -> COCO instances json
    out: Path
    size: int = 96
    mass: float = 0.6
    tau_tokencut: float = 0.2
    tau_maskcut: float = 0.15
    max_masks: int = 3
    max_images: int | None = None
    command: str = ""
    notes: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def _layers_of_one_image(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS attention ``(L, K, gh, gw)`` and cut features ``(L, N, K * dh)`` of every layer, one forward pass."""
    geom = token_geometry(model, tuple(x.shape[-2:]))
    depth = len(model_layers(model))
    with AttentionRecorder(model, cls_only=True) as rec, FeatureRecorder(model, features=("subspace",)) as frec:
        cast(ViTLike, model).forward_features(x)
    attn = torch.stack([rec.attentions[i][0, :, geom.num_prefix_tokens :] for i in range(depth)])  # (L, K, N)
    attn = attn.reshape(depth, attn.shape[1], *geom.grid).float()
    feats = []
    for i in range(depth):
        f = frec.features[i]["subspace"][0, :, geom.num_prefix_tokens :]  # (K, N, dh)
        feats.append(f.permute(1, 0, 2).reshape(f.shape[1], -1))  # (N, K * dh)
    return attn, torch.stack(feats).double()


def evaluate_model(model: nn.Module, gt: Any, settings: RealPhotoSettings) -> dict[str, Any]:
    """Every score of one model on one ground truth (a :class:`~crate_vis.groundtruth.COCODataset`)."""
    model.eval()
    patch = model_patch_size(model)
    depth = len(model_layers(model))
    ids = list(gt.image_ids)[: settings.max_images]
    per_image: list[dict[str, Any]] = []
    dets: list[list[dict[str, Any]]] = [[] for _ in range(depth)]
    t0 = time.perf_counter()
    for image_id in ids:
        prep = prepare_image(load_image(gt.image_path(image_id)), patch, settings.size)
        fg = gt.foreground(image_id)
        boxes = gt.boxes(image_id)
        on_grid = torch.from_numpy(prep.geometry.mask_fraction(fg) >= 0.5)
        attn, feats = _layers_of_one_image(model, prep.tensor[None].to(next(model.parameters()).device))
        attn, feats = attn.cpu(), feats.cpu()
        rec: dict[str, Any] = {"image_id": image_id, "layers": []}
        for layer in range(depth):
            a = attn[layer]  # (K, gh, gw)
            heads = dino_masks(a[None], settings.mass)[0].numpy()  # (K, gh, gw)
            head_iou = [binary_iou(prep.grid_to_image(h), fg, empty=0.0) for h in heads]
            union = binary_iou(prep.grid_to_image(cast(np.ndarray, heads.any(0))), fg, empty=0.0)
            mean_mask = dino_foreground(a[None], settings.mass, combine="mean")[0].numpy()
            mass = attention_mass_inside(a, on_grid)  # (K,)
            tc = tokencut(feats[layer].numpy(), prep.grid, tau=settings.tau_tokencut)
            tc_mask = prep.grid_to_image(tc.masks[0]) if len(tc.masks) else np.zeros(fg.shape, bool)
            mc = maskcut(feats[layer].numpy(), prep.grid, tau=settings.tau_maskcut, max_masks=settings.max_masks)
            mc_full = prep.grid_to_image(mc.masks).astype(bool) if len(mc.masks) else np.zeros((0, *fg.shape), bool)
            dets[layer] += masks_to_results(image_id, mc_full, mc.scores) if len(mc_full) else []
            first = binary_iou(mc_full[0], fg, empty=0.0) if len(mc_full) else binary_iou(np.zeros_like(fg), fg, empty=0.0)
            tc_box = mask_bbox(tc_mask) if tc_mask.any() else None
            hit = bool(tc_box is not None and len(boxes) and (box_iou([tc_box], boxes) >= 0.5).any())
            rec["layers"].append({
                "heads_iou": head_iou,
                "dino_mean_heads": float(np.mean(head_iou)),
                "dino_union": union,
                "dino_best_head": float(np.max(head_iou)),
                "dino_mean_attention": binary_iou(prep.grid_to_image(mean_mask), fg, empty=0.0),
                "tokencut": binary_iou(tc_mask, fg, empty=0.0),
                "maskcut_first": first,
                "corloc": hit if len(boxes) else None,
                "mass_in": [float(v) for v in mass],
            })  # fmt: skip
        per_image.append(rec)
    seconds = time.perf_counter() - t0
    layers = []
    for layer in range(depth):
        rows = [r["layers"][layer] for r in per_image]
        ap = coco_ap(gt.coco, dets[layer]) if dets[layer] else {"AP": 0.0, "AP50": 0.0}
        corloc = [r["corloc"] for r in rows if r["corloc"] is not None]
        layers.append({
            "layer": layer,
            **{k: float(np.mean([r[k] for r in rows])) for k in
               ("dino_mean_heads", "dino_union", "dino_best_head", "dino_mean_attention", "tokencut", "maskcut_first")},
            "per_head_iou": np.mean([r["heads_iou"] for r in rows], axis=0).tolist(),
            "per_head_mass_in": np.nanmean([r["mass_in"] for r in rows], axis=0).tolist(),
            "mass_in": float(np.nanmean([np.mean(r["mass_in"]) for r in rows])),
            "corloc": float(np.mean(corloc)) if corloc else float("nan"),
            "maskcut_ap": float(ap["AP"]), "maskcut_ap50": float(ap["AP50"]),
            "per_image": {k: [r[k] for r in rows] for k in ("dino_mean_attention", "tokencut", "dino_union",
                                                            "maskcut_first")},
        })  # fmt: skip
    return {"images": len(ids), "seconds": round(seconds, 1), "layers": layers}


def ellipse_prior(gt: Any, max_images: int | None = None) -> dict[str, Any]:
    """Jaccard of a centred ellipse covering the mean object share of the image: what needs no model at all."""
    ids = list(gt.image_ids)[:max_images]
    fgs = [gt.foreground(i) for i in ids]
    share = float(np.mean([f.mean() for f in fgs]))
    ious = []
    for f in fgs:
        h, w = f.shape
        yy, xx = np.mgrid[:h, :w]
        r = math.sqrt(share / math.pi)  # an ellipse with semi-axes r*H, r*W has area pi r^2 H W = share * H W
        ell = ((yy + 0.5 - h / 2) / (r * h)) ** 2 + ((xx + 0.5 - w / 2) / (r * w)) ** 2 <= 1.0
        ious.append(binary_iou(ell, f, empty=0.0))
    return {"jaccard": float(np.mean(ious)), "object_share": share, "per_image": ious}


def interval(values: Sequence[float], per_image: Sequence[Sequence[float]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Mean and 95 % interval: a t-interval over seeds when there are several values, else a bootstrap over images."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) >= 2:
        from scipy import stats

        half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
        return {"mean": float(v.mean()), "low": float(v.mean() - half), "high": float(v.mean() + half), "n": len(v),
                "kind": f"t-interval over {len(v)} seeds"}  # fmt: skip
    if per_image is None:
        return {"mean": float(v.mean()), "low": float("nan"), "high": float("nan"), "n": 1, "kind": "one run"}
    x = np.asarray(per_image[0], dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(2000)]
    return {"mean": float(v.mean()), "low": float(np.quantile(boot, 0.025)), "high": float(np.quantile(boot, 0.975)),
            "n": 1, "kind": f"bootstrap over {len(x)} images"}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the run
def _load(run: ModelRun, cache: dict[str, nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
    from ..models import resolve_model
    from ..models.checkpoint import model_to_config
    from ..models.factory import build_from_config

    if run.weights is not None:
        model, info = resolve_model(run.weights, device="cpu", with_info=True)
        cache[run.label] = model
        return model, info
    base = cache.get(run.architecture or "")
    if base is None:
        base, _ = resolve_model(run.architecture, device="cpu", with_info=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        model = build_from_config(model_to_config(base)).eval()
    return model, {}


def run_real_photos(settings: RealPhotoSettings) -> dict[str, Any]:
    """Score every run on every ground truth; write ``real_photos.json``, the report and the figures."""
    from ..groundtruth import COCODataset
    from ..io.atomic import atomic_write_json

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    grounds = {name: COCODataset(path) for name, path in settings.grounds.items()}
    results: dict[str, Any] = {
        "command": settings.command, "size": settings.size, "mass": settings.mass,
        "grounds": {k: str(v) for k, v in settings.grounds.items()}, "models": {}, "priors": {},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "notes": settings.notes,
    }  # fmt: skip
    for name, gt in grounds.items():
        results["priors"][name] = ellipse_prior(gt, settings.max_images)
    cache: dict[str, nn.Module] = {}
    for run in settings.runs:
        model, info = _load(run, cache)
        entry: dict[str, Any] = {"group": run.group, "weights": run.weights, "seed": run.seed,
                                 "params": sum(p.numel() for p in model.parameters()),
                                 "model": getattr(model, "model_name", type(model).__name__)}  # fmt: skip
        if run.weights is not None:
            entry["training"] = _training_summary(run.weights)
        for name, gt in grounds.items():
            log.info("scoring %s on %s", run.label, name)
            entry[name] = evaluate_model(model, gt, settings)
        results["models"][run.label] = entry
        atomic_write_json(out / "real_photos.json", _jsonable(results), indent=1)  # partial results survive a kill
    return results


def _training_summary(weights: str) -> dict[str, Any]:
    """Accuracy and time of a training run (its metrics.csv), when the weights are a run's."""
    import csv

    p = Path(weights)
    run_dir = p if p.is_dir() and (p / "metrics.csv").exists() else p.parent
    metrics = run_dir / "metrics.csv"
    if not metrics.exists():
        return {}
    with open(metrics, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    best = max(rows, key=lambda r: float(r.get("val_top1") or 0))
    return {"epochs": len(rows), "val_top1_last": float(rows[-1]["val_top1"]), "val_top1_best": float(best["val_top1"]),
            "train_seconds": round(sum(float(r["seconds"]) for r in rows), 1),
            "images_per_s": round(float(np.mean([float(r["images_per_s"]) for r in rows])), 1)}  # fmt: skip


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------------- the report
METRICS = (
    ("dino_mean_attention", "DINO mask, mean of heads"),
    ("dino_union", "DINO, union of heads"),
    ("dino_mean_heads", "DINO, mean over heads"),
    ("dino_best_head", "DINO, best head (oracle)"),
    ("tokencut", "TokenCut"),
    ("maskcut_first", "MaskCut, first mask"),
    ("maskcut_ap50", "MaskCut AP50"),
    ("corloc", "CorLoc"),
    ("mass_in", "attention on object"),
)


def _groups(results: dict[str, Any]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for label, entry in results["models"].items():
        groups.setdefault(entry["group"], []).append(label)
    return groups


def group_scores(results: dict[str, Any], ground: str, group: str, layer: int | None = None) -> dict[str, Any]:
    """Per metric the group's value at ``layer`` (default: the layer best for the group's DINO-mask mean) with its
    interval, and the layer used."""
    labels = _groups(results)[group]
    entries = [results["models"][lab][ground] for lab in labels]
    depth = len(entries[0]["layers"])
    if layer is None:
        means = [np.mean([e["layers"][i]["dino_mean_attention"] for e in entries]) for i in range(depth)]
        layer = int(np.argmax(means))
    out: dict[str, Any] = {"layer": layer}
    for key, _ in METRICS:
        vals = [e["layers"][layer][key] for e in entries]
        per_image = [entries[0]["layers"][layer]["per_image"][key]] if key in entries[0]["layers"][layer]["per_image"] else None
        out[key] = interval(vals, per_image if len(vals) == 1 else None)
    tops = [results["models"][lab].get("training", {}).get("val_top1_last") for lab in labels]
    tops = [t for t in tops if t is not None]
    out["val_top1"] = interval(tops) if tops else None
    return out


def _cell(iv: dict[str, Any] | None, percent: bool = False) -> str:
    if iv is None or iv["mean"] is None or not math.isfinite(iv["mean"]):
        return "-"
    f = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")
    if math.isfinite(iv.get("low", float("nan"))):
        return f"{f(iv['mean'])} [{f(iv['low'])}, {f(iv['high'])}]"
    return f(iv["mean"])


def summary_table(results: dict[str, Any], ground: str, order: Sequence[str]) -> list[str]:
    """Markdown rows: one per group, each metric at the group's best layer, with intervals."""
    head = ["model", "runs", "val top-1 %", "layer"] + [name for _, name in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in order:
        if group not in _groups(results):
            continue
        s = group_scores(results, ground, group)
        n = len(_groups(results)[group])
        top = s["val_top1"]
        cells = [group, str(n), f"{top['mean']:.1f}" + (f" ± {(top['high'] - top['low']) / 2:.1f}" if n > 1 else "")
                 if top else "-", str(s["layer"])]  # fmt: skip
        cells += [_cell(s[key]) for key, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    prior = results["priors"][ground]
    lines.append("| centred ellipse (no model) | - | - | - | " + f"{prior['jaccard']:.3f} | " + " | ".join(["-"] * (len(METRICS) - 1)) + " |")
    return lines


def layer_table(results: dict[str, Any], ground: str, group: str) -> list[str]:
    """Markdown rows: one per layer of a group (means over its runs)."""
    labels = _groups(results)[group]
    entries = [results["models"][lab][ground] for lab in labels]
    head = ["layer"] + [name for _, name in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in range(len(entries[0]["layers"])):
        vals = [np.nanmean([e["layers"][i][k] for e in entries]) for k, _ in METRICS]
        lines.append("| " + " | ".join([str(i)] + [f"{v:.3f}" for v in vals]) + " |")
    return lines


def head_table(results: dict[str, Any], ground: str, label: str, layer: int) -> list[str]:
    """Markdown rows: per head of one model at one layer, DINO-mask IoU and attention mass on the object."""
    lay = results["models"][label][ground]["layers"][layer]
    lines = ["| head | DINO-mask IoU | attention on object |", "|---|---|---|"]
    for k, (iou, mass) in enumerate(zip(lay["per_head_iou"], lay["per_head_mass_in"])):
        lines.append(f"| {k} | {iou:.3f} | {mass:.3f} |")
    return lines


def layer_curves(results: dict[str, Any], ground: str, groups: Sequence[str], path: Path) -> Path:
    """DINO-mask Jaccard, TokenCut Jaccard and attention on the object against the layer, per group."""
    from ..viz.grid import new_figure
    from ..viz.plots import save_figure

    panels = [("dino_mean_attention", "DINO mask (mean of heads), Jaccard"), ("tokencut", "TokenCut, Jaccard"),
              ("mass_in", "attention on object")]  # fmt: skip
    fig = new_figure((5.0 * len(panels), 3.6))
    for j, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for group in groups:
            if group not in _groups(results):
                continue
            entries = [results["models"][lab][ground] for lab in _groups(results)[group]]
            vals = np.array([[e["layers"][i][key] for i in range(len(e["layers"]))] for e in entries])
            mean = vals.mean(0)
            err = vals.std(0, ddof=1) if len(vals) > 1 else None
            ax.errorbar(np.arange(len(mean)), mean, yerr=err, marker="o", ms=3.5, capsize=2, lw=1.2, label=group)
        if key != "mass_in":
            ax.axhline(results["priors"][ground]["jaccard"], color="grey", ls="--", lw=1, label="centred ellipse")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer (0 = first block)")
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()  # one legend for all panels, below them
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"{ground}: means over seeds (bars: standard deviation over seeds)", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_figure(fig, path, dpi=130)


#: The development half of a ground truth's images (even positions in id order), on which settings are chosen,
#: and the held-out half, on which the choice is checked.
DEV_HALF = slice(0, None, 2)
HELD_OUT_HALF = slice(1, None, 2)


def _sweep_mask(key: Mapping[str, Any], attn: torch.Tensor, feats: torch.Tensor, prep: Any,
                shape: tuple[int, ...]) -> np.ndarray:  # fmt: skip
    """The image-size mask ``segment`` writes for one sweep row (``method``, ``threshold``, ``layer``)."""
    layer, threshold = key["layer"], key["threshold"]
    if key["method"] == "dino":
        mask = dino_foreground(attn[layer][None], threshold, combine="mean")[0].numpy()
        return prep.grid_to_image(mask)
    f = feats[layer].numpy()
    cut = tokencut(f, prep.grid, tau=threshold) if key["method"] == "tokencut" else \
        maskcut(f, prep.grid, tau=threshold, max_masks=1)  # fmt: skip
    return prep.grid_to_image(cut.masks[0]) if len(cut.masks) else np.zeros(shape, bool)


def sweep_segment_defaults(
    model: nn.Module,
    gt: Any,
    sizes: Sequence[int],
    settings: RealPhotoSettings,
    taus: Sequence[float] = (0.1, 0.15, 0.2, 0.25, 0.3),
    masses: Sequence[float] = (0.4, 0.5, 0.6, 0.7, 0.8),
    refine_top: int = 0,
) -> dict[str, Any]:
    """Jaccard of each (input size, method, its threshold, layer) of one model on one ground truth, and the best.

    Methods are those ``crate-vis segment`` writes one mask per image with, computed as it computes them: ``dino``
    (the mask of the head-averaged attention) at each attention mass in ``masses``, ``tokencut`` (the official rule)
    and ``maskcut`` with one mask (TokenCut's cut with MaskCut's corner rule, an object-centric prior) at each graph
    threshold in ``taus``. The model runs once per image and size; the masks are made from the same features.

    The ``refine_top`` settings best on the development half are scored again with the bilateral-solver refinement
    (``segment --refine bilateral``, :func:`crate_vis.segmentation.bilateral.refine_masks`); the choice is then made
    among all rows, refined or not, on the development half alone.
    """
    from ..segmentation.bilateral import refine_masks

    model.eval()
    patch = model_patch_size(model)
    device = next(model.parameters()).device
    ids = list(gt.image_ids)[: settings.max_images]
    keys: list[dict[str, Any]] = []
    per_image: list[list[float]] = []
    for size in sizes:
        rows: dict[tuple[str, float, int], list[float]] = {}
        for image_id in ids:
            prep = prepare_image(load_image(gt.image_path(image_id)), patch, size)
            fg = gt.foreground(image_id)
            attn, feats = _layers_of_one_image(model, prep.tensor[None].to(device))
            attn, feats = attn.cpu(), feats.cpu()
            for layer in range(attn.shape[0]):
                for method, thresholds in (("dino", masses), ("tokencut", taus), ("maskcut", taus)):
                    for t in thresholds:
                        mask = _sweep_mask({"method": method, "threshold": t, "layer": layer}, attn, feats, prep,
                                           fg.shape)  # fmt: skip
                        rows.setdefault((method, t, layer), []).append(binary_iou(mask, fg, empty=0.0))
        for (method, threshold, layer), values in rows.items():
            keys.append({"size": size, "method": method, "threshold": threshold, "layer": layer, "refine": "none"})
            per_image.append(values)
    if refine_top > 0:
        dev_means = np.asarray(per_image, dtype=np.float64)[:, DEV_HALF].mean(1)
        top = [dict(keys[i], refine="bilateral") for i in np.argsort(-dev_means, kind="stable")[:refine_top]]
        refined: list[list[float]] = [[] for _ in top]
        for size in sorted({k["size"] for k in top}):
            for image_id in ids:
                image = load_image(gt.image_path(image_id))
                prep = prepare_image(image, patch, size)
                fg = gt.foreground(image_id)
                attn, feats = _layers_of_one_image(model, prep.tensor[None].to(device))
                attn, feats = attn.cpu(), feats.cpu()
                for j, key in enumerate(top):
                    if key["size"] == size:
                        coarse = _sweep_mask(key, attn, feats, prep, fg.shape)
                        mask = refine_masks(np.asarray(image), coarse[None]).masks[0]
                        refined[j].append(binary_iou(mask, fg, empty=0.0))
        keys += top
        per_image += refined
    scores = np.asarray(per_image, dtype=np.float64)  # (settings, images)
    table = [{**k, "jaccard": float(v)} for k, v in zip(keys, scores.mean(1))]
    # The choice is made on the development half (the even positions in id order) alone; the other half is held
    # out, and choosing the other way round shows how much the choice depends on the half.
    halves = []
    for pick, held in ((DEV_HALF, HELD_OUT_HALF), (HELD_OUT_HALF, DEV_HALF)):
        i = int(scores[:, pick].mean(1).argmax())
        halves.append({"chosen": keys[i], "chosen_on": float(scores[i, pick].mean()),
                       "held_out": float(scores[i, held].mean()), "all": float(scores[i].mean())})  # fmt: skip
    i = int(scores[:, DEV_HALF].mean(1).argmax())
    best = {**table[i], "dev": halves[0]["chosen_on"], "held_out": halves[0]["held_out"]}
    return {"table": table, "best": best, "split_half": halves, "images": len(ids),
            "dev_images": len(ids[DEV_HALF]), "held_out_images": len(ids[HELD_OUT_HALF])}  # fmt: skip


def segment_settings(best: Mapping[str, Any]) -> dict[str, Any]:
    """The ``metadata.segment`` record of a sweep's best row (what ``crate-vis segment`` reads back)."""
    out: dict[str, Any] = {"method": best["method"], "layer": best["layer"], "img_size": best["size"]}
    if best["method"] == "dino":
        out["mass"] = best["threshold"]
    else:
        out["tau"] = best["threshold"]
    if best["method"] == "maskcut":
        out["max_masks"] = 1
    if best.get("refine", "none") != "none":
        out["refine"] = best["refine"]
    return out


def findings(results: dict[str, Any], crate: str, vit: str, ground: str = "horses") -> list[str]:
    """Plain sentences on what did and did not emerge, computed from the numbers."""
    out: list[str] = []
    groups = _groups(results)
    if crate not in groups or vit not in groups:
        return out
    c, v = group_scores(results, ground, crate), group_scores(results, ground, vit)
    prior = results["priors"][ground]["jaccard"]
    for key, name in (("dino_mean_attention", "DINO-mask Jaccard"), ("tokencut", "TokenCut Jaccard"),
                      ("maskcut_ap50", "MaskCut AP50"), ("mass_in", "attention on the object")):  # fmt: skip
        gap = c[key]["mean"] - v[key]["mean"]
        overlap = c[key]["low"] <= v[key]["high"] and v[key]["low"] <= c[key]["high"]
        verdict = "the intervals overlap: no difference is shown" if overlap else (
            "CRATE is ahead" if gap > 0 else "the ViT is ahead")
        out.append(f"{ground}, {name} at each model's best layer: {crate} {_cell(c[key])} (layer {c['layer']}) vs "
                   f"{vit} {_cell(v[key])} (layer {v['layer']}); difference {gap:+.3f}, {verdict}.")  # fmt: skip
    best = c["dino_mean_attention"]["mean"]
    out.append(f"{ground}: the centred ellipse that ignores the image scores {prior:.3f}; CRATE's DINO mask "
               + ("beats it" if c["dino_mean_attention"]["low"] > prior else "does not clearly beat it")
               + f" ({best:.3f}).")  # fmt: skip
    return out


def default_findings(results: dict[str, Any], default_label: str, sweep: dict[str, Any] | None = None,
                     new_user: dict[str, Any] | None = None) -> list[str]:
    """Plain sentences on the photo default (``default_label``): against the centred ellipse on each ground truth,
    what the bilateral refinement adds, and what a new user gets; computed from the numbers."""
    if default_label not in results["models"]:
        return []
    out: list[str] = []
    group = results["models"][default_label]["group"]
    for ground in results["grounds"]:
        g = group_scores(results, ground, group)
        prior = results["priors"][ground]["jaccard"]
        dino, cut = g["dino_mean_attention"]["mean"], g["maskcut_first"]["mean"]
        out.append(f"{ground}, {group} (the photo default) at layer {g['layer']}: DINO mask {dino:.3f}, first MaskCut "
                   f"mask {cut:.3f}, centred ellipse {prior:.3f}: the DINO mask alone "
                   + ("beats" if dino > prior else "does not beat") + " the prior, the cut "
                   + ("beats" if cut > prior else "does not beat") + " it.")  # fmt: skip
    table: list[dict[str, Any]] = sweep["table"] if sweep else []
    refined = [r for r in table if r.get("refine", "none") != "none"]
    if sweep and refined:
        keys = ("size", "method", "threshold", "layer")
        plain = {tuple(r[k] for k in keys): r["jaccard"] for r in table if r.get("refine", "none") == "none"}
        gains = [r["jaccard"] - plain[tuple(r[k] for k in keys)] for r in refined]
        span = f"{min(gains):+.3f} to {max(gains):+.3f}"
        out.append(f"{sweep['ground']}: the bilateral refinement raises the Jaccard of each of the {len(gains)} settings "
                   f"it was tried on, by {span}: the coarse masks follow patch borders, and much of what they miss "
                   "lies along the object's outline." if min(gains) > 0 else
                   f"{sweep['ground']}: the bilateral refinement changes the Jaccard by {span} over the {len(gains)} "
                   "settings it was tried on.")  # fmt: skip
    if new_user is not None:
        out.append(f"A new user's `crate-vis segment` on the {new_user['images']} horse photos, no flags: Jaccard "
                   f"{new_user['jaccard']:.3f}.")  # fmt: skip
    return out


def write_report(results: dict[str, Any], out: Path, order: Sequence[str], crate: str, vit: str,
                 default_label: str | None = None, sweep: dict[str, Any] | None = None,
                 new_user: dict[str, Any] | None = None, figures: Sequence[str] = ()) -> Path:  # fmt: skip
    """Write ``real_photos.md``."""
    from ..io.atomic import atomic_write

    grounds = list(results["grounds"])
    lines = ["# Emergent segmentation on real photos", ""]
    lines += [results["notes"].get("intro", ""), ""]
    if results["notes"].get("design"):
        lines += ["## Why these settings", ""] + list(results["notes"]["design"]) + [""]
    lines += ["Reproduce with:", "", f"    {results['command']}", ""]
    for ground in grounds:
        n = next(iter(results["models"].values()))[ground]["images"]
        lines += [f"## {ground} ({n} images)", ""]
        lines += ["Each model at its best layer for the DINO mask (chosen on these images, so an optimistic pick "
                  "for every row alike); means with 95 % intervals (t over seeds, or bootstrap over images for one "
                  "run); Jaccard unless said otherwise.", ""]  # fmt: skip
        lines += summary_table(results, ground, order) + [""]
        for group in (crate, vit):
            if group in _groups(results):
                lines += [f"Per layer, {group} (means over its runs):", ""] + layer_table(results, ground, group) + [""]
        if default_label and default_label in results["models"]:
            layer = group_scores(results, ground, results["models"][default_label]["group"])["layer"]
            lines += [f"Per head, {default_label} at layer {layer}:", ""]
            lines += head_table(results, ground, default_label, layer) + [""]
    if sweep is not None:
        best = sweep["best"]
        lines += ["## Choosing `crate-vis segment`'s defaults for the photo model", ""]
        lines += [f"The Jaccard of the one mask per image that `segment` writes on the {sweep['ground']} images, by "
                  "input size, method, its threshold (`--mass` for dino, `--tau` for the cuts) and layer, over all "
                  f"{sweep['images']} images; maskcut is MaskCut with one mask (its first cut). The settings are "
                  f"chosen on the development half alone ({sweep.get('dev_images', '?')} images: the even positions "
                  f"in id order) and checked on the held-out half ({sweep.get('held_out_images', '?')} images); "
                  "nothing else was used to choose.", ""]  # fmt: skip
        layers = sorted({r["layer"] for r in sweep["table"]})
        lines += ["| size | method | threshold | " + " | ".join(f"layer {i}" for i in layers) + " |",
                  "|---|---|---|" + "---|" * len(layers)]  # fmt: skip
        cells: dict[tuple[int, str, float], dict[int, float]] = {}
        plain = {(r["size"], r["method"], r["threshold"], r["layer"]): r["jaccard"] for r in sweep["table"]
                 if r.get("refine", "none") == "none"}  # fmt: skip
        for (size, method, threshold, layer), value in plain.items():
            cells.setdefault((size, method, threshold), {})[layer] = value
        top = (best["size"], best["method"], best["threshold"], best["layer"])
        bold_plain = best.get("refine", "none") == "none"
        for (size, method, threshold), vals in cells.items():
            marks = ["**" if bold_plain and (size, method, threshold, i) == top else "" for i in layers]
            lines.append(f"| {size} | {method} | {threshold:g} | "
                         + " | ".join(f"{m}{vals[i]:.3f}{m}" for i, m in zip(layers, marks)) + " |")  # fmt: skip
        refined = [r for r in sweep["table"] if r.get("refine", "none") != "none"]
        if refined:
            lines += ["", f"The {len(refined)} settings best on the development half, again with the bilateral-solver "
                      "refinement of TokenCut (`--refine bilateral`: Barron & Poole's fast bilateral solver on the "
                      "photo, TokenCut's parameters; a refined mask that is empty or overlaps the coarse one by an "
                      "IoU below 0.5 is not used):", "",
                      "| size | method | threshold | layer | coarse | refined |", "|---|---|---|---|---|---|"]  # fmt: skip
            for r in refined:
                key = (r["size"], r["method"], r["threshold"], r["layer"])
                m = "**" if not bold_plain and key == top else ""
                lines.append(f"| {r['size']} | {r['method']} | {r['threshold']:g} | {r['layer']} | "
                             f"{plain[key]:.3f} | {m}{r['jaccard']:.3f}{m} |")  # fmt: skip
        chosen = segment_settings(best)
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in chosen.items())
        dev = f"{best['dev']:.3f} on the development half, **{best['held_out']:.3f}** held out, " if "dev" in best \
            else ""  # fmt: skip
        lines += ["", f"Chosen: `{flags}` ({dev}{best['jaccard']:.3f} on all images); the weights carry these "
                  "settings, so `crate-vis segment` uses them when no flag is given (and `attention` and `heads` the "
                  "layer and size).", ""]  # fmt: skip
        for half, name in zip(sweep.get("split_half", []), ("development half", "held-out half")):
            c = half["chosen"]
            how = " with the refinement" if c.get("refine", "none") != "none" else ""
            lines.append(f"* Chosen on the {name} alone: `{c['method']}` at {c['threshold']:g}, "
                         f"layer {c['layer']}, size {c['size']}{how}: {half['chosen_on']:.3f} there, "
                         f"**{half['held_out']:.3f}** on the other half (the gap is what choosing on the scored "
                         "images adds).")  # fmt: skip
        lines.append("")
    if new_user is not None:
        lines += ["## As a new user runs it", "", f"    {new_user['command']}", "",
                  f"Foreground Jaccard over the {new_user['images']} horse photos: **{new_user['jaccard']:.3f}** "
                  f"(centred ellipse {results['priors']['horses']['jaccard']:.3f}).", ""]  # fmt: skip
    lines += ["## Findings", ""] + [f"* {f}" for f in findings(results, crate, vit)]
    if default_label:
        lines += [f"* {f}" for f in default_findings(results, default_label, sweep, new_user)]
    for extra in results["notes"].get("findings", []):
        lines.append(f"* {extra}")
    lines.append("")
    lines += ["## Training runs", "", "| run | model | params | epochs | val top-1 (last) | train s | img/s |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, e in results["models"].items():
        t = e.get("training") or {}
        if t:
            lines.append(f"| {label} | {e['model']} | {e['params']:,} | {t['epochs']} | {t['val_top1_last']:.2f} | "
                         f"{t['train_seconds']:.0f} | {t['images_per_s']} |")  # fmt: skip
    for line in results["notes"].get("budget", []):
        lines.append(line)
    lines += [""] + [f"![{f}]({f})" for f in figures] + [""]
    for line in results["notes"].get("left_out", []):
        lines.append(line)
    dest = Path(out) / "real_photos.md"
    with atomic_write(dest, "w") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")
    return dest
