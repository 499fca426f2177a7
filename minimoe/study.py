"""Named studies: model variants x seeds x token budgets, paired statistics, resumable.

    python -m minimoe.study                         # "laptop": dense / moe / aoe, 5 seeds (~13 min, 2 cores)
    python -m minimoe.study overnight --max_runs=20 # hours on a CPU; run it in chunks, it resumes
    python -m minimoe.study gpu                     # the same question at 6 x 384 on CUDA
    python -m minimoe.study laptop --variants=moe,aoe --seeds=1,2,3 --budgets=750,1500
    python -m minimoe.study laptop --tune="learning_rate=1e-3,2e-3,4e-3"
    python -m minimoe.study --help                  # the studies and every option

A study is declarative: a base GPTConfig + TrainConfig, and a grid. Every run is one call of
minimoe.train.train() in its own folder out_dir/runs/<variant>-seed<s>-iters<n>-<hash>/, where the
hash covers the run's full model and training config; a finished run leaves result.json there and
is never trained again, an interrupted one (ckpt.pt, no result.json) is resumed exactly.

Why the design:
  * Paired seeds. Run s of every variant uses seed s for the init *and* for the batches (batch i of
    data.BatchSampler is a pure function of the seed), and all runs are scored on the same val
    batches. Seed-to-seed noise is then largely shared, so the per-seed difference to the baseline
    (MoE) has a much smaller spread than either loss: we report it with its own 95% CI.
  * 95% confidence intervals from the t-distribution (few seeds: the normal's 1.96 is too narrow).
  * Budgets are max_iters values, each its own run with its own full cosine schedule: the loss of
    a longer run at step n is *not* the loss of a run trained for n steps.
  * Fair tuning: with --tune, every variant gets the same tries of the same grid on a separate
    tuning seed, and each uses its own best for the reported seeds. Nobody is tuned alone.
  * Three budgets a reader may want to compare at: the table is at equal tokens, and lists total
    params (equal params), training FLOPs per token (equal active compute) and measured tokens/s
    (equal wall-clock); cost.png plots loss against FLOPs and seconds.

Writes out_dir/study.md (tables, the command, the machine, the date), study.json (every run's
numbers and the summaries) and loss.png, final.png, paired.png, entropy.png, cost.png.
"""

from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
import itertools
import json
import math
from pathlib import Path
import shlex
import statistics
import sys
import typing

import torch
from tqdm import tqdm

from .checkpoint import data_fingerprint
from .cli import parse_overrides, parse_value
from .data import load_corpus
from .files import CachedRun, cached_run, read_log, writable_folder
from .hardware import describe_machine
from .model import GPT, GPTConfig
from .plots import (plot_entropy_per_layer, plot_final_losses, plot_loss_vs_cost, plot_losses,
                    plot_paired_differences)
from .presets import laptop_model, laptop_train
from .runtime import grad_accum_steps, resolve_device
from .stats import fmt_ci, mean_ci, paired_difference, t_quantile_975  # noqa: F401 (notebooks import them here)
from .train import TrainConfig, TrainingDiverged, train
from . import variants as variants_module


# --------------------------------------------------------------------------- the studies

@dataclass
class StudyConfig:
    variants: str = "dense,moe,aoe"     # comma list of model variants (minimoe.variants), or "all"
    seeds: str = "1,2,3,4,5"            # comma list of seeds; run s of every variant uses seed s (paired)
    budgets: str = "1500"               # comma list of max_iters; each is its own run and cosine schedule
    tune: str = ""                      # grid every variant gets alike, e.g. "learning_rate=1e-3,2e-3;warmup_iters=30,100"
    tune_seed: int = 0                  # the seed of the tuning runs (not one of --seeds)
    baseline: str = "moe"               # paired differences are to this variant
    max_runs: int = 0                   # stop after this many new runs (0: no limit); run again to continue

    def __post_init__(self):
        variant_list(self.variants), seed_list(self.seeds), budget_list(self.budgets), tune_grid(self.tune)
        if not isinstance(self.max_runs, int) or self.max_runs < 0:
            raise ValueError(f"--max_runs={self.max_runs!r} is invalid: must be an integer >= 0 (0: no limit)")
        if self.tune and self.tune_seed in seed_list(self.seeds):
            raise ValueError(f"--tune_seed={self.tune_seed} is invalid: it is one of --seeds={self.seeds}; "
                             f"tune on a seed you do not report")
        if self.baseline not in variants_module.VARIANTS:
            raise ValueError(f"--baseline={self.baseline!r} is invalid: allowed values are "
                             f"{', '.join(variants_module.VARIANTS)}")


