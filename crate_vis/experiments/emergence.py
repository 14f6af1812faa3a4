"""Does segmentation emerge from supervised classification, more in CRATE than in a matched ViT? A one-machine test.

The claim under test (Yu et al., "Emergence of Segmentation with Minimalistic White-Box Transformers", 2023): the
CLS attention of a CRATE trained only to classify already segments the object, more than a ViT trained the same
way. ImageNet and the official weights are out of reach here, so the experiment is scaled down to what one CPU can
do, on data where the answer can be scored exactly:

1. **Data**: :class:`crate_vis.data.synthetic.SyntheticShapes`: one object of 10 classes per image on label-free
   clutter, with its exact mask. The class can only be read from the object, so attending to it pays.
2. **Models**: a small CRATE (``crate_mini_patch8_96``: dim 192, 6 layers, 6 heads) and a timm ViT with the same
   depth, heads and patch size whose width is chosen so that the parameter counts match (both are reported).
3. **Training**: the project trainer (:func:`crate_vis.train.train`), the same recipe, the same images and the same
   number of optimizer steps for both; the step count comes from the time budget (``--minutes-per-model``) and
   the measured step time of the slower model.
4. **Scoring** on held-out images (the ``test`` split, never seen in training or model selection), for the trained
   models and for the same architectures at random initialisation:

   * DINO masks (keep the most-attended patches holding 60 % of each head's CLS attention,
     :func:`crate_vis.segmentation.dino_masks`) of every layer and head, Jaccard with the ground-truth mask
     (:func:`crate_vis.metrics.fg_jaccard`): mean over heads, the mask of the head-averaged attention, the union
     of the heads' masks, and the best fixed head (chosen with the ground truth, so an upper bound);
   * MaskCut on each layer's per-head features (:func:`crate_vis.segmentation.maskcut`), class-agnostic COCO AP
     through pycocotools (:func:`crate_vis.metrics.coco_ap`);
   * layer-wise coding rate and sparsity (:func:`crate_vis.whitebox.measure_layers`);
   * test accuracy.

   A centre-box prior (a centred square of the mean object area) gives the Jaccard that needs no model at all.

Run it with ``crate-vis emergence --out DIR``. ``--fast`` trains a
few steps on a few tiny images: a smoke test of the whole pipeline, its numbers mean nothing.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

log = logging.getLogger("crate_vis.emergence")

__all__ = [
    "EmergenceSettings", "param_count", "matched_vit_kwargs", "measure_step_time", "test_batch", "score_attention",
    "score_maskcut", "score_whitebox", "centre_prior_jaccard", "evaluate", "run_emergence", "write_report",
    "rebuild_report", "curve_figures",
]  # fmt: skip

MODEL_NAMES = ("crate", "vit")


@dataclass
class EmergenceSettings:
    """Everything the experiment depends on (written to ``emergence.json``).

    Attributes:
        out: folder for the report, figures and ``emergence.json``.
        runs: folder for the training runs (checkpoints, metrics); default ``out/emergence_runs``.
        minutes_per_model: training time budget per model; sets the shared step count.
        image_size: square image side in pixels (multiple of 8).
        batch_size: training batch size.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_fraction: linear warm-up as a fraction of the steps.
        label_smoothing: cross-entropy label smoothing.
        max_steps: fix the number of steps instead of deriving it from the budget.
        val_images: validation images the trainer reports accuracy on.
        test_images: held-out images with masks that everything is scored on.
        classes: number of classes.
        seed: seed of data, initialisation and shuffling.
        crate_model: registered CRATE name.
        vit_model: timm ViT name whose width/depth/heads/patch are overridden to match.
        mass: DINO attention mass kept.
        maskcut_tau: MaskCut affinity threshold.
        maskcut_max_masks: masks per image.
        figure_images: test images shown in the figures.
        parallel: train the two models at the same time in two processes (same steps and recipe; the wall time of
            each is then shared with the other).
        threads: PyTorch CPU threads for training and scoring. One by default: on a CPU shared with other jobs, more
            threads than free cores make OpenMP spin and a step several times slower.
        fast: tiny smoke-test settings (a tiny CRATE, ``crate_test_patch8_32``, and its matched ViT).
    """

    out: Path
    runs: Path | None = None
    minutes_per_model: float = 10.0
    image_size: int = 64
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    max_steps: int | None = None
    val_images: int = 500
    test_images: int = 300
    classes: int = 10
    seed: int = 0
    crate_model: str = "crate_mini_patch8_96"
    vit_model: str = "vit_tiny_patch16_224"
    mass: float = 0.6
    maskcut_tau: float = 0.15
    maskcut_max_masks: int = 3
    figure_images: int = 4
    threads: int = 1
    parallel: bool = False
    fast: bool = False
    command: str | None = None  # the command line that ran the experiment, for the report

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.runs = Path(self.runs) if self.runs is not None else self.out / "emergence_runs"
        if self.fast:
            # a smoke test of every stage; nothing learns in this budget
            if self.crate_model == EmergenceSettings.crate_model:
                self.crate_model = "crate_test_patch8_32"
            self.image_size = min(self.image_size, 32)
            self.max_steps = self.max_steps or 2
            self.batch_size = min(self.batch_size, 8)
            self.val_images = min(self.val_images, 16)
            self.test_images = min(self.test_images, 8)
            self.figure_images = min(self.figure_images, 2)
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of the patch size 8, got {self.image_size}")
        if self.minutes_per_model <= 0:
            raise ValueError(f"minutes_per_model must be > 0, got {self.minutes_per_model}")


# ------------------------------------------------------------------------------------------------ models
def param_count(model: nn.Module) -> int:
    """Number of parameters."""
    return int(sum(p.numel() for p in model.parameters()))


def _build(name: str, image_size: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from crate_vis import create_model

    return create_model(name, num_classes=num_classes, img_size=image_size, **kwargs)


class _CRATEWidths(Protocol):
    """What :func:`matched_vit_kwargs` reads from a CRATE-family model."""

    num_heads: int
    depth: int
    embed_dim: int
    patch_size: tuple[int, int]


def matched_vit_kwargs(
    crate: nn.Module, image_size: int, num_classes: int, vit_model: str = "vit_tiny_patch16_224"
) -> tuple[dict[str, Any], int]:
    """The timm ViT width whose parameter count is closest to ``crate``'s, at the same depth, heads and patch.

    The width runs over multiples of the head count (timm needs ``embed_dim % num_heads == 0``); the MLP ratio
    stays at the standard 4.

    Returns:
        ``(kwargs for create_model(vit_model, ...), parameter count)``.
    """
    target = param_count(crate)
    widths = cast(_CRATEWidths, crate)
    heads, depth = int(widths.num_heads), int(widths.depth)
    patch = int(widths.patch_size[0])
    best: tuple[int, dict[str, Any], int] | None = None
    for width in range(heads * 4, 4 * int(widths.embed_dim) + 1, heads):
        kw = dict(patch_size=patch, embed_dim=width, depth=depth, num_heads=heads)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            n = param_count(_build(vit_model, image_size, num_classes, **kw))
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, kw, n)
        if n > target * 1.2:
            break
    assert best is not None
    return best[1], best[2]


def measure_step_time(model: nn.Module, image_size: int, batch_size: int, steps: int = 3) -> float:
    """Median seconds of one AdamW training step (forward, backward, update) on random data, after one warm-up.

    The model's weights are restored afterwards.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, int(getattr(model, "num_classes", 2)), (batch_size,))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return float(np.median(times))


