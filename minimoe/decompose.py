"""`python -m minimoe.study decompose`: why AoE trails the router MoE at laptop scale, one cause a block.

    python -m minimoe.study decompose --threads=2 --max_runs=6      # a chunk; run it again to continue
    python -m minimoe.study decompose --blocks=headline,gates        # some blocks only
    python -m minimoe.study decompose --report_only=true             # tables and plot from the finished runs

A study of *arms*: an arm is one variant with some fields changed (a learning rate, d_low, norm_topk, ...),
trained on a list of seeds; seed s of every arm has the same init for every shared weight (init.py) and the same
batches, so two arms are compared seed by seed. Each block asks one question and names the comparisons that
answer it (a - b, paired over the seeds both have, mean +- 95% t CI). The blocks, in the order they train:

    headline   dense / moe / aoe / moe-lowrank, 8 seeds: the gap, and how much of it the factorized W_g explains
    pairing    moe and aoe with init_rng="sequential" (before Dec 2026): the spread of AoE - MoE without common init
    product    W_g = W_down W_up at full rank and the MoE's width ("reparam": exactly the MoE's function class,
               more parameters) vs the MoE, across learning rates, and with the factors' learning rate scaled
    rank       moe-lowrank and AoE at d_low 40 and 64 (= n_embd, full rank), beside d_low 24 of the headline
    gates      norm_topk=false (no renormalization, the authors' megablocks AoE) for moe, moe-lowrank, aoe
    aux        Eq. 6 summed over layers (minimoe before Dec 2026: 2x at 2 layers) and megablocks' mean/K (1/2x)
    tune       every variant the same learning-rate grid, on two tuning seeds (not reported seeds)
    tuned      moe, aoe, moe-lowrank at their own best learning rate (from `tune`), 5 seeds
    budget     the headline four at 4x the tokens (6000 steps)
    width      the headline four at n_embd 96 (d_low 36 = 3/8 of it), ~20 tokens per active parameter
    prose      the headline four on English prose instead of Python (--prose=PATH: a text file or folder)

Every run ends with the final evaluation over the whole val split (train.final_val_loss); that is the loss
compared here. Runs live in out_dir/runs/ like every study's (study.make_run: same keys, same resume); the
results folder keeps result.json, log.jsonl and final_val.npy of each run (the checkpoints are ignored by git),
so a later session continues the grid. Writes out_dir/decompose.md, decompose.json and decompose.png.
"""

from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
import json
import math
from pathlib import Path
import shlex
import statistics

import numpy as np
import torch
from tqdm import tqdm

from .data import load_corpus
from .model import GPTConfig
from .checkpoint import data_fingerprint
from .cli import parse_overrides
from .config import TrainConfig
from .files import writable_folder
from .outdir import FINAL_VAL_FILE
from .runtime import resolve_device
from . import study as S

SEEDS8, SEEDS5, TUNE_SEEDS = (1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 3, 4, 5), (101, 102)
LR_GRID = (1e-3, 2e-3, 4e-3, 8e-3)
HEADLINE = ("dense", "moe", "aoe", "moe-lowrank")


@dataclass(frozen=True)
class Arm:
    label: str                       # unique in the study
    variant: str                     # a name of minimoe.variants
    overrides: tuple = ()            # ((field, value), ...): GPTConfig / TrainConfig fields
    seeds: tuple = SEEDS5
    budget: int = 1500               # optimizer steps
    data: str = ""                   # another corpus (load_corpus spec); "" = the study's


@dataclass(frozen=True)
class Block:
    name: str
    question: str
    arms: tuple
    comparisons: tuple               # ((a, b), ...): arm labels, a - b
    tuned_from: str = ""             # arms built from this block's best learning rate per variant


def _arms(prefix, variants, seeds=SEEDS5, budget=1500, data="", **fields):
    return tuple(Arm(f"{v}{prefix}", v, tuple(sorted(fields.items())), seeds, budget, data) for v in variants)


