"""The emergence experiment: its pieces against hand computations, and the whole pipeline in --fast mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crate_vis.experiments import emergence as emergence_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def em():
    return emergence_module


def test_matched_vit_has_crate_depth_heads_patch_and_close_parameter_count(em):
    from crate_vis import create_model

    crate = create_model("crate_test_patch8_32")
    kwargs, n = em.matched_vit_kwargs(crate, 32, 10)
    assert (kwargs["depth"], kwargs["num_heads"], kwargs["patch_size"]) == (3, 4, 8)
    vit = create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, **kwargs)
    assert em.param_count(vit) == n
    target = em.param_count(crate)
    assert abs(n - target) / target < 0.08
    # no other width of the search (multiples of the head count) is closer
    for width in (kwargs["embed_dim"] - 4, kwargs["embed_dim"] + 4):
        other = create_model("vit_tiny_patch16_224", num_classes=10, img_size=32,
                             **{**kwargs, "embed_dim": width})  # fmt: skip
        assert abs(em.param_count(other) - target) >= abs(n - target)


def test_centre_prior_known_answers(em):
    masks = np.zeros((2, 10, 10), bool)
    masks[:, 3:7, 3:7] = True  # a centred 4x4 square: the prior is exactly it
    assert em.centre_prior_jaccard(masks) == pytest.approx(1.0)
    corner = np.zeros((1, 10, 10), bool)
    corner[0, :4, :4] = True  # same area in a corner: the centred 4x4 square overlaps it in 1 pixel
    assert em.centre_prior_jaccard(corner) == pytest.approx(1 / 31)


def test_score_attention_matches_a_direct_computation(em):
    """Per-head DINO masks of each layer, IoU with the ground truth, computed here with numpy alone."""
    from crate_vis import create_model

    torch.manual_seed(0)
    model = create_model("crate_test_patch8_32").eval()
    batch = em.test_batch(6, 32, seed=1, classes=10)
    scores = em.score_attention(model, batch, mass=0.6)
    assert len(scores) == model.depth
    model.set_fused(False)  # the explicit path materialises the attention: record it through the softmax module
    store = {}
    handles = [blk.attn.attend.register_forward_hook(lambda m, i, o, k=k: store.__setitem__(k, o))
               for k, blk in enumerate(model.blocks)]  # fmt: skip
    with torch.no_grad():
        model(batch.images)
    for h in handles:
        h.remove()
    for layer, row in enumerate(scores):
        cls = store[layer][:, :, 0, 1:].numpy()  # (B, heads, 16) CLS row over patches
        ious = np.zeros(cls.shape[:2])
        for b in range(cls.shape[0]):
            for k in range(cls.shape[1]):
                a = cls[b, k] / cls[b, k].sum()
                order = np.argsort(-a, kind="stable")
                n_keep = int(np.searchsorted(np.cumsum(a[order]), 0.6 - 1e-12) + 1)  # smallest set holding 60 %
                keep = np.zeros(16, bool)
                keep[order[:n_keep]] = True
                pix = np.kron(keep.reshape(4, 4), np.ones((8, 8), bool)).astype(bool)
                gt = batch.masks[b]
                ious[b, k] = (pix & gt).sum() / (pix | gt).sum()
        assert row["heads_mean"] == pytest.approx(ious.mean(), abs=1e-6)
        assert row["per_head"] == pytest.approx(ious.mean(axis=0).tolist(), abs=1e-6)
        assert row["best_image"] == pytest.approx(ious.max(axis=1).mean(), abs=1e-6)
        # share of each head's CLS attention to patches that lands on patches at least half covered by the object
        cover = batch.masks.reshape(6, 4, 8, 4, 8).mean(axis=(2, 4)).reshape(6, 1, 16) >= 0.5  # (B, 1, 16)
        share = (cls * cover).sum(-1) / cls.sum(-1)  # (B, heads)
        assert row["attention_in_object"] == pytest.approx(share.mean(), abs=1e-6)
        assert row["layer"] == layer


def test_maskcut_scores_are_pycocotools_ap(em):
    """The AP reported equals COCOeval (class-agnostic) run here on the detections, against masks decoded here."""
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from crate_vis import create_model
    from crate_vis.hooks import subspace_features

    torch.manual_seed(0)
    model = create_model("crate_test_patch8_32").eval()
    batch = em.test_batch(6, 32, seed=2, classes=10)
    scores, masks, dets = em.score_maskcut(model, batch, layer=-1)
    assert len(masks) == 6 and sum(len(m) for m in masks) == len(dets) == scores["n_detections"] > 0
    # the first cut of each image runs on the unpainted graph: its score is 1 - Ncut / 2 on the binarised cosine
    # graph of the last layer's features (heads concatenated, tau 0.15, non-edges 1e-5), computed here by hand
    feats = subspace_features(model, batch.images, -1)  # (B, h, 16, dh)
    feats = feats.permute(0, 2, 1, 3).reshape(6, 16, -1).double().numpy()  # (B, 16, h*dh)
    first_seen = set()
    checked = 0
    for det in dets:  # every detection is one of the image's masks, RLE-encoded at the image size
        decoded = mask_utils.decode({"size": det["segmentation"]["size"],
                                     "counts": det["segmentation"]["counts"].encode()}).astype(bool)  # fmt: skip
        assert any(np.array_equal(decoded, m) for m in masks[det["image_id"] - 1])
        if det["image_id"] in first_seen:
            continue
        first_seen.add(det["image_id"])
        f = feats[det["image_id"] - 1]
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        a = np.where(f @ f.T > 0.15, 1.0, 1e-5)  # (16, 16)
        s = decoded[::8, ::8].ravel()  # token mask (4x4 grid of 8-pixel patches)
        cut = a[s][:, ~s].sum()
        ncut = cut / a[s].sum() + cut / a[~s].sum()
        assert det["score"] == pytest.approx(1 - ncut / 2, abs=1e-9)
        checked += 1
    assert checked == len({d["image_id"] for d in dets}) > 0
    gt_dict = json.loads(json.dumps(batch.coco))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(json.loads(json.dumps(dets))), "segm")
        ev.params.useCats = 0
        ev.params.catIds = sorted(set(gt.getCatIds()) | {1})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert scores["AP"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert scores["AP50"] == pytest.approx(ev.stats[1], abs=1e-12)
    # ground-truth masks in the COCO dict are the rendered masks
    for img in gt_dict["images"]:
        ann = gt.loadAnns(gt.getAnnIds(imgIds=img["id"]))[0]
        np.testing.assert_array_equal(gt.annToMask(ann).astype(bool), batch.masks[img["id"] - 1])


def _scores(best_layer: int, depth: int = 3) -> dict:
    """Scores of one model whose head-mean Jaccard peaks at ``best_layer``."""
    mean_attention = [0.1 + 0.01 * k for k in range(depth)]
    mean_attention[best_layer] = 0.5
    att = [{"layer": k, "mean_attention": mean_attention[k], "heads_mean": 0.2, "union": 0.3, "best_head": 0.4,
            "best_fixed_head": 1, "per_head": [0.0, 0.4], "attention_in_object": 0.25} for k in range(depth)]  # fmt: skip
    mc = [{"layer": k, "AP": 0.05, "AP50": 0.1} for k in range(depth)]
    wb = {m: {"mean": [1.0] * depth, "std": [0.1] * depth} for m in ("coding_rate", "sparsity")}
    return {"attention": att, "maskcut": mc, "whitebox": wb, "test_top1": 50.0}


def _results() -> dict:
    model = {"params": 1000, "steps": 2, "train_seconds": 1.0}
    return {
        "scores": {"crate": _scores(0), "vit": _scores(2), "crate_init": _scores(1), "vit_init": _scores(1)},
        "models": {"crate": model, "vit": model}, "centre_prior_jaccard": 0.2, "settings": {"classes": 10},
    }  # fmt: skip


def test_report_numbers_layers_from_zero_like_the_layer_option(em):
    """Tables and findings name layers 0..depth-1, the numbers ``--layer`` takes."""
    results = _results()
    rows = em.summary_table(results).splitlines()
    crate_row = next(r for r in rows if r.startswith("| CRATE |"))
    vit_row = next(r for r in rows if r.startswith("| ViT |"))
    assert "(L0)" in crate_row and "(L2)" in vit_row
    assert [row.split("|")[1].strip() for row in em.layer_table(results).splitlines()[2:]] == ["0", "1", "2"]
    assert "CRATE 0.500 (layer 0) vs ViT 0.500 (layer 2)" in em.findings(results)[0]


def test_layer_curves_put_layers_at_zero_to_depth_minus_one(em, tmp_path, monkeypatch):
    import crate_vis.viz.plots as plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figures.append(fig) or Path(path))
    em.curve_figures(_results(), tmp_path)
    assert len(figures) == 4
    for fig in figures:
        lines = fig.axes[0].lines
        assert lines and all(list(line.get_xdata()) == [0, 1, 2] for line in lines)
        fig.clf()


@pytest.mark.slow
def test_fast_run_end_to_end(tmp_path):
    """``crate-vis emergence --fast``: trains both models a few steps, scores, writes json, report and figures."""
    out = tmp_path / "em"
    proc = subprocess.run(
        [sys.executable, "-m", "crate_vis", "emergence", "--out", str(out), "--fast"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Best-layer DINO Jaccard" in proc.stdout
    res = json.loads((out / "emergence.json").read_text())
    models = res["models"]
    assert models["crate"]["steps"] == models["vit"]["steps"] == 2
    from crate_vis import create_model

    crate = create_model("crate_test_patch8_32", num_classes=10, image_size=32)
    vit_kwargs, vit_params = emergence_module.matched_vit_kwargs(crate, 32, 10)
    assert models["crate"]["params"] == emergence_module.param_count(crate)
    assert models["vit"]["params"] == vit_params and models["vit"]["kwargs"] == vit_kwargs
    assert models["vit"]["kwargs"]["depth"] == 3 and models["vit"]["kwargs"]["num_heads"] == 4
    for key in ("crate", "vit", "crate_init", "vit_init"):
        sc = res["scores"][key]
        assert len(sc["attention"]) == len(sc["maskcut"]) == 3
        for layer, r in enumerate(sc["attention"]):  # layers keyed from 0; the per-head summaries agree
            assert r["layer"] == sc["maskcut"][layer]["layer"] == layer
            assert r["heads_mean"] == pytest.approx(np.mean(r["per_head"]), abs=1e-12)
            assert r["best_head"] == max(r["per_head"]) == r["per_head"][r["best_fixed_head"]]
        assert len(sc["whitebox"]["coding_rate"]["mean"]) == 3
    # CRATE's ISTA output is a ReLU: a sizeable share of exact zeros; the ViT block output has almost none
    assert min(res["scores"]["crate"]["whitebox"]["sparsity"]["mean"]) > 0.2
    assert max(res["scores"]["vit"]["whitebox"]["sparsity"]["mean"]) < 0.05
    report = (out / "emergence.md").read_text()
    assert "Smoke test" in report and "| CRATE |" in report and "crate-vis emergence" in report
    best = int(np.argmax([r["mean_attention"] for r in res["scores"]["crate"]["attention"]]))
    assert f"(layer {best})" in proc.stdout and f"(L{best})" in report
    assert "\n| 0 | " in report and "\n| 3 | " not in report  # the per-layer table numbers layers 0..2
    for name in res["figures"]:
        assert (out / name).stat().st_size > 1000
        assert f"({name})" in report