# ------------------------------------------------------------------------------------------------- training
@dataclass
class TrainedModel:
    """One trained model and what its training cost."""

    name: str
    model: nn.Module
    model_name: str
    model_kwargs: dict[str, Any]
    params: int
    steps: int
    seconds: float
    val_top1: float | None
    run_dir: str
    history: list[dict[str, Any]] = field(default_factory=list)


def _train_config(s: EmergenceSettings, model_name: str, model_kwargs: dict[str, Any], steps: int, run_dir: Path):
    from crate_vis.train import resolve_config

    return resolve_config(
        None,
        data="synthetic",
        model=model_name,
        model_kwargs=model_kwargs,
        out=str(run_dir),
        epochs=1,
        max_steps=steps,
        batch_size=s.batch_size,
        img_size=s.image_size,
        optimizer="adamw",
        lr=s.lr,
        weight_decay=s.weight_decay,
        scheduler="cosine",
        warmup_epochs=s.warmup_fraction,
        min_lr=s.lr * 0.01,
        label_smoothing=s.label_smoothing,
        clip_grad=1.0,
        # The images are drawn fresh for every step (one epoch of steps * batch images), so no augmentation is
        # needed; crops would cut objects and blur the masks, so they are off (full-frame crop, flips only).
        crop_scale=[1.0, 1.0],
        crop_ratio=[1.0, 1.0],
        hflip=0.5,
        eval_crop_pct=1.0,
        eval_crop_mode="squash",
        workers=0,
        threads=s.threads,
        seed=s.seed,
        device="cpu",
        progress=False,
        synthetic_train_images=steps * s.batch_size,
        synthetic_val_images=s.val_images,
        synthetic_classes=s.classes,
    )


