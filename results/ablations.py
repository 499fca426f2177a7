"""The ablation tables and routing diagnostics of results/ablations.md, from finished study folders.

    python results/ablations.py tables      # one table per axis: mean ± 95% CI, paired Δ vs the matching MoE,
                                            # and the laptop study's paired gap at each evaluation
    python results/ablations.py diagnose [ARM ...]   # how sharp and how useful the trained gates are

Each "arm" is one variant of one `python -m minimoe.study laptop ...` folder (ARMS below, with the
command that made it). Seeds pair across folders: run s of every study uses seed s for its init and
its batches, and every run is scored on the same val batches, so the per-seed difference between
two arms of different studies is as paired as one inside a study.

`diagnose` reloads each run's final checkpoint and replays the 20 val batches of the evaluation
(batches 0..19 of the val sampler, as minimoe.train.estimate_loss), measuring per expert layer:
  * the spread of the scores within a token (std over the E experts; router logits for MoE,
    ||a_i|| for AoE) -- the softmax sees nothing else: a small spread means near-uniform gates;
  * the top-1 gate after renormalizing the top-2 (0.5 = the two chosen experts weigh the same);
  * the margin s_(2) - s_(3) between the last chosen and the first unchosen score;
and two counterfactual val losses, with the routing replaced at evaluation time in every layer:
  * "flat gates": the same experts, each weighted 1/K (what the gate values are worth),
  * "random experts": K experts drawn uniformly per token, weighted 1/K (what the choice is worth).
"""

from dataclasses import dataclass
import json
import math
from pathlib import Path
import sys

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minimoe import aoe as aoe_module, moe as moe_module  # noqa: E402
from minimoe.data import BatchSampler, load_corpus  # noqa: E402
from minimoe.dispatch import Routing, route  # noqa: E402
from minimoe.study import fmt_ci, mean_ci, paired_difference  # noqa: E402
from minimoe.checkpoint import load_model  # noqa: E402
from minimoe.config import VAL_SEED  # noqa: E402

BASE = "python -m minimoe.study laptop --threads=2 --progress=false --max_runs=2"


@dataclass
class Arm:
    label: str
    folder: str          # a study's --out_dir
    variant: str
    command: str         # the study command that trained it (rerun it to resume / reproduce)


LAPTOP = f"{BASE} --out_dir=/tmp/study-laptop --seeds=1,2,3,4,5"
AUX0 = f"{BASE} --out_dir=/tmp/study-aux0 --variants=moe,aoe --aux_loss_coef=0 --seeds=1,2,3,4,5"
WUP = f"{BASE} --out_dir=/tmp/study-wup002 --variants=aoe --w_up_init_std=0.02 --seeds=1,2,3,4,5"
ARMS = {
    "dense": Arm("dense", "/tmp/study-laptop", "dense", LAPTOP),
    "moe": Arm("MoE (aux 0.01)", "/tmp/study-laptop", "moe", LAPTOP),
    "aoe": Arm("AoE (aux 0.01, d_low 24, W_up std 1/sqrt(d_low))", "/tmp/study-laptop", "aoe", LAPTOP),
    "moe-aux0": Arm("MoE, aux off", "/tmp/study-aux0", "moe", AUX0),
    "aoe-aux0": Arm("AoE, aux off", "/tmp/study-aux0", "aoe", AUX0),
    "aoe-wup002": Arm("AoE, W_up std 0.02 (paper)", "/tmp/study-wup002", "aoe", WUP),
    **{f"aoe-dlow{L}": Arm(f"AoE, d_low {L}", f"/tmp/study-dlow{L}", "aoe",
                           f"{BASE} --out_dir=/tmp/study-dlow{L} --variants=aoe --d_low={L} --seeds=1,2,3")
       for L in (8, 16, 32)},
    **{f"{v}-tuned": Arm(f"{v}, lr tuned", "/tmp/study-lrtune", v,
                         f"{BASE} --out_dir=/tmp/study-lrtune --variants=moe,aoe --tune=learning_rate=1e-3,2e-3,4e-3")
       for v in ("dense", "moe", "aoe")},
}
# axis title -> [(arm, the arm its paired Δ is taken against)]
AXES = {
    "Laptop study (5 seeds)": [("dense", "moe"), ("moe", None), ("aoe", "moe")],
    "Aux loss on/off": [("moe-aux0", None), ("aoe-aux0", "moe-aux0"), ("aoe-aux0", "moe"),
                        ("moe-aux0", "moe"), ("aoe-aux0", "aoe")],
    "W_up init": [("aoe", "moe"), ("aoe-wup002", "moe"), ("aoe-wup002", "aoe")],
    "d_low sweep (n_embd 64; d_wide matches the MoE's parameters)":
        [(f"aoe-dlow{L}", "moe") for L in (8, 16)] + [("aoe", "moe"), ("aoe-dlow32", "moe")],
    "Learning rate, tuned alike (grid 1e-3, 2e-3, 4e-3 on seed 0; the study's --tune)":
        [("dense-tuned", "moe-tuned"), ("moe-tuned", None), ("aoe-tuned", "moe-tuned")],
}


