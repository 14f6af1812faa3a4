"""Atomic outputs: an exception or a SIGKILL leaves the old file or the new one, never part of one."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crate_vis.io.atomic import atomic_save, atomic_write, atomic_write_bytes, atomic_write_json

ATOMIC_PY = Path(__file__).resolve().parents[1] / "crate_vis" / "io" / "atomic.py"


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Boom(RuntimeError):
    pass


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # missing folders are created
    with atomic_write(target) as fh:
        fh.write("first")
    assert target.read_text() == "first"
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    atomic_write_json(target, {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    assert _entries(target.parent) == ["out.txt"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_exception_inside_atomic_write_keeps_old_file(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content")
    with pytest.raises(error):
        with atomic_write(target, "wb") as fh:
            fh.write(b"new content, half written" * 1000)
            fh.flush()
            raise error("killed mid-write")
    assert target.read_bytes() == b"old content"
    assert _entries(tmp_path) == ["out.bin"]


def test_exception_without_an_old_file_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_write(tmp_path / "new.txt") as fh:
            fh.write("partial")
            raise Boom
    assert _entries(tmp_path) == []


def test_json_that_fails_to_serialise_keeps_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"miou": 0.5})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"miou": 0.6, "bad": object()})  # json.dump has written part of it by then
    assert json.loads(target.read_text()) == {"miou": 0.5}
    assert _entries(tmp_path) == ["metrics.json"]


def test_atomic_save_failure_keeps_old_file(tmp_path):
    target = tmp_path / "mask.png"
    Image.new("L", (4, 4), 7).save(target)
    old = target.read_bytes()

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"\x89PNG partial")
        raise Boom

    with pytest.raises(Boom):
        atomic_save(target, half_then_fail)
    assert target.read_bytes() == old
    assert _entries(tmp_path) == ["mask.png"]


def test_atomic_save_keeps_the_suffix_for_writers_that_sniff_it(tmp_path):
    target = tmp_path / "figure.png"
    atomic_save(target, lambda tmp: Image.new("RGB", (3, 2), (1, 2, 3)).save(tmp))  # format chosen from suffix
    with Image.open(target) as im:
        assert im.format == "PNG" and im.getpixel((0, 0)) == (1, 2, 3)
    atomic_save(tmp_path / "a.npy", lambda tmp: np.save(tmp, np.arange(3)))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))
    assert _entries(tmp_path) == ["a.npy", "figure.png"]


def test_bad_arguments_leave_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / "x", "a"):
            pass
    fds = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else None
    with pytest.raises(LookupError):
        with atomic_write(tmp_path / "x", "w", encoding="no-such-encoding"):
            pass
    assert _entries(tmp_path) == []
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds  # the temporary file's descriptor was closed


def test_permissions_follow_umask_or_the_replaced_file(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    target = tmp_path / "out.txt"
    atomic_write_bytes(target, b"x")
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)  # as open() would, not mkstemp's 0o600
    target.chmod(0o640)
    atomic_write_bytes(target, b"y")
    atomic_save(target, lambda tmp: Path(tmp).write_bytes(b"z"))
    assert (target.stat().st_mode & 0o777) == 0o640 and target.read_bytes() == b"z"


# ------------------------------------------------------------------------------------------------- SIGKILL
CHUNK = 1 << 17  # 128 KiB
CHUNKS = 48  # 6 MiB per version

_WRITER = r"""
import hashlib, importlib.util, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)  # the module alone: importing the package would pull in torch
target, mode, chunk, chunks = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def blocks(version):
    body = bytes([version % 251]) * chunk
    for _ in range(chunks):
        yield body
    yield hashlib.sha256(body * chunks).hexdigest().encode() + b"%08d" % version

version = 1
while True:
    print(f"begin {version}", flush=True)
    if mode == "atomic":
        with atomic.atomic_write(target, "wb") as fh:
            for b in blocks(version):
                fh.write(b)
                fh.flush()
    elif mode == "save":
        def save(tmp, version=version):
            with open(tmp, "wb") as fh:
                for b in blocks(version):
                    fh.write(b)
                    fh.flush()
        atomic.atomic_save(target, save)
    else:  # plain open(): what the atomic helpers exist to avoid
        with open(target, "wb") as fh:
            for b in blocks(version):
                fh.write(b)
                fh.flush()
    version += 1
