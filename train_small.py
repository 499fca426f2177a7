"""Dense vs router-MoE vs Autonomy-of-Experts on a laptop CPU: no download, a few minutes.

    python train_small.py                          # the three models in turn (~2.5 min on 2 cores)
    python train_small.py --model=aoe --max_iters=600
    python train_small.py --seeds=3                # the comparison over 3 seeds: mean +- std
    python train_small.py --init_from=resume       # continue after Ctrl-C (it saves a checkpoint)
    python train_small.py --overwrite=true         # start over in an out_dir that holds checkpoints
    python train_small.py --model=moe+bias         # one named variant of minimoe/variants.py (see --help)
    python train_small.py --help                   # the variants, and every option with its default
    python -m minimoe.sample --out_dir=out-small/aoe --start="def "

The data is the Python standard library's own source code, read as bytes (vocabulary 256), so
nothing is downloaded (--data=shakespeare or --data=PATH for other text). The three models share
everything but the feed-forward layer and see the same tokens in the same order:
    moe    8 experts of width d_ffn, a linear router picks 2 per token   (paper, Alg. 1)
    aoe    8 experts with equal total parameters; each scores itself by ||x W_down|| and the 2
           largest norms win (Eq. 3, Alg. 2); d_low ~ n_embd/3, d_wide from Eq. 5
    dense  one SwiGLU FFN as wide as the 2 experts a token uses: the MoE's active parameters
Writes out_dir/ (default out-small/): <model>/{ckpt.pt, log.jsonl, config.json, sample.txt}
(<model>/seed<k>/ with --seeds), loss.png, experts.png, routing.png and results.md, the table
printed at the end. All the training machinery is minimoe/train.py; this file only picks sizes.
"""

from dataclasses import dataclass, replace
from datetime import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from minimoe.data import load_corpus
from minimoe.model import GPT, GPTConfig
from minimoe.files import read_log
from minimoe.hardware import describe_machine
from minimoe.plots import plot_expert_load, plot_losses, plot_routing_entropy
from minimoe.cli import parse_overrides
from minimoe.outdir import refuse_overwrite
from minimoe.presets import laptop_model, laptop_train
from minimoe.runtime import resolve_device
from minimoe.train import TrainConfig, TrainingDiverged, train
from minimoe.validate import check_fields, ranges
from minimoe.variants import VARIANTS, variant_config, variants_help

KINDS = ("dense", "moe", "aoe")      # what --model=all trains; any name of minimoe/variants.py works alone


@ranges(prefix="--", seeds="[1, 100]")          # minimoe/validate.py; errors say --seeds=0, as typed
@dataclass
class SmallConfig:
    model: str = "all"       # a variant name (listed below) or "all" (dense, moe, aoe, one after another)
    seeds: int = 1           # repeat over seeds seed, seed+1, ...; the table then shows mean +- std

    def __post_init__(self):
        check_fields(self)
        if self.model not in (*VARIANTS, "all"):
            others = ", ".join(v for v in VARIANTS if v not in KINDS)
            raise ValueError(f"--model={self.model!r} is invalid: allowed values are {', '.join(KINDS)}, all, "
                             f"and the variants {others} (python train_small.py --help)")


def small_model_config() -> GPTConfig:
    """2 layers x 64 wide, context 64, byte vocabulary, 8 experts of width 128, top-2 (dense: width 256):
    0.44M parameters (MoE; 0.15M active), so 3.1M tokens are ~7 tokens per MoE parameter, 20 per
    active one. The laptop study (python -m minimoe.study) runs this very regime over 5 seeds."""
    return replace(laptop_model(), ffn="aoe")


def small_train_config() -> TrainConfig:
    """1500 steps x 32 x 64 = 3.1M tokens per model, evaluated every 100 steps on 20 x 2048 val tokens:
    the three models take ~150 s in all on 2 idle cores (dense 34 s, MoE 49 s, AoE 55 s of training)."""
    return replace(laptop_train(), out_dir="out-small", sample_start="\n")


def model_config_for(kind: str, base: GPTConfig) -> GPTConfig:
    """MoE and AoE at equal total parameters; dense as wide as top_k experts (= MoE's active params)."""
    return variant_config(kind, base)


