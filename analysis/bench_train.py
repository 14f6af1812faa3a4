"""Training throughput (forward + backward + AdamW step) of CRATE vs a timm ViT of matched FLOPs, fp32 and bf16, on CPU.

Settings: ``crate_tiny_patch16_224`` at 224 px (batch 8) and ``crate_mini_patch8_96`` at 64 and 96 px (batch 32).

**How the ViT is matched.** A timm ``VisionTransformer`` with the CRATE's depth, patch size, head width
(``dim_head``), class count and a class token; its width is the smallest multiple of the head width whose FLOPs with
``mlp_ratio=4`` reach the CRATE's, and its MLP hidden width is then chosen so that the matrix-product FLOPs of one
forward pass (patch embedding, qkv, attention, projection, MLP, head; as :meth:`CRATE.flops_per_image` counts them,
using the two-product ISTA of the definition) are as close as possible to the CRATE's. The table prints both counts.
A CRATE layer costs as much as a ViT attention sub-layer alone, so at equal FLOPs the ViT is narrower and spends a
smaller share of its FLOPs in attention. The ViT is timm's as it comes: its attention is
``F.scaled_dot_product_attention``, whose CPU backward in bfloat16 is slow at these sizes (the CRATE fused path
avoids it there, see :class:`crate_vis.models.crate.SubspaceAttention`), so the bf16 ratios include that difference.

**Rows, timed round-robin in one run.** ``CRATE (d4b70ad)`` is the same model with the fused path as it was at
commit d4b70ad (``F.scaled_dot_product_attention`` always, ISTA as two ``addmm`` under autograd), kept here as the
"before" column; ``CRATE`` is the current fused path; ``ViT`` the matched ViT. One step of each per round, after
warm-up; the table gives median images/s and, as the ratios, the median over rounds of each round's ratio (pairing
within a round keeps slow drifts of machine load out of the ratio).

``--profile N`` instead prints, for each setting and precision, the ``N`` ops with the most self CPU time in two
training steps of each CRATE row (``torch.profiler``), and no timing table.

    python analysis/bench_train.py --threads 1 --rounds 7
    python analysis/bench_train.py --threads 1 --profile 10
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from crate_vis import create_model
from crate_vis.models.crate import ISTA, MSSA

PREVIOUS = "d4b70ad"


# ------------------------------------------------------------------------------------------ the previous fused path
def _previous_mssa_forward(self: MSSA, x: torch.Tensor) -> torch.Tensor:
    """``MSSA.forward`` of commit d4b70ad (fused path: scaled_dot_product_attention in every dtype)."""
    b, n, _ = x.shape
    w = self.subspace(self.project(x))  # (B, h, N, dh)
    if self.fused:
        p = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(w, w, w, dropout_p=p, scale=self.scale)  # (B, h, N, dh)
    else:
        dots = torch.matmul(w, w.transpose(-1, -2)) * self.scale  # (B, h, N, N)
        attn = self.attn_drop(self.attend(dots))
        out = torch.matmul(attn, w)  # (B, h, N, dh)
    out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # (B, N, h*dh)
    return self.proj_drop(self.proj(out))


def _previous_ista_forward(self: ISTA, x: torch.Tensor) -> torch.Tensor:
    """``ISTA.forward`` of commit d4b70ad (fused path: two addmm, differentiated by autograd)."""
    if self.fused:
        z = x.reshape(-1, x.shape[-1])  # (B*N, dim)
        residual = torch.addmm(z, z, self.weight.t(), alpha=-1.0)  # z - D z
        out = torch.addmm(z - self.eta * self.lambd, residual, self.weight, alpha=self.eta)  # + eta D^T (z - D z)
        return F.relu(out, inplace=True).view_as(x)
    dtdx = F.linear(F.linear(x, self.weight), self.weight.t())  # D^T D z
    dtx = F.linear(x, self.weight.t())  # D^T z
    return F.relu(x + (self.eta * (dtx - dtdx) - self.eta * self.lambd))


def with_previous_fused_path(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (same weights) whose MSSA and ISTA modules run the fused path of commit d4b70ad."""
    old = copy.deepcopy(model)
    for module in old.modules():
        if type(module) is MSSA:
            module.forward = types.MethodType(_previous_mssa_forward, module)
        elif type(module) is ISTA:
            module.forward = types.MethodType(_previous_ista_forward, module)
    return old


# ----------------------------------------------------------------------------------------------- the matched ViT
def vit_flops(tokens: int, width: int, depth: int, hidden: int, patch_dim: int, classes: int) -> float:
    """Matrix-product FLOPs of one ViT forward: qkv, attention, projection, MLP, patch embedding, head."""
    per_layer = tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width
    per_layer += 2 * tokens * width * hidden
    return 2.0 * (depth * per_layer + (tokens - 1) * patch_dim * width + width * classes)


