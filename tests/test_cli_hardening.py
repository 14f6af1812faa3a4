"""Run folders that cannot be mixed and inputs checked before the work: one-line errors, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis import create_model, save_model
from crate_vis.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"img{k}.png")
    return root


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    return err


def test_duplicate_image_id_in_a_json_is_refused(tmp_path, images, ckpt, capsys):
    data = {"images": [{"id": 1, "file_name": "img0.png", "width": 48, "height": 40},
                       {"id": 1, "file_name": "img1.png", "width": 48, "height": 40}],
            "annotations": [], "categories": []}  # fmt: skip
    js = images / "gt.json"
    js.write_text(json.dumps(data))
    assert main(["segment", str(js), "--out", str(tmp_path / "o"), "-c", str(ckpt)]) == 1
    assert "duplicate image id 1" in _err(capsys)
    assert not (tmp_path / "o" / "masks").exists()


def test_edited_config_beside_the_weights_is_refused(tmp_path, capsys):
    folder = tmp_path / "w"
    save_model(create_model("crate_test_patch8_32"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["kwargs"]["depth"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["info", "-c", str(folder)]) == 1
    err = _err(capsys)
    assert "disagrees with the config stored inside model.safetensors" in err and "depth: 2 vs 3" in err


def test_resume_keys_on_the_weights_not_the_path(tmp_path, images, capsys):
    weights = tmp_path / "w"
    torch.manual_seed(0)
    save_model(create_model("crate_test_patch8_32"), weights)
    out = tmp_path / "seg"
    args = ["segment", str(images), "--out", str(out), "-c", str(weights), "--no-progress"]
    assert main(args) == 0
    torch.manual_seed(1)
    save_model(create_model("crate_test_patch8_32"), weights)  # new weights at the same path
    capsys.readouterr()
    assert main([*args, "--skip-existing"]) == 1  # stale masks are never reused
    assert "other settings (or other weights)" in _err(capsys)


def test_a_used_output_folder_is_refused_and_overwrite_removes_the_old_run(tmp_path, images, ckpt, capsys):
    out = tmp_path / "seg"
    args = ["segment", str(images), "--out", str(out), "-c", str(ckpt), "--no-progress"]
    assert main(args) == 0
    stale = out / "masks" / "old_0.png"
    stale.write_bytes(b"left by an earlier run")
    capsys.readouterr()
    assert main(args) == 1
    assert "already holds segmentation outputs" in _err(capsys)
    assert main([*args, "--overwrite", "--method", "tokencut"]) == 0
    assert not stale.exists()
    assert len(json.loads((out / "images.json").read_text())) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "maskcut", "--tau", "-0.1"], "--tau must be in [0, 1)"),
        (["--method", "maskcut", "--tau", "1.5"], "--tau must be in [0, 1)"),
        (["--method", "maskcut", "--tau", "nan"], "--tau must be in [0, 1)"),
        (["--layer", "99"], "layer 99 out of range: this model has layers 0..2"),
        (["--heads", "0,0"], "--heads names a head twice"),
        (["--img-size", "0"], "--img-size must be a positive number"),
        (["--mass", "0"], "--mass must be in (0, 1]"),
        (["--tau", "0.2"], "--tau applies to --method"),
        (["--device", "foo"], "--device 'foo' is not a torch device"),
    ],
)
def test_segment_options_are_checked_before_the_work(tmp_path, images, ckpt, capsys, extra, message):
    out = tmp_path / "o"
    assert main(["segment", str(images), "--out", str(out), "-c", str(ckpt), *extra]) == 1
    assert message in _err(capsys)
    assert not (out / "masks").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "--data", "{images}", "--out", "{tmp}/a", "--eps", "nan"], "--eps must be a positive number"),
        (["analyze", "--data", "{images}", "--out", "{tmp}/a", "--img-size", "0"], "--img-size must be positive"),
        (["attention", "{images}", "--out", "{tmp}/a", "--cell-width", "0"], "--cell-width must be positive"),
        (["attention", "{images}", "--out", "{tmp}/a", "--max-cols", "0"], "--max-cols must be at least 1"),
        (["heads", "{images}", "--out", "{tmp}/h.png", "--heads", "0,0"], "--heads names a head twice"),
        (["heads", "{images}", "--out", "{tmp}/h.txt"], "--out must end in .png, .pdf or .svg"),
        (["score", "--pred", "{images}", "--gt", "{images}", "--protocol", "miou", "--patch-size", "0"],
         "--patch-size must be at least 1"),
        (["train", "--data", "synthetic", "--model", "crate_test_patch8_32", "--model-arg", "patch_size=0", "--out",
          "{tmp}/t"], "patch_size=0: must be a positive integer"),
        (["info", "--model", "resnet50"], "resnet50 is not a Vision Transformer"),
        (["segment", "{tmp}/empty", "--out", "{tmp}/s"], "the folder holds no images"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, images, ckpt, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(images=images, tmp=tmp_path) for a in argv]
    if argv[0] in ("analyze", "attention", "heads", "segment"):
        argv += ["-c", str(ckpt)]
    assert main(argv) == 1
    assert message in _err(capsys)


def test_attention_refuses_an_extreme_aspect_ratio_quickly(tmp_path, ckpt, capsys):
    Image.fromarray(np.zeros((3000, 9, 3), np.uint8)).save(tmp_path / "thin.png")
    # 3000 x 9 at the model's 32 px would be a 10,664 px long input: skipped, the reason said
    assert main(["attention", str(tmp_path / "thin.png"), "--out", str(tmp_path / "a"), "-c", str(ckpt)]) == 1
    out = capsys.readouterr()
    assert "longer than 2048 px" in out.err and "0 processed, 1 skipped" in out.out


def test_version_and_info_describe_themselves(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("crate-vis ")
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "crate_mini_patch8_96" and "embedded default" in info["weights_source"]
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert all(key in text for key in info)  # the text shows what the JSON carries


def test_list_models_filters_weights_and_says_when_nothing_matches(capsys):
    assert main(["list-models", "crate_mini*"]) == 0
    out = capsys.readouterr().out
    assert "crate_mini_patch8_96.synthetic" in out and "crate_tiny" not in out
    assert main(["list-models", "no_such_model*"]) == 1
    assert "no model or weights match" in capsys.readouterr().out


def test_manifest_names_work_as_model_or_checkpoint(capsys):
    assert main(["info", "-m", "crate_test_patch8_32.golden", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 52_618
    assert main(["info", "-c", "crate_test_patch8_32.golden", "--json"]) == 0
    capsys.readouterr()
    from crate_vis.models import resolve_model

    # project-format weights named in the manifest keep their own config (trained at 64 px, not the name's 96)
    assert resolve_model("crate_mini_patch8_96.synthetic").image_size == (64, 64)


def test_convert_takes_model_args_for_unregistered_sizes(tmp_path, capsys):
    model = create_model("crate_test_patch8_32", depth=5)
    official = {"state_dict": {"module." + k: v for k, v in _to_official(model.state_dict()).items()}}
    src = tmp_path / "odd.pth"
    torch.save(official, src)
    assert main(["convert", str(src), str(tmp_path / "out"), "--model", "crate_test_patch8_32"]) == 1
    assert "does not fit" in _err(capsys)
    assert main(["convert", str(src), str(tmp_path / "out"), "--model", "crate_test_patch8_32", "--model-arg",
                 "depth=5"]) == 0  # fmt: skip


def _to_official(sd: dict) -> dict:
    import re

    table = [(r"^patch_embed\.norm_in\.", "to_patch_embedding.1."), (r"^patch_embed\.proj\.", "to_patch_embedding.2."),
             (r"^patch_embed\.norm_out\.", "to_patch_embedding.3."), (r"^pos_embed$", "pos_embedding"),
             (r"^blocks\.(\d+)\.norm1\.", r"transformer.layers.\1.0.norm."),
             (r"^blocks\.(\d+)\.attn\.qkv\.", r"transformer.layers.\1.0.fn.qkv."),
             (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer.layers.\1.0.fn.to_out.0."),
             (r"^blocks\.(\d+)\.norm2\.", r"transformer.layers.\1.1.norm."),
             (r"^blocks\.(\d+)\.ista\.weight$", r"transformer.layers.\1.1.fn.weight"),
             (r"^fc_norm\.", "mlp_head.0."), (r"^head\.", "mlp_head.1.")]  # fmt: skip
    out = {}
    for k, v in sd.items():
        for a, b in table:
            k = re.sub(a, b, k)
        out[k] = v
    return out


def test_overlays_can_be_jpeg(tmp_path, images, ckpt):
    out = tmp_path / "seg"
    assert main(["segment", str(images), "--out", str(out), "-c", str(ckpt), "--overlay-format", "jpg",
                 "--no-progress"]) == 0  # fmt: skip
    assert sorted(p.suffix for p in (out / "overlays").iterdir()) == [".jpg", ".jpg"]


def test_broken_pipe_is_quiet(tmp_path):
    code = "import sys; from crate_vis.cli import main; sys.exit(main(['list-models', '*']))"
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1", shell=True, capture_output=True, text=True,
                          cwd=REPO, timeout=300)  # fmt: skip
    assert proc.stdout.strip() and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
