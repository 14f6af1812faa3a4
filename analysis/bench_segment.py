"""Segmentation speed on COCO128 photos at 480 px with patch 8 (3,600 tokens): DINO, TokenCut and MaskCut images/s
through ``crate-vis segment`` with 1 and 2 processes, and CutLER's ``maskcut_forward`` on the same features.

Tables (every ratio is between rows measured in this run):

1. ``crate-vis segment`` wall-clock images/s on the first ``--images`` COCO128 photos (``--img-size 480 --square``,
   ``crate_seg_small_patch8_224`` at random init, one torch thread per process), with one process and with two
   (``--shard 0/2`` and ``--shard 1/2`` side by side, then ``--merge``), for each method;
2. MaskCut (3 masks, tau 0.15) on identical features: crate-vis (default rules, Lanczos), crate-vis with
   ``cut_rules="cutler"`` (dense, CutLER's rules) and CutLER's own ``maskcut_forward`` (given ``--cutler``: the path
   of ``maskcut/maskcut.py`` of facebookresearch/CutLER, and ``--tokencut``: TokenCut's
   ``unsupervised_saliency_detection`` folder, which it imports; both are read at run time, nothing of them is part of
   this repository), with the masks compared.

Run: ``python analysis/bench_segment.py [--images 16] [--cutler PATH --tokencut PATH]``.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128"


def _segment(inputs: list[Path], out: Path, weights: Path, method: str, shard: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "crate_vis", "segment", *map(str, inputs), "--out", str(out), "-c", str(weights),
           "--method", method, "--img-size", "480", "--square", "--no-overlay", "--no-progress"]  # fmt: skip
    if shard:
        cmd += ["--shard", shard]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)


def bench_processes(images: list[Path], weights: Path, methods: list[str]) -> list[tuple[str, float, float]]:
    """(method, images/s with one process, with two) for the CLI, wall clock including start-up."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            t0 = time.perf_counter()
            p = _segment(images, Path(tmp) / f"{method}_1", weights, method, None)
            assert p.wait() == 0, p.stderr.read()
            one = len(images) / (time.perf_counter() - t0)
            out2 = Path(tmp) / f"{method}_2"
            t0 = time.perf_counter()
            procs = [_segment(images, out2, weights, method, f"{i}/2") for i in range(2)]
            assert all(q.wait() == 0 for q in procs), [q.stderr.read() for q in procs]
            from crate_vis.experiments.segment import merge_shards

            merge_shards(out2)
            two = len(images) / (time.perf_counter() - t0)
            same = (Path(tmp) / f"{method}_1" / "results.json").read_bytes() == (out2 / "results.json").read_bytes()
            rows.append((method, one, two, same))
    return rows


def load_cutler(cutler: Path, tokencut: Path) -> types.SimpleNamespace:
    """CutLER's MaskCut functions from its source file, with TokenCut's ``detect_box`` and ``metric`` it imports."""
    import importlib

    sys.path.insert(0, str(tokencut))
    metric = importlib.import_module(next(n for n in ("metric", "sal_metric") if (tokencut / f"{n}.py").exists()))
    discovery = next(n for n in ("object_discovery", "sal_object_discovery") if (tokencut / f"{n}.py").exists())
    detect_box = importlib.import_module(discovery).detect_box

    import torch.nn.functional as F
    from scipy import ndimage
    from scipy.linalg import eigh

    names = ["get_affinity_matrix", "second_smallest_eigenvector", "get_salient_areas", "check_num_fg_corners",
             "get_masked_affinity_matrix", "maskcut_forward"]  # fmt: skip
    src = cutler.read_text()
    funcs = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name in names]
    ns = dict(np=np, torch=torch, F=F, eigh=eigh, ndimage=ndimage, detect_box=detect_box, metric=metric)
    exec(compile("\n\n".join(ast.get_source_segment(src, f) for f in funcs), str(cutler), "exec"), ns)  # noqa: S102
    return types.SimpleNamespace(**{k: ns[k] for k in names})


