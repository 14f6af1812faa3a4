"""Masked-autoencoding training of CRATE-MAE: data layouts, the loss, the export, exact resume, refused options, DDP."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis.errors import UsageError
from crate_vis.train import mask_noise, resolve_config, resolve_objective, train
from crate_vis.train.config import TrainConfig

MODEL = "crate_mae_test_patch8_32"


def make_photos(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` PNGs of assorted sizes (smooth colour gradients with noise) directly in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(28, 48)), int(rng.integers(28, 48))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], axis=-1) * 200  # (h, w, 3)
        arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


def mae_cfg(tmp_path: Path, data: Path | str, out: str = "run", **kw) -> TrainConfig:
    base = dict(data=str(data), model=MODEL, img_size=32, epochs=2, batch_size=4, workers=0, progress=False,
                out=str(tmp_path / out), lr=2e-3, seed=5)  # fmt: skip
    base.update(kw)
    return resolve_config(None, **base)


# ----------------------------------------------------------------------------------------------- the objective
def test_objective_follows_the_model_and_refuses_classification_options():
    assert resolve_objective(TrainConfig(model=MODEL)) == "mae"
    assert resolve_objective(TrainConfig(model="crate_test_patch8_32")) == "classification"
    with pytest.raises(UsageError, match="objective mae trains a CRATE-MAE model.*crate_test_patch8_32"):
        resolve_objective(TrainConfig(model="crate_test_patch8_32", objective="mae"))
    with pytest.raises(UsageError, match="masked autoencoder without a classifier"):
        resolve_objective(TrainConfig(model=MODEL, objective="classification"))
    for key, value in (("label_smoothing", 0.1), ("mixup", 0.8), ("cutmix", 1.0)):
        with pytest.raises(UsageError, match=f"{key}={value}.*classification options.*set {key}=0"):
            resolve_objective(TrainConfig(model=MODEL, **{key: value}))
    # a classification recipe's label smoothing is named together with the recipe that set it
    with pytest.raises(UsageError, match=r"label_smoothing=0.1 \(set by small_data_cpu\)"):
        resolve_objective(resolve_config("small_data_cpu", data="x", model=MODEL))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\), got 1.0"):
        TrainConfig(model=MODEL, mask_ratio=1.0)


def test_cli_refuses_classification_options_in_one_line(tmp_path, capsys):
    from crate_vis.cli import main

    folder = make_photos(tmp_path / "photos", 2)
    code = main(["train", "--data", str(folder), "--model", MODEL, "--img-size", "32", "--out", str(tmp_path / "r"),
                 "--label-smoothing", "0.1", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert err.startswith("crate-vis train: error: label_smoothing=0.1: classification options")
    assert not (tmp_path / "r").exists()


def test_evaluation_refuses_a_masked_autoencoder():
    from crate_vis import create_model
    from crate_vis.train import evaluate_model

    with pytest.raises(UsageError, match="no top-1 to evaluate"):
        evaluate_model(create_model(MODEL), [], ["a", "b"])


def test_base_learning_rate_scales_with_the_batch_and_an_explicit_lr_wins():
    cfg = resolve_config("crate_mae_pretrain", data="x")
    assert (cfg.objective, cfg.mask_ratio, cfg.betas, cfg.weight_decay, cfg.warmup_epochs) == ("mae", 0.75,
                                                                                                [0.9, 0.95], 0.05, 40)
    assert cfg.lr == pytest.approx(1.5e-4 * 4096 / 256) and cfg.crop_scale == [0.2, 1.0]
    assert resolve_config("crate_mae_pretrain", data="x", batch_size=64).lr == pytest.approx(1.5e-4 * 64 / 256)
    explicit = resolve_config("crate_mae_pretrain", data="x", batch_size=64, lr=1e-3)
    assert explicit.lr == 1e-3 and explicit.blr is None


def test_mask_noise_is_a_pure_function_of_seed_epoch_and_index():
    a = mask_noise(3, 7, 16, epoch=2)
    assert a.shape == (16,) and torch.equal(a, mask_noise(3, 7, 16, epoch=2))
    others = [mask_noise(3, 7, 16, epoch=1), mask_noise(3, 8, 16, epoch=2), mask_noise(4, 7, 16, epoch=2),
              mask_noise(3, 7, 16)]  # fmt: skip
    assert not any(torch.equal(a, o) for o in others)
    assert torch.equal(mask_noise(3, 7, 16), mask_noise(3, 7, 16))  # validation: the same in every epoch


# --------------------------------------------------------------------------------------------------- training
def test_training_on_a_flat_folder_exports_a_model_that_reproduces_the_loss(tmp_path, caplog):
    import crate_vis

    folder = make_photos(tmp_path / "photos", 8)
    (folder / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.INFO, logger="crate_vis"):
        result = train(mae_cfg(tmp_path, folder))
    assert "is a CRATE-MAE model: training by masked autoencoding" in caplog.text
    assert result.objective == "mae" and result.classes == [] and result.best_metric is None
    assert result.best_epoch == 2 and result.best_val_loss is None  # no validation: best/ is the last epoch
    assert [p for p, _ in result.skipped_images] == [str(folder / "broken.png")]
    with open(tmp_path / "run" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "lr", "images_per_s", "seconds"]
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(np.isfinite(float(r["train_loss"])) for r in rows)
    assert all(r["val_loss"] == "" for r in rows)
    assert (tmp_path / "run" / "curves.png").is_file()

    loaded = crate_vis.load_model(tmp_path / "run" / "best")
    meta = loaded.pretrained_config["metadata"]
    assert type(loaded).__name__ == "CRATEMAE" and meta["objective"] == "mae" and meta["mask_ratio"] == 0.75
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.stack([mask_noise(5, i, 16, epoch=0) for i in range(2)])  # (2, 16)
    trained = result.model.eval()
    with torch.no_grad():
        expected = trained(images, 0.75, noise)[0]
        assert torch.equal(loaded(images, 0.75, noise)[0], expected)
        assert not torch.equal(loaded(images, 0.75, mask_noise(5, 9, 16).expand(2, 16))[0], expected)


class FixedImages(torch.utils.data.Dataset):
    """Four fixed images, no augmentation: a fixed batch."""

    def __init__(self) -> None:
        self.x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).cumsum(-1) / 4

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return self.x[i]


def test_loss_goes_down_on_a_fixed_batch_and_best_is_the_lowest_validation_loss(tmp_path):
    data = FixedImages()
    cfg = resolve_config(None, data="custom", model=MODEL, img_size=32, epochs=8, batch_size=4, workers=0,
                         progress=False, out=str(tmp_path / "run"), lr=3e-3, scheduler="constant", seed=0)  # fmt: skip
    result = train(cfg, train_dataset=data, val_dataset=data)
    losses = [row["val_loss"] for row in result.history]  # the same masks every epoch
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.best_val_loss == min(losses) and result.best_epoch == 1 + losses.index(min(losses))
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == result.best_epoch and best["metrics"]["val_loss"] == min(losses)


def test_layouts_of_unlabelled_data(tmp_path):
    from crate_vis.train.mae import build_unlabelled_datasets

    root = tmp_path / "tree"
    make_photos(root / "train" / "cats", 3)
    make_photos(root / "train" / "dogs", 2, seed=1)
    make_photos(root / "val", 2, seed=2)
    bundle = build_unlabelled_datasets(mae_cfg(tmp_path, root))
    assert (len(bundle.train), len(bundle.val), bundle.classes) == (5, 2, [])
    flat = build_unlabelled_datasets(mae_cfg(tmp_path, root / "train"))  # class folders, no train/: all, no val
    assert (len(flat.train), flat.val) == (5, None)
    make_photos(tmp_path / "only_val" / "val", 1)
    with pytest.raises(ValueError, match="has a val/ folder but no train/ folder"):
        build_unlabelled_datasets(mae_cfg(tmp_path, tmp_path / "only_val"))
    with pytest.raises(UsageError, match="decoded-image cache serves ImageFolder roots"):
        build_unlabelled_datasets(mae_cfg(tmp_path, tmp_path / "only_val" / "val", cache=True))
    with pytest.raises(UsageError, match="mask_ratio 0.97 keeps 0 of the 16 patches"):
        train(mae_cfg(tmp_path, root, mask_ratio=0.97))


def _state(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)


def test_resume_and_worker_count_do_not_change_the_result(tmp_path):
    """Crops, flips and masks are pure functions of (seed, epoch, index): stop + resume == straight, any workers."""
    root = tmp_path / "data"
    make_photos(root / "train", 8)
    make_photos(root / "val", 4, seed=1)
    common = dict(epochs=2, crop_scale=[0.2, 1.0], hflip=0.5, warmup_epochs=1, ema_decay=0.9, clip_grad=1.0)
    train(mae_cfg(tmp_path, root, out="w2", workers=2, **common))
    train(mae_cfg(tmp_path, root, out="w2r", workers=2, stop_after_epoch=1, **common))
    assert _state(tmp_path / "w2r")["epoch"] == 1
    train(mae_cfg(tmp_path, root, out="w2r", workers=2, resume=True, **common))
    train(mae_cfg(tmp_path, root, out="w0", workers=0, **common))
    straight = _state(tmp_path / "w2")
    for other in ("w2r", "w0"):
        state = _state(tmp_path / other)
        assert state["step"] == straight["step"] == 4
        for key in ("model", "ema"):
            for name, tensor in straight[key].items():
                assert torch.equal(tensor, state[key][name]), f"{other}: {key}.{name}"
        for pid, st in straight["optimizer"]["state"].items():
            for name, tensor in st.items():
                assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(state["optimizer"]["state"][pid][name]))
        assert [r["val_loss"] for r in state["history"]] == [r["val_loss"] for r in straight["history"]]
    assert all(np.isfinite(r["val_loss"]) for r in straight["history"])


DRIVER = """
import os, sys, torch
from crate_vis.train import resolve_config, train

