"""Cost of recording attention with :class:`crate_vis.hooks.AttentionRecorder`, relative to a plain fused forward.

For each model: a plain forward (fused attention, nothing recorded), then the same forward recording every layer's
full attention maps ``(B, h, N, N)``, then every layer's CLS rows ``(B, h, N)``, then a second plain forward whose
ratio to the first ("A/A") shows the noise floor of the machine. Runs are interleaved (one of each
per round, so drifting machine load hits all alike), after warm-up. The table reports median times and, as the
overhead, the median over rounds of each round's ratio to that round's plain forward (pairing within a round keeps
slow drifts in machine load out of the ratio).

Usage::

    python analysis/bench_recorder.py [--batch 8] [--size 224] [--rounds 7] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from crate_vis import create_model
from crate_vis.hooks import AttentionRecorder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_model(model: nn.Module, x: torch.Tensor, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per forward, one entry per round, for ``plain``, ``full`` and ``cls`` recording of all layers, and
    ``plain_again`` (a second plain forward, for the noise floor)."""

    def plain() -> None:
        model(x)

    def full() -> None:
        with AttentionRecorder(model) as rec:
            model(x)
        assert len(rec.attentions) == len(model.blocks)

    def cls() -> None:
        with AttentionRecorder(model, cls_only=True) as rec:
            model(x)
        assert len(rec.attentions) == len(model.blocks)

    cases = {"plain": plain, "full": full, "cls": cls, "plain_again": plain}
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in cases.values():
                fn()
        for _ in range(rounds):
            for name, fn in cases.items():
                times[name].append(_timed(fn, x.device))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["crate_tiny_patch16_224", "vit_small_patch16_224"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    print(f"batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, {device}, "
          f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds; all layers recorded")  # fmt: skip
    print()
    header = f"| {'model':<24} | {'plain fused (ms)':>16} | {'full maps (ms)':>14} | {'x plain':>7} |" \
             f" {'CLS rows (ms)':>13} | {'x plain':>7} | {'A/A plain':>9} |"  # fmt: skip
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name in args.models:
        model = create_model(name).to(device).eval()
        t = bench_model(model, x, args.rounds, args.warmup)
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        ratio = {k: statistics.median(a / b for a, b in zip(t[k], t["plain"])) for k in ("full", "cls", "plain_again")}
        print(f"| {name:<24} | {med['plain']:>16.1f} | {med['full']:>14.1f} | {ratio['full']:>6.2f}x |"
              f" {med['cls']:>13.1f} | {ratio['cls']:>6.2f}x | {ratio['plain_again']:>8.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
