"""Every script in examples/ runs in --fast mode and produces what it says (as a subprocess, like a user would)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, out: Path, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--fast", "--out", str(out), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_every_example_is_tested():
    tested = {"head_attention.py", "segment_and_score.py", "train_compare.py", "whitebox_layers.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_head_attention(tmp_path):
    out = run_example("head_attention.py", tmp_path)
    assert (tmp_path / "head_attention.png").stat().st_size > 5000
    shares = [int(m) for m in re.findall(r"head \d+: (\d+)% of the attention on the object", out)]
    assert len(shares) == 6  # the embedded default has 6 heads
    assert all(0 <= s <= 100 for s in shares) and len(set(shares)) > 1  # heads differ: the numbers are per head


def test_segment_and_score(tmp_path):
    out = run_example("segment_and_score.py", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results and {"image_id", "segmentation", "score", "category_id"} <= results[0].keys()
    assert {r["image_id"] for r in results} <= set(range(1, 7))
    ap = float(re.search(r"COCO AP ([\d.]+)", out).group(1))
    jac = float(re.search(r"foreground Jaccard ([\d.]+) over 6 images", out).group(1))
    assert 0 <= ap <= 100 and 0 < jac <= 1


def test_whitebox_layers(tmp_path):
    out = run_example("whitebox_layers.py", tmp_path)
    rows = re.findall(r"^\s+(\d) \|\s+([\d.]+) \(.*\|\s+([\d.]+) \(", out, flags=re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(0 < float(r[2]) < 1 for r in rows)  # fraction of zeros of the ISTA output
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