"""


def _version_of(path: Path) -> int | None:
    """The version number of a complete, self-consistent file, or ``None`` for a partial/corrupt one."""
    data = path.read_bytes()
    if len(data) != CHUNK * CHUNKS + 64 + 8:
        return None
    body, digest, version = data[: CHUNK * CHUNKS], data[-72:-8], int(data[-8:])
    if body != bytes([version % 251]) * (CHUNK * CHUNKS) or hashlib.sha256(body).hexdigest().encode() != digest:
        return None
    return version


def _write_version_zero(path: Path) -> None:
    body = bytes([0]) * CHUNK * CHUNKS
    path.write_bytes(body + hashlib.sha256(body).hexdigest().encode() + b"%08d" % 0)


def _kill_during_write(tmp_path: Path, mode: str, after: int, delay: float) -> tuple[int | None, int]:
    """Start the writer, SIGKILL it ``delay`` s after it began version ``after``; return (version on disk, started)."""
    target = tmp_path / "big.bin"
    _write_version_zero(target)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(ATOMIC_PY), str(target), mode, str(CHUNK), str(CHUNKS)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    started = 0
    try:
        deadline = time.monotonic() + 30
        while started < after and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            started = int(line.split()[1])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert started >= after, "the writer did not start"
    return _version_of(target), started


@pytest.mark.parametrize("mode", ["atomic", "save"])
def test_sigkill_leaves_old_or_new_never_partial(tmp_path, mode):
    from crate_vis.io.images import list_images

    for after, delay in [(1, 0.0), (2, 0.002), (2, 0.01), (3, 0.005)]:
        version, started = _kill_during_write(tmp_path, mode, after, delay)
        assert version is not None, f"partial file after SIGKILL ({mode}, version {started})"
        assert version >= started - 1  # the writer may have finished more versions during the delay
        # The killed writer's temporary file may remain; it is hidden, never mistaken for an output.
        leftovers = [p for p in tmp_path.iterdir() if p.name != "big.bin"]
        assert all(p.name.startswith(".big.") for p in leftovers)
        for p in leftovers:
            p.unlink()
    assert list_images(tmp_path) == []


def test_sigkill_control_plain_write_is_caught(tmp_path):
    # The check above can tell: a plain open()/write() killed the same way leaves a partial file.
    for delay in (0.0, 0.001, 0.002, 0.004, 0.008, 0.016):
        if _kill_during_write(tmp_path, "plain", 2, delay)[0] is None:
            return
    pytest.fail("a killed plain write never left a partial file: the SIGKILL test could not tell")


# ------------------------------------------------------------------------------- every write goes through atomic
PACKAGE = Path(__file__).resolve().parents[1] / "crate_vis"

#: Writes that are atomic another way, with the reason.
_ALLOWED_DIRECT_WRITES = {
    "crate_vis/data/synthetic.py": "files go into a temporary folder that is renamed into place as a whole",
    "crate_vis/io/runlock.py": "a lock is written whole under its own temporary name and hard-linked into place; it "
    "must never replace an existing file, which is what the atomic helpers do",
    "analysis/adversarial.py": "it writes broken inputs on purpose into a throwaway temporary folder and keeps no file",
}
_WRITE_METHODS = {"savefig", "write_text", "write_bytes", "imwrite", "to_csv", "save", "savez", "savez_compressed",
                  "savetxt", "dump"}  # fmt: skip
_ATOMIC = {"atomic_save", "atomic_write", "atomic_write_bytes", "atomic_write_json"}


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else None)


def _direct_writes(source: str) -> list[tuple[int, str]]:
    """Calls that write a file without going through :mod:`crate_vis.io.atomic` (line, code).

    A write call is allowed inside an ``atomic_*`` call (``atomic_save(p, lambda tmp: fig.savefig(tmp))``), when it
    writes to the handle of a ``with atomic_write(...) as fh`` block, or when it writes to the path parameter of a
    lambda or of a function that the module passes to ``atomic_save``.
    """
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    callbacks = {a.id for node in ast.walk(tree) if isinstance(node, ast.Call) and _call_name(node) == "atomic_save"
                 for a in node.args[1:] if isinstance(a, ast.Name)}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name == "open" and isinstance(node.func, ast.Name):
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            writes = isinstance(mode, ast.Constant) and isinstance(mode.value, str) and bool(set(mode.value) & set("wax"))
        else:
            writes = name in _WRITE_METHODS
        if not writes:
            continue
        target = node.args[0] if node.args else None
        owner = node.func.value.id if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) else ""
        if owner in ("json", "pickle", "torch") and len(node.args) > 1:
            target = node.args[1]  # json.dump(obj, fh), torch.save(obj, path)
        ok, p = False, parents.get(node)
        while p is not None and not ok:
            if isinstance(p, ast.Call) and _call_name(p) in _ATOMIC:
                ok = True
            elif isinstance(p, ast.With):
                ok = any(isinstance(it.context_expr, ast.Call) and _call_name(it.context_expr) == "atomic_write"
                         and isinstance(it.optional_vars, ast.Name) and isinstance(target, ast.Name)
                         and it.optional_vars.id == target.id for it in p.items)  # fmt: skip
            elif isinstance(p, ast.Lambda) or (isinstance(p, ast.FunctionDef) and p.name in callbacks):
                args = p.args.posonlyargs + p.args.args + p.args.kwonlyargs
                ok = isinstance(target, ast.Name) and target.id in {a.arg for a in args}
            p = parents.get(p)
        if not ok:
            found.append((node.lineno, ast.unparse(node)[:100]))
    return sorted(found)


def test_write_lint_tells_atomic_from_direct_writes():
    good = '''
atomic_save(out, lambda tmp: fig.savefig(tmp, dpi=150))
with atomic_write(path) as fh:
    json.dump(obj, fh)
def save(tmp):
    torch.save(state, tmp)
atomic_save(dest, save)
with open(path, encoding="utf-8") as fh:
    data = json.load(fh)
'''
    bad = '''
def write_mask(mask, path):
    Image.fromarray(mask).save(path)
with open(path, "w") as fh:
    json.dump(obj, fh)
Path(p).write_text("x")
torch.save(state, "model.pt")
'''
    assert _direct_writes(good) == []
    assert sorted(line for line, _ in _direct_writes(bad)) == [3, 4, 5, 6, 7]


def test_every_package_write_goes_through_atomic():
    offenders = []
    repo = PACKAGE.parent
    scripts = [p for folder in ("examples", "analysis") if (repo / folder).is_dir() for p in (repo / folder).rglob("*.py")]
    for path in sorted([*PACKAGE.rglob("*.py"), *scripts]):
        rel = path.relative_to(repo).as_posix()
        if rel == "crate_vis/io/atomic.py" or rel in _ALLOWED_DIRECT_WRITES:
            continue
        offenders += [f"{rel}:{line}: {code}" for line, code in _direct_writes(path.read_text(encoding="utf-8"))]
    assert not offenders, (
        "files written without crate_vis.io.atomic (a kill mid-write would leave a partial file); wrap them in "
        "atomic_write / atomic_save:\n" + "\n".join(offenders)
    )
