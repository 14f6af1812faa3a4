"""Trainer: recipes, schedule, gradient clipping, fine-tuning, bad inputs, datasets, run-folder outputs."""

from __future__ import annotations

import csv
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis.train import NonFiniteLossError, Trainer, resolve_config, topk_correct, train
from crate_vis.train.config import TrainConfig, list_recipes, load_recipe


def make_image_folder(root: Path, classes=("ants", "bees"), per_class: int = 6, size: int = 24, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/*.png``: class ``k`` is tinted towards colour channel ``k``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                arr[..., k % 3] = np.clip(arr[..., k % 3].astype(int) + 120, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{name}_{i}.png")
    return root


class TensorSet(torch.utils.data.Dataset):
    """Fixed random images with a ``classes`` attribute; optionally NaN images after ``nan_after`` reads."""

    def __init__(self, n: int = 16, classes: int = 3, size: int = 32, nan_after: int | None = None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.arange(n) % classes
        self.classes = [f"c{i}" for i in range(classes)]
        self.nan_after = nan_after
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        x = self.x[i]
        if self.nan_after is not None and self.reads > self.nan_after:
            x = torch.full_like(x, float("nan"))
        return x, int(self.y[i])


def tiny_cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(data="custom", model="crate_test_patch8_32", img_size=32, epochs=2, batch_size=8, workers=0,
                out=str(tmp_path / "run"), progress=False, lr=1e-3)  # fmt: skip
    base.update(kw)
    return resolve_config(None, **base)


# ------------------------------------------------------------------------------------------------- recipes
def test_shipped_recipes_resolve_and_paper_values():
    assert {"crate_paper_imagenet", "crate_official_readme", "crate_cifar_finetune"} <= set(list_recipes())
    for name in list_recipes():
        resolve_config(name, data="synthetic")
    paper = resolve_config("crate_paper_imagenet", data="x")
    assert (paper.optimizer, paper.lr, paper.weight_decay, paper.batch_size) == ("lion", 2.4e-4, 0.5, 2048)
    assert (paper.warmup_epochs, paper.epochs, paper.label_smoothing, paper.scheduler) == (5, 150, 0.1, "cosine")
    assert paper.weight_decay_filter is False and paper.clip_grad is None
    cifar = resolve_config("crate_cifar_finetune", data="x")
    assert (cifar.optimizer, cifar.lr, cifar.weight_decay, cifar.rand_augment) == ("adamw", 5e-5, 0.01, [2, 14])
    assert isinstance(cifar.lr, float) and (cifar.epochs, cifar.batch_size) == (200, 256)
    readme = load_recipe("crate_official_readme")
    assert (readme["optimizer"], readme["lr"], readme["weight_decay"], readme["batch_size"]) == ("lion", 2e-4, 0.04, 512)


def test_unknown_recipe_key_is_named(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("lr: 0.1\nwarmup_epoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown key 'warmup_epoch'.*warmup_epochs"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        resolve_config(None, data="x", learning_rate=1.0)
    with pytest.raises(FileNotFoundError, match="unknown recipe"):
        load_recipe("crate_paper_imagenett")


def test_cli_flags_override_recipe(tmp_path):
    from crate_vis.cli import build_parser
    from crate_vis.cli.train import config_from_args

    args = build_parser("train").parse_args(
        ["train", "--data", "synthetic", "--config", "crate_paper_imagenet", "--lr", "0.01", "--out", str(tmp_path),
         "--model-arg", "dim=32", "--set", "crop_scale=[0.5, 1.0]"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.lr == 0.01 and cfg.weight_decay == 0.5 and cfg.optimizer == "lion"
    assert cfg.model_kwargs == {"dim": 32} and cfg.crop_scale == [0.5, 1.0]


# ------------------------------------------------------------------------------------------ step mechanics
def test_topk_correct_capped_at_classes():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    target = torch.tensor([1, 1, 0])
    assert topk_correct(logits, target, (1, 5)) == [1, 3]  # top-5 of 2 classes is top-2: always right


def test_gradient_clipping_is_applied(tmp_path):
    """The gradients the optimizer steps with have norm clip_grad (they were far larger before clipping)."""
    norms = {}
    for clip in (None, 1e-3):
        trainer = Trainer(tiny_cfg(tmp_path / str(clip), clip_grad=clip, epochs=1), TensorSet(16))
        seen = []
        step = trainer.optimizer.step

        def recording_step(*a, _step=step, _seen=seen, _model=trainer.model, **k):
            grads = [p.grad for p in _model.parameters() if p.grad is not None]
            _seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            return _step(*a, **k)

        trainer.optimizer.step = recording_step
        trainer.fit()
        norms[clip] = seen
    assert len(norms[1e-3]) == 2
    assert min(norms[None]) > 0.1  # unclipped gradients are large
    np.testing.assert_allclose(norms[1e-3], 1e-3, rtol=1e-4)


def test_weight_decay_filter(tmp_path):
    """timm's filter exempts 1-d parameters (biases, norm weights); without it every parameter decays."""
    for flag in (True, False):
        trainer = Trainer(tiny_cfg(tmp_path / str(flag), weight_decay=0.3, weight_decay_filter=flag), TensorSet(8))
        decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.3 for p in g["params"]}
        for name, p in trainer.model.named_parameters():
            assert (id(p) in decayed) == (not flag or p.ndim > 1), name


def test_schedule_is_warmup_then_cosine_per_iteration(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=4, batch_size=4, warmup_epochs=1, lr=1e-2, min_lr=1e-4, warmup_lr=0.0)
    trainer = Trainer(cfg, TensorSet(16))
    lrs = []
    step = trainer.optimizer.step

    def recording_step(*a, **k):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*a, **k)

    trainer.optimizer.step = recording_step
    trainer.fit()
    total, warm = 16, 4  # 4 steps per epoch
    expected = []
    for t in range(total):
        if t < warm:
            expected.append(cfg.lr * t / warm)
        else:
            u = (t - warm) / (total - warm)
            expected.append(cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * u)))
    np.testing.assert_allclose(lrs, expected, rtol=1e-6, atol=1e-12)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = TensorSet(16, nan_after=16)  # epoch 1 reads 16 clean images, epoch 2 gets NaNs
    cfg = tiny_cfg(tmp_path, epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2.*loss is nan.*last good checkpoint.*epoch 1"):
        train(cfg, data)
    state = torch.load(Path(cfg.out) / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    rows = list(csv.DictReader(open(Path(cfg.out) / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1"]


def test_absurd_learning_rate_is_one_line_and_saves_no_broken_weights(tmp_path, capsys):
    from crate_vis.cli import main

    root = make_image_folder(tmp_path / "data", per_class=4, size=16)
    rc = main(["train", "--data", str(root), "--model", "crate_test_patch8_32", "--img-size", "32", "--epochs", "3",
               "--batch-size", "8", "--workers", "0", "--no-progress", "--optimizer", "lion", "--lr", "1e30",
               "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "is nan" in err[0] or "not finite" in err[0]
    assert "no checkpoint was written" in err[0]
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best").exists()


# -------------------------------------------------------------------------------------- data and outputs
def test_imagefolder_run_outputs_and_bad_image_skipped(tmp_path, caplog):
    from crate_vis import load_model
    from crate_vis.train.engine import METRIC_COLUMNS

    root = make_image_folder(tmp_path / "data")
    bad = root / "train" / "bees" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    out = tmp_path / "run"
    cfg = resolve_config(None, data=str(root), model="crate_test_patch8_32", img_size=32, epochs=2, batch_size=4,
                         workers=0, out=str(out), progress=False)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    assert [p for p, _ in result.skipped_images] == [str(bad)]
    assert sum(str(bad) in r.message for r in caplog.records) >= 1
    assert result.classes == ["ants", "bees"]
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.csv", "curves.png", "best/model.safetensors"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert list(rows[0]) == list(METRIC_COLUMNS) and len(rows) == 2
    assert float(rows[-1]["val_top5"]) == 100.0  # top-5 of 2 classes
    # the exported best weights are the best.pt weights and rebuild through load_model
    best = torch.load(out / "best.pt", weights_only=True)
    model = load_model(out / "best")
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["model"][k]), k
    assert model.pretrained_config["metadata"]["classes"] == ["ants", "bees"]
    # a second run into the same folder must not overwrite it
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)


def test_empty_data_folder_is_one_clear_line(tmp_path, capsys):
    from crate_vis.cli import main

    (tmp_path / "d" / "train").mkdir(parents=True)
    rc = main(["train", "--data", str(tmp_path / "d"), "--model", "crate_test_patch8_32", "--out", str(tmp_path / "r"),
               "--workers", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "no class folders" in err[0]
    rc = main(["train", "--data", "synthetic", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)])
    assert rc == 1 and "recipe file not found" in capsys.readouterr().err


def _write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], key: str = "labels") -> None:
    # The official files are Python 2 pickles: byte-string keys, (N, 3072) uint8 rows of R, G, B planes.
    with open(path, "wb") as fh:
        pickle.dump({b"batch_label": b"fake", key.encode(): labels, b"data": data,
                     b"filenames": [b"f%d.png" % i for i in range(len(labels))]}, fh, protocol=2)  # fmt: skip


def test_cifar10_pickles_read_in_the_official_layout(tmp_path):
    from crate_vis.data.folders import CIFARDataset

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)  # (N, H, W, C)
    rows = images.transpose(0, 3, 1, 2).reshape(12, 3072)  # R plane, G plane, B plane
    for i in range(1, 6):
        _write_cifar_batch(root / f"data_batch_{i}", rows[2 * (i - 1) : 2 * i], [i % 3, (i + 1) % 3])
    _write_cifar_batch(root / "test_batch", rows[10:], [0, 2])
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird"], b"num_cases_per_batch": 2}, fh, protocol=2)
    train_set = CIFARDataset(tmp_path, "train")  # the parent folder is found too
    assert len(train_set) == 10 and train_set.classes == ["airplane", "automobile", "bird"]
    image, label = train_set[3]
    np.testing.assert_array_equal(np.asarray(image), images[3])
    assert label == (2 + 1) % 3
    test_set = CIFARDataset(root, "val")
    assert test_set.targets == [0, 2]
    np.testing.assert_array_equal(np.asarray(test_set[1][0]), images[11])
    # and the trainer takes the folder as --data
    cfg = resolve_config(None, data=str(root), model="crate_test_patch8_32", img_size=32, epochs=1, batch_size=5,
                         workers=0, out=str(tmp_path / "run"), progress=False)  # fmt: skip
    result = train(cfg)
    assert result.classes == ["airplane", "automobile", "bird"] and result.steps == 2


def test_cifar100_and_refusal_of_code_in_pickles(tmp_path):
    from crate_vis.data.folders import CIFARDataset, read_cifar_pickle

    root = tmp_path / "c100"
    root.mkdir()
    rows = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    _write_cifar_batch(root / "train", rows, [5, 1, 0, 5], key="fine_labels")
    _write_cifar_batch(root / "test", rows[:2], [1, 0], key="fine_labels")
    with open(root / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(6)]}, fh, protocol=2)
    ds = CIFARDataset(root, "train")
    assert ds.targets == [5, 1, 0, 5] and len(ds.classes) == 6

    class Evil:
        def __reduce__(self):
            return (print, ("should never run",))

    with open(tmp_path / "evil", "wb") as fh:
        pickle.dump({b"data": Evil()}, fh)
    with pytest.raises(ValueError, match="refused"):
        read_cifar_pickle(tmp_path / "evil")


# ---------------------------------------------------------------------------------------------- fine-tune
def test_finetune_replaces_head_resamples_pos_embed_and_rejects_other_architectures(tmp_path, caplog):
    from crate_vis import CheckpointError, create_model, save_model

    torch.manual_seed(1)
    source = create_model("crate_test_patch8_32")  # 10 classes, 32 px (4x4 grid)
    save_model(source, tmp_path / "src")
    cfg = tiny_cfg(tmp_path, pretrained=str(tmp_path / "src"), img_size=48)  # 3 classes, 6x6 grid
    with caplog.at_level(logging.INFO):
        trainer = Trainer(cfg, TensorSet(8, classes=3, size=48))
    text = " ".join(r.message for r in caplog.records)
    assert "head replaced for 3 classes" in text and "head.weight" in text and "position embeddings resampled" in text
    own, ref = trainer.model.state_dict(), source.state_dict()
    for key in ref:
        if key.startswith("blocks.") or key.startswith("patch_embed."):
            assert torch.equal(own[key], ref[key]), key
    assert own["head.weight"].shape == (3, 64) and own["pos_embed"].shape == (1, 37, 64)

    other = tiny_cfg(tmp_path / "o", pretrained=str(tmp_path / "src"), model_kwargs={"dim": 32, "dim_head": 8})
    with pytest.raises(CheckpointError, match="wrongly-shaped"):
        Trainer(other, TensorSet(8, classes=3))
