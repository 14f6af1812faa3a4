"""Shared fixtures: golden reference data, tiny models and the real photos in ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tests use tiny models: one intra-op thread avoids hand-off overhead, which dominates on a small or busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    """Inputs and outputs of the official CRATE implementation (see tests/data/README.md)."""
    with np.load(DATA / "crate_ref_a_io.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def golden_config(golden) -> dict:
    return json.loads(str(golden["config"]))


@pytest.fixture()
def golden_model(golden_config):
    """The golden CRATE (official checkpoint), eval mode, fused path."""
    from crate_vis import CRATE, load_checkpoint

    model = CRATE(**golden_config)
    load_checkpoint(model, DATA / "crate_ref_a.pth.tar")
    return model.eval()


@pytest.fixture()
def tiny_crate():
    """A small random CRATE (seeded) for tests that need no reference numbers."""
    from crate_vis import create_model

    torch.manual_seed(0)
    return create_model("crate_test_patch8_32").eval()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """The seeded ``tiny_crate`` saved in the project format (``model.safetensors`` + ``config.json``), read-only use."""
    from crate_vis import create_model, save_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(create_model("crate_test_patch8_32").eval(), folder)
    return folder


#: Set (CI sets it) to make a missing ../shared/data a failure instead of a skip.
REQUIRE_SHARED = os.environ.get("CRATE_VIS_REQUIRE_SHARED", "") not in ("", "0")

#: Fixtures that read ../shared/data: a test using one carries the ``data`` marker.
SHARED_FIXTURES = ("hymenoptera_root", "coco128_root", "imagenette_root", "horse_root")


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        message = f"{path} is absent (real photos are read from ../shared/data, never committed)"
        if REQUIRE_SHARED:
            pytest.fail(message + "; CRATE_VIS_REQUIRE_SHARED is set")
        pytest.skip(message)
    return path


def pytest_collection_modifyitems(config, items):
    """Mark every test that reads ../shared/data with ``data`` (``-m "not data"`` deselects them)."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SHARED_FIXTURES):
            item.add_marker(pytest.mark.data)


@pytest.fixture(scope="session")
def imagenette_root() -> Path:
    """Imagenette ImageFolder root with train/ and val/ (10 classes, 224 px)."""
    return _shared("imagenette")


@pytest.fixture(scope="session")
def horse_root() -> Path:
    """Weizmann horses: images/, masks/, annotations/instances.json."""
    return _shared("weizmann_horse")


@pytest.fixture(scope="session")
def hymenoptera_root() -> Path:
    """ImageFolder root with train/ and val/ (ants vs bees)."""
    return _shared("hymenoptera/hymenoptera_data")


@pytest.fixture(scope="session")
def coco128_root() -> Path:
    """COCO128: train2017/ images and annotations/instances_train2017.json."""
    return _shared("coco128")