def train_pair(s: EmergenceSettings) -> tuple[dict[str, TrainedModel], dict[str, Any]]:
    """Train CRATE and the matched ViT with the same recipe, images and step count.

    Returns:
        ``({"crate": ..., "vit": ...}, budget)`` where ``budget`` records the step-time calibration.
    """
    torch.manual_seed(s.seed)
    crate = _build(s.crate_model, s.image_size, s.classes)
    vit_kwargs, vit_params = matched_vit_kwargs(crate, s.image_size, s.classes, s.vit_model)
    vit = _build(s.vit_model, s.image_size, s.classes, **vit_kwargs)
    budget: dict[str, Any] = {"minutes_per_model": s.minutes_per_model}
    if s.max_steps is not None:
        steps = int(s.max_steps)
        budget["steps_from"] = "fixed (--max-steps)"
    else:
        t_crate = measure_step_time(crate, s.image_size, s.batch_size)
        t_vit = measure_step_time(vit, s.image_size, s.batch_size)
        # both models get the step count the slower one fits in the budget (same images, same schedule)
        steps = max(1, int(s.minutes_per_model * 60 / max(t_crate, t_vit)))
        budget.update(step_seconds={"crate": t_crate, "vit": t_vit}, steps_from="budget / slower step time")
    budget["steps"] = steps
    budget["images_seen"] = steps * s.batch_size
    log.info("training both models for %d steps of %d images", steps, s.batch_size)

    jobs = [("crate", s.crate_model, {}), ("vit", s.vit_model, vit_kwargs)]
    configs = {}
    assert s.runs is not None  # set by EmergenceSettings.__post_init__
    for name, model_name, kwargs in jobs:
        run_dir = Path(s.runs) / name
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # this experiment's own run folder, rebuilt every time
        configs[name] = _train_config(s, model_name, kwargs, steps, run_dir)
    out: dict[str, TrainedModel] = {}
    if s.parallel:
        run_seconds = _train_in_processes(configs)
        for name, model_name, kwargs in jobs:
            out[name] = _collect_run(name, model_name, kwargs, s, run_seconds[name])
    else:
        from crate_vis.train import train

        for name, model_name, kwargs in jobs:
            t0 = time.perf_counter()
            result = train(configs[name])
            seconds = time.perf_counter() - t0
            model = result.model.cpu().eval()
            out[name] = TrainedModel(
                name=name, model=model, model_name=model_name, model_kwargs=kwargs, params=param_count(model),
                steps=int(result.steps), seconds=seconds, val_top1=result.best_metric,
                run_dir=str(configs[name].out), history=list(result.history),
            )  # fmt: skip
    for name, t in out.items():
        log.info("%s: %d steps in %.0f s, val top-1 %s", name, t.steps, t.seconds, t.val_top1)
    if out["vit"].params != vit_params:
        raise RuntimeError(f"the trained ViT has {out['vit'].params} parameters, the matched one {vit_params}")
    return out, budget


def _train_in_processes(configs: dict[str, Any]) -> dict[str, float]:
    """Run :func:`crate_vis.train.train` for each config in its own process, at the same time.

    Returns:
        Wall seconds of each run.

    Raises:
        RuntimeError: a run failed (its traceback is on stderr).
    """
    import multiprocessing as mp

    from crate_vis.train import train

    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked OpenMP or autograd state
    procs = {name: ctx.Process(target=train, args=(cfg,), name=f"train-{name}") for name, cfg in configs.items()}
    start = time.perf_counter()
    for p in procs.values():
        p.start()
    seconds: dict[str, float] = {}
    while len(seconds) < len(procs):
        for name, p in procs.items():
            if name not in seconds and not p.is_alive():
                p.join()
                seconds[name] = time.perf_counter() - start
        time.sleep(0.5)
    failed = [f"{n} (exit code {p.exitcode})" for n, p in procs.items() if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"training failed: {', '.join(failed)}; see the traceback above")
    return seconds


def _collect_run(name: str, model_name: str, kwargs: dict[str, Any], s: EmergenceSettings, seconds: float):
    """The final weights and metrics of a finished run folder (``last.pt``)."""
    from crate_vis import load_checkpoint
    from crate_vis.train.checkpointing import load_training_state

    assert s.runs is not None  # set by EmergenceSettings.__post_init__
    run_dir = Path(s.runs) / name
    state = load_training_state(run_dir / "last.pt")
    model = _build(model_name, s.image_size, s.classes, **kwargs)
    load_checkpoint(model, state["model"], strict=True)
    return TrainedModel(
        name=name, model=model.eval(), model_name=model_name, model_kwargs=kwargs, params=param_count(model),
        steps=int(state["step"]), seconds=seconds, val_top1=state.get("best_metric"), run_dir=str(run_dir),
        history=list(state.get("history", [])),
    )  # fmt: skip


# -------------------------------------------------------------------------------------------------- scoring
@dataclass
class TestBatch:
    """Held-out images with their ground truth."""

    images: torch.Tensor  # (B, 3, S, S) normalised
    pixels: np.ndarray  # (B, S, S, 3) uint8
    masks: np.ndarray  # (B, S, S) bool
    labels: torch.Tensor  # (B,)
    coco: dict[str, Any]  # COCO instances of these images (ids 1..B)


def test_batch(n: int, image_size: int, seed: int, classes: int) -> TestBatch:
    """The first ``n`` images of the synthetic ``test`` split (disjoint from train and val)."""
    from crate_vis.data.synthetic import SyntheticShapes, coco_instances
    from crate_vis.data.transforms import to_tensor

    ds = SyntheticShapes("test", n, image_size=image_size, seed=seed, num_classes=classes)
    samples = [ds.render(i) for i in range(n)]
    pixels = np.stack([s.image for s in samples])
    images = torch.stack([to_tensor(_pil(p)) for p in pixels])  # (B, 3, S, S)
    return TestBatch(
        images=images, pixels=pixels, masks=np.stack([s.mask for s in samples]),
        labels=torch.tensor([s.label for s in samples]), coco=coco_instances(ds),
    )  # fmt: skip


