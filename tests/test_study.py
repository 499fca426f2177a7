"""minimoe.study: a tiny grid end to end (files, tables, plots), resume after max_runs and after a
real Ctrl-C without retraining, fair tuning, the statistics against hand computations, t quantiles
against published values, and the one-line errors. CPU only, no network, a few seconds."""

import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_train_small
from test_train_small import cache, data  # noqa: F401 (fixtures)
import train_small
from minimoe import presets, stats, study
from minimoe.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
# train_small's tiny model and its two fixtures (MINIMOE_CACHE in tmp_path, ~20 KB of real Python)
TINY = [a for a in test_train_small.TINY if not a.startswith(("--max_iters", "--sample_tokens"))] + \
    ["--sample_tokens=0", "--variants=dense,moe", "--seeds=1,2", "--budgets=4"]


@pytest.fixture
def calls(monkeypatch):
    """Every train() call the study makes: (out_dir, init_from, seed, max_iters)."""
    seen, real = [], study.train

    def counting(model_config, cfg, **kw):
        seen.append((Path(cfg.out_dir).name, cfg.init_from, cfg.seed, cfg.max_iters))
        return real(model_config, cfg, **kw)
    monkeypatch.setattr(study, "train", counting)
    return seen


def test_tiny_grid_end_to_end(tmp_path, data, calls, capsys):
    out = tmp_path / "s"
    assert study.main(["laptop", *TINY, f"--data={data}", f"--out_dir={out}"]) == 0
    assert len(calls) == 4 and {c[1] for c in calls} == {"scratch"}
    assert sorted((c[0].split("-")[0], c[2]) for c in calls) == [("dense", 1), ("dense", 2), ("moe", 1), ("moe", 2)]
    for name in ("loss.png", "final.png", "paired.png", "entropy.png", "cost.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    js = json.loads((out / "study.json").read_text())
    assert js["finished"] == js["total"] == 4 and js["stopped"] is None
    runs = {(r["variant"], r["seed"]): r for r in js["runs"]}
    # the table's numbers are the runs' numbers: mean, CI and paired difference recomputed by hand
    moe, dense = [runs["moe", s]["val_loss"] for s in (1, 2)], [runs["dense", s]["val_loss"] for s in (1, 2)]
    d = [a - b for a, b in zip(dense, moe)]
    row = {r["variant"]: r for r in js["summary"]}
    assert row["dense"]["val_loss"][0] == pytest.approx(sum(dense) / 2)
    assert row["dense"]["val_loss"][1] == pytest.approx(12.7062047 * abs(dense[0] - dense[1]) / 2)
    assert row["dense"]["diff"][0] == pytest.approx(sum(d) / 2)
    assert row["dense"]["diff"][1] == pytest.approx(12.7062047 * abs(d[0] - d[1]) / 2)
    assert row["moe"]["diff"] == [None, None] and row["moe"]["ent_load"] is not None
    assert row["dense"]["ent_load"] is None and len(row["moe"]["layers"]) == 1
    # the same runs are the same batches: seed s of dense and moe read the same first batch
    assert runs["dense", 1]["tokens"] == runs["moe", 1]["tokens"] == 4 * 4 * 32
    assert row["moe"]["params_total"] > row["dense"]["params_total"]
    assert row["moe"]["flops_per_token"] > 0 and row["moe"]["train_s"][0] > 0
    md = (out / "study.md").read_text()
    assert "python -m minimoe.study laptop --n_layer=1" in md and "4 of 4 runs finished" in md
    assert f"{row['dense']['val_loss'][0]:.4f} ± {row['dense']['val_loss'][1]:.4f}" in md
    assert f"{row['dense']['diff'][0]:+.4f} ± {row['dense']['diff'][1]:.4f} (n=2)" in md
    assert "equal parameters" in md and "UTC" in md
    printed = capsys.readouterr().out
    assert "| dense | 0.00M | 2 | " in printed and "study.md, study.json, loss.png" in printed
    # run again: everything is done, nothing trains, the report is rewritten identically in numbers
    calls.clear()
    assert study.main(["laptop", *TINY, f"--data={data}", f"--out_dir={out}"]) == 0
    assert calls == [] and json.loads((out / "study.json").read_text())["summary"] == js["summary"]


def test_max_runs_chunks_then_resume_skips_finished_runs(tmp_path, data, calls, capsys):
    out = tmp_path / "s"
    args = ["laptop", *TINY, f"--data={data}", f"--out_dir={out}"]
    assert study.main([*args, "--max_runs=3"]) == 0
    assert len(calls) == 3
    js = json.loads((out / "study.json").read_text())
    assert js["finished"] == 3 and js["stopped"] == "--max_runs=3 reached"
    assert "run the same command to continue" in (out / "study.md").read_text()
    first = list(calls)
    calls.clear()
    assert study.main(args) == 0
    assert len(calls) == 1 and calls[0] not in first                # only the missing run trains
    assert json.loads((out / "study.json").read_text())["finished"] == 4
    # a changed config is a different run (another hash), so it trains anew
    calls.clear()
    assert study.main([*args, "--learning_rate=3e-3"]) == 0
    assert len(calls) == 4


def test_ctrl_c_mid_run_resumes_that_run_exactly(tmp_path, data, calls, monkeypatch):
    args = [*TINY, f"--data={data}", "--budgets=6", "--seeds=1"]
    assert study.main(["laptop", *args, f"--out_dir={tmp_path / 'full'}"]) == 0
    full = json.loads((tmp_path / "full" / "study.json").read_text())["runs"]

    real = study.train

    def interrupted_once(model_config, cfg, **kw):          # a real SIGINT during the second run
        def cb(it, model):
            if it == 3 and model_config.ffn == "moe" and cfg.init_from == "scratch":
                os.kill(os.getpid(), signal.SIGINT)
        return real(model_config, cfg, callback=cb, **kw)
    monkeypatch.setattr(study, "train", interrupted_once)
    assert study.main(["laptop", *args, f"--out_dir={tmp_path / 'part'}"]) == 130
    part_dir = next((tmp_path / "part" / "runs").glob("moe-*"))
    assert (part_dir / "ckpt.pt").exists() and not (part_dir / "result.json").exists()
    monkeypatch.setattr(study, "train", real)
    calls.clear()
    assert study.main(["laptop", *args, f"--out_dir={tmp_path / 'part'}"]) == 0
    assert [(c[0].split("-")[0], c[1]) for c in calls] == [("moe", "resume")]   # dense not retrained
    part = json.loads((tmp_path / "part" / "study.json").read_text())["runs"]
    assert [r["val_loss"] for r in part] == [r["val_loss"] for r in full]         # bit-exact on CPU


def test_tuning_gives_every_variant_the_same_grid(tmp_path, data, calls):
    out = tmp_path / "s"
    assert study.main(["laptop", *TINY, f"--data={data}", f"--out_dir={out}", "--seeds=1",
                       "--tune=learning_rate=1e-3,3e-3", "--tune_seed=7"]) == 0
    js = json.loads((out / "study.json").read_text())
    tune = [r for r in js["runs"] if r["tuning"]]
    assert sorted((r["variant"], r["tuned"]["learning_rate"], r["seed"]) for r in tune) == \
        [("dense", 1e-3, 7), ("dense", 3e-3, 7), ("moe", 1e-3, 7), ("moe", 3e-3, 7)]
    for b in js["best_tuned"]:
        mine = [r for r in tune if r["variant"] == b["variant"]]
        assert b["tuned"] == min(mine, key=lambda r: r["val_loss"])["tuned"]
        reported = next(r for r in js["runs"] if not r["tuning"] and r["variant"] == b["variant"])
        assert reported["tuned"] == b["tuned"] and reported["seed"] == 1
    assert len(calls) == 6 and "## Tuning (seed 7" in (out / "study.md").read_text()


def test_runs_reused_by_a_tuning_study_carry_its_tuned_values(tmp_path, data, calls):
    out = tmp_path / "s"
    args = ["laptop", *TINY, f"--data={data}", f"--out_dir={out}"]
    assert study.main(args) == 0 and len(calls) == 4
    calls.clear()                  # the grid's only point is the default lr: seeds 1, 2 are the same runs
    lr = presets.laptop_train().learning_rate
    assert study.main([*args, f"--tune=learning_rate={lr}", "--tune_seed=7"]) == 0
    assert sorted((c[0].split("-")[0], c[2]) for c in calls) == [("dense", 7), ("moe", 7)]   # only tuning
    js = json.loads((out / "study.json").read_text())
    assert {r["seed"] for r in js["runs"] if not r["tuning"]} == {1, 2}
    assert all(r["tuned"] == {"learning_rate": lr} for r in js["runs"])
    assert all(row["tuned"] == {"learning_rate": lr} for row in js["summary"])


@pytest.mark.parametrize("df, t", [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451),
                                   (9, 2.2621572), (11, 2.2009852), (15, 2.1314495), (20, 2.0859634),
                                   (30, 2.0422725), (60, 2.0002978), (120, 1.9799304), (10**6, 1.9599659)])