def _int_list(name: str, text: str, low: int) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or min(values) < low or len(set(values)) != len(values):
        raise ValueError(f"--{name}={text!r} is invalid: must be a comma list of distinct integers >= {low}")
    return values


def seed_list(text) -> list[int]:
    return _int_list("seeds", text, 0)


def budget_list(text) -> list[int]:
    return _int_list("budgets", text, 1)


def variant_list(text) -> list[str]:
    names = list(variants_module.VARIANTS) if text == "all" else [v.strip() for v in str(text).split(",")]
    bad = [v for v in names if v not in variants_module.VARIANTS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"--variants={text!r} is invalid: a comma list of distinct names from "
                         f"{', '.join(variants_module.VARIANTS)}, or all")
    return names


# a run's seed, length, folder and data come from the grid; the fields outside a run's identity (NOT_IDENTITY)
# would give every grid point the same run: tuning any of them would report rows that never ran
# fields that do not change what a run computes: left out of its identity (the hash). The data enters the
# identity as its content's fingerprint (train.data_fingerprint), not as the --data string.
NOT_IDENTITY = ("out_dir", "init_from", "progress", "threads", "log_interval", "wandb", "wandb_project",
                "overwrite", "dispatch", "data", "parallel", "activation_checkpointing")
UNTUNABLE = ("seed", "max_iters") + NOT_IDENTITY


def tune_grid(text: str) -> list[dict]:
    """'lr=1,2;wd=0,0.1' -> the 4 combinations as dicts of typed values; '' -> [{}] (no tuning)."""
    if not text:
        return [{}]
    hints = {**typing.get_type_hints(GPTConfig), **typing.get_type_hints(TrainConfig)}
    axes = {}
    for part in text.split(";"):
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in hints or name in UNTUNABLE or not values:
            raise ValueError(f"--tune={text!r} is invalid: write FIELD=v1,v2[;FIELD=...] with GPTConfig/"
                             f"TrainConfig fields other than {', '.join(UNTUNABLE)}")
        axes[name] = [parse_value(name, v.strip(), hints[name]) for v in values.split(",")]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


@dataclass
class Study:
    about: str
    model: GPTConfig
    train: TrainConfig
    grid: StudyConfig = field(default_factory=StudyConfig)


def studies() -> dict[str, Study]:
    """Built on each call: the variant list is read from minimoe.variants when asked for."""
    gpu_model = GPTConfig(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=384, ffn="moe",
                          n_experts=8, top_k=2, d_ffn=768)
    return {
        "laptop": Study("the train_small regime, dense/moe/aoe x 5 seeds x 3.1M tokens (~13 min on 2 cores)",
                        laptop_model(), laptop_train()),
        "overnight": Study("every variant x 6 seeds x 1.5k/3k/6k steps, lr tuned alike on seed 0 "
                           "(~6 min per variant and seed on 2 cores; 9 seeds' worth with the tuning)",
                           laptop_model(), replace(laptop_train(), out_dir="out-study/overnight"),
                           StudyConfig(variants="all", seeds="1,2,3,4,5,6", budgets="1500,3000,6000",
                                       tune="learning_rate=1e-3,2e-3,4e-3")),
        "gpu": Study("6 x 384 on CUDA, bf16, 3000 steps x 64 x 256 = 49M tokens per run, dense/moe/aoe x 3 seeds "
                     "(stdlib bytes: ~4.7 passes; --data=a prepare.py folder for fresh tokens)",
                     gpu_model, TrainConfig(out_dir="out-study/gpu", device="cuda", dtype="bfloat16",
                                            max_iters=3000, eval_interval=250, eval_iters=40, log_interval=50,
                                            batch_size=64, learning_rate=1e-3, min_lr=1e-4, warmup_iters=150,
                                            sample_tokens=200, sample_start="def "),
                     StudyConfig(seeds="1,2,3")),
    }