def _pil(arr: np.ndarray):  # noqa: ANN202
    from PIL import Image

    return Image.fromarray(arr, mode="RGB")


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def accuracy(model: nn.Module, batch: TestBatch, chunk: int = 64) -> float:
    """Top-1 accuracy (%) on the test images."""
    model.eval()
    preds = torch.cat([model(batch.images[s]).argmax(1) for s in _chunks(len(batch.images), chunk)])
    return float((preds == batch.labels).float().mean() * 100)


def _cls_attention(model: nn.Module, images: torch.Tensor, layer: int, chunk: int = 64) -> torch.Tensor:
    from crate_vis.hooks import cls_attention_maps

    return torch.cat([cls_attention_maps(model, images[s], layer) for s in _chunks(len(images), chunk)])


@torch.no_grad()
def score_attention(model: nn.Module, batch: TestBatch, mass: float = 0.6) -> list[dict[str, Any]]:
    """DINO-mask Jaccard of every layer and head against the ground-truth masks.

    Returns:
        One dict per layer: ``heads_mean`` (mean over heads of the per-head IoU), ``mean_attention`` (IoU of the
        mask of the head-averaged attention), ``union`` (IoU of the union of the heads' masks), ``best_image``
        (best head per image: oracle), ``per_head`` (each head's mean IoU), ``best_fixed_head`` and its IoU
        ``best_head`` (chosen with the ground truth), ``attention_in_object`` (fraction of the CLS attention to
        patches that falls on patches at least half covered by the object, averaged over heads and images).
    """
    from crate_vis.metrics import attention_mass_inside, fg_jaccard
    from crate_vis.models import token_geometry
    from crate_vis.segmentation import dino_foreground, dino_masks
    from crate_vis.segmentation.masks import upsample_masks

    model.eval()
    geom = token_geometry(model, tuple(batch.images.shape[-2:]))
    gh, gw = geom.grid
    ph, pw = geom.patch_size
    # fraction of each patch covered by the object, for the attention-mass score
    cover = batch.masks.reshape(len(batch.masks), gh, ph, gw, pw).mean(axis=(2, 4)) >= 0.5  # (B, gh, gw)
    out = []
    for layer in range(int(getattr(model, "depth", len(cast(nn.ModuleList, model.blocks))))):
        attn = _cls_attention(model, batch.images, layer).float()  # (B, h, gh, gw)
        heads = upsample_masks(dino_masks(attn, mass), geom.patch_size).numpy()  # (B, h, S, S)
        mean_fg = upsample_masks(dino_foreground(attn, mass, combine="mean"), geom.patch_size).numpy()  # (B, S, S)
        per_head = fg_jaccard(list(heads), list(batch.masks))
        mean_attn = fg_jaccard(list(mean_fg), list(batch.masks))
        inside = attention_mass_inside(attn, torch.from_numpy(cover))  # (B, h)
        out.append({
            "layer": layer,
            "heads_mean": per_head["mean"],
            "mean_attention": mean_attn["mean"],
            "union": per_head["union"],
            "best_image": per_head["best"],
            "per_head": per_head["per_head"],
            "best_fixed_head": per_head["best_fixed_head"],
            "best_head": max(per_head["per_head"]),
            "attention_in_object": float(inside.mean()),
        })  # fmt: skip
    return out


@torch.no_grad()
def score_maskcut(
    model: nn.Module, batch: TestBatch, layer: int, tau: float = 0.15, max_masks: int = 3
) -> tuple[dict[str, Any], list[np.ndarray], list[dict[str, Any]]]:
    """MaskCut on one layer's per-head features, scored by class-agnostic COCO AP (pycocotools).

    Returns:
        ``(scores, masks, detections)``: AP, AP50, AP75, AR... from :func:`crate_vis.metrics.coco_ap`, each image's
        ``(K, S, S)`` masks, and the COCO results that were scored (image ids ``1..B``).
    """
    from crate_vis.hooks import subspace_features
    from crate_vis.io.coco import masks_to_results
    from crate_vis.metrics import coco_ap
    from crate_vis.models import token_geometry
    from crate_vis.segmentation import maskcut
    from crate_vis.segmentation.masks import upsample_masks

    model.eval()
    geom = token_geometry(model, tuple(batch.images.shape[-2:]))
    results: list[dict[str, Any]] = []
    all_masks = []
    for s in _chunks(len(batch.images), 64):
        feats = subspace_features(model, batch.images[s], layer)  # (b, h, N, dh)
        b, h, n, dh = feats.shape
        feats = feats.permute(0, 2, 1, 3).reshape(b, n, h * dh)  # (b, N, h*dh): heads concatenated
        for j in range(b):
            image_id = s.start + j + 1
            res = maskcut(feats[j].double().numpy(), geom.grid, tau=tau, max_masks=max_masks)
            masks = upsample_masks(torch.from_numpy(res.masks), geom.patch_size).numpy()  # (K, S, S)
            all_masks.append(masks)
            if len(res):
                results += masks_to_results(image_id, masks, res.scores)
    scores = coco_ap(batch.coco, results)
    scores.pop("summary", None)
    return scores, all_masks, results


