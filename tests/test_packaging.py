"""A wheel built from the checkout carries the package, its embedded weights and sample photos, and runs the demo
installed alone, outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w",
                           str(out), "-q"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("crate_vis-*.whl")
    return path


def test_wheel_holds_the_package_weights_and_photos(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "crate_vis/weights/manifest.json" in names
    assert any(n.startswith("crate_vis/weights/") and n.endswith("model.safetensors") for n in names)
    assert {f"crate_vis/sample_images/{p}.jpg" for p in ("astronaut", "chelsea", "coffee", "rocket")} <= names
    assert "crate_vis/recipes/small_data_cpu.yaml" in names
    packages = {p.relative_to(REPO).parent.as_posix() for p in (REPO / "crate_vis").rglob("__init__.py")}
    assert all(f"{pkg}/__init__.py" in names for pkg in packages), "a sub-package is missing from the wheel"
    assert not any(n.startswith(("tests/", "analysis/", "examples/")) for n in names)


def test_installed_wheel_runs_the_demo_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel),
                           "-q"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CRATE_VIS_WEIGHTS")}
    env["PYTHONPATH"] = str(target)  # the installed copy only; dependencies come from the environment
    code = "import crate_vis, sys; from crate_vis.cli import main; print(crate_vis.__file__); sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "demo", "--out", "demo", "--images", "2"], cwd=work,
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[0].startswith(str(target))  # the wheel's copy ran, not the checkout
    assert (work / "demo" / "photos" / "heads.png").exists() and (work / "demo" / "synthetic" / "heads.png").exists()
