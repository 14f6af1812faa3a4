"""The README's commands and Python block are the ones that work."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_the_two_commands_are_first_and_ci_runs_the_test_command():
    block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    assert block[0].startswith("pip install -e . && crate-vis demo")
    test_cmd = block[1].split("#")[0].strip()
    assert test_cmd == 'pip install -e ".[test]" && python -m pytest -q'
    assert test_cmd in (REPO / ".ci" / "run").read_text()


def test_the_python_block_runs(monkeypatch):
    monkeypatch.chdir(REPO)
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README, flags=re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["full"].shape[0] == scope["model"].num_heads


def test_every_command_in_the_table_exists():
    from crate_vis.cli import COMMANDS

    listed = set(re.findall(r"^\| `crate-vis ([a-z-]+)", README, flags=re.M))
    assert listed == set(COMMANDS)