def blocks(prose: str = "") -> list[Block]:
    """The decomposition of issue 17, in the order it trains (cheap and decisive first)."""
    reparam = dict(expert_gate="lowrank", d_low=64, d_wide=128)         # W_down W_up at the MoE's rank and width
    product = [Arm("moe lr=%g" % lr, "moe", (("learning_rate", lr),)) for lr in (1e-3, 4e-3)]
    product += [Arm("reparam lr=%g" % lr, "moe", tuple(sorted({**reparam, "learning_rate": lr}.items())))
                for lr in (1e-3, 2e-3, 4e-3)]
    scales = {"1/2": (0.5, 0.5), "1/sqrt2": (0.7071, 0.7071), "down 1/4": (0.25, 1.0)}
    product += [Arm(f"reparam factors x{name}", "moe", tuple(sorted({**reparam, "w_down_lr_scale": d,
                                                                     "w_up_lr_scale": u}.items())))
                for name, (d, u) in scales.items()]
    width = dict(n_embd=96, d_ffn=192, d_low=36)
    out = [
        Block("headline", "How far does each variant trail the MoE, and how much of AoE's gap does a router with "
              "AoE's factorized experts (moe-lowrank) share?", _arms("", HEADLINE, SEEDS8),
              (("aoe", "moe"), ("moe-lowrank", "moe"), ("aoe", "moe-lowrank"), ("dense", "moe"))),
        Block("product", "Does a product W_down W_up train worse than one matrix of the same function class, and "
              "does scaling the factors' learning rate fix it?", tuple(product),
              (("reparam lr=0.002", "moe"), ("reparam lr=0.001", "moe lr=0.001"), ("reparam lr=0.004", "moe lr=0.004"),
               *((f"reparam factors x{n}", "moe") for n in scales),
               *((f"reparam factors x{n}", "reparam lr=0.002") for n in scales))),
        Block("pairing", "How much do common random numbers (init.py) shrink the seed-to-seed spread of AoE - MoE? "
              "The same two arms with the draws in construction order, as before Dec 2026",
              _arms(" sequential", ("moe", "aoe"), SEEDS8, init_rng="sequential"),
              (("aoe sequential", "moe sequential"), ("aoe", "moe"))),
        Block("rank", "Is the rank of W_down the cause? (d_low 24 is the headline's)",
              _arms(" d_low=40", ("moe-lowrank", "aoe"), d_low=40) + _arms(" d_low=64", ("moe-lowrank", "aoe"), d_low=64),
              (("moe-lowrank d_low=40", "moe"), ("aoe d_low=40", "moe"), ("aoe d_low=40", "moe-lowrank d_low=40"),
               ("moe-lowrank d_low=64", "moe"), ("aoe d_low=64", "moe"), ("aoe d_low=64", "moe-lowrank d_low=64"))),
        Block("gates", "Does renormalizing the top-k gates (ours) instead of not (the authors' megablocks AoE) "
              "cost AoE more than the MoE?", _arms(" no-renorm", ("moe", "moe-lowrank", "aoe"), norm_topk=False),
              (("moe no-renorm", "moe"), ("aoe no-renorm", "aoe"), ("moe-lowrank no-renorm", "moe-lowrank"),
               ("aoe no-renorm", "moe no-renorm"), ("aoe no-renorm", "moe-lowrank no-renorm"))),
        Block("aux", "Does the aux loss's scale (its gradient lands on AoE's W_down, an expert weight) hurt AoE more?",
              _arms(" aux=sum", ("moe", "aoe"), aux_loss_reduce="sum") +
              _arms(" aux=mean/k", ("moe", "aoe"), aux_loss_reduce="mean/k"),
              (("aoe aux=sum", "moe aux=sum"), ("aoe aux=mean/k", "moe aux=mean/k"), ("aoe aux=sum", "aoe"),
               ("moe aux=sum", "moe"), ("aoe aux=mean/k", "aoe"), ("moe aux=mean/k", "moe"))),
        Block("tune", "The same learning-rate grid for every variant, on two tuning seeds",
              tuple(Arm(f"tune {v} lr={lr:g}", v, (("learning_rate", lr),), TUNE_SEEDS)
                    for v in ("moe", "aoe", "moe-lowrank") for lr in LR_GRID), ()),
        Block("tuned", "Each at its own best learning rate: the gap after tuning alike", (),
              (("aoe tuned", "moe tuned"), ("moe-lowrank tuned", "moe tuned"), ("aoe tuned", "moe-lowrank tuned")),
              tuned_from="tune"),
        Block("budget", "Does the gap shrink with 4x the tokens?", _arms(" 4x", HEADLINE, budget=6000),
              (("aoe 4x", "moe 4x"), ("moe-lowrank 4x", "moe 4x"), ("aoe 4x", "moe-lowrank 4x"), ("dense 4x", "moe 4x"))),
        Block("width", "Does the gap shrink at n_embd 96 (d_low 36), ~20 tokens per active parameter?",
              _arms(" d96", HEADLINE, budget=3000, **width),
              (("aoe d96", "moe d96"), ("moe-lowrank d96", "moe d96"), ("aoe d96", "moe-lowrank d96"),
               ("dense d96", "moe d96"))),
    ]
    if prose:
        out.append(Block("prose", f"The headline on English prose ({prose}) instead of Python",
                         _arms(" prose", HEADLINE, data=prose),
                         (("aoe prose", "moe prose"), ("moe-lowrank prose", "moe prose"),
                          ("aoe prose", "moe-lowrank prose"))))
    return out


