"""Published weights as data: the manifest's records, Hugging Face Hub resolution from the local cache, checksums and
what ``crate-vis list-models`` says about each record.

No test downloads anything: every test runs with ``HF_HUB_OFFLINE=1`` (or with ``hf_hub_download`` replaced), a fake
Hugging Face cache in ``tmp_path`` laid out as ``huggingface_hub`` lays it out, and a private crate-vis cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import crate_vis
from crate_vis.cli import main
from crate_vis.errors import ChecksumError, WeightsNotFoundError
from crate_vis.models import pretrained
from crate_vis.models.checkpoint import load_checkpoint, read_checkpoint
from crate_vis.models.conversion import detect_layout
from crate_vis.models.pretrained import get_record, list_weights, resolve_weights, weights_status
from crate_vis.models.registry import list_models, model_family

DATA = Path(__file__).parent / "data"
ALPHA_GOLDEN = DATA / "crate_alpha_ref_a.pth"  # official CRATE-alpha layout (bare state dict), 10 classes
REPO = "UCSC-VLAA/CRATE-alpha"
B16 = "crate_alpha_base_patch16_224.in1k"

#: Words of a record's ``layout`` -> the family those checkpoints hold, and a golden file in that layout.
LAYOUTS = {
    "official CRATE main.py": ("crate", DATA / "crate_ref_a.pth.tar"),
    "CRATE-alpha torch_inference": ("crate_alpha", ALPHA_GOLDEN),
    "MAE codebase": ("crate_mae", DATA / "crate_mae_ref_a.pth"),
    "crate-vis project format": (None, None),
}


@pytest.fixture(autouse=True)
def offline_caches(tmp_path, monkeypatch):
    """Offline mode, an empty Hugging Face cache and crate-vis cache of our own; every hub call must stay local."""
    hf = tmp_path / "hf-cache"
    own = tmp_path / "crate-vis-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("CRATE_VIS_CACHE", str(own))
    import huggingface_hub

    real = huggingface_hub.hf_hub_download
    calls: list[dict] = []

    def local_only(*args, **kwargs):
        calls.append(kwargs)
        assert kwargs.get("local_files_only") is True, "a test tried to download from the Hugging Face Hub"
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", local_only)
    return hf, own, calls


@pytest.fixture()
def private_manifest(tmp_path, monkeypatch):
    """``write(records)`` replaces the manifest by records of our own (the real one is back after the test)."""
    folder = tmp_path / "weights"
    folder.mkdir()

    def write(records: list[dict]) -> None:
        (folder / "manifest.json").write_text(json.dumps({"format": 1, "weights": records}))
        monkeypatch.setattr(pretrained, "WEIGHTS_DIR", folder)
        pretrained._manifest.cache_clear()

    pretrained._manifest.cache_clear()
    yield write
    pretrained._manifest.cache_clear()


def put_in_hf_cache(cache: Path, repo: str, filename: str, source: Path, revision: str = "a" * 40) -> Path:
    """Store ``source`` as ``huggingface_hub`` stores a download: a blob named by its sha256, a snapshot symlink to
    it under the commit, and ``refs/main`` naming the commit. Returns the snapshot path."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    blob = folder / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, blob)
    snapshot = folder / "snapshots" / revision / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return snapshot


#: The published B/16 record, read before any test replaces the manifest.
B16_RECORD = asdict(get_record(B16))


def _tiny_b16_record(**changes) -> dict:
    """The published B/16 record, pointed at the tiny golden CRATE-alpha (same repo, file and name)."""
    record = dict(B16_RECORD)
    record.update(model="crate_alpha_test_patch8_32", config={"num_classes": 10}, size=ALPHA_GOLDEN.stat().st_size,
                  sha256=hashlib.sha256(ALPHA_GOLDEN.read_bytes()).hexdigest())  # fmt: skip
    record.update(changes)
    return record


# ------------------------------------------------------------------------------------------------- the records
def test_every_record_names_a_registered_model_of_its_layouts_family():
    records = list_weights()
    assert len({r.name for r in records}) == len(records)
    for record in records:
        assert record.model in list_models(), record.name
        assert record.name.split(".")[0] == record.model and record.name.count(".") == 1, record.name
        matches = [words for words in LAYOUTS if record.layout.startswith(words)]
        assert len(matches) == 1, f"{record.name}: layout {record.layout!r} names no known layout"
        family, example = LAYOUTS[matches[0]]
        if family is not None:
            assert model_family(record.model) == family, record.name
            assert detect_layout(read_checkpoint(example)[0]) == (family, "official")
        assert record.source and record.license, record.name
        assert record.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", record.sha256), record.name
        if record.reported_accuracy is not None:
            assert {"dataset", "top1", "reference"} <= set(record.reported_accuracy), record.name
        if record.hf_repo:
            assert record.file == Path(record.hf_filename).name and not record.url, record.name


