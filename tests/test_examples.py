"""Every script in examples/ runs in --fast mode and produces what it says (as a subprocess, like a user would)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, out: Path, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--fast", "--out", str(out), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _default_model():
    from crate_vis import load_model
    from crate_vis.models.pretrained import default_weights

    return load_model(default_weights())


def _cls_attention(model, x: torch.Tensor, layer: int = -1) -> np.ndarray:
    """``(B, heads, N)`` CLS attention over the patch tokens, read off the softmax of the explicit attention path."""
    model.set_fused(False)
    store = {}
    hook = model.blocks[layer].attn.attend.register_forward_hook(lambda m, i, o: store.setdefault("attn", o))
    with torch.no_grad():
        model(x)
    hook.remove()
    model.set_fused(True)
    return store["attn"][:, :, 0, 1:].double().numpy()


def _dino_mask(a: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """The smallest set of patches holding ``mass`` of the attention ``a`` (N,), most attended first."""
    a = a / a.sum()
    order = np.argsort(-a, kind="stable")
    keep = np.zeros(a.shape, bool)
    keep[order[: int(np.searchsorted(np.cumsum(a[order]), mass - 1e-12) + 1)]] = True
    return keep


def _to_pixels(tokens: np.ndarray, grid: int, patch: int) -> np.ndarray:
    return np.kron(tokens.reshape(grid, grid), np.ones((patch, patch), int)).astype(bool)


def test_every_example_is_tested():
    tested = {"head_attention.py", "segment_and_score.py", "train_compare.py", "whitebox_layers.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_head_attention(tmp_path):
    out = run_example("head_attention.py", tmp_path)
    assert (tmp_path / "head_attention.png").stat().st_size > 5000
    printed = re.findall(r"head (\d+): (\d+)% of the attention on the object, DINO-mask IoU ([\d.]+)", out)
    assert [int(h) for h, _, _ in printed] == list(range(6))  # the embedded default has 6 heads
    # by hand: the example's synthetic image at the model's size, so one patch is 8x8 pixels of the mask
    from crate_vis.data.image_geometry import prepare_image
    from crate_vis.data.synthetic import SyntheticShapes

    model = _default_model()
    side, patch = int(model.config["image_size"][0]), 8
    grid = side // patch
    image, _, mask = SyntheticShapes("val", 8, image_size=side, seed=0).sample(3)
    prep = prepare_image(image, patch, side)
    assert tuple(prep.tensor.shape[-2:]) == mask.shape == (side, side)  # the model sees the image as it is
    attn = _cls_attention(model, prep.tensor[None])[0]  # (heads, N)
    cover = mask.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).ravel()  # object share of each patch
    share = (attn * cover).sum(1) / attn.sum(1)  # (heads,)
    for (h, pct, iou), s in zip(printed, share):
        assert abs(int(pct) - 100 * s) <= 0.5 + 1e-6, (h, pct, s)
        pix = _to_pixels(_dino_mask(attn[int(h)]), grid, patch)
        assert abs(float(iou) - (pix & mask).sum() / (pix | mask).sum()) <= 0.005 + 1e-9, (h, iou)
    assert len({pct for _, pct, _ in printed}) > 1  # heads differ: the numbers are per head


def test_segment_and_score(tmp_path):
    out = run_example("segment_and_score.py", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results and {"image_id", "segmentation", "score", "category_id"} <= results[0].keys()
    assert {r["image_id"] for r in results} <= set(range(1, 7))
    printed = re.search(r"COCO AP ([\d.]+)  AP50 ([\d.]+)  AP75 ([\d.]+)  AR100 ([\d.]+)", out)
    jac = float(re.search(r"foreground Jaccard ([\d.]+) over 6 images", out).group(1))

    # by hand: the same synthetic images (64 px, the model's size: one patch is 8x8 pixels), their DINO masks from
    # the head-averaged attention of the last layer, pycocotools on the written results, Jaccard pixel by pixel
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from crate_vis.data.image_geometry import prepare_image
    from crate_vis.data.synthetic import write_dataset
    from crate_vis.io.images import load_image

    model = _default_model()
    side, patch = int(model.config["image_size"][0]), 8
    root = write_dataset(tmp_path / "synthetic", num_train=0, num_val=6, image_size=side, seed=0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "annotations" / "instances_val.json"))
    ious = []
    for image_id in sorted(gt.getImgIds()):
        info = gt.loadImgs(image_id)[0]
        truth = np.any([gt.annToMask(a).astype(bool) for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id))], axis=0)
        prep = prepare_image(load_image(root / "val" / info["file_name"]), patch, side)
        assert tuple(prep.tensor.shape[-2:]) == truth.shape == (side, side)
        attn = _cls_attention(model, prep.tensor[None])[0]  # (heads, N)
        expected = _to_pixels(_dino_mask((attn / attn.sum(1, keepdims=True)).mean(0)), side // patch, patch)
        written = [mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
                   for r in results if r["image_id"] == image_id]  # fmt: skip
        assert len(written) == 1 and np.array_equal(written[0].astype(bool), expected)
        ious.append((expected & truth).sum() / (expected | truth).sum())
    assert abs(jac - np.mean(ious)) <= 0.0005 + 1e-9
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(str(tmp_path / "results.json")), "segm")
        ev.params.useCats = 0
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for value, stat in zip(printed.groups(), (ev.stats[0], ev.stats[1], ev.stats[2], ev.stats[8])):
        assert abs(float(value) - 100 * stat) <= 0.05 + 1e-9, (printed.groups(), ev.stats)


def test_whitebox_layers(tmp_path):
    out = run_example("whitebox_layers.py", tmp_path)
    rows = re.findall(r"^\s+(\d) \|\s+([\d.]+) \(.*\|\s+([\d.]+) \(", out, flags=re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3, 4, 5]  # numbered from 0, as --layer numbers them
    # by hand: the fraction of exact zeros of each layer's ISTA output (all tokens), mean over the 8 images
    from crate_vis.data.synthetic import SyntheticShapes
    from crate_vis.data.transforms import to_tensor

    model = _default_model()
    data = SyntheticShapes("val", 8, image_size=int(model.config["image_size"][0]), seed=0)
    images = torch.stack([to_tensor(data.sample(i)[0]) for i in range(8)])  # (8, 3, S, S)
    zeros = []
    hooks = [blk.ista.register_forward_hook(lambda m, i, o: zeros.append((o == 0).double().mean(dim=(1, 2))))
             for blk in model.blocks]  # fmt: skip
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    sparsity = torch.stack(zeros).mean(1).numpy()  # (layers,)
    assert len(set(np.round(sparsity, 3))) > 1
    for row, expected in zip(rows, sparsity):
        assert abs(float(row[2]) - expected) <= 0.0005 + 1e-9, (row, expected)
    assert (tmp_path / "coding_rate.png").exists() and (tmp_path / "sparsity.png").exists()


@pytest.mark.slow
def test_train_compare(tmp_path):
    out = run_example("train_compare.py", tmp_path)
    assert re.search(r"^crate\s+crate_test_patch8_32\s+52,618\s+2\s", out, flags=re.M), out
    assert re.search(rf"^vit\s+vit_tiny_patch16_224\s+{_vit_params(36, 3, 8, 32, 10):,}\s+2\s", out, flags=re.M), out
    for name in ("crate", "vit"):
        assert (tmp_path / name / "best" / "model.safetensors").exists()


def _vit_params(d: int, depth: int, patch: int, size: int, classes: int, mlp_ratio: int = 4) -> int:
    """A timm ViT's parameter count from its architecture alone (independent of the code that prints it)."""
    tokens = (size // patch) ** 2 + 1
    embed = 3 * patch * patch * d + d + d + tokens * d  # conv patch embedding, CLS token, position embedding
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp_ratio * d + mlp_ratio * d) + (mlp_ratio * d * d + d)
    return embed + depth * block + 2 * d + d * classes + classes  # final norm and head