def results(arm: Arm, budget: int = 1500) -> dict:
    """{seed: result} of the arm's reported (not tuning) runs, as its study.json lists them."""
    path = Path(arm.folder) / "study.json"
    if not path.exists():
        return {}
    out = {}
    for r in json.loads(path.read_text())["runs"]:
        if r["variant"] == arm.variant and not r.get("tuning") and r["budget"] == budget:
            r["dir"] = str(Path(arm.folder) / "runs" / f"{arm.variant}-seed{r['seed']}-iters{budget}-{r['key'][:10]}")
            out[r["seed"]] = r
    return out


def tables() -> str:
    out = []
    for title, rows in AXES.items():
        lines = [f"### {title}\n", "| arm | seeds | val loss (mean ± 95% CI) | paired Δ (± 95% CI) | vs |",
                 "|---|---|---|---|---|"]
        any_row = False
        for name, base_name in rows:
            rs = results(ARMS[name])
            if not rs:
                continue
            any_row = True
            loss = fmt_ci(*mean_ci([r["val_loss"] for r in rs.values()]))
            diff, vs = "-", "-"
            if base_name:
                base = results(ARMS[base_name])
                m, ci, n = paired_difference({s: r["val_loss"] for s, r in rs.items()},
                                             {s: r["val_loss"] for s, r in base.items()})
                diff, vs = (fmt_ci(m, ci, sign=True) + f" (n={n})", ARMS[base_name].label) if n else ("-", "-")
            lines.append(f"| {ARMS[name].label} | {len(rs)} ({','.join(map(str, sorted(rs)))}) | {loss} | {diff} | {vs} |")
        if any_row:
            commands = sorted({ARMS[n].command for pair in rows for n in pair if n and results(ARMS[n])})
            out += lines + ["", "Commands:", *[f"    {c}" for c in commands], ""]
    out += ["### The gap over training (laptop study, paired per seed, val nats)\n", gap_over_training(), "",
            "### Ent_conf over training (laptop study; ln 8 = 2.079 is uniform)\n", confidence_over_training(), ""]
    return "\n".join(out)


def val_curve(run_dir: str) -> dict:
    """{iter: val loss} of one run's log.jsonl (every eval_interval steps)."""
    rows = (json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line)
    return {r["iter"]: r["val_loss"] for r in rows if r.get("val_loss") is not None}