def test_t_quantiles_match_published_values(df, t):
    assert stats.t_quantile_975(df) == pytest.approx(t, abs=2e-5)


def test_t_formula_agrees_with_the_table_where_both_exist(monkeypatch):
    # the expansion used beyond the table, evaluated inside it: 1e-5 at df 10, worse for smaller df
    table = dict(stats.T975)
    for df, tol in ((6, 2e-4), (8, 5e-5), (10, 1e-5)):
        monkeypatch.setattr(stats, "T975", {k: v for k, v in table.items() if k != df})
        assert stats.t_quantile_975(df) == pytest.approx(table[df], abs=tol)
        assert abs(stats.t_quantile_975(df) - table[df]) > tol / 20       # really the formula, not the table


def test_mean_ci_and_paired_difference_by_hand():
    m, ci = stats.mean_ci([1.0, 2.0, 3.0])                   # s = 1, n = 3: t_{.975,2} / sqrt 3
    assert m == 2.0 and ci == pytest.approx(4.3026527 / math.sqrt(3))
    assert stats.mean_ci([5.0]) == (5.0, None)
    a = {1: 1.40, 2: 1.38, 3: 1.39, 4: 9.0}
    b = {1: 1.31, 2: 1.30, 3: 1.32}
    m, ci, n = stats.paired_difference(a, b)                  # seed 4 has no pair: left out
    diffs = [0.09, 0.08, 0.07]
    assert n == 3 and m == pytest.approx(0.08)
    assert ci == pytest.approx(4.3026527 * statistics.stdev(diffs) / math.sqrt(3))
    assert stats.paired_difference({1: 1.0}, {2: 1.0}) == (None, None, 0)
    assert stats.fmt_ci(0.08, 0.0248, sign=True) == "+0.0800 ± 0.0248" and stats.fmt_ci(None, None) == "-"


