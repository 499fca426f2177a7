"""python -m minimoe.study decompose on a tiny grid: blocks of paired arms, tuned arms from the tuning block,
resume without retraining, the report's comparisons against the runs, one-line errors before any training."""

import json
from pathlib import Path

import numpy as np
import pytest

from test_train_small import cache, data  # noqa: F401 (fixtures)
from minimoe import decompose, study

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--d_ffn=32", "--batch_size=4",
        "--eval_iters=2", "--eval_interval=2", "--warmup_iters=1", "--final_eval_tokens=256", "--progress=false",
        "--device=cpu", "--threads=1", "--seeds=1,2", "--budget_scale=0.002"]


def run(tmp_path, data, *extra, calls=None):
    return study.main(["decompose", f"--out_dir={tmp_path / 'dc'}", f"--data={data}", *TINY, *extra])


@pytest.fixture
def trained(monkeypatch):
    seen, real = [], study.train

    def counting(model_config, cfg, **kw):
        seen.append((Path(cfg.out_dir).name, cfg.seed, cfg.learning_rate))
        return real(model_config, cfg, **kw)
    monkeypatch.setattr(study, "train", counting)
    return seen


def test_tiny_decompose_end_to_end_and_resume(tmp_path, data, trained):
    assert run(tmp_path, data, "--blocks=headline,gates,tune,tuned") == 0
    out = json.loads((tmp_path / "dc" / "decompose.json").read_text())
    rows = out["rows"]
    arms = {r["label"]: r for r in rows if r["kind"] == "arm"}
    # headline 4 arms + gates 3, on seeds 1,2; the tuning grid 3 variants x 4 lrs on the 2 tuning seeds
    assert all(arms[a]["seeds"] == [1, 2] for a in ("dense", "moe", "aoe", "moe-lowrank", "aoe no-renorm"))
    assert sum(r["label"].startswith("tune ") for r in arms.values()) == 12
    assert len(trained) == 7 * 2 + 12 * 2 + 3 * 2 - sum(1 for _ in ())   # tuned arms may reuse nothing here
    # each tuned arm is at the learning rate with the lowest mean final loss over the tuning seeds
    for v in ("moe", "aoe", "moe-lowrank"):
        tune = {a["overrides"]["learning_rate"]: a["loss"][0] for a in arms.values() if a["label"].startswith(f"tune {v} lr")}
        assert arms[f"{v} tuned"]["overrides"]["learning_rate"] == min(tune, key=tune.get)
    # a comparison is the mean of the per-seed differences of the arms' final losses
    comp = next(r for r in rows if r["label"] == "aoe − moe")
    diffs = [arms["aoe"]["per_seed"][s] - arms["moe"]["per_seed"][s] for s in ("1", "2")]
    assert comp["pairs"] == 2 and comp["diff"][0] == pytest.approx(np.mean(diffs))
    assert comp["val_set_se"] > 0 and (tmp_path / "dc" / "decompose.png").is_file()
    md = (tmp_path / "dc" / "decompose.md").read_text()
    assert "| aoe − moe-lowrank | 2 |" in md and "## tuned" in md
    # the runs keep what the report needs: result.json with the final loss, and the windows for the val-set SE
    folders = list((tmp_path / "dc" / "runs").iterdir())
    assert all((f / "result.json").is_file() and (f / "final_val.npy").is_file() for f in folders)
    # again: nothing trains, the same report
    trained.clear()
    assert run(tmp_path, data, "--blocks=headline,gates,tune,tuned") == 0
    assert trained == [] and json.loads((tmp_path / "dc" / "decompose.json").read_text())["rows"] == rows


def test_max_runs_stops_and_continues(tmp_path, data, trained):
    assert run(tmp_path, data, "--blocks=headline", "--max_runs=3") == 0
    assert len(trained) == 3
    assert run(tmp_path, data, "--blocks=headline") == 0
    assert len(trained) == 8 and len({t[0] for t in trained}) == 8       # the 3 finished ones were not retrained


@pytest.mark.parametrize("args,message", [
    (["--blocks=headline,nope"], "--blocks='headline,nope' is invalid"),
    (["--budget_scale=0"], "--budget_scale=0.0 is invalid"),
    (["--seed=3"], "--seed is set by the study's arms"),
    (["--blocks=rank", "--n_embd=16", "--n_head=2"], "d_low"),            # d_low=40 > n_embd: before any run
])
def test_bad_input_is_one_line_before_any_training(tmp_path, data, trained, args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run(tmp_path, data, *args)
    assert trained == []


def test_out_dir_that_is_a_file_and_a_damaged_result_are_one_line(tmp_path, data, trained):
    (tmp_path / "dc").write_text("not a folder")
    with pytest.raises(ValueError, match=r"--out_dir=.*dc is not a writable folder"):
        run(tmp_path, data, "--blocks=headline")
    (tmp_path / "dc").unlink()
    assert run(tmp_path, data, "--blocks=headline", "--max_runs=1") == 0
    (result,) = (tmp_path / "dc" / "runs").glob("*/result.json")
    result.write_text('{"key": ')                                        # truncated
    with pytest.raises(ValueError, match=r"result.json is not a study result .* delete it"):
        run(tmp_path, data, "--blocks=headline")
