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

--split separates matmul time from everything else: it records the matmuls one forward+backward really
runs (a TorchDispatchMode below autograd sees the backward's too), replays them alone in the same
interleaved rounds, and reports "rest" = layer - matmuls (element-wise work, gathers, sorting, autograd).
Their FLOPs, summed from the recorded shapes, equal the 6 * active-parameters rule to the FLOP (tested).
"""

import argparse
from dataclasses import replace
import re
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .aoe import AoE
from .dense import DenseFFN
from .dispatch import grouped_mm_available
from .hardware import keep_freed_memory
from .model import FFN_KINDS, GPTConfig
from .moe import MoE
from .variants import variant_config

# --------------------------------------------------------------------------- the command line's checks
# (shared by bench, bench gpu, sample and prepare; their home is a cli / runtime module once there is one)

class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: ...`, exit 2, like every minimoe command
    (argparse's own prints the whole usage first). Subparsers made from it inherit it."""

    def error(self, message):
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def pick_device(name, flag: str = "--device") -> torch.device:
    """The device a command line names, checked before any work: an unknown name, a GPU that is not
    there or an index past the last GPU is a one-line ValueError naming `flag` and what is allowed."""
    from .runtime import resolve_device                   # the one place that resolves 'auto' and checks CUDA/MPS
    if not isinstance(name, str) or not DEVICE.fullmatch(name):
        raise ValueError(f"{flag}={name!r} is not a device: allowed are auto, cpu, cuda, cuda:N, mps")
    try:
        device = resolve_device(name)
    except ValueError as e:
        raise ValueError(str(e).replace("TrainConfig.device", flag)) from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{flag}={name}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}); pick one of those or --device=cpu")
    return device


def check_ints(parser, args, table: dict) -> None:
    """parser.error (one line, exit 2) for the first int option outside its [low, high]; None passes
    (the option's default applies). table: {name: (low, high)}."""
    for name, (low, high) in table.items():
        v = getattr(args, name)
        if v is not None and not low <= v <= high:
            parser.error(f"--{name}={v} is outside [{low}, {high}]; give a value in that range")


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


MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm")


class _RecordMatmuls(TorchDispatchMode):
    """Sees every aten op below autograd, so both the forward's and the backward's matmuls; keeps a copy of
    the arguments of each matmul (same shapes, strides and group offsets) to run them again alone."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in MATMULS:
            self.calls.append((func, [_copy(a) for a in args], {k: _copy(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _copy(a):
    return a.detach().clone() if isinstance(a, torch.Tensor) else a   # clone keeps the strides


def record_matmuls(step) -> list:
    """The matmuls one call of step runs (forward and backward), as (op, args, kwargs) to replay."""
    with _RecordMatmuls() as rec:
        step()
    return rec.calls


def matmul_flops(calls) -> int:
    """2*M*N*K summed over the recorded matmuls: what the layer really multiplied, for comparison with the
    6 * active-parameters rule the FLOPs/tok column uses. _grouped_mm: x (M, K) @ w (G, K, N) groups the
    rows; x (K, M) @ g (M, N), the weight gradient, groups the reduction; either way the groups tile M."""
    total = 0
    for func, args, _ in calls:
        a, b = args[-2:] if func.overloadpacket.__name__ in ("addmm", "baddbmm") else args[:2]
        batch = a.shape[0] if a.dim() == 3 else 1
        total += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
    return total


def replay_step(calls):
    """Runs only the recorded matmuls, without autograd: the layer's matmul time on its own."""
    def step():
        with torch.no_grad():
            for func, args, kwargs in calls:
                func(*args, **kwargs)
    return step