def auto_threads() -> int:
    """CPU threads for this run: the cores the load average says are idle (at least 1). Threads that
    share a busy core wait for each other at every op, which is far slower than using fewer."""
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, cores - int(busy))


def fmt(values, digits):
    """'1.234' for one value, '1.234 ± 0.005' for several, '-' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def models_table(results: dict) -> str:
    """Markdown table, one row per model kind: results[kind] is a list of train() results (seeds)."""
    max_ent = next((r[0]["routing"][0]["max_ent"] for r in results.values() if r[0].get("routing")), None)
    head = ["model", "params total", "params active", "val loss (nats)", "val bpb", "tokens/s",
            f"Ent_load (nats, max {max_ent:.3f})" if max_ent else "Ent_load (nats)", "Ent_conf (nats)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, runs in results.items():
        r0 = runs[0]
        lines.append("| " + " | ".join([
            kind, f"{r0['params_total'] / 1e6:.2f}M", f"{r0['params_active'] / 1e6:.2f}M",
            fmt([r["val_loss"] for r in runs], 4), fmt([r["val_bpb"] for r in runs], 4),
            fmt([r["tokens_per_sec"] for r in runs], 0), fmt([r["ent_load"] for r in runs], 3),
            fmt([r["ent_conf"] for r in runs], 3)]) + " |")
    return "\n".join(lines)


def write_report(out: Path, argv, base: GPTConfig, cfg: TrainConfig, small: SmallConfig, corpus, kinds, results: dict,
                 sizes: list[str], files: list[str], wall: float, run_dir) -> str:
    """out/results.md: the command, the machine, the table, the models, the figures, a sample of each.
    Returns the table."""
    table = models_table(results)
    command = "python train_small.py" + "".join(f" {a}" for a in argv)
    seeds = f"mean ± std over {small.seeds} seeds ({cfg.seed}..{cfg.seed + small.seeds - 1}), " \
        if small.seeds > 1 else f"seed {cfg.seed}, "
    device = resolve_device(cfg.device)
    report = [f"# train_small results\n", f"`{command}`\n",
              f"- {datetime.now():%Y-%m-%d %H:%M}, {describe_machine(device)}, device {device}",
              f"- wall time {wall:.0f} s in all; {seeds}{cfg.max_iters} steps x "
              f"{results[kinds[0]][0]['tokens'] // cfg.max_iters} tokens = {results[kinds[0]][0]['tokens']:,} "
              f"tokens per model",
              f"- val loss on the same {cfg.eval_iters} x {cfg.batch_size} x {base.block_size} val tokens for "
              f"every model; bpb = bits per byte; Ent_load (Eq. 7) and Ent_conf (Eq. 8) averaged over layers\n",
              table, "", f"Models ({base.n_layer} layers x {base.n_embd}, {base.n_head} heads, context "
              f"{base.block_size}, vocabulary {base.vocab_size}):\n", "```", *sizes, "```\n",
              "Figures: " + ", ".join(files) + "\n"]
    for kind in kinds:
        sample_path = run_dir(kind, 0) / "sample.txt"
        if sample_path.exists():
            report += [f"Sample from {kind} (`{sample_path}`):\n", "```", sample_path.read_text()[:400], "```\n"]
    (out / "results.md").write_text("\n".join(report))
    return table


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    if "--help" in argv or "-h" in argv:            # the variants first; parse_overrides prints the fields
        print(f"--model=NAME trains one variant of minimoe/variants.py, or all = {', '.join(KINDS)}:\n"
              f"{variants_help()}\n")
    base, cfg, small = parse_overrides(argv, small_model_config(), small_train_config(), SmallConfig())
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv}
    corpus = load_corpus(cfg.data)
    if "vocab_size" not in given:
        base = replace(base, vocab_size=corpus.vocab_size if corpus.vocab_size == 256
                       else -(-corpus.vocab_size // 64) * 64)            # BPE: pad to a multiple of 64
    if "sample_start" not in given and cfg.data == "stdlib":
        cfg.sample_start = "def "
    if not cfg.threads and cfg.init_from == "scratch" and resolve_device(cfg.device).type == "cpu":
        cfg.threads = auto_threads()       # (on resume train() reuses the checkpoint's thread count)
        print(f"CPU threads: {cfg.threads} of {os.cpu_count()} (cores the load average leaves idle; "
              f"--threads=N to choose)")
    kinds = KINDS if small.model == "all" else (small.model,)
    out = Path(cfg.out_dir)

    def run_dir(kind, k):
        return out / kind / f"seed{k}" if small.seeds > 1 else out / kind

    if cfg.init_from == "resume" and not any((run_dir(kd, k) / "ckpt.pt").exists()
                                             for kd in kinds for k in range(small.seeds)):
        raise FileNotFoundError(f"--init_from=resume: no checkpoint in {out}/{{{','.join(kinds)}}}"
                                f"{'/seed*' if small.seeds > 1 else ''}; start without --init_from=resume")
    for kd in kinds:                 # refuse before training anything, not after the first model
        for k in range(small.seeds):
            refuse_overwrite(run_dir(kd, k), cfg)

    # --- sizes: print how the three are matched ---
    configs = {kind: model_config_for(kind, base) for kind in kinds}
    print(f"data: {corpus.name}, {len(corpus.train):,} train / {len(corpus.val):,} val tokens "
          f"(vocab {corpus.vocab_size})")
    sizes = []
    for kind, mc in configs.items():
        with torch.device("meta"):                          # count parameters without allocating
            m = GPT(mc)
        widths = {"dense": f"one SwiGLU FFN, d_ffn {mc.ffn_dim} = top_k x the experts' d_ffn",
                  "moe": f"{mc.n_experts} experts x d_ffn {mc.ffn_dim}, router, top-{mc.top_k}",
                  "aoe": f"{mc.n_experts} experts, d_low {mc.low_dim}, d_wide {mc.wide_dim} (Eq. 5), "
                         f"top-{mc.top_k}"}[mc.ffn]
        if kind not in KINDS:
            widths = VARIANTS[kind].about
        sizes.append(f"{kind:5s} {m.num_params() / 1e6:5.2f}M total, {m.num_active_params() / 1e6:5.2f}M active "
                     f"per token  ({widths})")
        print("  " + sizes[-1])

    # --- train: every kind, every seed ---
    results = {kind: [] for kind in kinds}
    for k in range(small.seeds):
        for kind in kinds:
            run = replace(cfg, out_dir=str(run_dir(kind, k)), seed=cfg.seed + k)
            if run.init_from == "resume" and not (Path(run.out_dir) / "ckpt.pt").exists():
                print(f"{run.out_dir}: no checkpoint yet, starting it from scratch")
                run = replace(run, init_from="scratch")
            r = train(configs[kind], run, corpus=corpus)
            r.pop("model")
            if r["interrupted"]:
                print(f"interrupted ({r['interrupted']}): resume with  python train_small.py "
                      f"{' '.join(a for a in argv if not a.startswith('--init_from'))} --init_from=resume")
                return 130 if r["interrupted"] == "SIGINT" else 143
            results[kind].append(r)

    # --- figures and the table ---
    logs = {kind: [read_log(run_dir(kind, k)) for k in range(small.seeds)] for kind in kinds}
    title = f"{corpus.name}, {base.n_layer} x {base.n_embd}, {cfg.max_iters} steps"
    files = ["loss.png"]
    plot_losses(logs, out / "loss.png", title=f"Validation loss vs tokens ({title})")
    if plot_expert_load(logs, out / "experts.png", title=f"Expert load per layer over training ({title})"):
        files.append("experts.png")
    if plot_routing_entropy(logs, out / "routing.png", title=f"Routing statistics ({title})"):
        files.append("routing.png")
    wall = time.perf_counter() - t0
    table = write_report(out, argv, base, cfg, small, corpus, kinds, results, sizes, files, wall, run_dir)
    print(f"\n{table}\n\nwrote {out}/results.md and {', '.join(files)} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:     # bad input (DataError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:                        # a second Ctrl-C, or one outside the training loop
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