@dataclass
class DecomposeConfig:
    blocks: str = "all"           # comma list of block names (headline, product, ...) or "all"
    seeds: str = ""               # replace every arm's seeds (e.g. "1,2" for a smoke test); "": each arm's own
    budget_scale: float = 1.0     # multiply every arm's steps (a smoke test: 0.01); 1: the real grid
    max_runs: int = 0             # stop after this many new runs (0: no limit); run again to continue
    prose: str = ""               # an English prose corpus (text file or folder) for the `prose` block
    report_only: bool = False     # train nothing; write the report from the finished runs

    def __post_init__(self):
        names = [b.name for b in blocks("x")]
        chosen = names if self.blocks == "all" else [b.strip() for b in self.blocks.split(",")]
        if not chosen or any(b not in names for b in chosen):
            raise ValueError(f"--blocks={self.blocks!r} is invalid: a comma list of {', '.join(names)}, or all")
        if "prose" in chosen and self.blocks != "all" and not self.prose:
            raise ValueError("--blocks=prose needs --prose=PATH (an English text file or folder)")
        if self.seeds:
            S.seed_list(self.seeds)
        if not (isinstance(self.budget_scale, (int, float)) and 0 < self.budget_scale <= 100):
            raise ValueError(f"--budget_scale={self.budget_scale!r} is invalid: a number in (0, 100]")
        if not isinstance(self.max_runs, int) or self.max_runs < 0:
            raise ValueError(f"--max_runs={self.max_runs!r} is invalid: must be an integer >= 0 (0: no limit)")

    def chosen(self) -> list[Block]:
        all_blocks = blocks(self.prose)
        if self.blocks == "all":
            return all_blocks
        names = [b.strip() for b in self.blocks.split(",")]
        return [b for b in all_blocks if b.name in names]


def default_train() -> TrainConfig:
    return replace(S.laptop_train(), out_dir="results/decompose", sample_tokens=0)