def test_studies_take_their_variants_from_the_table():
    s = study.studies()
    assert list(s)[0] == "laptop" and {"laptop", "overnight", "gpu"} <= set(s)
    assert study.variant_list(s["overnight"].grid.variants) == list(VARIANTS)
    assert study.variant_list(s["laptop"].grid.variants) == ["dense", "moe", "aoe"]
    assert len(study.seed_list(s["laptop"].grid.seeds)) == 5 and len(study.seed_list(s["gpu"].grid.seeds)) == 3
    g = s["gpu"]
    assert (g.model.n_layer, g.model.n_embd, g.train.dtype, g.train.device) == (6, 384, "bfloat16", "cuda")
    tokens = g.train.max_iters * g.train.batch_size * g.model.block_size
    assert 45e6 < tokens < 55e6
    # train_small is the laptop study's regime (one source of the numbers)
    assert train_small.small_train_config().max_iters == s["laptop"].train.max_iters
    assert train_small.small_model_config().n_embd == s["laptop"].model.n_embd


def test_tune_grid_parses_typed_products():
    assert study.tune_grid("") == [{}]
    grid = study.tune_grid("learning_rate=1e-3,2e-3;warmup_iters=10,20;aux_loss_coef=0")
    assert len(grid) == 4 and grid[0] == {"learning_rate": 1e-3, "warmup_iters": 10, "aux_loss_coef": 0.0}
    assert isinstance(grid[0]["warmup_iters"], int)


