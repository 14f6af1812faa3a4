"""The linters are part of the tests: ruff and mypy, with the settings of pyproject.toml, report nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cmd",
    [[sys.executable, "-m", "ruff", "check", "crate_vis", "tests", "examples", "analysis"], [sys.executable, "-m", "mypy"]],
    ids=["ruff", "mypy"],
)
def test_linter_is_clean(cmd):
    tool = cmd[2]
    if shutil.which(tool) is None and subprocess.run([sys.executable, "-c", f"import {tool}"]).returncode:
        pytest.fail(f"{tool} is not installed: pip install -e '.[test]' installs it")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
