"""One API over the CRATE family: CRATE, CRATE-alpha and the CRATE-MAE encoder through every tool and command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from crate_vis import create_model, load_checkpoint
from crate_vis.cli import main
from crate_vis.errors import CheckpointError
from crate_vis.hooks import AttentionRecorder, FeatureRecorder, cls_attention_maps, subspace_features
from crate_vis.models import list_models, model_family
from crate_vis.whitebox import measure_layers

DATA = Path(__file__).parent / "data"
FAMILIES = {
    "crate": ("crate_test_patch8_32", DATA / "crate_ref_a.pth.tar"),
    "crate_alpha": ("crate_alpha_test_patch8_32", DATA / "crate_alpha_ref_a.pth"),
    "crate_mae": ("crate_mae_test_patch8_32", DATA / "crate_mae_ref_a.pth"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(family, name, a project-format folder of the official golden weights) per family."""
    name, official = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param) / "weights"
    assert main(["convert", str(official), str(folder), "--model", name]) == 0
    return request.param, name, folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(40, 56), (48, 32)]):
        img = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = [200, 60, 40]
        Image.fromarray(img).save(root / f"p{k}.png")
    return root


def test_registry_groups_the_families_and_timm_builds_them():
    for fam, (name, _) in FAMILIES.items():
        assert model_family(name) == fam and name in list_models(family=fam)
        model = timm.create_model(name)  # registered with timm on import
        assert type(model).__name__ == type(create_model(name)).__name__
    assert len(list_models(family="crate_alpha")) >= 7 and "crate_alpha_large_patch14_224" in list_models()


def test_same_trunk_api_and_recorders(family):
    fam, name, folder = family
    from crate_vis import load_model

    model = load_model(folder)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))  # not the training size
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 4 * 6, model.embed_dim)
    final, inter = model.forward_intermediates(x, indices=[0, -1], output_fmt="NCHW", return_prefix_tokens=False)
    assert inter[-1].shape == (2, model.embed_dim, 4, 6) and torch.allclose(final, tokens, atol=1e-6)
    # the recorders' attention equals the explicit path's softmax, for every family
    with AttentionRecorder(model, layers=[-1]) as rec:
        model.forward_features(x)
    model.set_fused(False)
    with AttentionRecorder(model, layers=[-1]) as rec_explicit:
        model.forward_features(x)
    model.set_fused(True)
    torch.testing.assert_close(rec.attentions[-1], rec_explicit.attentions[-1], atol=1e-5, rtol=1e-5)
    cls = cls_attention_maps(model, x)
    assert cls.shape == (2, model.num_heads, 4, 6)
    torch.testing.assert_close(cls.flatten(-2), rec.attentions[-1][:, :, 0, 1:])
    assert subspace_features(model, x).shape == (2, model.num_heads, 24, model.dim_head)
    with FeatureRecorder(model, layers=[0], features=("sparse_code",)) as frec:
        model.forward_features(x)
    code = frec.features[0]["sparse_code"]
    assert code.shape[-1] == (4 * model.embed_dim if fam == "crate_alpha" else model.embed_dim)
    stats = measure_layers(model, x)
    assert set(stats) == set(range(model.depth)) and 0.0 < float(stats[0]["sparsity"].mean()) < 1.0


def test_every_command_runs_on_every_family(family, photos, tmp_path, capsys):
    fam, name, folder = family
    ck = ["--checkpoint", str(folder)]
    assert main(["info", *ck, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == fam and info["model"] == name
    seg = tmp_path / "seg"
    assert main(["segment", str(photos), "--out", str(seg), *ck, "--img-size", "32", "--no-progress"]) == 0
    assert len(json.loads((seg / "images.json").read_text())) == 2
    assert main(["segment", str(photos), "--out", str(tmp_path / "cut"), *ck, "--img-size", "32", "--method",
                 "tokencut", "--no-progress"]) == 0  # fmt: skip
    assert main(["attention", str(photos / "p0.png"), "--out", str(tmp_path / "att"), *ck, "--img-size", "32",
                 "--save-maps"]) == 0  # fmt: skip
    assert (tmp_path / "att" / "p0.png").stat().st_size > 1000 and (tmp_path / "att" / "maps" / "p0.npy").exists()
    assert main(["heads", str(photos), "--out", str(tmp_path / "heads.png"), *ck, "--img-size", "32"]) == 0
    assert main(["analyze", "--data", str(photos), "--out", str(tmp_path / "an"), *ck, "--img-size", "32"]) == 0
    assert (tmp_path / "an" / "layers.csv").exists()
    # score the segmentation against ground truth made from the photos' red squares
    gt = tmp_path / "gt"
    (gt / "masks").mkdir(parents=True)
    for p in sorted(photos.glob("*.png")):
        img = np.asarray(Image.open(p))
        Image.fromarray(((img[..., 0] == 200) * 255).astype(np.uint8)).save(gt / "masks" / p.name)
    capsys.readouterr()
    assert main(["score", "--pred", str(seg), "--gt", str(gt), "--protocol", "jaccard", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 2
    assert main(["score", "--pred", str(tmp_path / "att" / "maps"), "--gt", str(gt), "--protocol", "parts",
                 "--allow-missing", "--json"]) == 0  # fmt: skip


def test_a_checkpoint_of_another_family_is_refused(family):
    fam, name, _ = family
    for other, (_, official) in FAMILIES.items():
        if other == fam:
            continue
        model = create_model(name)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError, match="checkpoint .* but the model is a"):
            load_checkpoint(model, official)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_jax_archive_is_a_clear_error(tmp_path):
    npz = tmp_path / "crate_alpha_B16.npz"
    np.savez(npz, w=np.zeros(3))
    with pytest.raises(CheckpointError, match="JAX"):
        load_checkpoint(create_model("crate_alpha_test_patch8_32"), npz)