@pytest.mark.parametrize("args, match", [
    (["nightly"], r"study 'nightly' is unknown: allowed values are laptop, overnight, gpu"),
    (["--variants=moe,mlp"], r"--variants='moe,mlp' is invalid: a comma list of distinct names from dense, moe"),
    (["--seeds=1,x"], r"--seeds='1,x' is invalid: must be a comma list of distinct integers >= 0"),
    (["--seeds=1,1"], r"--seeds='1,1' is invalid"),
    (["--budgets=0"], r"--budgets='0' is invalid: must be a comma list of distinct integers >= 1"),
    (["--max_runs=-1"], r"--max_runs=-1 is invalid: must be an integer >= 0"),
    (["--tune=seed=1,2"], r"--tune='seed=1,2' is invalid: write FIELD=v1,v2"),
    (["--tune=learning_rate=fast"], r"--learning_rate='fast' is not a number"),
    (["--tune=learning_rate=1e-3", "--tune_seed=1"], r"--tune_seed=1 is invalid: it is one of --seeds"),
    (["--baseline=mlp"], r"--baseline='mlp' is invalid"),
    (["--seed=3"], r"--seed is set by the study's grid: use --seeds=1,2,3 instead"),
    (["--max_iters=3"], r"--max_iters is set by the study's grid: use --budgets"),
    (["--max_run=3"], r"unknown option --max_run; did you mean --max_runs"),
])
def test_bad_inputs_raise_one_line_errors(tmp_path, args, match):
    with pytest.raises(ValueError, match=match) as e:
        study.main([*args, f"--out_dir={tmp_path}"] if args[0].startswith("--") else args)
    assert "\n" not in str(e.value)


def test_gpu_study_without_cuda_says_so_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"TrainConfig.device='cuda' is invalid: CUDA is not available here"):
        study.main(["gpu", f"--out_dir={tmp_path / 'g'}", "--data=/no/such/corpus"])   # before the corpus
    assert not (tmp_path / "g").exists()


def test_command_line_help_and_errors():
    r = subprocess.run([sys.executable, "-m", "minimoe.study", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    for text in ("laptop", "overnight", "gpu", *VARIANTS, "--max_runs=0", "--budgets=", "--n_embd=64"):
        assert text in r.stdout, text
    r = subprocess.run([sys.executable, "-m", "minimoe.study", "laptop", "--variants=mlp"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --variants='mlp' is invalid") \
        and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_per_step_extra_flops_of_a_variant_are_counted_once_per_forward():
    """ERC's fixed n^2 work (GPT.flops_per_step_extra) enters the study's FLOP budget per micro-step;
    variants without such work report 0."""
    from minimoe.model import GPT, GPTConfig
    from minimoe.variants import variant_config
    base = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=4, top_k=2, d_ffn=32)
    erc = variant_config("moe+erc", base)
    per_forward = GPT(erc).flops_per_step_extra(1)
    assert per_forward > 0
    assert study.sizes(erc)["extra_flops_per_step"] == per_forward
    assert study.sizes(erc, accum_steps=3)["extra_flops_per_step"] == 3 * per_forward
    assert study.sizes(variant_config("moe", base))["extra_flops_per_step"] == 0
