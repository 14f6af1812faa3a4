"""``crate-vis reconstruct``: figures and table, the unmasked case, pasted-back patches, PSNR, de-normalisation."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from crate_vis import create_model, save_model
from crate_vis.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from crate_vis.errors import UsageError
from crate_vis.experiments.reconstruct import ReconstructConfig, psnr, reconstruct_image
from crate_vis.models.crate_mae import CRATE_MAE_VARIANTS, CRATEMAE

MODEL = "crate_mae_test_patch8_32"


def tiny_mae(norm_pix_loss: bool = False) -> CRATEMAE:
    torch.manual_seed(0)
    return create_model(MODEL, norm_pix_loss=norm_pix_loss).eval()


def photo(h: int = 32, w: int = 32, seed: int = 0, low: int = 60, high: int = 190) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (h, w, 3), dtype=np.uint8)


class Oracle(CRATEMAE):
    """Predicts every patch as its target (standardised with ``norm_pix_loss``) plus ``offset``."""

    offset = 0.0

    def forward(self, imgs, mask_ratio=0.75, noise=None, *, ids_keep=None):
        _, mask, _ = self.masking(imgs.shape[0], self.grid_size[0] * self.grid_size[1], mask_ratio, noise)
        target = self.patchify(imgs)  # (B, L, P)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        pred = target + self.offset
        return self.forward_loss(imgs, pred, mask), pred, mask


def oracle(norm_pix_loss: bool = False, offset: float = 0.0) -> Oracle:
    model = Oracle(**{**CRATE_MAE_VARIANTS[MODEL], "norm_pix_loss": norm_pix_loss}).eval()
    model.offset = offset
    return model


def test_cli_writes_a_figure_per_image_and_a_table(tmp_path, capsys):
    from PIL import Image

    from crate_vis.cli import main

    save_model(tiny_mae(), tmp_path / "weights")
    Image.fromarray(photo(40, 72)).save(tmp_path / "wide.png")
    Image.fromarray(photo(36, 36, seed=1)).save(tmp_path / "square.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(["reconstruct", str(tmp_path / "wide.png"), str(tmp_path / "square.png"), str(tmp_path / "bad.png"),
                 "--checkpoint", str(tmp_path / "weights"), "--out", str(out), "--seed", "3", "--dpi", "50"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert (out / "wide.png").is_file() and (out / "square.png").is_file()
    assert "PSNR (dB)" in printed and "2 processed, 1 skipped" in printed
    with open(out / "reconstruct.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["input"], r["removed"], r["patches"]) for r in rows] == [("56x32", "21", "28"), ("32x32", "12", "16")]
    assert all(math.isfinite(float(r["psnr_db"])) for r in rows)


def test_cli_refuses_a_classifier(tmp_path, capsys):
    from crate_vis.cli import main

    code = main(["reconstruct", str(tmp_path), "--model", "crate_test_patch8_32", "--out", str(tmp_path / "o")])
    assert code == 1 and "needs a CRATE-MAE model" in capsys.readouterr().err
    with pytest.raises(UsageError, match=r"--mask-ratio must be in \[0, 1\), got 1.0"):
        ReconstructConfig(mask_ratio=1.0)


def test_mask_ratio_zero_is_the_unmasked_forward():
    model = tiny_mae()
    rec = reconstruct_image(model, photo(), ReconstructConfig(mask_ratio=0.0))
    x = rec.prepared.tensor.unsqueeze(0)  # (1, 3, 32, 32)
    with torch.no_grad():
        unmasked = model.forward_decoder(model.norm(model.forward_features(x)))[0]  # (L, P), no masking involved
    torch.testing.assert_close(rec.pred, unmasked, rtol=0, atol=1e-6)
    assert rec.removed == 0 and math.isnan(rec.psnr) and math.isnan(rec.loss)
    assert np.array_equal(rec.pasted, rec.target) and np.array_equal(rec.masked_image(), rec.target)


def test_visible_patches_are_pasted_back_and_the_mask_is_seeded():
    model = tiny_mae()
    config = ReconstructConfig(mask_ratio=0.75, seed=11)
    rec = reconstruct_image(model, photo(40, 64), config)
    gh, gw = rec.prepared.grid
    assert (gh, gw) == (4, 6) and rec.removed == 24 - int(24 * 0.25)
    removed = rec.mask.numpy().repeat(8, 0).repeat(8, 1)  # (32, 48)
    assert np.array_equal(rec.pasted[~removed], rec.target[~removed])
    assert np.array_equal(rec.pasted[removed], rec.recon[removed])
    assert np.all(rec.masked_image()[removed] == 0.5)
    # the target is the model input in [0, 1]: the prepared tensor, de-normalised
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    back = rec.prepared.tensor.permute(1, 2, 0).numpy() * std + mean
    np.testing.assert_allclose(rec.target, back, atol=1e-6)
    again = reconstruct_image(model, photo(40, 64, seed=5), config)
    assert torch.equal(again.mask, rec.mask)  # the mask depends on the seed and the grid only
    other = reconstruct_image(model, photo(40, 64), ReconstructConfig(mask_ratio=0.75, seed=12))
    assert not torch.equal(other.mask, rec.mask)


def test_psnr_of_a_known_error():
    # a prediction off by d in normalised units is off by d * std_c in pixels: PSNR = -10 log10(d^2 mean(std_c^2))
    d = 0.05
    rec = reconstruct_image(oracle(offset=d), photo(), ReconstructConfig(seed=2))
    expected = -10 * math.log10(d**2 * float(np.mean(np.square(IMAGENET_STD))))
    assert rec.psnr == pytest.approx(expected, abs=1e-3)
    assert rec.denorm == "pixels" and rec.loss == pytest.approx(d**2, rel=1e-4)
    perfect = reconstruct_image(oracle(), photo(), ReconstructConfig(seed=2))
    np.testing.assert_allclose(perfect.recon, perfect.target, atol=1e-5)
    assert psnr(np.zeros((2, 2, 3)), np.full((2, 2, 3), 0.1)) == pytest.approx(20.0)
    assert psnr(np.zeros((1, 1, 3)), np.zeros((1, 1, 3))) == math.inf


def test_norm_pix_predictions_are_denormalised_without_hidden_pixels():
    # "target" (MAE's demo) recovers any image from a perfect standardised prediction
    rec = reconstruct_image(oracle(norm_pix_loss=True), photo(), ReconstructConfig(denorm="target"))
    np.testing.assert_allclose(rec.recon, rec.target, atol=1e-5)
    # "visible" recovers an image whose patches share their statistics (a tiled patch)
    tile = photo(8, 8)
    rec = reconstruct_image(oracle(norm_pix_loss=True), np.tile(tile, (4, 4, 1)), ReconstructConfig(denorm="visible"))
    assert rec.denorm == "visible"
    np.testing.assert_allclose(rec.recon, rec.target, atol=1e-5)
    # and, with a real model, nothing it shows depends on the pixels of a removed patch
    model = tiny_mae(norm_pix_loss=True)
    image = photo()
    first = reconstruct_image(model, image, ReconstructConfig(seed=4))
    r, c = map(int, np.argwhere(first.mask.numpy())[0])
    changed = image.copy()
    changed[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 250
    second = reconstruct_image(model, changed, ReconstructConfig(seed=4))
    assert np.array_equal(first.recon, second.recon) and np.array_equal(first.pasted, second.pasted)
    leaky = [reconstruct_image(model, im, ReconstructConfig(seed=4, denorm="target")).recon for im in (image, changed)]
    assert not np.array_equal(*leaky)