torch.set_num_threads(1)
root, out, dump = sys.argv[1:4]
cfg = resolve_config(None, data=root, model="crate_mae_test_patch8_32", img_size=32, epochs=1, batch_size=4,
                     workers=0, progress=False, out=out, lr=1e-3, seed=3)
result = train(cfg)
rank = int(os.environ["RANK"])
torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, os.path.join(dump, f"rank{rank}.pt"))
"""


@pytest.mark.slow
def test_two_process_gloo_masked_autoencoding(tmp_path):
    folder = make_photos(tmp_path / "photos", 8)
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "driver.py"), str(folder), str(out), str(dump)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0 = torch.load(dump / "rank0.pt", weights_only=True)
    w1 = torch.load(dump / "rank1.pt", weights_only=True)
    for key, value in w0.items():
        assert torch.equal(value, w1[key]), key
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2  # 8 images, 2 per process per step
    assert (out / "best").is_dir()
    # decoder_embed is never applied, so DDP runs with find_unused_parameters; it must stay as initialised
    from crate_vis import create_model

    torch.manual_seed(3)
    init = create_model("crate_mae_test_patch8_32", img_size=32).state_dict()
    assert torch.equal(init["decoder_embed.weight"], w0["decoder_embed.weight"])
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], w0["blocks.0.attn.qkv.weight"])