class Grid:
    """The study's runs, built (and validated) up front, trained in order, results kept by run key."""

    def __init__(self, dc: DecomposeConfig, base: GPTConfig, cfg: TrainConfig):
        self.dc, self.base, self.cfg, self.root = dc, base, cfg, Path(cfg.out_dir)
        self.corpora, self.fingerprints, self.results, self.runs = {}, {}, {}, {}
        self.new, self.stopped = 0, None

    def corpus(self, spec):
        spec = spec or self.cfg.data
        if spec not in self.corpora:
            self.corpora[spec] = load_corpus(spec)
            self.fingerprints[spec] = data_fingerprint(self.corpora[spec])
        return self.corpora[spec]

    def seeds(self, arm):
        return tuple(S.seed_list(self.dc.seeds)) if self.dc.seeds and arm.seeds != TUNE_SEEDS else arm.seeds

    def make(self, arm, seed):
        self.corpus(arm.data)
        budget = max(1, round(arm.budget * self.dc.budget_scale))
        cfg = replace(self.cfg, data=arm.data or self.cfg.data)
        run = S.make_run(arm.variant, seed, budget, dict(arm.overrides), self.base, cfg, self.root,
                         self.fingerprints[arm.data or self.cfg.data])
        self.runs[(arm.label, seed)] = run
        if (r := S.load_result(run)) is not None:
            self.results[run.key] = r
        return run

    def train(self, run, data, bar) -> bool:
        """Train `run` unless finished; False when the study must stop (max_runs, a signal)."""
        if run.key in self.results:
            bar.update(1)
            return True
        if self.dc.report_only or (self.dc.max_runs and self.new >= self.dc.max_runs):
            self.stopped = self.stopped or ("--report_only" if self.dc.report_only else f"--max_runs={self.dc.max_runs} reached")
            return False
        bar.set_postfix_str(f"{run.variant} seed {run.seed} {run.budget} steps")
        try:
            self.results[run.key] = S.run_one(run, self.corpus(data))
        except S.Interrupted as e:
            self.stopped = e.signal_name
            return False
        self.new += 1
        bar.update(1)
        return True

    def loss(self, label, seed):
        run = self.runs.get((label, seed))
        r = self.results.get(run.key) if run else None
        return None if r is None else r.get("final_val_loss", r["val_loss"])


def tuned_arms(grid: Grid, tune: Block) -> tuple:
    """For each variant of `tune`, an arm at the learning rate with the lowest mean final loss over the tuning
    seeds, once all of that variant's tuning runs are done (else none)."""
    out = []
    for v in dict.fromkeys(a.variant for a in tune.arms):
        means = []
        for arm in (a for a in tune.arms if a.variant == v):
            losses = [grid.loss(arm.label, s) for s in grid.seeds(arm)]
            if None in losses:
                break
            means.append((statistics.fmean(losses), dict(arm.overrides)["learning_rate"]))
        else:
            best = min(means)[1]
            out.append(Arm(f"{v} tuned", v, (("learning_rate", best),), SEEDS5))
    return tuple(out)


def execute(grid: Grid, chosen: list[Block]) -> list[Block]:
    """Build every run first (one-line errors before any training), then train block by block, seed by seed
    within a block, so a partial grid holds complete pairs. Returns the blocks with their tuned arms filled."""
    for block in chosen:
        for arm in block.arms:
            for seed in grid.seeds(arm):
                grid.make(arm, seed)
    total = sum(len(grid.seeds(a)) for b in chosen for a in b.arms)
    bar = tqdm(total=total, desc="study decompose", unit="run", dynamic_ncols=True, disable=not grid.cfg.progress)
    done = []
    try:
        for block in chosen:
            if block.tuned_from:
                tune = next((b for b in done if b.name == block.tuned_from), None)
                block = replace(block, arms=tuned_arms(grid, tune) if tune else ())
                for arm in block.arms:
                    bar.total += len(grid.seeds(arm))
                    for seed in grid.seeds(arm):
                        grid.make(arm, seed)
            done.append(block)
            seeds = sorted({s for a in block.arms for s in grid.seeds(a)})
            for seed in seeds:
                for arm in (a for a in block.arms if seed in grid.seeds(a)):
                    if not grid.train(grid.runs[(arm.label, seed)], arm.data, bar) and grid.stopped:
                        break
                if grid.stopped:
                    break
    finally:
        bar.close()
    done += [b for b in chosen if b.name not in {d.name for d in done}]
    return done


