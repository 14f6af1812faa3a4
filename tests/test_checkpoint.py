"""Checkpoint layouts, strict loading, the project format and the weights manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crate_vis import CheckpointError, create_model, load_checkpoint, load_model, save_model
from crate_vis.cli import main as cli_main
from crate_vis.models.checkpoint import read_state_dict
from crate_vis.models.conversion import OFFICIAL_TO_CRATE_VIS, convert_official_state_dict
from crate_vis.models.pretrained import WeightsNotFoundError, get_record, resolve_weights

DATA = Path(__file__).parent / "data"
GOLDEN_CKPT = DATA / "crate_ref_a.pth.tar"


def _official() -> dict:
    return torch.load(GOLDEN_CKPT, map_location="cpu", weights_only=True)


def _logits(model, golden) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(golden["images"]))


@pytest.mark.parametrize("layout", ["main", "finetune", "bare", "bare-prefixed"])
def test_every_official_layout_loads_strictly(tmp_path, golden, layout):
    ckpt = _official()
    sd = ckpt["state_dict"]
    stripped = {k.removeprefix("module."): v for k, v in sd.items()}
    obj = {"main": ckpt, "finetune": {"model": stripped, "epoch": 3}, "bare": stripped, "bare-prefixed": sd}[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = create_model("crate_test_patch8_32")
    report = load_checkpoint(model, path)
    assert report.layout == "official"
    torch.testing.assert_close(_logits(model, golden), torch.from_numpy(golden["logits"]), atol=1e-5, rtol=0)


def test_conversion_table_covers_every_official_key():
    converted = convert_official_state_dict({k.removeprefix("module."): v for k, v in _official()["state_dict"].items()})
    assert set(converted) == set(create_model("crate_test_patch8_32").state_dict())
    assert len(OFFICIAL_TO_CRATE_VIS) == 12


def test_project_format_round_trip(tmp_path, golden):
    model = create_model("crate_test_patch8_32")
    load_checkpoint(model, GOLDEN_CKPT)
    weights = save_model(model, tmp_path / "run", metadata={"note": "golden"})
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["family"] == "crate" and config["kwargs"]["dim"] == 64 and config["metadata"]["note"] == "golden"
    for source in (tmp_path / "run", weights):
        rebuilt = load_model(source)
        torch.testing.assert_close(_logits(rebuilt, golden), torch.from_numpy(golden["logits"]), atol=1e-5, rtol=0)
    # the weights file alone carries its config
    (tmp_path / "run" / "config.json").unlink()
    assert load_model(weights).config == model.config


def test_timm_model_round_trip(tmp_path):
    torch.manual_seed(0)
    vit = create_model("vit_tiny_patch16_224", img_size=32, num_classes=4, depth=2).eval()
    save_model(vit, tmp_path / "vit")
    rebuilt = load_model(tmp_path / "vit")
    assert len(rebuilt.blocks) == 2
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), vit(x))


def test_mismatch_names_missing_unexpected_and_shapes_and_loads_nothing():
    model = create_model("crate_tiny_patch16_224", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, GOLDEN_CKPT)
    text = str(err.value)
    assert "missing keys" in text and "blocks.3." in text
    assert "wrongly-shaped" in text and "patch_embed.proj.weight" in text
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"


def test_unexpected_keys_are_reported():
    sd = read_state_dict(GOLDEN_CKPT)
    sd["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks.0.extra"):
        load_checkpoint(create_model("crate_test_patch8_32"), sd)


def test_head_mismatch_is_explicit(caplog):
    model = create_model("crate_test_patch8_32", num_classes=3)
    with pytest.raises(CheckpointError, match="head.weight"):
        load_checkpoint(model, GOLDEN_CKPT)
    report = load_checkpoint(model, GOLDEN_CKPT, allow_head_mismatch=True)
    assert sorted(report.dropped_head) == ["head.bias", "head.weight"]
    assert "classifier head does not fit" in caplog.text


def test_new_resolution_resamples_position_embedding():
    model = create_model("crate_test_patch8_32", image_size=64)
    report = load_checkpoint(model, GOLDEN_CKPT)
    assert report.resampled == ["pos_embed"] and model.pos_embed.shape == (1, 65, 64)


def test_non_checkpoint_files_are_clear_errors(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth"):
        load_checkpoint(create_model("crate_test_patch8_32"), text)
    truncated = tmp_path / "cut.pth.tar"
    truncated.write_bytes(GOLDEN_CKPT.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.pth.tar"):
        load_checkpoint(create_model("crate_test_patch8_32"), truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent")


def test_checkpoint_without_config_says_how_to_load(tmp_path):
    with pytest.raises(CheckpointError, match="create_model"):
        load_model(GOLDEN_CKPT)


def test_manifest_verifies_golden_checksum(tmp_path):
    record = get_record("crate_test_patch8_32.golden")
    assert resolve_weights(str(GOLDEN_CKPT), model_name="crate_test_patch8_32") == GOLDEN_CKPT
    model = create_model("crate_test_patch8_32", pretrained=record.name)
    assert model.head.weight.shape == (10, 64)
    with pytest.raises(WeightsNotFoundError, match="put the file at"):
        resolve_weights("crate_small_patch16_224.in1k")  # published on Google Drive only


def test_convert_cli(tmp_path, golden, capsys):
    assert cli_main(["convert", str(GOLDEN_CKPT), str(tmp_path / "conv"), "--model", "crate_test_patch8_32"]) == 0
    model = load_model(tmp_path / "conv")
    torch.testing.assert_close(_logits(model, golden), torch.from_numpy(golden["logits"]), atol=1e-5, rtol=0)
    assert cli_main(["info", "--checkpoint", str(tmp_path / "conv"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) and info["grid"] == [4, 4]
    # the golden checkpoint's arch is not an official name: convert asks for --model
    assert cli_main(["convert", str(GOLDEN_CKPT), str(tmp_path / "conv2")]) == 1
