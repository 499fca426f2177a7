"""Figures from training logs (the rows of log.jsonl, one per evaluation): PNG files, no display.

    logs = {"dense": rows, "moe": rows, "aoe": rows}           # one run per name, or
    logs = {"moe": [rows_seed0, rows_seed1, ...], ...}         # several runs: mean and spread
    plot_losses(logs, "loss.png")          val loss vs tokens seen, all models on one plot
    plot_expert_load(logs, "experts.png")  each expert's share of the tokens, per layer, over training
    plot_routing_entropy(logs, "routing.png")  Ent_load (Eq. 7) and Ent_conf (Eq. 8) over training
Entropies are in nats everywhere (dispatch.load_entropy), shown next to their maximum log E.

Built on matplotlib's Figure object (never pyplot), so it works headless and leaves the notebook
backend alone. `read_log(out_dir)` loads a run's rows.
"""

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

COLORS = {"dense": "#7f7f7f", "moe": "#1f77b4", "aoe": "#d62728"}


def read_log(out_dir) -> list[dict]:
    path = Path(out_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
