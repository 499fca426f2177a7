"""Layer benchmark: forward + backward time of dense, router-MoE and AoE feed-forward layers.

    python -m minimoe.bench                       # CPU defaults, a few (n_experts, top_k, d_low)
    python -m minimoe.bench --device=cuda --dtype=bf16 --tokens=16384 --n_embd=768 --d_ffn=3072
    python -m minimoe.bench gpu                   # whole models instead: see bench_model.py
    python -m minimoe.bench --dtype=amp           # fp32 weights under bf16 autocast, as training runs

For each (E, K, d_low) it times, on the same N tokens and interleaved (each round runs every layer
once, in a rotated order; medians over rounds, so drift hits all rows alike):
    moe       router MoE (Alg. 1)                              the reference row (ratio 1.00)
    aoe=P     AoE with the MoE's total parameters (Eq. 5)      what the paper compares
    aoe=F     AoE with the MoE's active FLOPs per token        d_wide shrunk to pay for W_down
    dense     SwiGLU with the MoE's active FLOPs (d_ffn = K * expert width)
each with "grouped" (torch._grouped_mm) and "loop" (one matmul per expert) dispatch, and then, with the
first dispatch only, the variants of minimoe/variants.py that change the layer's cost:
    moe+bias, aoe+bias    DeepSeek-V3's balancing bias on the choice (a few element-wise ops)
    moe+erc               the ERC loss: a FIXED cost per forward (n^2 proxies), column "extra FLOPs"
    moe-lowrank           Table 2 control: the MoE with AoE's factorized W_g
    moe-bigrouter         Table 2 control: a router as large as AoE's W_down
and, with --dtype=amp, "moe bf16-scores" / "aoe=P bf16-scores": the scores computed in bf16
(fp32_scores=false), to show what computing them in fp32 (the default, torchtitan's choice) costs.
FLOPs/token = 6 * parameters one token touches (forward 2, backward 4). AoE's extra work over MoE
is the W_down of the E-K unselected experts, 2*(E-K)*D*L forward FLOPs per token (PAPER_NOTES).
"""

import argparse
from dataclasses import replace
import statistics
import sys
import time

import torch

from contextlib import nullcontext

from .aoe import AoE
from .dense import DenseFFN
from .dispatch import grouped_mm_available
from .model import FFN_KINDS, GPTConfig
from .moe import MoE
from .variants import variant_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp": torch.float32}   # amp: + bf16 autocast
COST_VARIANTS = ("moe+bias", "aoe+bias", "moe+erc", "moe-lowrank", "moe-bigrouter")


def d_wide_for_matched_flops(D: int, F: int, E: int, K: int, L: int) -> int:
    """AoE width whose active parameters equal the MoE's: E*D*L + K*(L + 2D)*W = D*E + 3*K*D*F."""
    W = (3 * K * D * F + D * E - E * D * L) / (K * (L + 2 * D))
    return max(8, int(round(W / 8)) * 8)


def make_step(layer, x, amp: bool = False):
    """One forward + backward (gradients w.r.t. input and weights), as a closure."""
    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else nullcontext():
            y, aux = layer(x)
        (y.float().square().mean() + aux).backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None
    return step


