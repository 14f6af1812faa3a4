"""Forward throughput of CRATE-T/16 (explicit, fused d4b70ad, fused; fp32, bf16 autocast, bf16 weights) beside timm ViT-T/16 and ViT-S/16, and of CRATE-alpha-B/16 (crate-vis fused and explicit, the reference implementation).

Everything is measured in one run, round-robin (one forward of each configuration per round), and reported as
medians with ratios inside each table.

**FLOP counts.** "nominal" is the model's own count (:meth:`CRATE.flops_per_image`: matrix products of the
definition, ISTA as the two products ``D z`` and ``D^T r``); "executed" counts the products each path actually runs:
the explicit ISTA runs three (``D z``, ``D^T D z``, ``D^T z``), the fused ISTA of d4b70ad two, and the current fused
ISTA one token-sized product plus one ``dim^3`` product per forward when a batch has at least ``dim`` tokens (see
:class:`crate_vis.models.crate.ISTAStep`). The GFLOP/s columns are set against the plain fp32/bf16 rate of a
2048^3 matrix product and against the rate of one product at the model's own shape,
``(batch * tokens, dim) @ (dim, dim)``.

**CRATE-alpha-B/16** (batch ``--alpha-batch``, 224 px): ``crate_alpha_base_patch16_224`` with random weights, the
same weights loaded into the reference model (``torch_inference/model/crate_alpha.py`` of UCSC-VLAA/CRATE-alpha,
imported at run time from ``--reference-alpha PATH``; it needs ``einops``) through
:func:`crate_vis.load_checkpoint`, which renames the official keys
(:data:`crate_vis.models.conversion.OFFICIAL_TO_CRATE_VIS_ALPHA`). The reference's logits are compared with both
crate-vis paths. Without ``--reference-alpha`` the reference row is left out.

Usage::

    python analysis/bench_model.py --threads 1 [--batch-size 8] [--img-size 224] [--repeats 10]
        [--reference-alpha /tmp/ref_alpha/crate_alpha.py] [--alpha-batch 8] [--alpha-repeats 3] [--no-alpha]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from crate_vis import create_model, load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import PREVIOUS, with_previous_fused_path  # noqa: E402  (a sibling script)

PRECISIONS = ("fp32", "bf16-autocast", "bf16")  # bf16: weights and inputs cast to bf16 once


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median wall time of each function, timed round-robin so that load on the machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def vit_flops_per_image(model: nn.Module, tokens: int) -> float:
    """Matrix-product FLOPs of a timm ViT forward (qkv, attention, projection, MLP, patch embedding, head)."""
    d = model.embed_dim
    blocks = len(model.blocks)
    hidden = model.blocks[0].mlp.fc1.out_features
    per_block = tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d + 2 * tokens * d * hidden
    patch = model.patch_embed.proj
    patch_flops = (tokens - model.num_prefix_tokens) * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * d
    return 2.0 * (blocks * per_block + patch_flops + d * model.num_classes)


def crate_executed_flops(model: nn.Module, path: str, batch: int, size: int) -> float:
    """FLOPs per image the given CRATE path runs at ``size`` px: the nominal count with its ISTA products replaced."""
    d, depth = model.embed_dim, model.depth
    gh, gw = model.feature_grid(size, size)
    tokens = gh * gw + model.num_prefix_tokens
    nominal = model.flops_per_image(size, size)
    token_product = 2.0 * tokens * d * d  # one (tokens, d) @ (d, d) product, per image
    if path == "explicit":
        ista = 3 * token_product
    elif path == "fused" and batch * tokens >= d:
        ista = token_product + 2.0 * d**3 / batch  # z + z E, and E = eta (D - D^T D) once per forward
    else:  # the previous fused path, or the current one on fewer tokens than channels
        ista = 2 * token_product
    return nominal + depth * (ista - 2 * token_product)


def make_step(model: nn.Module, x: torch.Tensor, precision: str, fused: bool | None) -> Callable[[], torch.Tensor]:
    inp = x.to(torch.bfloat16) if precision == "bf16" else x

    def step() -> torch.Tensor:
        if fused is not None:
            model.set_fused(fused)
        with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=precision == "bf16-autocast"):
            return model(inp)

    return step


def _table(rows: list[tuple], columns: list[tuple[str, str]]) -> None:
    """Print ``rows`` (tuples of values) as a markdown table; ``columns`` are ``(title, format)``."""
    cells = [[format(v, f) for v, (_, f) in zip(row, columns)] for row in rows]
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, (t, _) in enumerate(columns)]
    print("| " + " | ".join(t.ljust(w) for (t, _), w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))) + " |")


# ----------------------------------------------------------------------------------------------- CRATE-T/16 table
def bench_crate_t(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    crate = create_model("crate_tiny_patch16_224").to(device).eval()
    previous = with_previous_fused_path(crate)
    tokens = (args.img_size // 16) ** 2 + 1
    vits = {name: create_model(name, img_size=args.img_size).to(device).eval()
            for name in ("vit_tiny_patch16_224", "vit_small_patch16_224")}  # fmt: skip

    n_mm = 2048
    dtypes = (torch.float32, torch.bfloat16)
    mats = {dt: (torch.randn(n_mm, n_mm, device=device, dtype=dt), torch.randn(n_mm, n_mm, device=device, dtype=dt))
            for dt in dtypes}  # fmt: skip
    # The same rate at the shape of the model's own products: (batch * tokens, dim) @ (dim, dim).
    m_rows, m_dim = args.batch_size * tokens, crate.embed_dim
    small = {dt: (torch.randn(m_rows, m_dim, device=device, dtype=dt), torch.randn(m_dim, m_dim, device=device, dtype=dt))
             for dt in dtypes}  # fmt: skip
    fns: dict[str, Callable[[], object]] = {
        "matmul/fp32": lambda: torch.mm(*mats[torch.float32]),
        "matmul/bf16": lambda: torch.mm(*mats[torch.bfloat16]),
        "matmul-model/fp32": lambda: torch.mm(*small[torch.float32]),
        "matmul-model/bf16": lambda: torch.mm(*small[torch.bfloat16]),
    }
    # (label, model, precision, nominal flops, executed flops, fused)
    configs: list[tuple[str, nn.Module, str, float, float, bool | None]] = []
    nominal = crate.flops_per_image(args.img_size, args.img_size)
    for label, model, fused, path in (("CRATE-T/16 explicit", crate, False, "explicit"),
                                      (f"CRATE-T/16 fused {PREVIOUS}", previous, True, "previous"),
                                      ("CRATE-T/16 fused", crate, True, "fused")):  # fmt: skip
        executed = crate_executed_flops(crate, path, args.batch_size, args.img_size)
        half = copy.deepcopy(model).to(torch.bfloat16)
        for precision in PRECISIONS:
            configs.append((label, half if precision == "bf16" else model, precision, nominal, executed, fused))
    for name, vit in vits.items():
        flops = vit_flops_per_image(vit, tokens)
        half = copy.deepcopy(vit).to(torch.bfloat16)
        for precision in PRECISIONS:
            configs.append((name, half if precision == "bf16" else vit, precision, flops, flops, None))

    logits: dict[str, torch.Tensor] = {}
    for label, model, precision, _, _, fused in configs:
        key = f"{label}/{precision}"
        fns[key] = make_step(model, x, precision, fused)
        logits[key] = fns[key]().float().cpu()
    seconds = interleaved_medians(fns, device, warmup=2, repeats=args.repeats)
    mm = {p: 2 * n_mm**3 / seconds[f"matmul/{p}"] / 1e9 for p in ("fp32", "bf16")}
    shaped = {p: 2 * m_rows * m_dim * m_dim / seconds[f"matmul-model/{p}"] / 1e9 for p in ("fp32", "bf16")}

    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} img={args.img_size} "
          f"torch={torch.__version__}")  # fmt: skip
    print(f"plain matmul {n_mm}^3: fp32 {mm['fp32']:.1f} GFLOP/s, bf16 {mm['bf16']:.1f} GFLOP/s")
    print(f"matmul at the model's shape ({m_rows}x{m_dim} @ {m_dim}x{m_dim}): fp32 {shaped['fp32']:.1f} GFLOP/s, "
          f"bf16 {shaped['bf16']:.1f} GFLOP/s\n")  # fmt: skip
    base = args.batch_size / seconds["CRATE-T/16 explicit/fp32"]
    rows = []
    for label, _, precision, flops, executed, _ in configs:
        ips = args.batch_size / seconds[f"{label}/{precision}"]
        p = "fp32" if precision == "fp32" else "bf16"
        rows.append((label, precision, ips, ips / base, flops * ips / 1e9, 100 * flops * ips / 1e9 / mm[p],
                     100 * flops * ips / 1e9 / shaped[p], executed * ips / 1e9, 100 * executed * ips / 1e9 / shaped[p]))  # fmt: skip
    _table(rows, [("model", ""), ("precision", ""), ("images/s", ".1f"), ("vs explicit fp32", ".2f"),
                  ("nominal GFLOP/s", ".1f"), ("% of matmul", ".1f"), ("% of model-shape mm", ".1f"),
                  ("executed GFLOP/s", ".1f"), ("executed % of model-shape mm", ".1f")])  # fmt: skip
    ref = logits["CRATE-T/16 explicit/fp32"]
    print()
    for label in (f"CRATE-T/16 fused {PREVIOUS}", "CRATE-T/16 fused"):
        for precision in PRECISIONS:
            out = logits[f"{label}/{precision}"]
            rel = ((out - ref).abs().max() / ref.abs().max()).item()
            same = torch.equal(out.argmax(-1), ref.argmax(-1))
            print(f"{label} {precision} vs explicit fp32: same argmax {same}, max |logit diff| / max |logit| {rel:.2e}")


# --------------------------------------------------------------------------------------------- CRATE-alpha table
def load_reference_alpha(path: str) -> type[nn.Module]:
    """The reference ``CRATE`` class from ``torch_inference/model/crate_alpha.py``, imported from ``path``."""
    spec = importlib.util.spec_from_file_location("reference_crate_alpha", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--reference-alpha: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CRATE


def bench_alpha(args: argparse.Namespace, device: torch.device) -> None:
    name, size, batch = "crate_alpha_base_patch16_224", 224, args.alpha_batch
    torch.manual_seed(0)
    ours = create_model(name).to(device).eval()
    models: dict[str, tuple[nn.Module, bool | None]] = {
        "crate-vis fused": (ours, True),
        "crate-vis explicit": (ours, False),
    }
    if args.reference_alpha:
        reference_cls = load_reference_alpha(args.reference_alpha)
        reference = reference_cls(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12,
                                  dim_head=64).to(device).eval()  # fmt: skip
        load_checkpoint(ours, reference.state_dict())  # official keys, renamed; strict
        models["reference"] = (reference, None)
    else:
        print("CRATE-alpha: no --reference-alpha PATH given; the reference row is left out\n")
    x = torch.randn(batch, 3, size, size, device=device)
    tokens = (size // 16) ** 2 + 1
    flops = ours.flops_per_image(size, size)
    precisions = ("fp32", "bf16-autocast")
    fns: dict[str, Callable[[], object]] = {}
    logits: dict[str, torch.Tensor] = {}
    for label, (model, fused) in models.items():
        for precision in precisions:
            key = f"{label}/{precision}"
            fns[key] = make_step(model, x, precision, fused)
            logits[key] = fns[key]().float().cpu()
    d, code = ours.embed_dim, ours.overcomplete_ratio * ours.embed_dim
    m_rows = batch * tokens
    shaped_mats = {dt: (torch.randn(m_rows, d, device=device, dtype=dt), torch.randn(d, code, device=device, dtype=dt))
                   for dt in (torch.float32, torch.bfloat16)}  # fmt: skip
    fns["matmul-model/fp32"] = lambda: torch.mm(*shaped_mats[torch.float32])
    fns["matmul-model/bf16"] = lambda: torch.mm(*shaped_mats[torch.bfloat16])
    seconds = interleaved_medians(fns, device, warmup=1, repeats=args.alpha_repeats)
    shaped = {p: 2 * m_rows * d * code / seconds[f"matmul-model/{p}"] / 1e9 for p in ("fp32", "bf16")}

    print(f"CRATE-alpha-B/16 ({name}), batch={batch}, img={size}, {flops / 1e9:.1f} GFLOP/image; "
          f"matmul at the model's shape ({m_rows}x{d} @ {d}x{code}): fp32 {shaped['fp32']:.1f} GFLOP/s, "
          f"bf16 {shaped['bf16']:.1f} GFLOP/s\n")  # fmt: skip
    base_label = "reference" if "reference" in models else "crate-vis explicit"
    rows = []
    for precision in precisions:
        base = batch / seconds[f"{base_label}/{precision}"]
        for label in models:
            ips = batch / seconds[f"{label}/{precision}"]
            p = "fp32" if precision == "fp32" else "bf16"
            rows.append((label, precision, ips, ips / base, flops * ips / 1e9, 100 * flops * ips / 1e9 / shaped[p]))
    _table(rows, [("model", ""), ("precision", ""), ("images/s", ".1f"), (f"vs {base_label}", ".2f"),
                  ("GFLOP/s", ".1f"), ("% of model-shape mm", ".1f")])  # fmt: skip
    print()
    for precision in precisions:
        ref = logits[f"{base_label}/{precision}"]
        for label in models:
            if label == base_label:
                continue
            out = logits[f"{label}/{precision}"]
            diff = (out - ref).abs().max().item()
            print(f"CRATE-alpha-B/16 {label} vs {base_label}, {precision}: max |logit diff| {diff:.2e} "
                  f"(max |logit| {ref.abs().max().item():.2f}), same argmax {torch.equal(out.argmax(-1), ref.argmax(-1))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference-alpha", default=None, metavar="PATH",
                        help="torch_inference/model/crate_alpha.py of UCSC-VLAA/CRATE-alpha (needs einops)")  # fmt: skip
    parser.add_argument("--alpha-batch", type=int, default=8)
    parser.add_argument("--alpha-repeats", type=int, default=3)
    parser.add_argument("--no-alpha", action="store_true", help="leave out the CRATE-alpha-B/16 table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bench_crate_t(args, device)
    if not args.no_alpha:
        print()
        bench_alpha(args, device)


if __name__ == "__main__":
    main()