def gap_over_training(names=("aoe", "dense"), base_name="moe", iters=(100, 200, 300, 500, 700, 1000, 1500)) -> str:
    """Paired Δ to the baseline at each evaluation: when does a gap open, and does it close?"""
    base_runs = results(ARMS[base_name])
    base = {s: val_curve(r["dir"]) for s, r in base_runs.items()}
    per_step = next(iter(base_runs.values()))["tokens"] / next(iter(base_runs.values()))["iters"]
    lines = [f"| step | tokens | " + " | ".join(f"{ARMS[n].label} − {ARMS[base_name].label}" for n in names) + " |",
             "|" + "---|" * (len(names) + 2)]
    curves = {n: {s: val_curve(r["dir"]) for s, r in results(ARMS[n]).items()} for n in names}
    for it in iters:
        cells = []
        for n in names:
            m, ci, k = paired_difference({s: c[it] for s, c in curves[n].items() if it in c},
                                         {s: c[it] for s, c in base.items() if it in c})
            cells.append(fmt_ci(m, ci, sign=True) + f" (n={k})" if k else "-")
        lines.append(f"| {it} | {it * per_step / 1e6:.2f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confidence_over_training(names=("moe", "aoe"), iters=(100, 200, 300, 500, 1000, 1500)) -> str:
    """Ent_conf (Eq. 8) per layer at each evaluation, mean ± 95% CI over seeds: how fast each
    variant's routing gets confident, and whether it keeps sharpening."""
    logs = {n: [{r["iter"]: r for r in map(json.loads, (Path(res["dir"]) / "log.jsonl").read_text().splitlines())
                 if r.get("routing")} for res in results(ARMS[n]).values()] for n in names}
    layers = range(len(next(iter(next(iter(logs.values()))[0].values()))["routing"]))
    lines = ["| step | " + " | ".join(f"{ARMS[n].label}, layer {j}" for n in names for j in layers) + " |",
             "|" + "---|" * (1 + len(names) * len(layers))]
    for it in iters:
        lines.append(f"| {it} | " + " | ".join(
            fmt_ci(*mean_ci([lg[it]["routing"][j]["ent_conf"] for lg in logs[n]]), digits=3)
            for n in names for j in layers) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- diagnostics

MODE = {"mode": "normal"}      # the routing replacement in force (a diagnostic, not the library)
STATS: list = []               # (scores, routing) of each expert layer's last forward


def diagnostic_route(scores, top_k, renormalize=True) -> Routing:
    r = route(scores, top_k, renormalize)
    STATS.append(r.scores.detach().float())
    if MODE["mode"] == "flat":
        r = Routing(r.scores, r.probs, torch.full_like(r.gates, 1 / top_k), r.experts)
    elif MODE["mode"] == "random":
        g = torch.Generator().manual_seed(0)
        experts = torch.rand(scores.shape, generator=g).argsort(-1)[:, :top_k].to(scores.device)
        r = Routing(r.scores, r.probs, torch.full_like(r.gates, 1 / top_k), experts)
    return r


def diagnose_run(path: str, sampler, eval_iters: int = 20) -> dict:
    model, _ = load_model(Path(path) / "ckpt.pt")
    n_layers = len(model.expert_layers())
    out = {}
    for mode in ("normal", "flat", "random"):
        MODE["mode"], losses = mode, []
        spread, top1, margin, level = ([[] for _ in range(n_layers)] for _ in range(4))
        with torch.no_grad():
            for i in range(eval_iters):
                STATS.clear()
                x, y = sampler.batch(i)
                model(x, y)
                losses.append(model.last_ce_loss.item())
                if mode != "normal":
                    continue
                for j, s in enumerate(STATS):               # s: (N, E) scores of layer j
                    srt = s.sort(-1, descending=True).values
                    p = torch.softmax(s, -1).topk(2, -1).values
                    spread[j].append(s.std(-1).mean().item())
                    level[j].append(s.mean(-1).mean().item())
                    top1[j].append((p[:, 0] / p.sum(-1)).mean().item())
                    margin[j].append((srt[:, 1] - srt[:, 2]).mean().item())
        out[f"loss_{mode}"] = sum(losses) / len(losses)
        if mode == "normal":
            mean = lambda v: sum(v) / len(v)  # noqa: E731
            out["layers"] = [{"spread": mean(spread[j]), "level": mean(level[j]), "top1_gate": mean(top1[j]),
                              "margin": mean(margin[j])} for j in range(n_layers)]
    MODE["mode"] = "normal"
    return out


def diagnose(names=("moe", "aoe", "moe-aux0", "aoe-aux0", "aoe-wup002")) -> str:
    torch.set_num_threads(2)
    moe_module.route = aoe_module.route = diagnostic_route
    sampler = BatchSampler(load_corpus("stdlib").val, 32, 64, seed=VAL_SEED)
    head = ("| arm | seeds | layer | score level (mean) | score spread within a token (std over E) | "
            "top-1 share of the top-2 gates | margin s(2)-s(3) | Ent_conf (ln 8 = 2.079) | load min/max share | "
            "experts under 2% of the slots, per seed |")
    lines = [head, "|" + "---|" * 10]
    cf = ["| arm | seeds | val loss | flat gates: Δ loss | random experts: Δ loss |", "|---|---|---|---|---|"]
    for name in names:
        rs = results(ARMS[name])
        if not rs:
            continue
        d = {s: diagnose_run(r["dir"], sampler) for s, r in rs.items()}
        seeds = f"{len(d)}"
        for j in range(len(next(iter(d.values()))["layers"])):
            col = lambda k: fmt_ci(*mean_ci([v["layers"][j][k] for v in d.values()]), digits=3)  # noqa: E731
            ent = fmt_ci(*mean_ci([r["routing"][j]["ent_conf"] for r in rs.values()]), digits=3)
            lo = min(min(r["routing"][j]["load"]) for r in rs.values())
            hi = max(max(r["routing"][j]["load"]) for r in rs.values())
            dead = ",".join(str(sum(f < 0.02 for f in r["routing"][j]["load"])) for r in rs.values())
            lines.append(f"| {ARMS[name].label} | {seeds} | {j} | {col('level')} | {col('spread')} | "
                         f"{col('top1_gate')} | {col('margin')} | {ent} | {lo:.3f} / {hi:.3f} | {dead} |")
        base = fmt_ci(*mean_ci([v["loss_normal"] for v in d.values()]))
        dl = lambda k: fmt_ci(*mean_ci([v[k] - v["loss_normal"] for v in d.values()]), sign=True)  # noqa: E731
        cf.append(f"| {ARMS[name].label} | {seeds} | {base} | {dl('loss_flat')} | {dl('loss_random')} |")
    return "\n".join(lines) + "\n\nCounterfactual routing at evaluation (all expert layers, paired per seed):\n\n" \
        + "\n".join(cf)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "tables"
    if what not in ("tables", "diagnose"):
        sys.exit(f"usage: python results/ablations.py [tables|diagnose], not {what!r}")
    names = sys.argv[2:] or ("moe", "aoe", "moe-aux0", "aoe-aux0", "aoe-wup002")
    if bad := [n for n in names if n not in ARMS]:
        sys.exit(f"unknown arm(s) {bad}: allowed values are {', '.join(ARMS)}")
    print(tables() if what == "tables" else diagnose(names))