def test_the_published_checkpoints_are_listed():
    names = {r.name for r in list_weights()}
    assert {"crate_small_patch16_224.in1k", B16, "crate_alpha_large_patch14_224.in1k",
            "crate_mae_base_patch16_224.in1k"} <= names  # fmt: skip
    assert {f"crate_alpha_{s}_patch{p}_224.in21k" for s, ps in (("base", (8, 16, 32)), ("large", (8, 14, 32)))
            for p in ps} <= names  # fmt: skip
    b16, l14 = get_record(B16), get_record("crate_alpha_large_patch14_224.in1k")
    assert (b16.hf_repo, b16.hf_filename, b16.reported_accuracy["top1"]) == (REPO, "torch/crate_alpha_B16.pth", 81.2)
    assert (l14.hf_filename, l14.reported_accuracy["top1"]) == ("torch/crate_alpha_L14.pth", 83.9)
    # a model name alone picks its ImageNet-1K fine-tuned weights, not the ImageNet-21K pre-training
    assert get_record("crate_alpha_base_patch16_224").name == B16


def test_record_sizes_match_the_models_they_name():
    """A known file size is the model's float32 tensors plus the pickle's few kilobytes: the model, patch size and
    ``config`` (19167 classes for the ImageNet-21K heads) of each record are those of the published file."""
    sized = [r for r in list_weights() if r.size is not None]
    assert len(sized) >= 4
    for record in sized:
        with torch.device("meta"):
            model = crate_vis.create_model(record.model, **record.config)
        tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert 0 <= record.size - tensors < 256 * 1024, (record.name, record.size, tensors)


# --------------------------------------------------------------------------------------- Hub resolution, offline
def test_hub_record_resolves_from_the_offline_cache(offline_caches, private_manifest):
    hf, own, calls = offline_caches
    private_manifest([_tiny_b16_record()])
    snapshot = put_in_hf_cache(hf, REPO, "torch/crate_alpha_B16.pth", ALPHA_GOLDEN)
    assert resolve_weights(B16) == snapshot
    assert weights_status(get_record(B16)) == f"in the Hugging Face cache: {snapshot}"

    reference = crate_vis.create_model("crate_alpha_test_patch8_32").eval()
    load_checkpoint(reference, ALPHA_GOLDEN)
    x = torch.randn(2, 3, 32, 32)
    model = crate_vis.create_model("crate_alpha_test_patch8_32", pretrained=True).eval()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    resolved = crate_vis.resolve_model(B16, device="cpu")  # the manifest says which model and how many classes
    torch.testing.assert_close(resolved(x), reference(x), rtol=0, atol=0)
    assert calls and all(c["local_files_only"] for c in calls)
    assert not own.exists()  # nothing copied out of the Hugging Face cache


def test_crate_vis_cache_comes_before_the_hub(offline_caches, private_manifest):
    hf, own, calls = offline_caches
    private_manifest([_tiny_b16_record()])
    own.mkdir()
    shutil.copyfile(ALPHA_GOLDEN, own / "crate_alpha_B16.pth")
    assert resolve_weights(B16) == own / "crate_alpha_B16.pth"
    assert weights_status(get_record(B16)) == f"on disk: {own / 'crate_alpha_B16.pth'}"
    assert calls == []


def test_offline_and_absent_names_the_repo_and_the_command(offline_caches):
    hf, own, calls = offline_caches
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(B16)
    message = str(info.value)
    command = pretrained.hub_download_command(get_record(B16))
    assert re.fullmatch(r"(hf|huggingface-cli) download UCSC-VLAA/CRATE-alpha torch/crate_alpha_B16.pth", command)
    assert REPO in message and f"`{command}`" in message and "HF_HUB_OFFLINE" in message, message
    assert f"put crate_alpha_B16.pth in {own}" in message and str(hf) in message, message
    with pytest.raises(WeightsNotFoundError, match="torch/in21k_Pretrain/crate_alpha_L8_IN21K"):
        resolve_weights("crate_alpha_large_patch8_224.in21k")
    assert calls and all(c["local_files_only"] for c in calls)


def test_offline_and_absent_through_create_model(offline_caches, private_manifest):
    private_manifest([_tiny_b16_record()])
    with pytest.raises(WeightsNotFoundError, match="download UCSC-VLAA/CRATE-alpha torch/crate_alpha_B16.pth"):
        crate_vis.create_model("crate_alpha_test_patch8_32", pretrained=True)