def matched_vit(crate: nn.Module, size: int) -> tuple[VisionTransformer, dict, float]:
    """The ViT of matched FLOPs for ``crate`` at ``size`` px, its keywords and its FLOPs per image."""
    gh, gw = crate.feature_grid(size, size)
    tokens = gh * gw + 1
    ph, pw = crate.patch_size
    patch_dim = crate.patch_embed.channels * ph * pw
    target = crate.flops_per_image(size, size)
    head_width, depth, classes = crate.dim_head, crate.depth, crate.num_classes
    width = head_width
    while vit_flops(tokens, width, depth, 4 * width, patch_dim, classes) < target:
        width += head_width
    hidden = min(range(1, 4 * width + 1), key=lambda h: abs(vit_flops(tokens, width, depth, h, patch_dim, classes) - target))
    kwargs = dict(img_size=size, patch_size=(ph, pw), embed_dim=width, depth=depth, num_heads=width // head_width,
                  mlp_ratio=hidden / width, num_classes=classes)  # fmt: skip
    vit = VisionTransformer(**kwargs)
    assert vit.blocks[0].mlp.fc1.out_features == hidden, "timm rounded the MLP width differently"
    kwargs["mlp_hidden"] = hidden
    return vit, kwargs, vit_flops(tokens, width, depth, hidden, patch_dim, classes)


# ---------------------------------------------------------------------------------------------------- the bench
def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str) -> Callable[[], None]:
    """A closure running one forward + backward + AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def round_robin(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each function per round; one call of each per round, after ``warmup`` calls of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``den / num`` (images/s of ``num`` over images/s of ``den``)."""
    return statistics.median(d / n for n, d in zip(num, den, strict=True))


def profile_steps(fn: Callable[[], None], top: int, steps: int = 2) -> str:
    """Markdown table of the ``top`` ops by self CPU time over ``steps`` calls of ``fn`` (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| op | self ms/step | % | calls/step |", "|---|---|---|---|"]
    for e in events[:top]:
        lines.append(f"| {e.key} | {e.self_cpu_time_total / 1e3 / steps:.1f} | {100 * e.self_cpu_time_total / total:.1f} "
                     f"| {e.count // steps} |")  # fmt: skip
    lines.append(f"| total | {total / 1e3 / steps:.1f} | 100 | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of each model per round)")
    parser.add_argument("--batch-224", type=int, default=8)
    parser.add_argument("--batch-mini", type=int, default=32)
    parser.add_argument("--amp", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--no-previous", action="store_true", help=f"leave out the {PREVIOUS} rows")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N ops of each CRATE row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [
        ("CRATE-T/16, 224 px", "crate_tiny_patch16_224", 224, args.batch_224),
        ("crate_mini, 64 px", "crate_mini_patch8_96", 64, args.batch_mini),
        ("crate_mini, 96 px", "crate_mini_patch8_96", 96, args.batch_mini),
    ]
    what = "profiles of two steps after 1 warm-up step" if args.profile else f"{args.rounds} rounds after 1 warm-up step"
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s), {what}")
    rows = []
    for label, name, size, batch in settings:
        torch.manual_seed(0)
        crate = create_model(name, img_size=size).train()
        vit, vit_kw, vflops = matched_vit(crate, size)
        vit.train()
        cflops = crate.flops_per_image(size, size)
        print(f"{label}: {name} {cflops / 1e9:.3f} GFLOP/image, {sum(p.numel() for p in crate.parameters()) / 1e6:.2f}M "
              f"params; ViT width {vit_kw['embed_dim']}, {vit_kw['num_heads']} heads, depth {vit_kw['depth']}, "
              f"MLP {vit_kw['mlp_hidden']}: {vflops / 1e9:.3f} GFLOP/image, "
              f"{sum(p.numel() for p in vit.parameters()) / 1e6:.2f}M params", flush=True)  # fmt: skip
        models = {"crate": crate, "vit": vit}
        if not args.no_previous:
            models = {"previous": with_previous_fused_path(crate), **models}
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, crate.num_classes, (batch,))
        for amp in args.amp:
            fns = {k: make_step(copy.deepcopy(m), x, y, amp) for k, m in models.items()}
            if args.profile:
                for key in ("previous", "crate"):
                    if key in fns:
                        title = f"CRATE {PREVIOUS}" if key == "previous" else "CRATE"
                        print(f"\n{label}, {amp}, {title}: two training steps\n{profile_steps(fns[key], args.profile)}")
                continue
            t = round_robin(fns, args.rounds)
            row = {"setting": label, "amp": amp, "batch": batch}
            row.update({f"{k}_img_s": batch / statistics.median(v) for k, v in t.items()})
            row["crate_vs_vit"] = paired_ratio(t["crate"], t["vit"])
            if "previous" in t:
                row["previous_vs_vit"] = paired_ratio(t["previous"], t["vit"])
                row["crate_vs_previous"] = paired_ratio(t["crate"], t["previous"])
            rows.append(row)
            print("  " + amp + ": " + ", ".join(f"{k} {batch / statistics.median(v):.1f} img/s" for k, v in t.items()),
                  flush=True)  # fmt: skip
    if args.profile:
        return
    print()
    prev = not args.no_previous
    head = "| setting | precision | batch |" + (f" CRATE {PREVIOUS} img/s |" if prev else "") + " CRATE img/s | ViT img/s |"
    head += (f" CRATE {PREVIOUS} / ViT |" if prev else "") + " CRATE / ViT |" + (f" CRATE / CRATE {PREVIOUS} |" if prev else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = f"| {r['setting']} | {r['amp']} | {r['batch']} |"
        line += f" {r['previous_img_s']:.1f} |" if prev else ""
        line += f" {r['crate_img_s']:.1f} | {r['vit_img_s']:.1f} |"
        line += f" {r['previous_vs_vit']:.2f} |" if prev else ""
        line += f" {r['crate_vs_vit']:.2f} |"
        line += f" {r['crate_vs_previous']:.2f} |" if prev else ""
        print(line)


if __name__ == "__main__":
    main()