def studies_help() -> str:
    return "studies (python -m minimoe.study NAME; the first is the default):\n" + "\n".join(
        f"  {name:<10} {s.about}" for name, s in studies().items()) + \
        "\n  decompose  why AoE trails: blocks of paired arms, one cause each (python -m minimoe.study decompose " \
        "--help)" + \
        "\nmodel variants:\n" + variants_module.variants_help()


# --------------------------------------------------------------------------- runs


@dataclass
class StudyRun:
    """One run of a study's grid: a variant at one seed and budget, with the tuned values it uses."""
    variant: str
    seed: int
    budget: int
    tuned: dict                      # the grid values this run uses
    model: GPTConfig
    train: TrainConfig
    cache: CachedRun                 # its folder and key (sha1 of the full config minus NOT_IDENTITY)
    tuning: bool = False             # a run of the tuning grid (tune_seed), not a reported one

    @property
    def key(self) -> str:
        return self.cache.key

    @property
    def dir(self) -> Path:
        return self.cache.folder


def make_run(variant, seed, budget, tuned, base: GPTConfig, cfg: TrainConfig, root: Path, data: str,
             tuning=False) -> StudyRun:
    """The run of `variant` with the `tuned` field values; data: the corpus's fingerprint (part of the key).
    It lives in the run cache (files.cached_run): root/runs/<variant>-seed<s>-iters<n>-<key[:10]>/."""
    tuned_model = {k: v for k, v in tuned.items() if k in {f.name for f in fields(GPTConfig)}}
    mc = variants_module.variant_config(variant, replace(base, **tuned_model))
    tc = replace(cfg, **{k: v for k, v in tuned.items() if k not in tuned_model}, seed=seed, max_iters=budget)
    ident = {"model": asdict(mc), "train": asdict(tc), "data": data}
    for part in (ident["model"], ident["train"]):
        for name in NOT_IDENTITY:
            part.pop(name, None)
    cache = cached_run(root, f"{variant}-seed{seed}-iters{budget}", ident)
    return StudyRun(variant, seed, budget, tuned, mc, replace(tc, out_dir=str(cache.folder), init_from="scratch"),
                    cache, tuning)


def load_result(run: StudyRun) -> dict | None:
    """The run's finished result, labelled as *this* study sees the run: a run reused from another
    study (same config, so same key and folder) carries that study's `tuned`/`tuning` on disk."""
    r = run.cache.result()
    return {**r, "tuned": run.tuned, "tuning": run.tuning} if r is not None else None


def sizes(mc: GPTConfig, accum_steps: int = 1) -> dict:
    """Parameter and FLOP counts without allocating anything (meta device). extra_flops_per_step:
    a variant's training work per optimizer step that does not scale with the tokens (ERC's n^2
    proxies, GPT.flops_per_step_extra), for accum_steps forward+backward passes per step."""
    with torch.device("meta"):
        m = GPT(mc)
    return {"params_total": m.num_params(), "params_active": m.num_active_params(),
            "flops_per_token": m.flops_per_token(mc.block_size),
            "extra_flops_per_step": m.flops_per_step_extra(accum_steps)}


class Interrupted(Exception):
    def __init__(self, signal_name):
        super().__init__(signal_name)
        self.signal_name = signal_name