def test_online_failure_also_names_the_command(offline_caches, private_manifest, monkeypatch):
    """Not offline, but the network is unreachable: one download attempt, then the same advice."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    private_manifest([_tiny_b16_record()])
    attempts: list[bool] = []

    def unreachable(*args, local_files_only=False, **kwargs):
        attempts.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(B16)
    assert attempts == [True, False]
    message = str(info.value)
    assert "could not download torch/crate_alpha_B16.pth" in message and "Network is unreachable" in message
    assert "download UCSC-VLAA/CRATE-alpha torch/crate_alpha_B16.pth" in message, message


def test_online_download_lands_in_the_hub_cache_and_is_verified(offline_caches, private_manifest, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    hf, own, _ = offline_caches
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def fake_hub(source: Path):
        def download(repo_id, filename, *, revision=None, cache_dir=None, local_files_only=False):
            if local_files_only:
                raise LocalEntryNotFoundError("not in the cache")
            return str(put_in_hf_cache(Path(cache_dir), repo_id, filename, source))

        return download

    private_manifest([_tiny_b16_record()])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub(ALPHA_GOLDEN))
    expected = hf / "models--UCSC-VLAA--CRATE-alpha" / "snapshots" / ("a" * 40) / "torch" / "crate_alpha_B16.pth"
    assert resolve_weights(B16) == expected
    shutil.rmtree(hf)
    tampered = own.parent / "tampered.pth"
    data = bytearray(ALPHA_GOLDEN.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub(tampered))
    with pytest.raises(ChecksumError, match="does not match the manifest.*--force-download"):
        resolve_weights(B16)


# ------------------------------------------------------------------------------------------------- checksums
def test_checksum_mismatch_is_refused(offline_caches, private_manifest):
    hf, own, _ = offline_caches
    put_in_hf_cache(hf, REPO, "torch/crate_alpha_B16.pth", ALPHA_GOLDEN)
    # the published record: its size (289,348,353 bytes) already tells the tiny file apart, before any hashing
    with pytest.raises(ChecksumError, match="289,348,353") as info:
        resolve_weights(B16)
    assert "Hugging Face cache" in str(info.value) and "--force-download" in str(info.value)
    # size unknown, sha256 known: the hash decides
    private_manifest([_tiny_b16_record(size=None, sha256="0" * 64)])
    with pytest.raises(ChecksumError, match="does not match the manifest"):
        resolve_weights(B16)
    with pytest.raises(ChecksumError):
        crate_vis.create_model("crate_alpha_test_patch8_32", pretrained=True)
    # a copy in the crate-vis cache is checked the same way
    own.mkdir()
    shutil.copyfile(ALPHA_GOLDEN, own / "crate_alpha_B16.pth")
    with pytest.raises(ChecksumError):
        resolve_weights(B16)


def test_checksum_of_a_local_path_with_a_record_name(offline_caches, tmp_path):
    copy = tmp_path / "downloads" / "crate_alpha_B16.pth"
    copy.parent.mkdir()
    shutil.copyfile(ALPHA_GOLDEN, copy)
    with pytest.raises(ChecksumError, match="bytes"):  # matched to the B/16 record by file name and model
        resolve_weights(str(copy), model_name="crate_alpha_base_patch16_224")


# ------------------------------------------------------------------------------------------------ list-models
def test_list_models_names_the_status_of_each_record(offline_caches, capsys):
    hf, own, calls = offline_caches
    snapshot = put_in_hf_cache(hf, REPO, "torch/crate_alpha_B16.pth", ALPHA_GOLDEN)
    own.mkdir()
    (own / "crate_small_patch16_224.in1k.pth.tar").write_bytes(b"x")
    assert main(["list-models", "*"]) == 0
    out = capsys.readouterr().out
    assert f"in the Hugging Face cache: {snapshot}" in out
    l14 = get_record("crate_alpha_large_patch14_224.in1k")
    assert f"absent: `{pretrained.hub_download_command(l14)}` or put crate_alpha_L14.pth in {own}" in out
    assert f"on disk: {own / 'crate_small_patch16_224.in1k.pth.tar'}" in out
    assert (f"absent: put crate_mae_base_patch16_224.in1k.pth in {own} (get it from "
            "https://drive.google.com/file/d/11i5BMwymqOsunq44WD3omN5mS6ZREQPO/view)") in out  # fmt: skip
    for record in list_weights():
        assert record.name in out
    assert calls == []  # the status never goes through hf_hub_download


def test_without_huggingface_hub(offline_caches, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(WeightsNotFoundError, match="pip install huggingface_hub"):
        resolve_weights(B16)
    assert weights_status(get_record(B16)).startswith("absent: `")


def test_hf_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert pretrained.hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert pretrained.hf_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not pretrained.hf_offline()


def test_revision_travels_into_the_command():
    record = pretrained.WeightRecord(name="m.t", model="crate_test_patch8_32", file="w.pth", hf_repo="org/repo",
                                     hf_filename="w.pth", hf_revision="v1")  # fmt: skip
    assert pretrained.hub_download_command(record).endswith("download org/repo w.pth --revision v1")
    with pytest.raises(ValueError, match="go together"):
        pretrained.WeightRecord(name="m.t", model="crate_test_patch8_32", file="w.pth", hf_repo="org/repo")