def time_steps(steps: list, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each step, measured INTERLEAVED: every round times each step once, in an
    order rotated by one per round, so slow drift of the machine (clock, cache, other load) hits
    every layer alike instead of whichever happened to run last. Returns one median per step."""
    for step in steps:
        for _ in range(warmup):
            step()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times = [[] for _ in steps]
    for r in range(repeats):
        for j in range(len(steps)):
            i = (j + r) % len(steps)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[i]()
            if cuda:
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def bench_rows(D, F, E, K, L, tokens, device, dtype, repeats, dispatches, amp=False):
    base = GPTConfig(n_layer=1, n_head=1, n_embd=D, n_experts=E, top_k=K, d_ffn=F, d_low=L,
                     aux_loss_coef=0.01)
    variants = [
        ("moe", MoE, replace(base, ffn="moe"), dispatches),
        ("aoe=P", AoE, replace(base, ffn="aoe"), dispatches),
        ("aoe=F", AoE, replace(base, ffn="aoe", d_wide=d_wide_for_matched_flops(D, F, E, K, L)), dispatches),
        ("dense", DenseFFN, replace(base, ffn="dense", d_ffn=K * F), ["-"]),
    ]
    for name in COST_VARIANTS:
        cfg = variant_config(name, base)
        variants.append((name, FFN_KINDS[cfg.ffn], cfg, dispatches[:1]))
    if amp:   # what scoring in fp32 costs: the same layers scoring in the compute dtype (bf16)
        variants += [(f"{n} bf16-scores", c, replace(cfg, fp32_scores=False), dispatches[:1])
                     for n, c, cfg, _ in variants[:2]]
    x = torch.randn(1, tokens, D, device=device, dtype=dtype, requires_grad=True)
    built = []                                   # every layer first, then time them interleaved
    for name, cls, cfg, impls in variants:
        for dispatch in impls:
            torch.manual_seed(0)
            built.append((name, cls, cfg, dispatch,
                          cls(replace(cfg, dispatch=dispatch if dispatch != "-" else "loop")).to(device, dtype)))
    seconds = time_steps([make_step(layer, x, amp) for *_, layer in built], repeats)
    rows = []
    for (name, cls, cfg, dispatch, layer), sec in zip(built, seconds):
        active = layer.active_params()
        extra = layer.flops_per_forward_extra() if hasattr(layer, "flops_per_forward_extra") else 0
        width = cfg.wide_dim if cls is AoE or cfg.expert_gate == "lowrank" else cfg.ffn_dim
        rows.append(dict(E=E, K=K, L=L, kind=name, dispatch=dispatch, width=width,
                         params=sum(p.numel() for p in layer.parameters()), active=active, flops_tok=6 * active,
                         extra=extra, ms=sec * 1e3, tok_s=tokens / sec))
    ref = next(r for r in rows if r["kind"] == "moe" and r["dispatch"] == dispatches[0])
    for r in rows:
        r["vs_moe"] = ref["ms"] / r["ms"]   # > 1: faster than the MoE
        # time ratio over FLOP ratio to the MoE: 1.00 = costs exactly what its extra FLOPs explain
        r["time_per_flop"] = (r["ms"] / ref["ms"]) / (r["flops_tok"] / ref["flops_tok"])
    return rows


def format_table(rows) -> str:
    head = ("| E | K | d_low | layer | dispatch | hidden | params | active | FLOPs/tok | extra FLOPs/step "
            "| ms fwd+bwd | tok/s | speed vs moe | time/FLOPs vs moe |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        extra = f"{r['extra'] / 1e6:.1f}M" if r["extra"] else "-"
        lines.append(f"| {r['E']} | {r['K']} | {r['L']} | {r['kind']} | {r['dispatch']} | {r['width']} | "
                     f"{r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | {r['flops_tok'] / 1e6:.1f}M | {extra} | "
                     f"{r['ms']:.1f} | {r['tok_s']:,.0f} | {r['vs_moe']:.2f} | {r['time_per_flop']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["gpu"], ["model"]):            # the whole-model benchmark (bench_model.py)
        from .bench_model import main as bench_model_main
        return bench_model_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, default=4096, help="tokens per forward (B*T)")
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--d_ffn", type=int, default=512, help="hidden width of one MoE expert")
    p.add_argument("--configs", default="8,2,32;8,2,88;16,2,88;8,4,88",
                   help="semicolon-separated E,K,d_low triples")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, amp = DTYPES[args.dtype], args.dtype == "amp"
    try:
        configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
        assert all(len(c) == 3 for c in configs)
    except (ValueError, AssertionError):
        p.error(f"--configs={args.configs!r}: expected 'E,K,d_low' triples separated by ';', e.g. '8,2,64;16,4,64'")
    grouped = grouped_mm_available(torch.device(args.device).type, torch.bfloat16 if amp else dtype)
    dispatches = ["grouped", "loop"] if grouped else ["loop"]
    print(f"# minimoe.bench  device={args.device} dtype={args.dtype} tokens={args.tokens} n_embd={args.n_embd} "
          f"d_ffn={args.d_ffn} threads={torch.get_num_threads()} torch={torch.__version__}"
          + ("" if grouped else "  (torch._grouped_mm unavailable here: loop only)"))
    all_rows = []
    for E, K, L in configs:
        try:
            rows = bench_rows(args.n_embd, args.d_ffn, E, K, L, args.tokens, args.device, dtype, args.repeats, dispatches,
                              amp)
        except ValueError as e:
            p.error(f"config E={E},K={K},d_low={L}: {e}")
        all_rows += rows
    print(format_table(all_rows))
    return all_rows


if __name__ == "__main__":
    main()