# --------------------------------------------------------------------------- the report

def window_se(grid: Grid, a: str, b: str, seeds) -> float | None:
    """The val set's own error of the difference a - b: per seed, std of the per-window differences over
    sqrt(windows) (final_val.npy of both runs), averaged over seeds. The seed CI does not contain it: every seed
    is scored on the same val windows."""
    ses = []
    for s in seeds:
        paths = [Path(grid.runs[(label, s)].dir) / FINAL_VAL_FILE for label in (a, b)]
        if not all(p.is_file() for p in paths):
            continue
        da, db = (np.load(p).astype(np.float64) for p in paths)
        if len(da) == len(db) > 1:
            ses.append(float(np.std(da - db, ddof=1) / math.sqrt(len(da))))
    return statistics.fmean(ses) if ses else None


def summarize(grid: Grid, done: list[Block]) -> list[dict]:
    rows = []
    for block in done:
        for arm in block.arms:
            losses = {s: v for s in grid.seeds(arm) if (v := grid.loss(arm.label, s)) is not None}
            r = [grid.results[grid.runs[(arm.label, s)].key] for s in losses]
            rows.append({"block": block.name, "kind": "arm", "label": arm.label, "variant": arm.variant,
                         "overrides": dict(arm.overrides), "budget": arm.budget, "seeds": sorted(losses),
                         "loss": list(S.mean_ci(losses.values())) if losses else [None, None],
                         "per_seed": losses, "threads": sorted({x.get("threads") for x in r} - {None}),
                         "params_total": r[0]["params_total"] if r else None,
                         "params_active": r[0]["params_active"] if r else None})
        for a, b in block.comparisons:
            la, lb = ({s: v for (label, s) in grid.runs if label == x and (v := grid.loss(x, s)) is not None}
                      for x in (a, b))
            m, ci, n = S.paired_difference(la, lb)
            common = sorted(set(la) & set(lb))
            diffs = [la[s] - lb[s] for s in common]
            rows.append({"block": block.name, "kind": "comparison", "label": f"{a} − {b}", "a": a, "b": b,
                         "diff": [m, ci], "pairs": n, "per_seed": dict(zip(common, diffs)),
                         "sd": statistics.stdev(diffs) if n > 1 else None,
                         "positive": sum(la[s] > lb[s] for s in common),
                         "val_set_se": window_se(grid, a, b, common)})
    return rows


def fmt_se(se) -> str:
    return "-" if se is None else f"{se:.4f}"