def run_one(run: StudyRun, corpus) -> dict:
    """Train (or resume) one run and write its result.json. Raises Interrupted on Ctrl-C / SIGTERM."""
    cfg = replace(run.train, init_from=run.cache.init_from())
    r = train(run.model, cfg, corpus=corpus)
    r.pop("model", None)
    if r.get("interrupted"):
        raise Interrupted(r["interrupted"])
    s = sizes(run.model, grad_accum_steps(run.train, run.model.block_size, 1))
    train_s = r["tokens"] / r["tokens_per_sec"] if r.get("tokens_per_sec") else None
    result = {"key": run.key, "variant": run.variant, "seed": run.seed, "budget": run.budget,
              "tuned": run.tuned, "tuning": run.tuning, **s, "train_s": train_s, "threads": torch.get_num_threads(),
              "train_flops": s["flops_per_token"] * r["tokens"] + s["extra_flops_per_step"] * r["iters"],
              **{k: r.get(k) for k in ("val_loss", "val_bpb", "best_val_loss", "train_loss", "tokens", "iters",
                                      "tokens_per_sec", "mfu", "ent_load", "ent_conf", "wall_s", "final_val_loss",
                                      "final_val_se", "final_val_windows")},
              "routing": [{k: layer[k] for k in ("layer", "ent_load", "ent_conf", "load")}
                          for layer in r.get("routing") or []]}
    return run.cache.finish(result)                     # atomic: a result is whole or absent


# --------------------------------------------------------------------------- summaries

def best_tuned(results: dict, variant: str, budget: int, grid: list[dict], runs: dict) -> dict | None:
    """The grid point with the lowest final val loss for (variant, budget), once all are done."""
    losses = []
    for g in grid:
        r = results.get(runs[("tune", variant, budget, json.dumps(g, sort_keys=True))].key)
        if r is None:
            return None
        losses.append((r["val_loss"], g))
    return min(losses, key=lambda t: t[0])[1]


def summarize(reported: list[dict], variants: list[str], budgets: list[int], baseline: str) -> list[dict]:
    """One row per (budget, variant): mean +- 95% CI over seeds, paired difference to the baseline."""
    rows = []
    for budget in budgets:
        by_variant = {v: {r["seed"]: r for r in reported if r["variant"] == v and r["budget"] == budget}
                      for v in variants}
        base = {s: r["val_loss"] for s, r in by_variant.get(baseline, {}).items()}
        for v in variants:
            rs = by_variant[v]
            if not rs:
                continue
            rr = list(rs.values())
            loss, loss_ci = mean_ci([r["val_loss"] for r in rr])
            diff, diff_ci, n_pairs = paired_difference({s: r["val_loss"] for s, r in rs.items()}, base) \
                if v != baseline and base else (None, None, 0)
            n_layers = len(rr[0]["routing"])
            layers = [{"layer": rr[0]["routing"][j]["layer"], "max_ent": math.log(len(rr[0]["routing"][j]["load"])),
                       "ent_load": mean_ci([r["routing"][j]["ent_load"] for r in rr]),
                       "ent_conf": mean_ci([r["routing"][j]["ent_conf"] for r in rr])} for j in range(n_layers)]
            rows.append({"variant": v, "budget": budget, "tokens": rr[0]["tokens"], "seeds": sorted(rs),
                         "val_loss": [loss, loss_ci], "diff": [diff, diff_ci], "pairs": n_pairs,
                         "tuned": rr[0]["tuned"],
                         **{k: rr[0][k] for k in ("params_total", "params_active", "flops_per_token",
                                                   "extra_flops_per_step")},
                         "train_flops": statistics.fmean(r["train_flops"] for r in rr),
                         "tokens_per_sec": mean_ci([r["tokens_per_sec"] for r in rr]),
                         "train_s": mean_ci([r["train_s"] for r in rr]),
                         "ent_load": mean_ci([r["ent_load"] for r in rr]) if rr[0]["ent_load"] is not None else None,
                         "ent_conf": mean_ci([r["ent_conf"] for r in rr]) if rr[0]["ent_conf"] is not None else None,
                         "layers": layers})
    return rows


