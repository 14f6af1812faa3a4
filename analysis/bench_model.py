"""Forward throughput of CRATE-T/16 (explicit vs fused path; fp32, bf16 autocast and bf16 weights) beside timm ViT-T/16 and ViT-S/16.

Prints one table measured in a single run, with ratios against the explicit fp32 CRATE path and the machine's plain
fp32 matrix-multiply rate (model GFLOP/s counts only matrix products, as :meth:`CRATE.flops_per_image` does).

Usage::

    python analysis/bench_model.py [--batch-size 8] [--img-size 224] [--threads N] [--repeats 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from crate_vis import create_model


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


def vit_flops_per_image(model: torch.nn.Module, tokens: int) -> float:
    """Matrix-product FLOPs of a timm ViT forward (qkv, attention, projection, MLP, patch embedding, head)."""
    d = model.embed_dim
    blocks = len(model.blocks)
    hidden = model.blocks[0].mlp.fc1.out_features
    per_block = tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d + 2 * tokens * d * hidden
    patch = model.patch_embed.proj
    patch_flops = (tokens - model.num_prefix_tokens) * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * d
    return 2.0 * (blocks * per_block + patch_flops + d * model.num_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)

    crate = create_model("crate_tiny_patch16_224").to(device).eval()
    tokens = (args.img_size // 16) ** 2 + 1
    crate_flops = crate.flops_per_image(args.img_size, args.img_size)
    vits = {name: create_model(name, img_size=args.img_size).to(device).eval()
            for name in ("vit_tiny_patch16_224", "vit_small_patch16_224")}  # fmt: skip

    n_mm = 2048
    mats = {dt: (torch.randn(n_mm, n_mm, device=device, dtype=dt), torch.randn(n_mm, n_mm, device=device, dtype=dt))
            for dt in (torch.float32, torch.bfloat16)}  # fmt: skip
    # The same rate at the shape of the model's own products: (batch * tokens, dim) @ (dim, dim).
    m_rows, m_dim = args.batch_size * tokens, crate.embed_dim
    small = {dt: (torch.randn(m_rows, m_dim, device=device, dtype=dt), torch.randn(m_dim, m_dim, device=device, dtype=dt))
             for dt in (torch.float32, torch.bfloat16)}  # fmt: skip
    fns: dict[str, Callable[[], object]] = {
        "matmul/fp32": lambda: torch.mm(*mats[torch.float32]),
        "matmul/bf16": lambda: torch.mm(*mats[torch.bfloat16]),
        "matmul-model/fp32": lambda: torch.mm(*small[torch.float32]),
        "matmul-model/bf16": lambda: torch.mm(*small[torch.bfloat16]),
    }
    # precision: "fp32"; "bf16-autocast" (fp32 weights, autocast); "bf16" (weights and inputs cast to bf16 once)
    crate_bf16 = copy.deepcopy(crate).to(torch.bfloat16)
    vits_bf16 = {name: copy.deepcopy(vit).to(torch.bfloat16) for name, vit in vits.items()}
    configs: list[tuple[str, torch.nn.Module, str, float, bool | None]] = []
    for fused in (False, True):
        label = "CRATE-T/16 " + ("fused" if fused else "explicit")
        configs.append((label, crate, "fp32", crate_flops, fused))
        configs.append((label, crate, "bf16-autocast", crate_flops, fused))
        configs.append((label, crate_bf16, "bf16", crate_flops, fused))
    for name, vit in vits.items():
        flops = vit_flops_per_image(vit, tokens)
        configs += [(name, vit, "fp32", flops, None), (name, vit, "bf16-autocast", flops, None),
                    (name, vits_bf16[name], "bf16", flops, None)]  # fmt: skip

    def make_step(model: torch.nn.Module, precision: str, fused: bool | None) -> Callable[[], torch.Tensor]:
        inp = x.to(torch.bfloat16) if precision == "bf16" else x

        def step() -> torch.Tensor:
            if fused is not None:
                model.set_fused(fused)
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-autocast"):
                return model(inp)

        return step

    logits: dict[str, torch.Tensor] = {}
    for label, model, precision, _, fused in configs:
        key = f"{label}/{precision}"
        fns[key] = make_step(model, precision, fused)
        logits[key] = fns[key]().float().cpu()
    seconds = interleaved_medians(fns, device, warmup=2, repeats=args.repeats)
    mm32 = 2 * n_mm**3 / seconds["matmul/fp32"] / 1e9
    mm16 = 2 * n_mm**3 / seconds["matmul/bf16"] / 1e9
    small_flops = 2 * m_rows * m_dim * m_dim
    ms32 = small_flops / seconds["matmul-model/fp32"] / 1e9
    ms16 = small_flops / seconds["matmul-model/bf16"] / 1e9
    rows = []  # (model, precision, images/s, GFLOP/s)
    for label, _, precision, flops, _ in configs:
        ips = args.batch_size / seconds[f"{label}/{precision}"]
        rows.append((label, precision, ips, flops * ips / 1e9))
    base = next(r[2] for r in rows if r[0] == "CRATE-T/16 explicit" and r[1] == "fp32")

    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} img={args.img_size} "
          f"torch={torch.__version__}")  # fmt: skip
    print(f"plain matmul {n_mm}^3: fp32 {mm32:.1f} GFLOP/s, bf16 {mm16:.1f} GFLOP/s")
    print(f"matmul at the model's shape ({m_rows}x{m_dim} @ {m_dim}x{m_dim}): fp32 {ms32:.1f} GFLOP/s, "
          f"bf16 {ms16:.1f} GFLOP/s\n")
    header = f"| {'model':<24} | {'precision':<13} | {'images/s':>9} | {'vs explicit fp32':>16} | {'GFLOP/s':>8} | {'% of matmul':>11} | {'% of model-shape mm':>19} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for label, precision, ips, gflops in rows:
        peak, shaped = (mm32, ms32) if precision == "fp32" else (mm16, ms16)
        print(f"| {label:<24} | {precision:<13} | {ips:>9.1f} | {ips / base:>15.2f}x | {gflops:>8.1f} "
              f"| {100 * gflops / peak:>10.1f}% | {100 * gflops / shaped:>18.1f}% |")
    ref = logits["CRATE-T/16 explicit/fp32"]
    print()
    for precision in ("fp32", "bf16-autocast", "bf16"):
        out = logits[f"CRATE-T/16 fused/{precision}"]
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        same = torch.equal(out.argmax(-1), ref.argmax(-1))
        print(f"CRATE-T/16 fused {precision} vs explicit fp32: same argmax {same}, max |logit diff| / max |logit| {rel:.2e}")


if __name__ == "__main__":
    main()
