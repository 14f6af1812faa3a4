"""A run stopped between epochs and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import make_image_folder

from crate_vis.train import resolve_config, train
from crate_vis.train.checkpointing import capture_rng_state, restore_rng_state, save_training_state


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    save_training_state(tmp_path / "s.pt", {"rng": state})
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    restore_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_resume_between_epochs_gives_identical_weights(tmp_path):
    """Random-resized crops (python RNG), flips (torch RNG), mixup (numpy RNG), EMA, clipping, warm-up + cosine."""
    root = make_image_folder(tmp_path / "data", per_class=8, size=20)
    common = dict(data=str(root), model="crate_test_patch8_32", img_size=32, epochs=3, batch_size=4, workers=0,
                  progress=False, optimizer="adamw", lr=2e-3, warmup_epochs=1, mixup=0.4, cutmix=0.5,
                  label_smoothing=0.1, ema_decay=0.9, clip_grad=0.5, seed=7, deterministic=True,
                  color_jitter=0.3)  # fmt: skip
    straight = train(resolve_config(None, out=str(tmp_path / "a"), **common))

    part = resolve_config(None, out=str(tmp_path / "b"), stop_after_epoch=2, **common)
    first = train(part)
    assert first.epochs_completed == 2
    resumed = train(resolve_config(None, out=str(tmp_path / "b"), resume=True, **common))
    assert resumed.epochs_completed == 3 and resumed.steps == straight.steps

    a = torch.load(Path(tmp_path / "a" / "last.pt"), weights_only=True)
    b = torch.load(Path(tmp_path / "b" / "last.pt"), weights_only=True)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    for pid, st in a["optimizer"]["state"].items():
        for name, tensor in st.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(b["optimizer"]["state"][pid][name]))
    same = ("train_loss", "train_acc", "val_loss", "val_top1", "lr")
    assert [[r[k] for k in same] for r in a["history"]] == [[r[k] for k in same] for r in b["history"]]
    # the metrics CSV of the resumed run has each epoch once
    assert [line.split(",")[0] for line in (tmp_path / "b" / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_resume_refuses_another_model(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4, size=16)
    common = dict(data=str(root), img_size=32, epochs=2, batch_size=4, workers=0, progress=False, out=str(tmp_path / "r"))
    train(resolve_config(None, model="crate_test_patch8_32", stop_after_epoch=1, **common))
    with pytest.raises(ValueError, match="was trained with model_kwargs="):
        train(resolve_config(None, model="crate_test_patch8_32", model_kwargs={"depth": 2}, resume=True, **common))
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        train(resolve_config(None, model="crate_test_patch8_32", resume=True, **{**common, "out": str(tmp_path / "x")}))


def test_cli_resume_continues_from_the_run_folder_config(tmp_path):
    """``crate-vis train --out RUN --resume`` needs no other flag: the run's config.yaml supplies them."""
    from crate_vis.cli import main

    root = make_image_folder(tmp_path / "data", per_class=4, size=16)
    flags = ["--data", str(root), "--model", "crate_test_patch8_32", "--img-size", "32", "--epochs", "2",
             "--batch-size", "4", "--workers", "0", "--no-progress", "--seed", "5"]  # fmt: skip
    assert main(["train", *flags, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *flags, "--out", str(tmp_path / "b"), "--stop-after-epoch", "1"]) == 0
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def _weights_and_optimizer(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)


def _assert_same_training_state(a: dict, b: dict) -> None:
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"model.{name}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pid, st in a["optimizer"]["state"].items():
        for name, tensor in st.items():
            other = b["optimizer"]["state"][pid][name]
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(other)), (pid, name)
    assert a["step"] == b["step"]


@pytest.mark.parametrize("cache", [False, True], ids=["imagefolder", "decoded-cache"])
def test_resume_and_worker_count_do_not_change_the_result(tmp_path, cache):
    """Augmentation is a pure function of (seed, epoch, index): workers=2 resumed == workers=2 straight == workers=0."""
    root = make_image_folder(tmp_path / "data", per_class=6, size=40)
    common = dict(data=str(root), model="crate_test_patch8_32", img_size=32, epochs=2, batch_size=4, progress=False,
                  lr=2e-3, seed=11, color_jitter=0.4, crop_scale=[0.2, 1.0], mixup=0.4, label_smoothing=0.1,
                  cache=cache, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    train(resolve_config(None, out=str(tmp_path / "w2"), workers=2, **common))
    train(resolve_config(None, out=str(tmp_path / "w2r"), workers=2, stop_after_epoch=1, **common))
    assert _weights_and_optimizer(tmp_path / "w2r")["epoch"] == 1
    train(resolve_config(None, out=str(tmp_path / "w2r"), workers=2, resume=True, **common))
    train(resolve_config(None, out=str(tmp_path / "w0"), workers=0, **common))
    straight = _weights_and_optimizer(tmp_path / "w2")
    _assert_same_training_state(straight, _weights_and_optimizer(tmp_path / "w2r"))
    _assert_same_training_state(straight, _weights_and_optimizer(tmp_path / "w0"))


def test_sample_augmentation_depends_only_on_seed_epoch_and_index():
    from PIL import Image

    from crate_vis.train.config import TrainConfig
    from crate_vis.train.data import SeededSamples, build_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    tf = build_transform(TrainConfig(img_size=16, color_jitter=0.4, crop_scale=[0.1, 1.0]), True)

    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return tf(image)

    data = SeededSamples(Augmented(), seed=3)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = data[(2, 1)]
    assert torch.equal(torch.get_rng_state(), before[0])  # the caller's random state is left as it was
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    torch.rand(5), np.random.rand(5), random.random()  # whatever happens in between
    assert torch.equal(first, data[(2, 1)])
    others = [data[(2, 2)], data[(3, 1)], SeededSamples(Augmented(), seed=4)[(2, 1)]]
    assert not any(torch.equal(first, o) for o in others)
    # and the transform really is random: the same sample differs between epochs
    assert len({float(data[(e, 0)].sum()) for e in range(6)}) == 6
