"""train_small.py end to end: a few-iteration run of all three models (files, figures, table), seeds,
exact resume, parameter matching, and every bad input the script promises a clear error for.
CPU only, no network: the data is a small text file written here."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_small
from minimoe.model import GPT

ROOT = Path(__file__).resolve().parents[1]
# a model of a few thousand parameters: each run takes well under a second
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--d_ffn=32", "--batch_size=4",
        "--eval_iters=2", "--eval_interval=2", "--log_interval=1", "--max_iters=4", "--warmup_iters=1",
        "--sample_tokens=16", "--progress=false", "--device=cpu", "--threads=1"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def data(tmp_path):
    import textwrap
    path = tmp_path / "code.py"
    path.write_text(Path(textwrap.__file__).read_text())      # ~20 KB of real Python
    return path


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_default_run_writes_everything_and_prints_the_table(tmp_path, data, capsys):
    out = tmp_path / "out"
    assert train_small.main([*TINY, f"--data={data}", f"--out_dir={out}"]) == 0
    for kind in ("dense", "moe", "aoe"):
        for name in ("ckpt.pt", "log.jsonl", "config.json", "sample.txt"):
            assert (out / kind / name).is_file(), (kind, name)
        rows = read_log(out / kind / "log.jsonl")
        assert [r["iter"] for r in rows] == [0, 2, 4] and rows[-1]["val_loss"] < rows[0]["val_loss"]
        assert (rows[-1]["ent_load"] is None) == (kind == "dense")
    for name in ("loss.png", "experts.png", "routing.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    results = (out / "results.md").read_text()
    table = [line for line in results.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | params total | params active | val loss (nats) | val bpb | tokens/s")
    assert "Ent_load (nats, max 2.079)" in table[0]              # log 8 experts
    assert [line.split(" | ")[0] for line in table[1:]] == ["| dense", "| moe", "| aoe"]
    assert table[1].endswith("| - | - |") and not table[3].endswith("| - | - |")
    for line in table:
        assert line in printed                                    # printed and written: the same table
    final = read_log(out / "aoe" / "log.jsonl")[-1]
    assert f"{final['val_loss']:.4f}" in table[3] and f"{final['ent_conf']:.3f}" in table[3]
    assert "python train_small.py --n_layer=1" in results and "Sample from aoe" in results
    assert "d_low 8, d_wide" in printed and "active per token" in printed


def test_matched_sizes_at_the_defaults():
    base = train_small.small_model_config()
    count = {}
    for kind in train_small.KINDS:
        with torch.device("meta"):
            m = GPT(train_small.model_config_for(kind, base))
        count[kind] = (m.num_params(), m.num_active_params())
    (dense, _), (moe, moe_active), (aoe, _) = count["dense"], count["moe"], count["aoe"]
    assert abs(aoe - moe) / moe < 0.01                            # equal total parameters (Eq. 5)
    # dense = the MoE's active parameters; the MoE's router (n_embd x n_experts per layer) is the gap
    assert moe_active - dense == base.n_layer * base.n_embd * base.n_experts
    assert train_small.model_config_for("dense", base).ffn_dim == base.top_k * base.ffn_dim


def test_seeds_give_mean_and_std(tmp_path, data, capsys):
    out = tmp_path / "out"
    assert train_small.main([*TINY, f"--data={data}", f"--out_dir={out}", "--model=moe", "--seeds=2",
                             "--sample_tokens=0"]) == 0
    for k in (0, 1):
        assert (out / "moe" / f"seed{k}" / "ckpt.pt").is_file()
    logs = [read_log(out / "moe" / f"seed{k}" / "log.jsonl") for k in (0, 1)]
    assert logs[0][-1]["val_loss"] != logs[1][-1]["val_loss"]     # different seeds, different runs
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| moe"))
    assert row.count("±") == 5 and "over 2 seeds" in (out / "results.md").read_text()
    assert not (out / "dense").exists() and (out / "experts.png").exists()


def test_resume_at_script_level_gives_the_uninterrupted_losses(tmp_path, data):
    common = [*TINY, f"--data={data}", "--model=aoe", "--lr_decay_iters=8", "--sample_tokens=0"]
    train_small.main([*common, "--max_iters=8", f"--out_dir={tmp_path / 'full'}"])
    train_small.main([*common, "--max_iters=4", f"--out_dir={tmp_path / 'part'}"])
    train_small.main([*common, "--max_iters=8", f"--out_dir={tmp_path / 'part'}", "--init_from=resume"])
    full, part = read_log(tmp_path / "full" / "aoe" / "log.jsonl"), read_log(tmp_path / "part" / "aoe" / "log.jsonl")
    assert [r["iter"] for r in full] == [r["iter"] for r in part] == [0, 2, 4, 6, 8]
    assert [(r["train_loss"], r["val_loss"]) for r in full] == [(r["train_loss"], r["val_loss"]) for r in part]


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, data):
    # a real SIGINT to a real run: it finishes the step, saves, says how to resume, exits 130
    env = {**os.environ, "MINIMOE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    args = [*TINY, f"--data={data}", f"--out_dir={tmp_path}", "--model=moe", "--max_iters=1000000",
            "--eval_interval=1000000"]
    p = subprocess.Popen([sys.executable, "train_small.py", *args], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in p.stdout:                     # the first evaluation is printed inside the loop's handler
        if "moe iter 0:" in line:
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "stopped at iter" in out and "--init_from=resume" in out and "Traceback" not in err
    ckpt = torch.load(tmp_path / "moe" / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] >= 1 and ckpt["sampler"]["counter"] == ckpt["iter"]


def test_interrupted_run_exits_130_and_says_how_to_resume(tmp_path, data, monkeypatch, capsys):
    def stopped(model_config, cfg, corpus=None):
        return {"interrupted": "SIGINT", "model": None}
    monkeypatch.setattr(train_small, "train", stopped)
    assert train_small.main([*TINY, f"--data={data}", f"--out_dir={tmp_path}"]) == 130
    assert "--init_from=resume" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["--max_iter=3"], r"unknown option --max_iter; did you mean --max_iters"),
    (["--max_iters=three"], r"--max_iters='three' is not an integer"),
    (["--n_embd=33"], r"GPTConfig.n_embd=33 is invalid: must be divisible by n_head=2"),
    (["--top_k=9"], r"GPTConfig.top_k=9 is invalid: must be between 1 and n_experts=8"),
    (["--model=mlp"], r"--model='mlp' is invalid: allowed values are dense, moe, aoe, all"),
    (["--seeds=0"], r"--seeds=0 is invalid"),
    (["--data=/no/such/file.txt"], r"data path '/no/such/file.txt' does not exist"),
])
def test_bad_inputs_raise_clear_errors(tmp_path, data, args, match):
    argv = [*TINY, f"--data={data}", f"--out_dir={tmp_path}", *args]
    with pytest.raises(ValueError, match=match):
        train_small.main(argv)


def test_resume_errors(tmp_path, data):
    common = [*TINY, f"--data={data}", f"--out_dir={tmp_path}", "--sample_tokens=0"]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*\{dense,moe,aoe\}; start without"):
        train_small.main([*common, "--init_from=resume"])
    train_small.main([*common, "--model=moe", "--max_iters=2"])
    # the checkpoint of another model kind, or of another config, is refused with the differing fields
    (tmp_path / "aoe").mkdir()
    (tmp_path / "aoe" / "ckpt.pt").write_bytes((tmp_path / "moe" / "ckpt.pt").read_bytes())
    with pytest.raises(ValueError, match=r"different model \(ffn: checkpoint 'moe', now 'aoe'\)"):
        train_small.main([*common, "--model=aoe", "--init_from=resume"])
    with pytest.raises(ValueError, match=r"n_embd: checkpoint 32, now 64"):
        train_small.main([*common, "--model=moe", "--init_from=resume", "--n_embd=64"])


def test_script_errors_are_one_line_with_exit_code_2(tmp_path):
    for args, text in ((["--n_head=3"], "error: GPTConfig.n_embd=64 is invalid: must be divisible by n_head=3"),
                       ([f"--out_dir={tmp_path}", "--init_from=resume"], "error: --init_from=resume: no checkpoint")):
        r = subprocess.run([sys.executable, "train_small.py", *args], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "MINIMOE_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_help_lists_all_options(capsys):
    with pytest.raises(SystemExit):
        train_small.main(["--help"])
    out = capsys.readouterr().out
    for name in ("max_iters=1500", "eval_interval", "batch_size=32", "block_size=64", "n_layer=2", "n_head=4",
                 "n_embd=64", "learning_rate", "out_dir='out-small'", "device", "compile", "seed", "init_from",
                 "model='all'", "seeds=1"):
        assert f"--{name}" in out, name