def bench_maskcut(images: list[Path], cutler: types.SimpleNamespace | None) -> list[list[str]]:
    """Seconds per image of MaskCut on identical features: crate-vis default, crate-vis cutler rules, CutLER."""
    from crate_vis import create_model
    from crate_vis.data.image_geometry import prepare_image
    from crate_vis.hooks import subspace_features
    from crate_vis.io.images import load_image
    from crate_vis.segmentation.maskcut import maskcut

    torch.manual_seed(0)
    model = create_model("crate_seg_small_patch8_224").eval()
    times: dict[str, list[float]] = {"crate-vis default rules (Lanczos)": [], "crate-vis cutler rules (dense)": [],
                                     "CutLER maskcut_forward": []}  # fmt: skip
    agree, compared = 0, 0
    for path in images:
        x = prepare_image(load_image(path), 8, 480, square=True).tensor[None]
        feats = subspace_features(model, x)[0]  # (h, 3600, dh)
        f = feats.permute(1, 0, 2).reshape(feats.shape[1], -1)  # (3600, h*dh), float32 as the reference gets them
        t0 = time.perf_counter()
        maskcut(f.double().numpy(), (60, 60), tau=0.15, max_masks=3)
        times["crate-vis default rules (Lanczos)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = maskcut(f.numpy(), (60, 60), tau=0.15, max_masks=3, rules="cutler")
        times["crate-vis cutler rules (dense)"].append(time.perf_counter() - t0)
        if cutler is not None:
            t0 = time.perf_counter()
            _, bipartitions, _ = cutler.maskcut_forward(f.T.contiguous(), [60, 60], [1, 1], [60, 60], tau=0.15, N=3,
                                                        cpu=True)  # fmt: skip
            times["CutLER maskcut_forward"].append(time.perf_counter() - t0)
            ref = [np.asarray(b, bool) for b in bipartitions if np.asarray(b).any()]
            compared += 1
            agree += len(ref) == len(ours.masks) and all((r == o).all() for r, o in zip(ref, ours.masks))
    rows = []
    ref_t = np.mean(times["CutLER maskcut_forward"]) if times["CutLER maskcut_forward"] else None
    for name, ts in times.items():
        if not ts:
            rows.append([name, "-", "-", "(pass --cutler and --tokencut)"])
            continue
        s = float(np.mean(ts))
        rows.append([name, f"{s:.2f}", f"{ref_t / s:.1f}x" if ref_t else "-", ""])
    if compared:
        rows.append(["masks of cutler rules == CutLER's", f"{agree}/{compared} images", "", ""])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="COCO128 photos (default 16)")
    parser.add_argument("--cutler", type=Path, default=None, help="CutLER's maskcut/maskcut.py (read at run time)")
    parser.add_argument("--tokencut", type=Path, default=None, help="TokenCut's unsupervised_saliency_detection/")
    parser.add_argument("--methods", default="dino,tokencut,maskcut")
    parser.add_argument("--parts", default="processes,maskcut", help="which tables (default both)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = sorted((COCO128 / "train2017").glob("*.jpg"))[: args.images]
    if not images:
        raise SystemExit(f"{COCO128} not found: the benchmark reads its photos from ../shared/data")
    from crate_vis import create_model, save_model

    parts = args.parts.split(",")
    print(f"torch {torch.__version__}; {len(images)} COCO128 photos at 480x480 px, patch 8 (3,600 tokens); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    if "processes" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            weights = save_model(create_model("crate_seg_small_patch8_224"), Path(tmp) / "w").parent
            rows = bench_processes(images, weights, args.methods.split(","))
        print(_table(["method", "1 process img/s", "2 processes img/s", "speed-up", "merged == single"],
                     [[m, f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}x", str(same)] for m, a, b, same in rows]))  # fmt: skip
        print()
    if "maskcut" in parts:
        cutler = load_cutler(args.cutler, args.tokencut) if args.cutler and args.tokencut else None
        print(_table(["MaskCut, 3 masks, tau 0.15, same features (masks at the 60x60 grid)", "s/image", "vs CutLER",
                      ""], bench_maskcut(images[: min(len(images), 6)], cutler)))  # fmt: skip


if __name__ == "__main__":
    main()