def markdown(rows, command, device, grid) -> str:
    base, cfg = grid.base, grid.cfg
    lines = ["# Study `decompose`: why AoE trails the MoE at laptop scale\n", f"`{command}`\n",
             f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {S.describe_machine(device)}",
             f"- model {base.n_layer} x {base.n_embd} (unless an arm says otherwise), context {base.block_size}, "
             f"{base.n_experts} experts top-{base.top_k}, d_ffn {base.ffn_dim}; batch {cfg.batch_size} x "
             f"{base.block_size}; lr {cfg.learning_rate} cosine to {cfg.min_lr}, warmup {cfg.warmup_iters}; "
             f"init_rng={base.init_rng}, aux_loss_reduce={base.aux_loss_reduce} unless an arm says otherwise",
             "- loss: the final evaluation over the whole val split (train.final_val_loss), nats/byte; "
             "mean ± 95% t CI over seeds; Δ: paired per seed (same init for every shared weight, same batches); "
             "val-set SE: the val windows' own error of Δ (not in the seed CI)",
             f"- {sum(1 for r in grid.results)} runs finished" +
             (f"; stopped: {grid.stopped} (run the same command to continue)" if grid.stopped else ""), ""]
    for block in dict.fromkeys(r["block"] for r in rows):
        lines += [f"## {block}\n"]
        arms = [r for r in rows if r["block"] == block and r["kind"] == "arm"]
        if arms:
            lines += ["| arm | seeds | loss | threads |", "|---|---|---|---|"]
            lines += [f"| {r['label']} | {len(r['seeds'])} | {S.fmt_ci(*r['loss'])} | "
                      f"{','.join(map(str, r['threads'])) or '-'} |" for r in arms]
            lines.append("")
        comps = [r for r in rows if r["block"] == block and r["kind"] == "comparison"]
        if comps:
            lines += ["| comparison | pairs | Δ (paired, ± 95% CI) | SD over seeds | a > b on | val-set SE | per seed |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {r['label']} | {r['pairs']} | {S.fmt_ci(*r['diff'], sign=True)} | {fmt_se(r['sd'])} | "
                      f"{r['positive']}/{r['pairs']} | {fmt_se(r['val_set_se'])} | "
                      + " ".join(f"{d:+.4f}" for d in r["per_seed"].values()) + " |" for r in comps]
            lines.append("")
    return "\n".join(lines)


def plot(rows, path) -> bool:
    comps = [r for r in rows if r["kind"] == "comparison" and r["diff"][0] is not None]
    if not comps:
        return False
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 0.32 * len(comps) + 1.5), layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(comps)))[::-1]
    for y, r in zip(ys, comps):
        m, ci = r["diff"]
        ax.errorbar(m, y, xerr=ci or 0, fmt="o", color="C0" if "aoe" in r["a"] else "C1", capsize=3)
        ax.scatter(list(r["per_seed"].values()), [y] * len(r["per_seed"]), s=8, color="0.6", zorder=0)
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(ys, [f"[{r['block']}] {r['label']} (n={r['pairs']})" for r in comps], fontsize=7)
    ax.set_xlabel("paired difference of the final val loss, a − b (nats; < 0: a better), mean ± 95% CI; dots: seeds")
    fig.suptitle("study decompose: where AoE's gap to the MoE comes from")
    fig.savefig(path, dpi=110)
    return True


def main(argv) -> int:
    if "--help" in argv or "-h" in argv:
        print(__doc__)
    base, cfg, dc = parse_overrides(argv, S.laptop_model(), default_train(), DecomposeConfig())
    given = {a[2:].split("=", 1)[0] for a in argv}
    for name, use in (("seed", "--seeds=1,2"), ("max_iters", "--budget_scale=0.5")):
        if name in given:
            raise ValueError(f"--{name} is set by the study's arms: use {use} instead")
    device = resolve_device(cfg.device)
    grid = Grid(dc, base, cfg)
    writable_folder(cfg.out_dir)
    done = execute(grid, dc.chosen())
    command = shlex.join(["python", "-m", "minimoe.study", "decompose", *argv])
    rows = summarize(grid, done)
    root = Path(cfg.out_dir)
    (root / "decompose.md").write_text(markdown(rows, command, device, grid))
    (root / "decompose.json").write_text(json.dumps({"command": command, "model": asdict(base), "train": asdict(cfg),
                                                     "config": asdict(dc), "stopped": grid.stopped, "rows": rows},
                                                    indent=1, default=str))
    wrote = plot(rows, root / "decompose.png")
    print(f"wrote {root}/decompose.md, decompose.json{', decompose.png' if wrote else ''}")
    if grid.stopped and grid.stopped.startswith("SIG"):
        print(f"stopped ({grid.stopped}); continue with:  {command}")
        return {"SIGINT": 130, "SIGTERM": 143}.get(grid.stopped, 1)
    if grid.stopped and not dc.report_only:
        print(f"stopped ({grid.stopped}) after {grid.new} new run(s); continue with:  {command}")
    return 0
