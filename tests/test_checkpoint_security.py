"""Hostile and broken checkpoints: nothing executes, nothing half-loads, every failure is a clear error.

Each payload below would create a marker file if it were ever unpickled; the tests first show that plain ``pickle``
does run it, then that every crate-vis entry point refuses the file and the marker never appears.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import shutil
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch

import crate_vis
from crate_vis.models import pretrained
from crate_vis.models.checkpoint import CheckpointError, checkpoint_arch, read_checkpoint, read_state_dict
from crate_vis.models.pretrained import ChecksumError, WeightsNotFoundError, resolve_weights

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "crate_ref_a.pth.tar"


class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _hostile_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """Checkpoints carrying the payload, in each format a download could come in."""
    tensors = {"cls_token": torch.zeros(1, 1, 64)}
    files = {
        "torch_zip": tmp_path / "evil.pth",
        "torch_legacy": tmp_path / "evil_legacy.pth.tar",
        "plain_pickle": tmp_path / "evil.pkl",
        "plain_pickle_proto0": tmp_path / "evil0.pt",
        "inside_state_dict": tmp_path / "evil_inner.pth",
    }
    torch.save({"state_dict": tensors, "extra": _Payload(marker)}, files["torch_zip"])
    torch.save({"x": _Payload(marker)}, files["torch_legacy"], _use_new_zipfile_serialization=False)
    files["plain_pickle"].write_bytes(pickle.dumps({"state_dict": {"w": _Payload(marker)}}))
    files["plain_pickle_proto0"].write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    torch.save({"state_dict": {"cls_token": _Payload(marker)}}, files["inside_state_dict"])
    return files


def test_payload_is_live_under_plain_pickle(tmp_path):
    # Guards the tests below: the payload really runs when something unpickles it.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_code_carrying_checkpoints_are_refused(tmp_path, monkeypatch, force_unsafe_env):
    if force_unsafe_env:
        # torch lets this variable turn weights_only off, but only where a caller left weights_only unset.
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "MARKER"
    model = crate_vis.create_model("crate_test_patch8_32")
    for kind, path in _hostile_files(tmp_path, marker).items():
        entry_points = {
            "read_checkpoint": lambda p=path: read_checkpoint(p),
            "read_state_dict": lambda p=path: read_state_dict(p),
            "load_checkpoint": lambda p=path: crate_vis.load_checkpoint(model, p),
            "load_model": lambda p=path: crate_vis.load_model(p),
            "checkpoint_arch": lambda p=path: checkpoint_arch(p),
            "create_model(pretrained=)": lambda p=path: crate_vis.create_model("crate_test_patch8_32", pretrained=str(p)),
        }
        for name, call in entry_points.items():
            with pytest.raises(CheckpointError) as info:
                call()
            message = str(info.value)
            assert str(path) in message, (kind, name, message)
            assert "refused" in message and "unpickling" in message, (kind, name, message)
            # Says what was refused, without terminal escapes or torch's advice on how to turn the check off.
            assert "Details: Unsupported" in message and "\x1b" not in message and "False" not in message, message
            assert not marker.exists(), f"{kind} via {name} executed code"


def _golden_model():
    model = crate_vis.create_model("crate_test_patch8_32")
    crate_vis.load_checkpoint(model, GOLDEN)
    return model


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed by a failed load"


def test_broken_files_give_checkpoint_error(tmp_path):
    data = GOLDEN.read_bytes()
    cases = {
        "half.pth.tar": data[: len(data) // 2],
        "tail_cut.pth.tar": data[:-100],
        "ten_bytes.pth": data[:10],
        "empty.pth": b"",
        "notes.pth": b"these are not weights\n" * 20,
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "a zip, but not a torch file")
    cases["plain.zip.pth"] = buf.getvalue()
    legacy = io.BytesIO()
    torch.save({"w": torch.arange(100.0)}, legacy, _use_new_zipfile_serialization=False)
    cases["legacy_cut.pth"] = legacy.getvalue()[:-50]
    expected = {
        "half.pth.tar": "not a readable PyTorch checkpoint",
        "tail_cut.pth.tar": "not a readable PyTorch checkpoint",
        "ten_bytes.pth": "not a readable PyTorch checkpoint",
        "empty.pth": "empty file",
        "notes.pth": "not a readable PyTorch checkpoint",
        "plain.zip.pth": "not a readable PyTorch checkpoint",
        "legacy_cut.pth": "not a readable PyTorch checkpoint",
    }
    model = _golden_model()
    before = _snapshot(model)
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        for call in (read_checkpoint, lambda p: crate_vis.load_checkpoint(model, p), crate_vis.load_model):
            with pytest.raises(CheckpointError, match=expected[name]) as info:
                call(path)
            assert str(path) in str(info.value)
    _assert_unchanged(model, before)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")


def test_not_weights_inside_a_valid_file(tmp_path):
    cases = {
        "tensor.pth": torch.zeros(3),
        "list.pth": [torch.zeros(3)],
        "ints.pth": {"state_dict": {"a": 1}},
        "empty_dict.pth": {},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match="tensor|no tensors"):
            read_checkpoint(tmp_path / name)


def test_wrong_architecture_names_keys_and_loads_nothing():
    tiny = crate_vis.create_model("crate_tiny_patch16_224")
    before = _snapshot(tiny)
    with pytest.raises(CheckpointError) as info:
        crate_vis.load_checkpoint(tiny, GOLDEN)
    message = str(info.value)
    assert "wrongly-shaped keys" in message
    assert "cls_token: checkpoint (1, 1, 64) vs model (1, 1, 384)" in message
    assert "missing keys" in message and "blocks.3." in message  # the golden model has 3 blocks, tiny 12
    _assert_unchanged(tiny, before)

    shallow = crate_vis.create_model("crate_test_patch8_32", depth=2)  # right widths, one block short
    before = _snapshot(shallow)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): blocks\.2\."):
        crate_vis.load_checkpoint(shallow, GOLDEN)
    _assert_unchanged(shallow, before)


def _save_project(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return crate_vis.save_model(crate_vis.create_model("crate_test_patch8_32"), tmp_path / "saved")


def test_truncated_safetensors(tmp_path):
    weights = _save_project(tmp_path)
    data = weights.read_bytes()
    for name, blob in {"half": data[: len(data) // 2], "header": data[:8], "nine": data[:9]}.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        for call in (read_checkpoint, crate_vis.load_model):
            with pytest.raises(CheckpointError, match="not a readable safetensors file") as info:
                call(path)
            assert str(path) in str(info.value)
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        crate_vis.load_model(tmp_path / "text.safetensors")


def _with_config(tmp_path: Path, config) -> Path:
    """The saved weights with ``config`` (a dict or raw text) in their metadata."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(_save_project(tmp_path)))
    path = tmp_path / "edited.safetensors"
    text = config if isinstance(config, str) else json.dumps(config)
    save_file(sd, str(path), metadata={"crate_vis_config": text})
    return path