@torch.no_grad()
def score_whitebox(model: nn.Module, batch: TestBatch, chunk: int = 64) -> dict[str, dict[str, list[float]]]:
    """Layer-wise coding rate and sparsity (mean and std over the test images), see :mod:`crate_vis.whitebox`."""
    from crate_vis.whitebox import LayerStatsAccumulator, measure_layers

    model.eval()
    acc = LayerStatsAccumulator()
    for s in _chunks(len(batch.images), chunk):
        acc.update(measure_layers(model, batch.images[s]))
    out = {}
    for metric in ("coding_rate", "sparsity"):
        out[metric] = {"mean": acc.mean(metric).tolist(), "std": acc.std(metric).tolist()}
    return out


def centre_prior_jaccard(masks: np.ndarray) -> float:
    """Jaccard of a centred square of the mean object area: what needs no model at all."""
    from crate_vis.metrics import fg_jaccard

    b, h, w = masks.shape
    side = math.sqrt(float(masks.mean()) * h * w)
    prior = np.zeros((h, w), bool)
    y0, x0 = int(round((h - side) / 2)), int(round((w - side) / 2))
    prior[y0 : y0 + int(round(side)), x0 : x0 + int(round(side))] = True
    return float(fg_jaccard([prior] * b, list(masks))["mean"])


def evaluate(model: nn.Module, batch: TestBatch, s: EmergenceSettings) -> dict[str, Any]:
    """Every score of one model on the test batch."""
    depth = int(getattr(model, "depth", len(cast(nn.ModuleList, model.blocks))))
    attention = score_attention(model, batch, s.mass)
    maskcut_layers = []
    last_masks: list[np.ndarray] = []
    for layer in range(depth):
        scores, masks, _ = score_maskcut(model, batch, layer, s.maskcut_tau, s.maskcut_max_masks)
        maskcut_layers.append({"layer": layer, **scores})
        last_masks = masks
    return {
        "test_top1": accuracy(model, batch),
        "attention": attention,
        "maskcut": maskcut_layers,
        "whitebox": score_whitebox(model, batch),
        "_maskcut_last": last_masks,  # for the figures; not written to json
    }


