"""Figures from training logs (the rows of log.jsonl, one per evaluation): PNG files, no display.

    logs = {"dense": rows, "moe": rows, "aoe": rows}           # one run per name, or
    logs = {"moe": [rows_seed0, rows_seed1, ...], ...}         # several runs: mean and spread
    plot_losses(logs, "loss.png")          val loss vs tokens seen, all models on one plot
    plot_expert_load(logs, "experts.png")  each expert's share of the tokens, per layer, over training
    plot_routing_entropy(logs, "routing.png")  Ent_load (Eq. 7) and Ent_conf (Eq. 8) over training
Entropies are in nats everywhere (dispatch.load_entropy), shown next to their maximum log E.

Built on matplotlib's Figure object (never pyplot), so it works headless and leaves the notebook
backend alone. files.read_log(out_dir) loads a run's rows.
"""

import math

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

COLORS = {"dense": "#7f7f7f", "moe": "#1f77b4", "aoe": "#d62728"}


def _runs(rows_or_runs) -> list[list[dict]]:
    """Accept one run (a list of row dicts) or several (a list of such lists)."""
    if rows_or_runs and isinstance(rows_or_runs[0], dict):
        return [rows_or_runs]
    return [r for r in rows_or_runs if r]


def _curve(runs, key):
    """x (tokens) and the mean / std over runs of `key`, on the evaluation points all runs share."""
    common = sorted(set.intersection(*({r["tokens"] for r in run if r.get(key) is not None} for run in runs)))
    values = np.array([[{r["tokens"]: r[key] for r in run}[t] for t in common] for run in runs], dtype=float)
    return np.array(common, dtype=float), values.mean(axis=0), values.std(axis=0)


def _color(name, i):
    kind = name.split("/")[0].split(" ")[0]
    return COLORS.get(kind, f"C{i}")


def plot_losses(logs: dict, path, title: str | None = None) -> None:
    """Validation loss (nats/token; bits per byte on the right axis when logged) against tokens
    seen, one line per model; several runs give their mean and a +-1 std band. The right panel
    zooms into the second half of training, where the models separate."""
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    bpb_ratio = None
    zoom_lo, zoom_hi, last_x = math.inf, -math.inf, 0.0
    for i, (name, rows) in enumerate(logs.items()):
        runs = _runs(rows)
        if not runs:
            continue
        x, mean, std = _curve(runs, "val_loss")
        tx, tmean, _ = _curve(runs, "train_loss")
        color = _color(name, i)
        n = f" (mean of {len(runs)})" if len(runs) > 1 else ""
        for ax in axes:
            ax.plot(x, mean, "-o", ms=3, color=color, label=f"{name}{n}: {mean[-1]:.3f}")
            if len(runs) > 1:
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)
            ax.plot(tx, tmean, ":", color=color, alpha=0.6)
        half = x >= x[-1] / 2
        zoom_lo, zoom_hi = min(zoom_lo, (mean - std)[half].min()), max(zoom_hi, (mean + std)[half].max())
        last_x = max(last_x, x[-1])
        row = runs[0][-1]
        if row.get("val_bpb"):
            bpb_ratio = row["val_bpb"] / row["val_loss"]
    axes[1].plot([], [], ":", color="k", alpha=0.6, label="dotted: train loss")
    if math.isfinite(zoom_lo):
        pad = 0.15 * (zoom_hi - zoom_lo) + 1e-3
        axes[1].set_xlim(last_x / 2 * 0.98, last_x * 1.01)
        axes[1].set_ylim(zoom_lo - pad, zoom_hi + pad)
    for ax, what in zip(axes, ("whole run", "second half (zoom)")):
        ax.set_xlabel("tokens seen (training)")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_ylabel("validation loss (nats / token)")
        ax.set_title(what)
        ax.grid(alpha=0.3)
        if bpb_ratio:
            sec = ax.secondary_yaxis("right", functions=(lambda v: v * bpb_ratio, lambda v: v / bpb_ratio))
            sec.set_ylabel("bits per byte")
    axes[1].legend(title="final val loss", fontsize=9)
    fig.suptitle(title or "Validation loss vs tokens (same val batches for every model)")
    fig.savefig(path, dpi=120)


