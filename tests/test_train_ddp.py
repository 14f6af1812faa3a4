"""Two processes under torchrun (gloo, CPU) train one model: checkpoint from rank 0, identical weights on both."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import make_image_folder

DRIVER = """
import os, sys, torch
from crate_vis.train import resolve_config, train

torch.set_num_threads(1)
root, out, dump = sys.argv[1:4]
cfg = resolve_config(None, data=root, model="crate_test_patch8_32", img_size=32, epochs=2, batch_size=4, workers=0,
                     progress=False, out=out, lr=1e-3, seed=3)
result = train(cfg)
rank = int(os.environ["RANK"])
torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, os.path.join(dump, f"rank{rank}.pt"))
torch.save({"steps": result.steps, "world": int(os.environ["WORLD_SIZE"])}, os.path.join(dump, f"info{rank}.pt"))
"""


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=6, size=16)  # 12 training images
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "driver.py"), str(root), str(out), str(dump)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "last.pt").is_file() and (out / "metrics.csv").is_file() and (out / "best").is_dir()
    w0 = torch.load(dump / "rank0.pt", weights_only=True)
    w1 = torch.load(dump / "rank1.pt", weights_only=True)
    for key, value in w0.items():
        assert torch.equal(value, w1[key]), key
    # 12 images over 2 processes with a global batch of 4: 6 per process, 2 per process per step -> 3 steps/epoch
    info = torch.load(dump / "info0.pt", weights_only=True)
    assert info == {"steps": 6, "world": 2}
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    for key, value in ckpt["model"].items():
        assert torch.equal(value, w0[key]), key
    # the weights moved away from their initialisation
    torch.manual_seed(3)
    from crate_vis import create_model

    init = create_model("crate_test_patch8_32", num_classes=2, img_size=32).state_dict()
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], w0["blocks.0.attn.qkv.weight"])