# ------------------------------------------------------------------------------------------------------- run
def run_emergence(s: EmergenceSettings) -> dict[str, Any]:
    """Train both models, score them and their random initialisations, write the report and figures.

    Returns:
        The results dict that is also written to ``out/emergence.json``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _run(s)
    finally:
        torch.set_num_threads(threads)


def _run(s: EmergenceSettings) -> dict[str, Any]:
    from crate_vis.io.atomic import atomic_write_json

    t_start = time.perf_counter()
    torch.manual_seed(s.seed)
    trained, budget = train_pair(s)
    batch = test_batch(s.test_images, s.image_size, s.seed, s.classes)

    evaluated: dict[str, dict[str, Any]] = {}
    for name in MODEL_NAMES:
        t = trained[name]
        log.info("scoring trained %s", name)
        evaluated[name] = evaluate(t.model, batch, s)
        # the same architecture at random initialisation: what the training added
        torch.manual_seed(s.seed)
        init = _build(t.model_name, s.image_size, s.classes, **t.model_kwargs).eval()
        log.info("scoring random-init %s", name)
        evaluated[f"{name}_init"] = evaluate(init, batch, s)

    results: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "command": s.command or "crate-vis emergence " + " ".join(shlex.quote(a) for a in _argv_of(s)),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "budget": budget,
        "models": {
            name: {"model": t.model_name, "kwargs": t.model_kwargs, "params": t.params, "steps": t.steps,
                   "train_seconds": round(t.seconds, 1), "val_top1": t.val_top1, "run_dir": t.run_dir}
            for name, t in trained.items()
        },  # fmt: skip
        "centre_prior_jaccard": centre_prior_jaccard(batch.masks),
        "scores": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in evaluated.items()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    s.out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(trained, evaluated, batch, s)
    results["figures"] = [str(p.name) for p in figures]
    atomic_write_json(s.out / "emergence.json", results, indent=1)
    write_report(results, s.out / "emergence.md")
    return results


def _argv_of(s: EmergenceSettings) -> list[str]:
    args = ["--out", str(s.out), "--minutes-per-model", f"{s.minutes_per_model:g}", "--image-size", str(s.image_size)]
    if s.max_steps is not None and not s.fast:
        args += ["--max-steps", str(s.max_steps)]
    if s.test_images != EmergenceSettings.test_images and not s.fast:
        args += ["--test-images", str(s.test_images)]
    if s.seed:
        args += ["--seed", str(s.seed)]
    if s.threads != EmergenceSettings.threads:
        args += ["--threads", str(s.threads)]
    if s.lr != EmergenceSettings.lr:
        args += ["--lr", f"{s.lr:g}"]
    if s.batch_size != EmergenceSettings.batch_size and not s.fast:
        args += ["--batch-size", str(s.batch_size)]
    if s.parallel:
        args.append("--parallel")
    if s.fast:
        args.append("--fast")
    return args


# ---------------------------------------------------------------------------------------------------- figures
_LABELS = {"crate": "CRATE", "vit": "ViT", "crate_init": "CRATE (random init)", "vit_init": "ViT (random init)"}


def curve_figures(results: dict[str, Any], out: Path) -> list[Path]:
    """The layer-wise curves (Jaccard, MaskCut AP50, coding rate, sparsity) from the scores alone.

    Layers are numbered from 0 on the x axis, as ``--layer`` and the tables number them.
    """
    from crate_vis.viz.plots import LayerSeries, plot_layer_metric, save_figure

    sc = results["scores"]
    depth = len(sc["crate"]["attention"])

    def series(key: str, values: list[float], err: list[float] | None = None) -> LayerSeries:
        return LayerSeries(_LABELS[key], values, err)  # x: layers 0 .. depth-1

    paths = []
    prior = LayerSeries("centre-box prior", [results["centre_prior_jaccard"]] * depth)
    fig = plot_layer_metric([series(k, [r["mean_attention"] for r in sc[k]["attention"]]) for k in _LABELS],
                            "Jaccard (DINO mask)", baseline=prior,
                            title="CLS attention (head mean) vs object")  # fmt: skip
    paths.append(save_figure(fig, out / "emergence_jaccard.png", dpi=150))
    fig = plot_layer_metric([series(k, [r["AP50"] * 100 for r in sc[k]["maskcut"]]) for k in _LABELS],
                            "MaskCut AP50 (%)", title="MaskCut on each layer's features")  # fmt: skip
    paths.append(save_figure(fig, out / "emergence_maskcut.png", dpi=150))
    for metric, ylabel in (("coding_rate", "coding rate"), ("sparsity", "fraction of zeros")):
        wb = [series(k, sc[k]["whitebox"][metric]["mean"], sc[k]["whitebox"][metric]["std"]) for k in _LABELS]
        fig = plot_layer_metric(wb, ylabel, title=f"{metric.replace('_', ' ')} by layer")
        paths.append(save_figure(fig, out / f"emergence_{metric}.png", dpi=150))
    return paths


def write_figures(
    trained: dict[str, TrainedModel], evaluated: dict[str, dict[str, Any]], batch: TestBatch, s: EmergenceSettings
) -> list[Path]:
    """Layer-wise curves, the head-wise attention grid and a mask comparison, as small PNGs in ``s.out``."""
    from crate_vis.segmentation import attention_maps, dino_foreground
    from crate_vis.segmentation.masks import upsample_masks
    from crate_vis.viz.grid import image_grid
    from crate_vis.viz.overlay import mask_overlay
    from crate_vis.viz.plots import HeadBlock, head_grid_figure, save_figure

    paths = curve_figures({"scores": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                                      for k, v in evaluated.items()},
                           "centre_prior_jaccard": centre_prior_jaccard(batch.masks)}, s.out)  # fmt: skip
    label = _LABELS

    # head-wise attention of the last layer for a few test images (one of each of the first classes)
    idx = list(range(min(s.figure_images, len(batch.images))))
    blocks = []
    for name in MODEL_NAMES:
        model = trained[name].model
        attn = _cls_attention(model, batch.images[idx], -1).float()  # (n, h, gh, gw)
        heat = attention_maps(attn, size=batch.images.shape[-2:], mode="bilinear").numpy()  # (n, h, S, S)
        per_head = evaluated[name]["attention"][-1]["per_head"]
        blocks.append(HeadBlock(name=f"{label[name]} (last layer)", head_ids=list(range(heat.shape[1])),
                                heat=list(heat), scores={"J": np.asarray(per_head)}))  # fmt: skip
    fig = head_grid_figure(list(batch.pixels[idx]), blocks, title="CLS attention per head (J: mean Jaccard of the head)",
                           cell_width=1.0)  # fmt: skip
    paths.append(save_figure(fig, s.out / "emergence_heads.png", dpi=110))

    # masks: image | ground truth | DINO (mean attention, best layer) and MaskCut (last layer) of both models
    cells = []
    titles = ["image", "ground truth"]
    for name in MODEL_NAMES:
        best_layer = int(np.argmax([r["mean_attention"] for r in evaluated[name]["attention"]]))
        attn = _cls_attention(trained[name].model, batch.images[idx], best_layer).float()
        fg = upsample_masks(dino_foreground(attn, s.mass, combine="mean"), batch.images.shape[-1] // attn.shape[-1])
        evaluated[name]["_fg"] = fg.numpy()
        titles += [f"{label[name]} DINO L{best_layer}", f"{label[name]} MaskCut"]
    for r, i in enumerate(idx):
        row = [batch.pixels[i], mask_overlay(batch.pixels[i], batch.masks[i])]
        for name in MODEL_NAMES:
            row.append(mask_overlay(batch.pixels[i], evaluated[name]["_fg"][r]))
            mc = evaluated[name]["_maskcut_last"][i]
            row.append(mask_overlay(batch.pixels[i], mc[0] if len(mc) else np.zeros_like(batch.masks[i])))
        cells.append(row)
    fig = image_grid(cells, col_titles=titles, cell_width=1.1, title="Masks on held-out synthetic images")
    paths.append(save_figure(fig, s.out / "emergence_masks.png", dpi=110))
    return paths


# ----------------------------------------------------------------------------------------------------- report
def _f(v: float | None, pct: bool = False, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v * 100:.1f}" if pct else f"{v:.{digits}f}"


def summary_table(results: dict[str, Any]) -> str:
    """The headline table (markdown)."""
    sc, models = results["scores"], results["models"]
    rows = [
        "| model | params | steps | train time (s) | test top-1 (%) | Jaccard, best layer (mean attn) | "
        "Jaccard, last layer (mean attn / heads mean / best fixed head) | attention on object, last layer | "
        "MaskCut AP / AP50, last layer (%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    label = {"crate": "CRATE", "vit": "ViT", "crate_init": "CRATE, random init", "vit_init": "ViT, random init"}
    for key in ("crate", "vit", "crate_init", "vit_init"):
        att, mc = sc[key]["attention"], sc[key]["maskcut"]
        best = max(range(len(att)), key=lambda i: att[i]["mean_attention"])
        base = key.split("_")[0]
        m = models[base]
        trained = key in models
        rows.append(
            f"| {label[key]} | {m['params']:,} | {m['steps'] if trained else 0} | "
            f"{m['train_seconds'] if trained else '-'} | {sc[key]['test_top1']:.1f} | "
            f"{_f(att[best]['mean_attention'])} (L{best}) | {_f(att[-1]['mean_attention'])} / "
            f"{_f(att[-1]['heads_mean'])} / {_f(att[-1]['best_head'])} (h{att[-1]['best_fixed_head']}) | "
            f"{_f(att[-1]['attention_in_object'])} | {_f(mc[-1]['AP'], True)} / {_f(mc[-1]['AP50'], True)} |"
        )
    return "\n".join(rows)


def layer_table(results: dict[str, Any]) -> str:
    """Per-layer Jaccard (mean attention / heads mean / union), MaskCut AP50, coding rate and sparsity.

    Layers are numbered from 0 (the first block), as ``--layer`` numbers them.
    """
    sc = results["scores"]
    keys = ("crate", "vit", "crate_init", "vit_init")
    head = "| layer | " + " | ".join(
        f"{k} J mean-attn / heads-mean / union | {k} MaskCut AP50 | {k} coding rate | {k} sparsity" for k in keys[:2]
    ) + " | crate_init J mean-attn | vit_init J mean-attn |"
    rows = [head, "|---" * (1 + 4 * 2 + 2) + "|"]
    depth = len(sc["crate"]["attention"])
    for layer in range(depth):
        cells = [str(layer)]
        for k in keys[:2]:
            a = sc[k]["attention"][layer]
            wb = sc[k]["whitebox"]
            cells += [
                f"{_f(a['mean_attention'])} / {_f(a['heads_mean'])} / {_f(a['union'])}",
                _f(sc[k]["maskcut"][layer]["AP50"], True),
                f"{wb['coding_rate']['mean'][layer]:.1f}",
                f"{wb['sparsity']['mean'][layer]:.3f}",
            ]
        cells += [_f(sc[k]["attention"][layer]["mean_attention"]) for k in keys[2:]]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def findings(results: dict[str, Any]) -> list[str]:
    """Plain statements read off the numbers (which model is ahead, by how much)."""
    sc = results["scores"]

    def best(key: str, metric: str = "mean_attention") -> tuple[float, int]:
        vals = [r[metric] for r in sc[key]["attention"]]
        return max(vals), int(np.argmax(vals))

    out = []
    (cj, cl), (vj, vl) = best("crate"), best("vit")
    lead = "CRATE" if cj > vj else "the ViT"
    out.append(f"Best-layer DINO Jaccard (mean attention): CRATE {cj:.3f} (layer {cl}) vs ViT {vj:.3f} (layer {vl}); "
               f"{lead} is ahead by {abs(cj - vj):.3f}.")  # fmt: skip
    (ci, _), (vi, _) = best("crate_init"), best("vit_init")
    out.append(f"Training changed the best-layer Jaccard by {cj - ci:+.3f} for CRATE and {vj - vi:+.3f} for the ViT "
               f"(random init: {ci:.3f} and {vi:.3f}); the centre-box prior scores "
               f"{results['centre_prior_jaccard']:.3f}.")  # fmt: skip
    prior = results["centre_prior_jaccard"]
    for key, name, j in (("crate", "CRATE", cj), ("vit", "The ViT", vj)):
        verdict = "above" if j > prior + 0.01 else ("below" if j < prior - 0.01 else "level with")
        share = sc[key]["attention"][-1]["attention_in_object"]
        share0 = sc[f"{key}_init"]["attention"][-1]["attention_in_object"]
        out.append(f"{name}'s best-layer Jaccard is {verdict} the centre-box prior ({j:.3f} vs {prior:.3f}); its last "
                   f"layer puts {share:.0%} of the CLS attention on object patches ({share0:.0%} at random init).")
    ca, va = sc["crate"]["maskcut"][-1]["AP50"], sc["vit"]["maskcut"][-1]["AP50"]
    out.append(f"MaskCut on the last layer: AP50 {ca * 100:.1f} % (CRATE) vs {va * 100:.1f} % (ViT).")
    out.append(f"Test accuracy: CRATE {sc['crate']['test_top1']:.1f} %, ViT {sc['vit']['test_top1']:.1f} % "
               f"(chance {100 / results['settings']['classes']:.0f} %).")  # fmt: skip
    return out


def write_report(results: dict[str, Any], path: str | Path) -> Path:
    """Write the markdown report (tables, figures, command, budget, findings) atomically."""
    from crate_vis.io.atomic import atomic_write

    s, b, models = results["settings"], results["budget"], results["models"]
    lines = [
        "# Emergent segmentation: CRATE vs a matched ViT on synthetic shapes (one CPU)",
        "",
        "Generated by `crate-vis emergence`. Everything below was measured in one run of:",
        "",
        f"    {results['command']}",
        "",
        "## Setup",
        "",
        f"* Data: `SyntheticShapes` ({s['classes']} classes, {s['image_size']} px, seed {s['seed']}): training images "
        f"drawn fresh for each step ({b['images_seen']:,} in all), {s['val_images']} validation images for the "
        f"trainer, {s['test_images']} held-out `test` images with exact masks for every score below.",
        f"* CRATE: `{models['crate']['model']}` at {s['image_size']} px, {models['crate']['params']:,} parameters.",
        f"* ViT: `{models['vit']['model']}` with {models['vit']['kwargs']}, {models['vit']['params']:,} parameters "
        f"({(models['vit']['params'] / models['crate']['params'] - 1) * 100:+.1f} % vs CRATE).",
        f"* Recipe (both): AdamW, lr {s['lr']:g} (cosine, {s['warmup_fraction']:.0%} warm-up), weight decay "
        f"{s['weight_decay']:g}, batch {s['batch_size']}, label smoothing {s['label_smoothing']:g}, gradient "
        f"clipping 1.0, horizontal flips only, {b['steps']} steps; trained with `crate_vis.train`"
        + (" (the two runs at the same time, in two processes)." if s.get("parallel") else "."),
        f"* Budget: {s['minutes_per_model']:g} min per model; step count from {b['steps_from']}"
        + (f" (measured step time: CRATE {b['step_seconds']['crate']:.2f} s, ViT {b['step_seconds']['vit']:.2f} s)"
           if "step_seconds" in b else "") + f". Actual training wall time: CRATE "
        f"{models['crate']['train_seconds']} s, ViT {models['vit']['train_seconds']} s; whole run "
        f"{results['total_seconds']} s on {results['machine']['threads']} thread(s) of a shared CPU.",
        f"* Segmentation: DINO masks keep the most-attended patches holding {s['mass']:.0%} of the CLS attention; "
        f"MaskCut (tau {s['maskcut_tau']}, up to {s['maskcut_max_masks']} masks, no CRF) on each layer's "
        "per-head features (CRATE: subspace projections; ViT: keys); COCO AP is class-agnostic (pycocotools).",
        "",
        "## Results",
        "",
        summary_table(results),
        "",
        "\"best fixed head\" and \"best layer\" are chosen with the ground truth: upper bounds, not deployable "
        "choices. \"attention on object\": share of the CLS attention to patches that lands on patches at least "
        "half covered by the object (mean over heads and images).",
        "",
        "Per layer (J: Jaccard of DINO masks with the object mask; layers numbered from 0, as `--layer` numbers "
        "them):",
        "",
        layer_table(results),
        "",
        "## What came out",
        "",
        *[f"* {line}" for line in findings(results)],
        "",
        "## Figures",
        "",
        *[f"![{name}]({name})" for name in results.get("figures", [])],
        "",
    ]
    if s.get("fast"):
        lines.insert(2, "**Smoke test (`--fast`): a few steps on tiny images; these numbers mean nothing.**\n")
    dest = Path(path)
    with atomic_write(dest, "w") as fh:
        fh.write("\n".join(lines))
    return dest


def rebuild_report(out: str | Path) -> dict[str, Any]:
    """Rewrite ``emergence.md`` and the layer-curve figures from ``out/emergence.json`` (after editing the report
    code); the attention and mask figures, which need the models, are kept as they are."""
    out = Path(out)
    path = out / "emergence.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the experiment first")
    results = json.loads(path.read_text())
    curve_figures(results, out)
    write_report(results, out / "emergence.md")
    return results