def plot_expert_load(logs: dict, path, title: str | None = None) -> bool:
    """Heatmaps of each expert's share of the token-slots at every evaluation (rows: models with
    experts, columns: their expert layers). White = 1/n_experts, the perfectly balanced share;
    red = overloaded, blue = starved. Uses the first run of each model. Returns False (and writes
    nothing) when no model has expert layers."""
    models = {name: _runs(rows)[0] for name, rows in logs.items() if _runs(rows) and _runs(rows)[0][-1].get("routing")}
    if not models:
        return False
    n_layers = max(len(rows[-1]["routing"]) for rows in models.values())
    fig = Figure(figsize=(2.6 * n_layers + 1.2, 2.4 * len(models) + 0.8), layout="constrained")
    axes = np.array(fig.subplots(len(models), n_layers, squeeze=False, sharex=True, sharey=True))
    image = None
    for r, (name, rows) in enumerate(models.items()):
        rows = [row for row in rows if row.get("routing")]
        tokens = np.array([row["tokens"] for row in rows], dtype=float)
        for c in range(n_layers):
            ax = axes[r, c]
            if c >= len(rows[-1]["routing"]):
                ax.set_visible(False)
                continue
            load = np.array([row["routing"][c]["load"] for row in rows]).T      # (E, evaluations)
            E = load.shape[0]
            # one column per evaluation, centred on its token count
            edges = np.concatenate([[tokens[0]], (tokens[1:] + tokens[:-1]) / 2, [tokens[-1]]]) / 1e6
            norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0 / E, vmax=max(2.0 / E, load.max()))
            image = ax.pcolormesh(edges, np.arange(E + 1) - 0.5, load, cmap="RdBu_r", norm=norm)
            last = rows[-1]["routing"][c]
            ax.set_title(f"{name} · layer {last['layer']}\nEnt_load {last['ent_load']:.2f} nats "
                         f"(max log E = {last['max_ent']:.2f})", fontsize=9)
            if c == 0:
                ax.set_ylabel("expert")
            if r == len(models) - 1:
                ax.set_xlabel("tokens seen (M)")
            ax.set_yticks(range(E))
    fig.colorbar(image, ax=axes, label="share of token-slots (white = 1/n_experts, balanced)", shrink=0.9)
    fig.suptitle(title or "Expert load per layer over training (val batches)")
    fig.savefig(path, dpi=120)
    return True


def plot_routing_entropy(logs: dict, path, title: str | None = None) -> bool:
    """Ent_load (Eq. 7: balance, max log E) and Ent_conf (Eq. 8: lower = more confident scores), in nats,
    averaged over layers, against tokens; several runs give mean +- std. False if nothing routes."""
    models = {n: _runs(r) for n, r in logs.items() if _runs(r) and _runs(r)[0][-1].get("ent_load") is not None}
    if not models:
        return False
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    max_ent = None
    for i, (name, runs) in enumerate(models.items()):
        max_ent = runs[0][-1]["routing"][0]["max_ent"]
        for ax, key in zip(axes, ("ent_load", "ent_conf")):
            x, mean, std = _curve(runs, key)
            ax.plot(x, mean, "-o", ms=3, color=_color(name, i), label=name)
            if len(runs) > 1:
                ax.fill_between(x, mean - std, mean + std, color=_color(name, i), alpha=0.2, lw=0)
    for ax, what in zip(axes, ("Ent_load (Eq. 7, nats): how evenly tokens spread over experts",
                               "Ent_conf (Eq. 8, nats): how unsure the scores are per token")):
        ax.axhline(max_ent, ls="--", color="k", lw=1, label=f"log E = {max_ent:.2f} nats (uniform)")
        ax.set_xlabel("tokens seen (training)")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_ylabel("entropy (nats), mean over layers")
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title or "Routing statistics on the val batches")
    fig.savefig(path, dpi=120)
    return True


# --------------------------------------------------------------------------- study summaries
# The functions below draw minimoe.study's summary rows: one dict per (variant, budget) with
# "val_loss": [mean, ci95], "diff": [mean, ci95] (paired, to the baseline), "tokens", "train_s",
# "train_flops" and "layers" (per-layer "ent_load"/"ent_conf" as [mean, ci95]). A ci of None
# (a single seed) draws no error bar.

def _err(ci):
    return 0.0 if ci is None else ci


def _by_variant(rows):  # {variant: its rows by tokens}
    out = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r)
    return {v: sorted(rs, key=lambda r: r["tokens"]) for v, rs in out.items()}


