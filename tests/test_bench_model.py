"""`python -m minimoe.bench gpu` (bench_model.py) in its tiny CPU form: it runs every combination it
says it runs, its ratios and FLOPs come from its own rows and the model, and it writes its files.
No timing is asserted."""

import json

import pytest
import torch

from minimoe import bench, bench_model
from minimoe.model import GPT
from minimoe.variants import VARIANTS

MODELS = "tiny-dense,tiny-moe,tiny-aoe,tiny-aoe:d_low=64"


def test_tiny_cpu_run_writes_tables_and_json(tmp_path, capsys):
    r = bench.main(["gpu", "--device=cpu", f"--models={MODELS}", "--compile=off", "--dtype=fp32", "--steps=1",
                    "--warmup=1", "--batch_size=2", "--seq_len=32", "--sample_tokens=6", f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert (tmp_path / "bench_model.md").read_text().strip() in out
    assert json.loads((tmp_path / "bench_model.json").read_text()) == json.loads(json.dumps(r))
    rows = {(x["model"], x["dispatch"]): x for x in r["train"]}
    assert set(rows) == {("tiny-dense", "-")} | {(m, d) for m in MODELS.split(",")[1:] for d in ("grouped", "loop")}
    for (spec, _), row in rows.items():
        assert "error" not in row, row
        assert row["tokens_per_sec"] > 0 and row["mfu"] is None and row["peak_mem_bytes"] is None   # CPU
        with torch.device("meta"):
            model = GPT(bench_model.model_spec(spec)[0])
        assert row["flops_per_token"] == model.flops_per_token(32) and row["active"] == model.num_active_params()
    assert rows[("tiny-aoe:d_low=64", "loop")]["d_low"] == 64 and rows[("tiny-aoe", "loop")]["d_low"] == 16
    ratios = {(x["model"], x["dispatch"]): x for x in r["ratios"]}
    assert set(ratios) == {(m, d) for m in ("tiny-aoe", "tiny-aoe:d_low=64") for d in ("grouped", "loop")}
    for (spec, d), x in ratios.items():
        assert x["throughput"] == rows[(spec, d)]["tokens_per_sec"] / rows[("tiny-moe", d)]["tokens_per_sec"]
        assert x["memory"] is None
    assert ratios[("tiny-aoe:d_low=64", "loop")]["paper_throughput"] == pytest.approx(0.968, abs=1e-3)  # Table 4
    assert ratios[("tiny-aoe", "loop")]["paper_throughput"] is None        # the paper has no d_low 16
    assert [s["model"] for s in r["sampling"]] == MODELS.split(",")
    assert [s["dispatch"] for s in r["sampling"]] == ["-", "grouped", "grouped", "grouped"]   # the first --dispatch
    for s in r["sampling"]:
        assert s["same_tokens"] and s["speedup"] == s["cache"] / s["no_cache"]   # fp32: cache == reference


def test_default_models_cover_presets_and_variants():
    for device in ("cuda", "cpu"):
        specs = bench_model.default_models(device)
        family = "gpt2" if device == "cuda" else "tiny"
        assert specs[:3] == [f"{family}-dense", f"{family}-moe", f"{family}-aoe"]
        assert {s.partition("@")[0] for s in specs[4:]} == set(VARIANTS) - {"dense", "moe", "aoe"}
        cfgs = [bench_model.model_spec(s)[0] for s in specs]
        assert cfgs[3].low_dim == (64 if device == "cuda" else 8) and cfgs[3].ffn == "aoe"
    assert bench_model.model_spec("dense@tiny-moe")[0].ffn_dim == 2 * 128      # the variant's override
    assert bench_model.model_spec("gpt2-moe")[1].grad_clip == 1.0              # the preset's training settings


@pytest.mark.parametrize("spec, match", [
    ("nope", r"unknown preset 'nope'; available presets: gpt2-dense"),
    ("zzz@tiny-moe", r"model variant 'zzz' is unknown"),
    ("tiny-aoe:d_low=x", r"model 'tiny-aoe:d_low=x': override 'd_low=x' must be GPTConfig_FIELD=INTEGER"),
    ("tiny-aoe:nope=3", r"override 'nope=3' must be GPTConfig_FIELD=INTEGER"),
])
def test_bad_model_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        bench_model.model_spec(spec)


@pytest.mark.parametrize("args", [["--models=nope"], ["--dispatch=fast"], ["--steps=0"], ["--seq_len=65"],
                                  ["--sample_tokens=60"]])
def test_bad_cli_arguments_exit_with_a_message(args, capsys):
    with pytest.raises(SystemExit):
        bench.main(["gpu", "--device=cpu", "--models=tiny-moe", *args])
    assert "error:" in capsys.readouterr().err


def test_a_failed_row_is_reported_in_its_table_row():
    """On a GPU a row can fail (out of memory, a compile error): the table says so and goes on."""
    meta = dict(device_name="X", torch="2", dtype="bf16", steps=1, warmup=0)
    row = dict(model="gpt2-aoe", ffn="aoe", params=1e8, active=5e7, flops_per_token=1e9, batch_size=16,
               seq_len=1024, compile=True, dispatch="grouped", error="CUDA out of memory")
    lines = bench_model.markdown(meta, [row], [], []).splitlines()
    assert lines[0] == "# minimoe.bench gpu: X, torch 2, bf16 autocast, 1 timed training steps after 0 warmup"
    assert lines[-1].startswith("| gpt2-aoe | aoe |") and "failed: CUDA out of memory" in lines[-1]
    assert lines[-1].count("|") == lines[-3].count("|")       # as many cells as the header
    assert bench_model.ratios([row]) == []


def test_the_timed_step_is_the_training_loops_own(monkeypatch):
    """bench gpu times train.train_step, expert-bias update included (it once rewrote the step without it)."""
    from minimoe import train
    calls = []
    real = train.update_expert_bias
    monkeypatch.setattr(train, "update_expert_bias", lambda model, rt: calls.append(1) or real(model, rt))
    cfg, tcfg = bench_model.model_spec("moe+bias@tiny-moe")
    row = bench_model.time_training(cfg, tcfg, torch.device("cpu"), torch.float32, compile=False, batch_size=2,
                                    seq_len=16, steps=2, warmup=1)
    assert len(calls) == 3 and row["tokens_per_sec"] > 0
# --------------------------------------------------------------------------- bad input: one line, before any timing

def _refused(argv, capsys, monkeypatch, says):
    def no_timing(*a, **k):
        raise AssertionError("timing started before the input was checked")
    monkeypatch.setattr(bench_model, "time_training", no_timing)
    monkeypatch.setattr(bench_model, "time_sampling", no_timing)
    with pytest.raises(SystemExit) as e:
        bench.main(["gpu", "--models=tiny-moe", "--compile=off", "--steps=1", "--warmup=0", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


@pytest.mark.parametrize("arg, says", [
    ("--threads=-2", "--threads=-2 is outside [0, 4096]"), ("--steps=-1", "--steps=-1"), ("--warmup=-1", "--warmup=-1"),
    ("--sample_tokens=-5", "--sample_tokens=-5"), ("--sample_prompt=0", "--sample_prompt=0"),
    ("--batch_size=0", "--batch_size=0 is outside [1,"), ("--seq_len=0", "--seq_len=0"), ("--batch_size=-4", "-4"),
    ("--device=foo", "--device='foo' is not a device"), ("--device=cuda:", "--device='cuda:'"),
    ("--steps=many", "--steps: invalid int value"),
])
def test_bad_values_are_one_line_before_any_timing(arg, says, tmp_path, capsys, monkeypatch):
    _refused(["--device=cpu", f"--out_dir={tmp_path / 'o'}", arg], capsys, monkeypatch, says)
    assert not (tmp_path / "o").exists()                          # nothing made for a refused command


def test_an_absent_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(["--device=cuda", f"--out_dir={tmp_path}"], capsys, monkeypatch, "CUDA is not available")


def test_an_out_dir_that_cannot_hold_the_results_is_refused_before_timing(tmp_path, capsys, monkeypatch):
    import os
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "taken" / "bench_model.md").mkdir(parents=True)
    (tmp_path / "ro").mkdir()
    for out, says in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "fifo", "is a FIFO"),
                      (tmp_path / "loop", "not accessible"), (tmp_path / "file" / "sub", "not accessible (Not a directory)"),
                      (tmp_path / "taken", "bench_model.md is a folder")):
        _refused(["--device=cpu", f"--out_dir={out}"], capsys, monkeypatch, says)
    if os.geteuid() != 0:                                          # root writes anywhere
        (tmp_path / "ro").chmod(0o500)
        _refused(["--device=cpu", f"--out_dir={tmp_path / 'ro'}"], capsys, monkeypatch, "not a writable folder")


def test_out_dir_with_a_tilde_is_the_home_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    bench.main(["gpu", "--device=cpu", "--models=tiny-dense", "--compile=off", "--dtype=fp32", "--steps=1",
                "--warmup=0", "--batch_size=1", "--seq_len=8", "--sample_tokens=0", "--out_dir=~/b"])
    assert (tmp_path / "home" / "b" / "bench_model.json").exists() and not (tmp_path / "~").exists()