def test_hostile_config_is_refused_without_building_it(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    from crate_vis.models import factory

    # Every model built while loading, with the device it was built on: a hostile config may be built on the
    # ``meta`` device (no memory) to compare shapes, never for real; a depth that the weights do not hold is
    # refused before any module tree is built.
    builds: list[str] = []
    real_build = factory.build_from_config

    def recording_build(config):
        builds.append(torch.empty(0).device.type)
        return real_build(config)

    monkeypatch.setattr(factory, "build_from_config", recording_build)
    good = crate_vis.load_model(_save_project(tmp_path)).pretrained_config
    kwargs = dict(good["kwargs"])
    cases = {
        "depth bomb": ({**good, "kwargs": {**kwargs, "depth": 10**9}}, "depth=1000000000 but the weights hold 3"),
        "width bomb": ({**good, "kwargs": {**kwargs, "dim": 2**20}}, "wrongly-shaped keys"),
        "image bomb": ({**good, "kwargs": {**kwargs, "image_size": [2**20, 2**20]}}, "pos_embed"),
        "class bomb": ({**good, "kwargs": {**kwargs, "num_classes": 10**9}}, "head.weight"),
        "unknown kwarg": ({**good, "kwargs": {**kwargs, "evil": 1}}, "buildable"),
        "unknown family": ({**good, "family": "os.system"}, "unknown model family"),
        "hub name": ({"family": "timm", "name": "hf-hub:someone/model", "kwargs": {}}, "buildable"),
        "kwargs list": ({**good, "kwargs": [1, 2]}, "must be a JSON object"),
        "fetch a url": ({"family": "timm", "name": "vit_tiny_patch16_224",
                         "kwargs": {"pretrained": "http://127.0.0.1:9/evil.pth"}}, "load or fetch weights"),
        "read a file": ({"family": "timm", "name": "vit_tiny_patch16_224",
                         "kwargs": {"checkpoint_path": str(GOLDEN)}}, "load or fetch weights"),
        "hub config": ({"family": "timm", "name": "vit_tiny_patch16_224",
                        "kwargs": {"pretrained_cfg_overlay": {"hf_hub_id": "someone/model"}}}, "load or fetch weights"),
        "config list": ([1, 2], "must be a JSON object"),
        "broken json": ("{not json", "unreadable"),
    }
    for name, (config, fragment) in cases.items():
        path = _with_config(tmp_path, config)
        builds.clear()
        with pytest.raises(CheckpointError, match=fragment.replace("[", r"\[")):
            crate_vis.load_model(path)
        assert set(builds) <= {"meta"}, (name, builds)
        if name == "depth bomb":
            assert builds == [], builds
    # the recorder sees real builds: the untouched config is probed on meta, then built on the CPU
    builds.clear()
    crate_vis.load_model(_save_project(tmp_path))
    assert builds == ["meta", "cpu"]


def test_load_model_round_trip_still_works(tmp_path):
    torch.manual_seed(0)
    model = crate_vis.create_model("crate_test_patch8_32").eval()
    back = crate_vis.load_model(crate_vis.save_model(model, tmp_path / "m"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- manifest weights
@pytest.fixture()
def private_manifest(tmp_path, monkeypatch):
    """A weights folder and cache of our own, so that the tests never touch the real ones."""
    weights = tmp_path / "weights"
    weights.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", weights)
    monkeypatch.setenv("CRATE_VIS_CACHE", str(cache))
    pretrained._manifest.cache_clear()

    def write(records: list[dict]) -> None:
        (weights / "manifest.json").write_text(json.dumps({"format": 1, "weights": records}))
        pretrained._manifest.cache_clear()

    yield write, weights, cache
    pretrained._manifest.cache_clear()


GOLDEN_SHA = hashlib.sha256(GOLDEN.read_bytes()).hexdigest()


def _record(**fields) -> dict:
    base = {"name": "crate_test_patch8_32.t", "model": "crate_test_patch8_32", "file": "crate_ref_a.pth.tar",
            "sha256": GOLDEN_SHA, "source": "tests"}  # fmt: skip
    return {**base, **fields}


def _modified_copy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = bytearray(GOLDEN.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    path = folder / "crate_ref_a.pth.tar"
    path.write_bytes(bytes(data))
    return path


def test_checksum_mismatch_of_a_modified_copy(tmp_path):
    copy = _modified_copy(tmp_path / "downloads")
    with pytest.raises(ChecksumError, match="does not match the manifest"):
        resolve_weights(str(copy), model_name="crate_test_patch8_32")
    with pytest.raises(ChecksumError):
        crate_vis.create_model("crate_test_patch8_32", pretrained=str(copy))
    shutil.copyfile(GOLDEN, copy)
    assert resolve_weights(str(copy), model_name="crate_test_patch8_32") == copy


def test_checksum_mismatch_in_weights_folder_and_download(private_manifest, tmp_path):
    write, weights, cache = private_manifest
    _modified_copy(weights)
    write([_record()])
    with pytest.raises(ChecksumError):
        resolve_weights("crate_test_patch8_32.t")
    (weights / "crate_ref_a.pth.tar").unlink()
    bad = _modified_copy(tmp_path / "mirror")
    write([_record(url=bad.as_uri())])
    with pytest.raises(ChecksumError):
        resolve_weights("crate_test_patch8_32.t")
    assert not (cache / "crate_ref_a.pth.tar").exists()  # a corrupt download is not kept
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    shutil.copyfile(GOLDEN, bad)
    assert resolve_weights("crate_test_patch8_32.t") == cache / "crate_ref_a.pth.tar"  # good download verified


@pytest.mark.parametrize("url", ["file:///nonexistent-crate-vis/weights.pth", "http://127.0.0.1:9/weights.pth"])
def test_offline_urls_say_where_to_put_the_file(private_manifest, url, monkeypatch):
    write, weights, cache = private_manifest
    attempts: list[tuple[str, float | None]] = []
    real_urlopen = urllib.request.urlopen

    def recording_urlopen(target, *args, **kwargs):
        attempts.append((str(target), kwargs.get("timeout", args[1] if len(args) > 1 else None)))
        return real_urlopen(target, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", recording_urlopen)
    for record_url, spec, dest in [
        (url, "crate_test_patch8_32.t", cache / "crate_ref_a.pth.tar"),  # a manifest record with a URL
        (None, url, cache / "weights.pth"),  # a URL given directly
    ]:
        write([_record(url=record_url)])
        attempts.clear()
        with pytest.raises(WeightsNotFoundError) as info:
            resolve_weights(spec)
        # one attempt, with a finite timeout (no retries, no wait without end on an address that never answers)
        assert len(attempts) == 1 and attempts[0][0] == url, attempts
        assert attempts[0][1] is not None and 0 < attempts[0][1] <= 60, attempts
        message = str(info.value)
        assert url in message and f"put it at {dest}" in message, message
    assert not cache.exists() or not list(cache.iterdir())


def test_missing_weights_without_url(private_manifest):
    write, weights, cache = private_manifest
    write([_record(url=None)])
    with pytest.raises(WeightsNotFoundError, match="put the file at .*crate_ref_a.pth.tar"):
        resolve_weights("crate_test_patch8_32.t")
    with pytest.raises(WeightsNotFoundError, match="neither an existing file"):
        resolve_weights("no-such-weights")


# --------------------------------------------------------------------------------------------------- fuzzing
def test_mutated_checkpoints_only_raise_checkpoint_error(tmp_path):
    from safetensors.torch import save

    sources = [(GOLDEN.read_bytes(), ".pth.tar"), (save({"w": torch.arange(12.0).reshape(3, 4)}), ".safetensors")]
    rng = random.Random(1234)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(300):  # a fixed number of seeded mutations (about a second)
        blob, suffix = rng.choice(sources)
        data = bytearray(blob)
        kind = rng.randrange(3)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            del data[rng.randrange(1, len(data)) :]
        else:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 32))
        path = tmp_path / f"m{suffix}"
        path.write_bytes(bytes(data))
        try:
            sd, _ = read_checkpoint(path)
        except CheckpointError:
            outcomes["refused"] += 1
        else:
            assert sd and all(isinstance(v, torch.Tensor) for v in sd.values())
            outcomes["ok"] += 1
    assert outcomes["refused"] > 20 and outcomes["ok"] + outcomes["refused"] == 300, outcomes


# ------------------------------------------------------------------------------------- CIFAR python pickles
def test_hostile_cifar_pickle_is_refused(tmp_path):
    from crate_vis.data import folders
    marker = tmp_path / "MARKER"
    for protocol in (0, 2, 4):
        path = tmp_path / f"data_batch_{protocol}"
        path.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=protocol))
        with pytest.raises(ValueError, match="refused"):
            folders.read_cifar_pickle(path)
    assert not marker.exists()


def test_cifar_pickle_with_a_corrupt_codec_name_is_a_value_error(tmp_path):
    from crate_vis.data import folders
    blob = pickle.dumps({b"data": b"abc"}, protocol=2)  # bytes travel as _codecs.encode(str, "latin1")
    assert b"latin1" in blob
    (tmp_path / "batch").write_bytes(blob.replace(b"latin1", b"nosuch"))
    with pytest.raises(ValueError):
        folders.read_cifar_pickle(tmp_path / "batch")


# ------------------------------------------------------------------------------------ training checkpoints
def test_hostile_training_checkpoint_is_refused(tmp_path):
    from crate_vis.train import checkpointing
    marker = tmp_path / "MARKER"
    path = tmp_path / "last.pt"
    torch.save({"format": checkpointing.CHECKPOINT_FORMAT, "model": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="unreadable training checkpoint"):
        checkpointing.load_training_state(path)
    assert not marker.exists()
    data = GOLDEN.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable training checkpoint"):
        checkpointing.load_training_state(path)


def test_text_file_as_training_checkpoint_is_a_value_error(tmp_path):
    from crate_vis.train import checkpointing
    (tmp_path / "last.pt").write_text("hello world\n")
    with pytest.raises(ValueError):
        checkpointing.load_training_state(tmp_path / "last.pt")


# ------------------------------------------------------------------------------------ tensors that do not fit
def _golden_state() -> dict[str, torch.Tensor]:
    return read_state_dict(GOLDEN)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda t: t.to_sparse(), "wrongly-typed keys"),
        (lambda t: t.bool(), "wrongly-typed keys"),
        (lambda t: t.to(torch.complex64), "wrongly-typed keys"),
        (lambda t: t.long(), "wrongly-typed keys"),
        (lambda t: torch.full_like(t, float("nan")), "NaN or inf"),
        (lambda t: t.index_fill(-1, torch.tensor([0]), float("inf")), "NaN or inf"),
    ],
    ids=["sparse", "bool", "complex", "int64", "nan", "inf"],
)
def test_wrong_kinds_of_tensor_are_refused_before_any_copy(tmp_path, change, fragment):
    model = _golden_model()
    before = _snapshot(model)
    sd = _golden_state()
    key = "blocks.2.ista.weight"  # late in the order: a key-by-key copy would have changed the others first
    sd[key] = change(sd[key])
    path = tmp_path / "changed.pth"
    torch.save(sd, path)
    for src in (sd, path):
        with pytest.raises(CheckpointError, match=fragment) as info:
            crate_vis.load_checkpoint(model, src)
        assert key in str(info.value)
    _assert_unchanged(model, before)


def test_lower_precision_weights_still_load():
    model = crate_vis.create_model("crate_test_patch8_32")
    sd = {k: v.half() for k, v in _golden_state().items()}
    crate_vis.load_checkpoint(model, sd)
    torch.testing.assert_close(model.cls_token, sd["cls_token"].float())


def test_non_string_keys(tmp_path):
    torch.save({1: torch.zeros(1)}, tmp_path / "int_keys.pth")
    with pytest.raises(CheckpointError, match="not a parameter name"):
        read_checkpoint(tmp_path / "int_keys.pth")


def test_saved_config_never_records_weight_sources():
    from crate_vis.models.checkpoint import model_to_config

    model = crate_vis.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)
    model.creation_kwargs = {**model.creation_kwargs, "checkpoint_path": "/x.pth", "pretrained_cfg_overlay": {}}
    kwargs = model_to_config(model)["kwargs"]
    assert "checkpoint_path" not in kwargs and "pretrained_cfg_overlay" not in kwargs
    assert kwargs["num_classes"] == 3 and kwargs["img_size"] == [32, 32]