def _grouped(rows):
    """Categorical x positions: one tick per variant, its budgets side by side (lightest = fewest
    tokens). Yields (x, row, color, alpha) and returns the tick labels."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    budgets = sorted({r["tokens"] for r in rows})
    width = 0.8 / len(budgets)
    placed = []
    for i, v in enumerate(names):
        for j, tokens in enumerate(budgets):
            r = next((r for r in rows if r["variant"] == v and r["tokens"] == tokens), None)
            if r is not None:
                placed.append((i + (j - (len(budgets) - 1) / 2) * width, r, _color(v, i),
                               0.35 + 0.65 * (j + 1) / len(budgets), width))
    return placed, names, budgets


def _budget_note(budgets):
    return "bars per variant, left to right: " + ", ".join(EngFormatter()(t) for t in budgets) + " tokens" \
        if len(budgets) > 1 else f"{EngFormatter()(budgets[0])} tokens"


def plot_final_losses(rows: list[dict], path, title: str | None = None) -> None:
    """Final val loss per variant (and budget) with 95% CI bars over seeds."""
    placed, names, budgets = _grouped(rows)
    fig = Figure(figsize=(max(6.0, 1.2 + 1.1 * len(placed)), 4.5), layout="constrained")
    ax = fig.subplots()
    for x, r, color, alpha, _ in placed:
        ax.errorbar(x, r["val_loss"][0], yerr=_err(r["val_loss"][1]), fmt="o", ms=7, capsize=5, color=color,
                    alpha=alpha)
        ax.annotate(f"{r['val_loss'][0]:.4f}\nn={len(r['seeds'])}", (x, r["val_loss"][0]), xytext=(8, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.2)
    ax.set_xlabel(_budget_note(budgets))
    ax.set_ylabel("final validation loss (nats / token)")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "Final validation loss, mean ± 95% CI over seeds")
    fig.savefig(path, dpi=120)


def plot_paired_differences(rows: list[dict], baseline: str, path, title: str | None = None) -> bool:
    """Per-seed difference to `baseline` (negative = better), mean with its 95% CI, per variant and
    budget; the zero line is the baseline. False (nothing written) when no row has a difference."""
    rows = [r for r in rows if r["diff"][0] is not None]
    if not rows:
        return False
    placed, names, budgets = _grouped(rows)
    fig = Figure(figsize=(max(6.0, 1.2 + 1.1 * len(placed)), 4.5), layout="constrained")
    ax = fig.subplots()
    for x, r, color, alpha, width in placed:
        ax.bar(x, r["diff"][0], width * 0.9, color=color, alpha=alpha)
        ax.errorbar(x, r["diff"][0], yerr=_err(r["diff"][1]), color="k", capsize=4)
    ax.axhline(0, color="k", lw=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel(_budget_note(budgets))
    ax.set_ylabel(f"val loss − {baseline}'s, same seed (nats)")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title or f"Paired difference to {baseline}, mean ± 95% CI (below 0: better than {baseline})")
    fig.savefig(path, dpi=120)
    return True


def plot_entropy_per_layer(rows: list[dict], path, title: str | None = None) -> bool:
    """Final Ent_load (Eq. 7) and Ent_conf (Eq. 8) of each expert layer, mean ± 95% CI over seeds,
    one bar per variant with experts. False (nothing written) when no variant routes."""
    rows = [r for r in rows if r.get("layers")]
    if not rows:
        return False
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = np.arange(len(r["layers"])) + (i - (len(rows) - 1) / 2) * width
        for ax, key in zip(axes, ("ent_load", "ent_conf")):
            ax.bar(xs, [layer[key][0] for layer in r["layers"]], width * 0.9, color=_color(r["variant"], i),
                   yerr=[_err(layer[key][1]) for layer in r["layers"]], capsize=3, label=r["variant"])
    max_ent = rows[0]["layers"][0].get("max_ent")
    for ax, what in zip(axes, ("Ent_load (Eq. 7): balance over experts", "Ent_conf (Eq. 8): per-token doubt")):
        if max_ent:
            ax.axhline(max_ent, ls="--", color="k", lw=1, label=f"log n = {max_ent:.2f}")
        ax.set_xticks(range(len(rows[0]["layers"])), [str(layer["layer"]) for layer in rows[0]["layers"]])
        ax.set_xlabel("layer")
        ax.set_ylabel("entropy (nats)")
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=9)
    fig.suptitle(title or "Routing entropy per layer at the end of training, mean ± 95% CI")
    fig.savefig(path, dpi=120)
    return True


def plot_loss_vs_cost(rows: list[dict], path, title: str | None = None) -> None:
    """Final val loss (mean ± 95% CI) against two costs: training FLOPs (counted) and training
    seconds (measured on this machine). Lower-left is better; equal x is a compute-matched view."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    spans = {}
    for i, (v, rs) in enumerate(_by_variant(rows).items()):
        for ax, key in zip(axes, ("train_flops", "train_s")):
            x = [r[key][0] if isinstance(r[key], (list, tuple)) else r[key] for r in rs]
            spans.setdefault(key, []).extend(x)
            ax.errorbar(x, [r["val_loss"][0] for r in rs], yerr=[_err(r["val_loss"][1]) for r in rs],
                        fmt="-o", ms=4, capsize=4, color=_color(v, i), label=v)
    for ax, key, what in zip(axes, ("train_flops", "train_s"),
                             ("training FLOPs (6 x active params + attention, per token)",
                              "training seconds (measured, evaluation excluded)")):
        if max(spans[key]) > 10 * min(spans[key]) > 0:      # budgets a decade apart: log scale
            ax.set_xscale("log")
        ax.set_xlabel(what)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_ylabel("final validation loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title or "Final validation loss vs training cost")
    fig.savefig(path, dpi=120)