def summary_table(rows: list[dict], baseline: str) -> str:
    """Markdown table of summarize()'s rows: one per (budget, variant), with the paired difference."""
    head = ["variant", "tokens", "seeds", "val loss (nats, mean ± 95% CI)", f"Δ vs {baseline} (paired, ± 95% CI)",
            "params total", "params active", "train FLOPs/token", "train FLOPs", "tokens/s", "train s",
            "Ent_load", "Ent_conf"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        extra = f" + {r['extra_flops_per_step'] / 1e6:.1f}M/step" if r["extra_flops_per_step"] else ""
        lines.append("| " + " | ".join([
            r["variant"], f"{r['tokens'] / 1e6:.2f}M", str(len(r["seeds"])), fmt_ci(*r["val_loss"]),
            fmt_ci(*r["diff"], sign=True) + (f" (n={r['pairs']})" if r["pairs"] else ""),
            f"{r['params_total'] / 1e6:.3f}M", f"{r['params_active'] / 1e6:.3f}M",
            f"{r['flops_per_token'] / 1e6:.2f}M{extra}", f"{r['train_flops']:.3g}",
            fmt_ci(*r["tokens_per_sec"], digits=0), fmt_ci(*r["train_s"], digits=1),
            fmt_ci(*r["ent_load"], digits=3) if r["ent_load"] else "-",
            fmt_ci(*r["ent_conf"], digits=3) if r["ent_conf"] else "-"]) + " |")
    return "\n".join(lines)


def tuning_table(tune_results: list[dict], grid: list[dict], best: dict) -> str:
    """Rows: variant and budget; columns: the grid points; the chosen one in bold."""
    cols = [", ".join(f"{k}={v}" for k, v in g.items()) for g in grid]
    lines = ["| variant | steps | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for (variant, budget), chosen in best.items():
        cells = []
        for g in grid:
            r = next((t for t in tune_results if t["variant"] == variant and t["budget"] == budget
                      and t["tuned"] == g), None)
            cell = "-" if r is None else f"{r['val_loss']:.4f}"
            cells.append(f"**{cell}**" if g == chosen else cell)
        lines.append(f"| {variant} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse(argv) -> tuple[str, GPTConfig, TrainConfig, StudyConfig, set]:
    """[NAME] [--field=value ...] -> the study's name, its configs with the overrides, the fields given."""
    all_studies = studies()
    if "--help" in argv or "-h" in argv:
        print(studies_help() + "\n")
    name, argv = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else ("laptop", argv)
    if name not in all_studies:
        raise ValueError(f"study {name!r} is unknown: allowed values are {', '.join(all_studies)}")
    s = all_studies[name]
    model, cfg, grid = parse_overrides(argv, s.model, s.train, s.grid)
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv}
    for field_name, use in (("seed", "--seeds=1,2,3"), ("max_iters", "--budgets=500,1000")):
        if field_name in given:        # the grid sets these per run
            raise ValueError(f"--{field_name} is set by the study's grid: use {use} instead")
    return name, model, cfg, grid, given


class Runner:
    """Trains a study's runs in the order given, each unless it is finished (result.json); stops at
    --max_runs new runs or at a signal, and says why (stopped)."""

    def __init__(self, corpus, max_runs: int, total: int, label: str, progress: bool):
        self.corpus, self.max_runs = corpus, max_runs
        self.results: dict = {}                   # run key -> result, for every finished run
        self.new, self.stopped = 0, None
        self.bar = tqdm(total=total, desc=label, unit="run", position=0, dynamic_ncols=True, disable=not progress)

    def load(self, run: StudyRun) -> bool:
        """Take the run's result if an earlier invocation finished it."""
        if run.key not in self.results and (r := load_result(run)) is not None:
            self.results[run.key] = r
        return run.key in self.results

    def do(self, run: StudyRun) -> bool:
        """Train `run` unless it is done; False when the study must stop (max_runs, a signal)."""
        if self.load(run):
            self.bar.update(1)
            return True
        if self.max_runs and self.new >= self.max_runs:
            self.stopped = f"--max_runs={self.max_runs} reached"
            return False
        self.bar.set_postfix_str(f"{run.variant} seed {run.seed} {run.budget} steps")
        try:
            self.results[run.key] = run_one(run, self.corpus)
        except Interrupted as e:
            self.stopped = e.signal_name
            return False
        self.new += 1
        self.bar.update(1)
        return True


def report_header(name, command, device, corpus, base: GPTConfig, cfg: TrainConfig, grid: StudyConfig,
                  seeds: list[int], done: int, total: int, stopped: str | None) -> list[str]:
    """The lines of study.md above the table: the command, the machine, the runs, the regime, the rules."""
    return [f"# Study `{name}`\n", f"`{command}`\n",
            f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {describe_machine(device)}; device {device}",
            f"- {done} of {total} runs finished" + (f" (stopped: {stopped}; run the same command to continue)"
                                                    if stopped else ""),
            f"- data {corpus.name}; model {base.n_layer} layers x {base.n_embd}, context {base.block_size}, "
            f"{base.n_experts} experts top-{base.top_k}, d_ffn {base.ffn_dim}; batch {cfg.batch_size} x "
            f"{base.block_size}; lr {cfg.learning_rate} (cosine to {cfg.min_lr}, warmup {cfg.warmup_iters})",
            f"- seeds {seeds}: run s of every variant has seed s for init and batches (paired); val loss on the "
            f"same {cfg.eval_iters} x {cfg.batch_size} x {base.block_size} val tokens for every run",
            "- **budgets:** rows with the same tokens are at equal training tokens; compare `params total` "
            "for equal parameters, `train FLOPs` (6 x active matmul params + attention, per token) for equal "
            "compute, `train s` (measured, evaluation excluded) for equal wall-clock; cost.png plots both",
            f"- CI: 95%, Student t over seeds; Δ: per-seed difference to {grid.baseline}, negative = better\n"]


def write_figures(name, rows: list[dict], main_runs: list[StudyRun], results: dict, variants: list[str],
                  baseline: str, root: Path) -> list[str]:
    """loss.png, final.png, paired.png, entropy.png, cost.png in root (those that have data); their names."""
    largest = max(r["budget"] for r in rows)
    logs = {v: [read_log(r.dir) for r in main_runs if r.variant == v and r.budget == largest
                and r.key in results] for v in variants}
    title = f"study {name}, {largest} steps"
    plot_losses({v: lg for v, lg in logs.items() if lg}, root / "loss.png",
                title=f"Validation loss vs tokens, mean ± std over seeds ({title})")
    plot_final_losses(rows, root / "final.png", title=f"Final val loss, mean ± 95% CI (study {name})")
    files = ["loss.png", "final.png"]
    if plot_paired_differences(rows, baseline, root / "paired.png",
                               title=f"Paired difference to {baseline}, mean ± 95% CI (study {name})"):
        files.append("paired.png")
    if plot_entropy_per_layer([r for r in rows if r["budget"] == largest], root / "entropy.png",
                              title=f"Routing entropy per layer at the end, mean ± 95% CI ({title})"):
        files.append("entropy.png")
    plot_loss_vs_cost(rows, root / "cost.png", title=f"Final val loss vs training cost (study {name})")
    return files + ["cost.png"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["decompose"]:                  # a study of arms, not a grid (decompose.py)
        from . import decompose
        return decompose.main(argv[1:])
    name, base, cfg, grid, given = parse(argv)
    device = resolve_device(cfg.device)          # no CUDA for the gpu study: say so before any work
    corpus = load_corpus(cfg.data)
    if "vocab_size" not in given and base.vocab_size < corpus.vocab_size:
        base = replace(base, vocab_size=-(-corpus.vocab_size // 64) * 64)    # BPE: pad to a multiple of 64
    if "sample_start" not in given and cfg.data != "stdlib":
        cfg = replace(cfg, sample_start="\n")
    variants, seeds, budgets = variant_list(grid.variants), seed_list(grid.seeds), budget_list(grid.budgets)
    points = tune_grid(grid.tune)
    root = writable_folder(cfg.out_dir)
    command = shlex.join(["python", "-m", "minimoe.study", name, *(a for a in argv if a.startswith("-"))])
    data = data_fingerprint(corpus)
    # every run's config is built (and so validated) before the first one trains
    for budget, v, g, seed in itertools.product(budgets, variants, points, seeds):
        make_run(v, seed, budget, g, base, cfg, root, data)

    # every run of the study, in the order they train: the tuning grid, then seed by seed (so a
    # partial study already holds complete pairs)
    runs = {}
    if grid.tune:
        for budget, v, g in itertools.product(budgets, variants, points):
            runs[("tune", v, budget, json.dumps(g, sort_keys=True))] = \
                make_run(v, grid.tune_seed, budget, g, base, cfg, root, data, tuning=True)
    total = len(runs) + len(variants) * len(seeds) * len(budgets)
    runner = Runner(corpus, grid.max_runs, total, f"study {name}", cfg.progress)
    for run in runs.values():
        runner.load(run)
    main_runs = []
    try:
        if all(runner.do(r) for r in runs.values()):
            best = {(v, b): best_tuned(runner.results, v, b, points, runs) if grid.tune else {}
                    for b in budgets for v in variants}
            for seed, budget, v in itertools.product(seeds, budgets, variants):
                run = make_run(v, seed, budget, best[(v, budget)], base, cfg, root, data)
                main_runs.append(run)
                if not runner.do(run):
                    break
    finally:
        runner.bar.close()

    # --- report: whatever is finished (a partial study says so) ---
    results, stopped = runner.results, runner.stopped
    tune_results = [results[r.key] for r in runs.values() if r.key in results]
    best = {(v, b): best_tuned(results, v, b, points, runs) for b in budgets for v in variants} if grid.tune else {}
    reported = [results[r.key] for r in main_runs if r.key in results]
    rows = summarize(reported, variants, budgets, grid.baseline)
    done = len(tune_results) + len(reported)
    table = summary_table(rows, grid.baseline) if rows else "(no reported run has finished yet)"
    report = report_header(name, command, device, corpus, base, cfg, grid, seeds, done, total, stopped) + [table, ""]
    if grid.tune:
        report += [f"## Tuning (seed {grid.tune_seed}, the same grid for every variant; val loss, chosen in bold)\n",
                   tuning_table(tune_results, points, best), ""]
    files = write_figures(name, rows, main_runs, results, variants, grid.baseline, root) if rows else []
    if files:
        report.append("Figures: " + ", ".join(files) + "\n")
    (root / "study.md").write_text("\n".join(report))
    (root / "study.json").write_text(json.dumps(
        {"study": name, "command": command, "model": asdict(base), "train": asdict(cfg), "grid": asdict(grid),
         "finished": done, "total": total, "stopped": stopped, "summary": rows,
         "best_tuned": [{"variant": v, "budget": b, "tuned": g} for (v, b), g in best.items()],
         "runs": tune_results + reported}, indent=1, default=str))
    print(f"\n{table}\n\nwrote {root}/study.md, study.json{''.join(', ' + f for f in files)}")
    if stopped:
        print(f"stopped ({stopped}) after {runner.new} new run(s); continue with:  {command}")
        return {"SIGINT": 130, "SIGTERM": 143}.get(stopped, 0)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:     # bad input: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
