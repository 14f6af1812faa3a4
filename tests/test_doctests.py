"""Every docstring example of the package runs and prints what it says (doctests across the package)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import crate_vis

MODULES = sorted(m.name for m in pkgutil.walk_packages(crate_vis.__path__, "crate_vis.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    torch.manual_seed(0)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"


def test_the_public_modules_carry_examples():
    """Examples are where a reader learns the API: the modules people import first must have them."""
    counts = {}
    for name in ("crate_vis.data.image_geometry", "crate_vis.io.coco", "crate_vis.io.segment_output",
                 "crate_vis.models.factory", "crate_vis.metrics.scoring", "crate_vis.experiments.segment",
                 "crate_vis.experiments.attention", "crate_vis.errors"):  # fmt: skip
        finder = doctest.DocTestFinder()
        counts[name] = sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
    assert all(n > 0 for n in counts.values()), counts
