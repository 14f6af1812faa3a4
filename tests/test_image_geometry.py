"""The one image geometry (crate_vis.data.image_geometry): photo -> model input -> grid -> back onto the photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from crate_vis.data.image_geometry import (
    ImageGeometry,
    plan_geometry,
    prepare_image,
    resize_nearest,
    shrink_for_display,
)
from crate_vis.errors import ImageLoadError, UsageError
from crate_vis.segmentation.masks import upsample_masks


def _photo(h: int = 50, w: int = 90, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_prepare_image_keeps_aspect_and_whole_patches():
    prep = prepare_image(_photo(50, 90), 8, 32)
    assert prep.original_hw == (50, 90)
    assert prep.geometry.resized_hw == (32, 58)  # 90 * 32 / 50 = 57.6 -> 58
    assert prep.input_hw == (32, 56) and prep.grid == (4, 7)
    assert prep.tensor.shape == (3, 32, 56)


def test_grid_to_image_nearest_puts_each_patch_where_it_was():
    prep = prepare_image(_photo(50, 90), 8, 32)
    grid = torch.arange(28, dtype=torch.float32).reshape(4, 7)
    out = prep.grid_to_image(grid)
    assert out.shape == (50, 90)  # the photo's size: no stretching, no crop
    scale = 50 / 32  # photo pixels per model-input pixel, the same along both axes (aspect kept)
    for gy, gx in [(0, 0), (1, 3), (3, 6), (2, 5)]:
        y, x = int((gy * 8 + 4) * scale), int((gx * 8 + 4) * scale)  # the centre of patch (gy, gx), in photo pixels
        assert out[y, x] == grid[gy, gx]
    # The cropped strip at the right (56..58 model pixels) repeats the last column.
    assert (out[:, -1] == out[:, int(55.5 * scale)]).all()


def test_grid_to_image_respects_the_crop_pixel_by_pixel():
    # 50x70 resized to 24x34 (short side 24) is cropped by patch 8 to 24x32: the right edge maps onto the last column
    g = plan_geometry((50, 70), 8, 24)
    assert g.resized_hw == (24, 34) and g.input_hw == (24, 32)
    grid = np.arange(12).reshape(3, 4)
    out = g.grid_to_image(grid)
    assert out.shape == (50, 70) and out[0, 0] == 0 and out[-1, -1] == 11
    cols = np.floor((np.arange(70) + 0.5) * 34 / 70 / 8).clip(0, 3).astype(int)
    np.testing.assert_array_equal(out[0], grid[0, cols])
    # Identity geometry reproduces nearest upsampling by the patch size.
    m = np.random.default_rng(0).random((3, 4)) > 0.5
    ident = plan_geometry((24, 32), 8, None)
    np.testing.assert_array_equal(ident.grid_to_image(m), upsample_masks(torch.from_numpy(m), 8).numpy())


def test_grid_to_image_keeps_dtype_and_batch():
    prep = prepare_image(_photo(40, 24), 8, 16)
    up = prep.grid_to_image(torch.rand(3, *prep.grid) > 0.5)
    assert up.dtype == bool and up.shape == (3, 40, 24)
    up_l = prep.grid_to_image(torch.randint(-1, 3, prep.grid))
    assert up_l.dtype == np.int64 and set(np.unique(up_l)) <= {-1, 0, 1, 2}
    smooth = prep.grid_to_image(torch.rand(2, *prep.grid), mode="bilinear")
    assert smooth.shape == (2, 40, 24) and smooth.dtype == np.float32
    with pytest.raises(ValueError, match="grid"):
        prep.grid_to_image(torch.rand(3, 3))


@pytest.mark.parametrize("hw", [(50, 90), (90, 50), (64, 64), (37, 101)])
@pytest.mark.parametrize("fit", ["crop", "pad", "center"])
def test_mask_round_trip_through_the_photo(hw, fit):
    prep = prepare_image(_photo(*hw), 8, 32, fit=fit)
    grid = torch.rand(*prep.grid, generator=torch.Generator().manual_seed(hw[0])) > 0.5
    back = prep.geometry.mask_fraction(prep.grid_to_image(grid)) >= 0.5
    np.testing.assert_array_equal(back, grid.numpy())


def test_labels_to_grid_majority_and_void():
    lab = np.array([[1, 1, 2, 2], [1, 0, 2, 255], [0, 0, 255, 255], [0, 0, 255, 3]])
    g = ImageGeometry.covering((4, 4), (2, 2))
    assert g.labels_to_grid(lab).tolist() == [[1, 2], [0, 255]]


def test_covering_matches_a_planned_geometry():
    g = plan_geometry((480, 640), 16, 224)
    m = np.zeros((480, 640), bool)
    m[100:300, 50:500] = True
    cov = ImageGeometry.covering(g.original_hw, g.grid, g.extent)
    np.testing.assert_allclose(cov.mask_fraction(m), g.mask_fraction(m))


def test_center_fit_is_a_centred_square():
    g = plan_geometry((480, 640), 16, 224, fit="center")
    assert g.input_hw == (224, 224) and g.offset == (0, (299 - 224) // 2)
    x = prepare_image(np.arange(480 * 640 * 3, dtype=np.uint8).reshape(480, 640, 3) * 0 + 100, 16, 224, fit="center")
    assert tuple(x.tensor.shape) == (3, 224, 224)
    # the leftmost photo columns lie outside the window: no cell covers them
    m = np.zeros((480, 640), bool)
    m[:, :40] = True
    assert g.mask_fraction(m).sum() == 0


def test_pad_fit_pads_with_zeros_and_maps_back_to_the_photo():
    prep = prepare_image(_photo(30, 45), 8, None, fit="pad")
    assert prep.input_hw == (32, 48) and prep.geometry.resized_hw == (30, 45)
    assert torch.all(prep.tensor[:, 30:, :] == 0) and torch.all(prep.tensor[:, :, 45:] == 0)
    assert prep.grid_to_image(np.ones(prep.grid, bool)).shape == (30, 45)


def test_size_policy_errors():
    with pytest.raises(ImageLoadError, match="smaller than one"):
        plan_geometry((5, 40), 8, None)
    with pytest.raises(UsageError, match="longer than"):
        plan_geometry((5000, 10), 8, 224)  # a 5000x10 photo at 224 would be a 112,000 px long input
    with pytest.raises(UsageError, match="at least one"):
        plan_geometry((50, 50), 8, 0)
    assert plan_geometry((5000, 10), 8, 224, max_side=None).input_hw[0] > 100000


def test_to_dict_round_trip_and_display_shrink():
    g = plan_geometry((120, 200), 8, 32)
    assert ImageGeometry.from_dict(g.to_dict()) == g
    prep = prepare_image(_photo(120, 200), 8, 32)
    small = shrink_for_display(prep, 50)
    assert small.original.shape[:2] == (30, 50) and small.grid == prep.grid
    assert shrink_for_display(prep, 500) is prep
    grid = torch.arange(np.prod(prep.grid), dtype=torch.float32).reshape(prep.grid)
    big, little = prep.grid_to_image(grid), small.grid_to_image(grid)
    assert little.shape == (30, 50)
    for y, x in [(3, 4), (15, 26), (27, 45)]:  # the same patch under the same relative position
        assert little[y, x] == big[int((y + 0.5) * 4), int((x + 0.5) * 4)]


def test_resize_nearest_uses_pixel_centres():
    a = np.arange(4).reshape(2, 2)
    np.testing.assert_array_equal(resize_nearest(a, (4, 4)), np.repeat(np.repeat(a, 2, 0), 2, 1))
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[1, 1] = 255
    assert resize_nearest(rgb, (4, 4)).shape == (4, 4, 3)