def profile_table(step, steps: int = 5, rows: int = 12) -> str:
    """torch.profiler's top ops by self CPU time over `steps` calls of `step`, per step (ms).

    On CPU the profiler itself slows element-wise ops (by about half on our 2-core machine), so read it
    for WHICH ops run and how often, and the interleaved medians above for how long a layer takes."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    lines = ["| op | calls/step | self CPU ms/step |", "|---|---|---|"]
    lines += [f"| {e.key} | {e.count / steps:g} | {e.self_cpu_time_total / 1e3 / steps:.2f} |" for e in events]
    return "\n".join(lines)


def layer_names(amp: bool = False) -> list[str]:
    """The rows bench_rows times, by name, in order (what --layers and --profile may name)."""
    base = ["moe", "aoe=P", "aoe=F", "dense", *COST_VARIANTS]
    return base + ([f"{n} bf16-scores" for n in base[:2]] if amp else [])


def layer_configs(D, F, E, K, L, amp=False):
    """(name, layer class, GPTConfig) of every row for one (E, K, d_low); a bad value is a ValueError."""
    base = GPTConfig(n_layer=1, n_head=1, n_embd=D, n_experts=E, top_k=K, d_ffn=F, d_low=L,
                     aux_loss_coef=0.01)
    rows = [("moe", MoE, replace(base, ffn="moe")), ("aoe=P", AoE, replace(base, ffn="aoe")),
            ("aoe=F", AoE, replace(base, ffn="aoe", d_wide=d_wide_for_matched_flops(D, F, E, K, L))),
            ("dense", DenseFFN, replace(base, ffn="dense", d_ffn=K * F))]
    for name in COST_VARIANTS:
        cfg = variant_config(name, base)
        rows.append((name, FFN_KINDS[cfg.ffn], cfg))
    if amp:   # what scoring in fp32 costs: the same layers scoring in the compute dtype (bf16)
        rows += [(f"{n} bf16-scores", c, replace(cfg, fp32_scores=False)) for n, c, cfg in rows[:2]]
    return rows


def bench_rows(D, F, E, K, L, tokens, device, dtype, repeats, dispatches, amp=False, layers=None, profile=(),
               split=False):
    # the first four rows in each dispatch, the variants and the bf16-scores rows in the first only
    variants = [(name, cls, cfg, ["-"] if name == "dense" else dispatches if i < 3 else dispatches[:1])
                for i, (name, cls, cfg) in enumerate(layer_configs(D, F, E, K, L, amp))]
    if layers:                                   # --layers: a subset, the MoE reference always kept
        variants = [v for v in variants if v[0] == "moe" or v[0] in layers]
    x = torch.randn(1, tokens, D, device=device, dtype=dtype, requires_grad=True)
    built = []                                   # every layer first, then time them interleaved
    for name, cls, cfg, impls in variants:
        for dispatch in impls:
            torch.manual_seed(0)
            built.append((name, cls, cfg, dispatch,
                          cls(replace(cfg, dispatch=dispatch if dispatch != "-" else "loop")).to(device, dtype)))
    steps = [make_step(layer, x, amp) for *_, layer in built]
    # --split: each layer's recorded matmuls replayed alone, timed in the same interleaved rounds
    calls = [record_matmuls(step) for step in steps] if split else []
    seconds = time_steps(steps + [replay_step(c) for c in calls], repeats)   # layers first, then replays
    for (name, _, _, dispatch, _), step in zip(built, steps):
        if name in profile:
            print(f"\n# profile: {name} ({dispatch}), E={E} K={K} d_low={L}\n{profile_table(step)}\n")
    rows = []
    for i, ((name, cls, cfg, dispatch, layer), sec) in enumerate(zip(built, seconds)):
        active = layer.active_params()
        extra = layer.flops_per_forward_extra() if hasattr(layer, "flops_per_forward_extra") else 0
        width = cfg.wide_dim if cls is AoE or cfg.expert_gate == "lowrank" else cfg.ffn_dim
        rows.append(dict(E=E, K=K, L=L, kind=name, dispatch=dispatch, width=width,
                         params=sum(p.numel() for p in layer.parameters()), active=active, flops_tok=6 * active,
                         extra=extra, ms=sec * 1e3, tok_s=tokens / sec))
        if split:   # matmul time alone, the rest (element-wise, gathers, sorting, autograd) by difference
            mm_sec = seconds[len(built) + i]
            rows[-1].update(mm_ms=mm_sec * 1e3, rest_ms=(sec - mm_sec) * 1e3, mm_flops=matmul_flops(calls[i]))
    ref = next(r for r in rows if r["kind"] == "moe" and r["dispatch"] == dispatches[0])
    for r in rows:
        r["vs_moe"] = ref["ms"] / r["ms"]   # > 1: faster than the MoE
        # time ratio over FLOP ratio to the MoE: 1.00 = costs exactly what its extra FLOPs explain
        r["time_per_flop"] = (r["ms"] / ref["ms"]) / (r["flops_tok"] / ref["flops_tok"])
    return rows


def format_table(rows) -> str:
    split = "mm_ms" in rows[0]
    head = ("| E | K | d_low | layer | dispatch | hidden | params | active | FLOPs/tok | extra FLOPs/step "
            "| ms fwd+bwd | tok/s | speed vs moe | time/FLOPs vs moe |")
    if split:
        head += " matmul ms | rest ms | matmul GFLOP/s |"
    lines = [head, "|" + "---|" * (17 if split else 14)]
    for r in rows:
        extra = f"{r['extra'] / 1e6:.1f}M" if r["extra"] else "-"
        line = (f"| {r['E']} | {r['K']} | {r['L']} | {r['kind']} | {r['dispatch']} | {r['width']} | "
                f"{r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | {r['flops_tok'] / 1e6:.1f}M | {extra} | "
                f"{r['ms']:.1f} | {r['tok_s']:,.0f} | {r['vs_moe']:.2f} | {r['time_per_flop']:.2f} |")
        if split:
            line += f" {r['mm_ms']:.1f} | {r['rest_ms']:.1f} | {r['mm_flops'] / r['mm_ms'] / 1e6:.0f} |"
        lines.append(line)
    return "\n".join(lines)


SUMMARY = (("moe", "dense", "the dispatch's cost: MoE over a dense SwiGLU of its active FLOPs"),
           ("aoe=P", "moe", "AoE over the MoE (Eq. 5 widths: AoE's hidden layer is wider)"),
           ("aoe=P", "moe-lowrank", "AoE over the router MoE with AoE's own expert widths: scoring alone"))


def format_summary(rows) -> str:
    """One line per pair of SUMMARY present in rows (first dispatch of each): time ratio, FLOP ratio, and
    their quotient. moe-lowrank runs AoE's expert shapes (W_down W_up, d_wide) behind a router, so
    aoe=P / moe-lowrank isolates what norm scoring + reading the cached a_i cost against a router."""
    first = {}
    for r in rows:
        first.setdefault((r["E"], r["K"], r["L"], r["kind"]), r)
    lines = []
    for (E, K, L, kind), a in first.items():
        for num, den, what in SUMMARY:
            b = first.get((E, K, L, den))
            if kind == num and b is not None:
                t, f = a["ms"] / b["ms"], a["flops_tok"] / b["flops_tok"]
                lines.append(f"E={E} K={K} d_low={L}  {num} / {den}: time x{t:.3f}, FLOPs x{f:.3f}, "
                             f"time/FLOPs {t / f:.3f}   ({what})")
                if "mm_ms" in a:   # --split: how much of that is matmul speed, how much everything else
                    mt, mf = a["mm_ms"] / b["mm_ms"], a["mm_flops"] / b["mm_flops"]
                    lines.append(f"    matmuls alone: time x{mt:.3f}, FLOPs x{mf:.3f} (as run), time/FLOPs "
                                 f"{mt / mf:.3f};  the rest: {a['rest_ms']:.1f} vs {b['rest_ms']:.1f} ms "
                                 f"({a['rest_ms'] - b['rest_ms']:+.1f} ms, {(a['rest_ms'] - b['rest_ms']) / b['ms']:+.1%} "
                                 f"of {den}'s time)")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["gpu"], ["model"]):            # the whole-model benchmark (bench_model.py)
        from .bench_model import main as bench_model_main
        return bench_model_main(argv[1:])
    p = OneLineParser(prog="python -m minimoe.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if there is a GPU, else the CPU), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, default=4096, help="tokens per forward (B*T)")
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--d_ffn", type=int, default=512, help="hidden width of one MoE expert")
    p.add_argument("--configs", default="8,2,32;8,2,88;16,2,88;8,4,88",
                   help="semicolon-separated E,K,d_low triples")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--malloc", default="keep", choices=["keep", "default"],
                   help="keep: glibc keeps large freed buffers (hardware.keep_freed_memory, as train.py does on "
                        "CPU); default: glibc's own policy, which page-faults fresh activations every step")
    p.add_argument("--layers", default="", help="comma-separated subset of the rows' layer names, e.g. "
                   "'aoe=P,dense' (the moe row, the reference, is always timed); empty = all")
    p.add_argument("--profile", default="", help="comma-separated layer names to run under torch.profiler "
                   "after timing: prints their top ops per step, e.g. --profile=moe,aoe=P")
    p.add_argument("--split", action="store_true",
                   help="also time each layer's matmuls alone (recorded from one forward+backward and replayed, "
                        "interleaved with the layers): columns matmul ms, rest ms = the layer minus its matmuls")
    p.add_argument("--dispatch", default="", choices=["", "grouped", "loop"],
                   help="time one dispatch only (empty = grouped and loop where grouped runs)")
    args = p.parse_args(argv)
    # every check before any timing (and before --threads changes the process): one line, exit 2
    check_ints(p, args, dict(threads=(0, 4096), tokens=(1, 2**31 - 1), n_embd=(1, 2**20), d_ffn=(1, 2**20),
                             repeats=(1, 10**6)))
    try:
        device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    dtype, amp = DTYPES[args.dtype], args.dtype == "amp"
    try:
        configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
        assert all(len(c) == 3 for c in configs)
    except (ValueError, AssertionError):
        p.error(f"--configs={args.configs!r}: expected 'E,K,d_low' triples separated by ';', e.g. '8,2,64;16,4,64'")
    for E, K, L in configs:                      # every config is a valid layer, before the first is timed
        try:
            layer_configs(args.n_embd, args.d_ffn, E, K, L, amp)
        except ValueError as e:
            p.error(f"config E={E},K={K},d_low={L}: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = args.malloc == "keep" and device.type == "cpu" and keep_freed_memory()
    grouped = grouped_mm_available(device.type, torch.bfloat16 if amp else dtype)
    dispatches = ["grouped", "loop"] if grouped else ["loop"]
    if args.dispatch:
        if args.dispatch not in dispatches:
            p.error(f"--dispatch={args.dispatch}: torch._grouped_mm does not run here for this dtype; use loop")
        dispatches = [args.dispatch]
    layers = [n for n in args.layers.split(",") if n]
    known = layer_names(amp)
    profiled = [n for n in args.profile.split(",") if n]
    for flag, names in (("--layers", layers), ("--profile", profiled)):
        bad = [n for n in names if n not in known]
        if bad:
            p.error(f"{flag}: {', '.join(map(repr, bad))} not among {', '.join(known)}")
    print(f"# minimoe.bench  device={device} dtype={args.dtype} tokens={args.tokens} n_embd={args.n_embd} "
          f"d_ffn={args.d_ffn} threads={torch.get_num_threads()} torch={torch.__version__}"
          + (" malloc=keep" if kept else "")
          + ("" if grouped else "  (torch._grouped_mm unavailable here: loop only)"))
    all_rows = []
    for E, K, L in configs:
        try:
            rows = bench_rows(args.n_embd, args.d_ffn, E, K, L, args.tokens, device, dtype, args.repeats, dispatches,
                              amp, layers, profiled, args.split)
        except torch.OutOfMemoryError as e:
            p.error(f"config E={E},K={K},d_low={L} with --tokens={args.tokens}: out of memory ({str(e).splitlines()[0][:120]}); "
                    f"use fewer --tokens or a smaller --n_embd/--d_ffn")
        all_rows += rows
    print(format_table(all_rows))
    print(format_summary(all_rows))
    return all_rows


if __name__ == "__main__":
    main()
