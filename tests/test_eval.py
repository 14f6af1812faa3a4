"""Evaluation metrics against scikit-learn, and ``crate-vis eval`` end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, top_k_accuracy_score
from test_train import make_image_folder
from torch import nn

from crate_vis.train.evaluation import evaluate_model, write_eval_report


class Linear(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_metrics_match_sklearn():
    classes = [f"c{i}" for i in range(7)]
    model = Linear(7).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 7, (n,), generator=g)) for n in (9, 16, 5)]
    result = evaluate_model(model, batches, classes)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches]).numpy()
    with torch.no_grad():
        logits = model(x).numpy()
    pred = logits.argmax(1)
    np.testing.assert_array_equal(result.confusion, confusion_matrix(y, pred, labels=range(7)))
    assert result.top1 == pytest.approx(100 * accuracy_score(y, pred))
    assert result.k == 5
    assert result.topk == pytest.approx(100 * top_k_accuracy_score(y, logits, k=5, labels=range(7)))
    ce = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y))
    assert result.loss == pytest.approx(float(ce), rel=1e-5)
    per = {r["class"]: r for r in result.per_class}
    for c in range(7):
        mask = y == c
        expected = None if not mask.any() else 100 * float((pred[mask] == c).mean())
        assert per[f"c{c}"]["accuracy"] == (pytest.approx(expected) if expected is not None else None)


def test_report_files(tmp_path):
    result = evaluate_model(Linear(3).eval(), [(torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 1]))], ["a", "b", "c"])
    paths = write_eval_report(result, tmp_path)
    data = json.loads(paths["metrics"].read_text())
    assert data["k"] == 3 and data["top3"] == 100.0  # top-5 capped at 3 classes
    assert np.asarray(data["confusion"]).sum() == 6
    assert paths["confusion"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(paths["per_class"])))
    assert [r["class"] for r in rows] == ["a", "b", "c"] and [int(r["images"]) for r in rows] == [2, 3, 1]


def test_cli_eval_on_image_folder(tmp_path, capsys, caplog):
    from crate_vis import create_model, save_model
    from crate_vis.cli import main
    from crate_vis.data.folders import ImageFolderDataset
    from crate_vis.train.config import TrainConfig
    from crate_vis.train.data import build_transform

    root = make_image_folder(tmp_path / "data", classes=("ants", "bees", "wasps"), per_class=4, size=20)
    (root / "val" / "bees" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    torch.manual_seed(0)
    model = create_model("crate_test_patch8_32", num_classes=3).eval()
    save_model(model, tmp_path / "m", metadata={"classes": ["ants", "bees", "wasps"], "img_size": 32})
    rc = main(["eval", "--data", str(root), "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "ev"),
               "--workers", "0", "--batch-size", "4"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "zz_broken.png" in caplog.text and "1 unreadable image(s) skipped" in captured.out
    # reference: the same model on the same transformed images, scored by scikit-learn
    ds = ImageFolderDataset(root / "val", transform=build_transform(TrainConfig(data="x"), False, 32))
    xs, ys = zip(*[ds[i] for i in range(len(ds)) if not ds.samples[i][0].endswith("zz_broken.png")])
    with torch.no_grad():
        pred = model(torch.stack(xs)).argmax(1).numpy()
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and metrics["k"] == 3
    assert metrics["top1"] == pytest.approx(100 * accuracy_score(ys, pred))
    np.testing.assert_array_equal(metrics["confusion"], confusion_matrix(ys, pred, labels=range(3)))
    assert (tmp_path / "ev" / "confusion.png").is_file()


def test_cli_eval_errors_are_one_line(tmp_path, capsys):
    from crate_vis import create_model, save_model
    from crate_vis.cli import main

    root = make_image_folder(tmp_path / "data", per_class=2, size=16)
    torch.save(create_model("crate_test_patch8_32", num_classes=2).state_dict(), tmp_path / "bare.pt")
    rc = main(["eval", "--data", str(root), "--checkpoint", str(tmp_path / "bare.pt"), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "pass --model" in err[0]
    rc = main(["eval", "--data", str(root), "--checkpoint", str(tmp_path / "bare.pt"), "--model", "crate_mini_patch8_96",
               "--num-classes", "2", "--workers", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "does not fit" in err[0]
    save_model(create_model("crate_test_patch8_32", num_classes=5), tmp_path / "five")
    rc = main(["eval", "--data", str(root), "--checkpoint", str(tmp_path / "five"), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "5 outputs but the data has 2 classes" in err[-1]
