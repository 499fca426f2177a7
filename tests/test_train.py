"""minimoe.train (the loop both scripts use), hardware, plots and sample. CPU only, no network, seconds.

Most runs use an in-memory byte corpus (train(..., corpus=...)) and a model of a few thousand
parameters, so a whole training run takes well under a second.
"""

import json
import math
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch

from minimoe import files, hardware, plots, sample
from minimoe.data import Corpus, encode_bytes
from minimoe.model import GPTConfig
from minimoe.checkpoint import load_model
from minimoe.cli import help_text, parse_overrides
from minimoe.runtime import grad_accum_steps
from minimoe.train import TrainConfig, TrainingDiverged, configure_optimizer, estimate_loss, get_lr, train


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))


def toy_corpus():
    # a little real Python: varied enough that the loss falls but never hits zero
    import textwrap, json as j                                         # noqa: E401
    text = open(textwrap.__file__).read() + open(j.decoder.__file__).read()
    tokens = encode_bytes(text)
    cut = int(0.9 * len(tokens))
    return Corpus("toy", tokens[:cut], tokens[cut:], 256, {"tokenizer": "byte"})


CORPUS = toy_corpus()


def tiny(ffn="aoe", **kw):
    return GPTConfig(**{**dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32, ffn=ffn,
                               n_experts=4, top_k=2, d_ffn=32), **kw})


def fast(out_dir, **kw):
    return TrainConfig(**{**dict(out_dir=str(out_dir), data="toy", max_iters=8, eval_interval=4, eval_iters=2,
                                 log_interval=2, batch_size=4, learning_rate=3e-3, warmup_iters=2, threads=1,
                                 progress=False, sample_tokens=0), **kw})


def read_log(out_dir):
    return files.read_log(out_dir)


# --------------------------------------------------------------------------- command line

def test_parse_overrides_types_and_in_place():
    m, t = tiny(), fast("x")
    got = parse_overrides(["--n_layer=3", "--learning_rate=1e-2", "--compile", "--progress=false",
                           "--total_batch_tokens=1e3", "--lr_decay_iters=None", "--d_low=None", "--out_dir=o",
                           "--max-iters=5"], m, t)
    assert got == (m, t)                                           # the same instances, updated
    assert (m.n_layer, m.d_low) == (3, None)
    assert (t.learning_rate, t.compile, t.progress, t.total_batch_tokens, t.lr_decay_iters, t.out_dir,
            t.max_iters) == (1e-2, True, False, 1000, None, "o", 5)
    assert isinstance(t.total_batch_tokens, int)


@pytest.mark.parametrize("argv, match", [
    (["--max_iter=5"], r"unknown option --max_iter; did you mean --max_iters"),
    (["--nonsense=1"], r"unknown option --nonsense \(--help"),
    (["--max_iters=ten"], r"--max_iters='ten' is not an integer"),
    (["--max_iters=2.5"], r"--max_iters='2.5' is not an integer"),
    (["--learning_rate=fast"], r"--learning_rate='fast' is not a number"),
    (["--compile=maybe"], r"--compile='maybe' is not a boolean"),
    (["--max_iters"], r"--max_iters needs a value"),
    (["max_iters=5"], r"unexpected argument 'max_iters=5'"),
    (["--n_embd=33"], r"GPTConfig.n_embd=33 is invalid: must be divisible"),       # validated after parsing
    (["--init_from=continue"], r"TrainConfig.init_from='continue' is invalid: allowed values"),
    (["--device=gpu"], r"TrainConfig.device='gpu' is invalid"),
    (["--beta2=1.5"], r"TrainConfig.beta2=1.5 is invalid"),
])
def test_parse_overrides_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_overrides(argv, tiny(), fast("x"))


def test_help_lists_every_field_with_default_and_comment(capsys):
    with pytest.raises(SystemExit) as e:
        parse_overrides(["--help"], tiny(), TrainConfig())
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("max_iters", "eval_interval", "batch_size", "block_size", "n_layer", "n_head", "n_embd",
                 "learning_rate", "out_dir", "device", "compile", "seed", "init_from", "d_low", "aux_loss_coef"):
        assert f"--{name}=" in out
    assert "--max_iters=1000" in out and "optimizer steps" in out     # default and the field's comment
    assert help_text(TrainConfig()).count("\n    --") == len(TrainConfig.__dataclass_fields__)


def test_field_names_do_not_collide_with_gptconfig():
    assert not set(TrainConfig.__dataclass_fields__) & set(GPTConfig.__dataclass_fields__)


# --------------------------------------------------------------------------- schedule, optimizer, batch

def test_get_lr_warmup_cosine_floor():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert get_lr(0, cfg) == pytest.approx(1 / 11)
    assert get_lr(9, cfg) == pytest.approx(10 / 11)
    assert get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.55)                  # half way down the cosine
    assert get_lr(110, cfg) == get_lr(500, cfg) == 0.1
    assert get_lr(60, replace(cfg, lr_decay_iters=210)) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_optimizer_groups_decay_matrices_only():
    from minimoe.model import GPT
    model = GPT(tiny())
    opt = configure_optimizer(model, fast("x", weight_decay=0.2))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_grad_accum_steps():
    assert grad_accum_steps(fast("x"), 32, 1) == 1
    assert grad_accum_steps(fast("x", total_batch_tokens=4 * 32 * 2 * 3), 32, 2) == 3
    with pytest.raises(ValueError, match=r"total_batch_tokens=200 is invalid.*4 x 32 x 1 = 128.*"
                                         r"--total_batch_tokens=256"):
        grad_accum_steps(fast("x", total_batch_tokens=200), 32, 1)


# --------------------------------------------------------------------------- hardware

@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10G", 70), ("NVIDIA A10", 125),
    ("NVIDIA L4", 121), ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165), ("Tesla T4", 65),
    ("Tesla V100-SXM2-16GB", 125), ("Some Future GPU", None)])
def test_peak_flops_table(name, tflops):
    got = hardware.peak_flops_for_name(name)
    assert (got is None) if tflops is None else got == tflops * 1e12


def test_mfu():
    assert hardware.peak_flops("cpu") is None
    assert hardware.mfu(6e9, 1e4, 1e15) == pytest.approx(0.06)
    assert hardware.mfu(6e9, 1e4, None) is None


# --------------------------------------------------------------------------- the loop

def test_train_writes_files_and_learns(tmp_path):
    r = train(tiny("aoe"), fast(tmp_path / "run", sample_tokens=20, sample_start="def "), corpus=CORPUS)
    out = tmp_path / "run"
    for name in ("ckpt.pt", "log.jsonl", "config.json", "sample.txt"):
        assert (out / name).is_file(), name
    rows = read_log(out)
    assert [row["iter"] for row in rows] == [0, 4, 8]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] < math.log(256) + 0.2
    assert rows[-1]["val_bpb"] == pytest.approx(rows[-1]["val_loss"] / math.log(2))
    assert rows[-1]["tokens"] == 8 * 4 * 32 and rows[-1]["tokens_per_sec"] > 0 and rows[-1]["mfu"] is None
    routing = rows[-1]["routing"]
    assert [s["layer"] for s in routing] == [0, 1]
    for s in routing:
        assert sum(s["load"]) == pytest.approx(1.0) and 0 < s["ent_load"] <= s["max_ent"] + 1e-9
    assert rows[-1]["ent_load"] == pytest.approx(sum(s["ent_load"] for s in routing) / 2)
    for key in ("val_loss", "val_bpb", "params_total", "params_active", "tokens_per_sec", "ent_load",
                "ent_conf", "wall_s", "model"):
        assert r[key] is not None, key
    assert r["params_active"] < r["params_total"] and r["interrupted"] is None
    assert r["val_loss"] == rows[-1]["val_loss"] and r["tokens"] == rows[-1]["tokens"]
    assert (out / "sample.txt").read_text().startswith("def ") and r["sample"].startswith("def ")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["ffn"] == "aoe" and config["train"]["max_iters"] == 8
    assert config["resolved"]["wide_dim"] == tiny().wide_dim and config["resolved"]["threads"] == 1
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 8 and ckpt["model_config"] == config["model"] and ckpt["sampler"]["counter"] == 8
    assert not list(out.glob(".*tmp*"))                               # atomic write left nothing behind
    model, _ = load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), r["model"].state_dict().values()))


def test_dense_has_no_routing_and_accumulation_runs(tmp_path):
    r = train(tiny("dense"), fast(tmp_path, max_iters=2, eval_interval=2, total_batch_tokens=3 * 4 * 32),
              corpus=CORPUS)
    assert r["ent_load"] is None and r["routing"] == [] and r["tokens"] == 2 * 3 * 4 * 32
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["sampler"]["counter"] == 6   # 3 micro-steps x 2


def test_eval_is_deterministic_and_the_same_batches_for_every_model(tmp_path):
    from minimoe.data import BatchSampler
    from minimoe.model import GPT
    torch.manual_seed(0)
    model = GPT(tiny("moe"))
    sampler = BatchSampler(CORPUS.val, 4, 32, seed=0)
    a, b = estimate_loss(model, sampler, 3), estimate_loss(model, sampler, 3)
    assert a == b and len(a["routing"]) == 2
    # the val loss logged at iter 0 by train() is estimate_loss on those same batches
    r = train(tiny("moe"), fast(tmp_path, max_iters=1, eval_interval=1, eval_iters=3, seed=0), corpus=CORPUS)
    assert read_log(tmp_path)[0]["val_loss"] == a["val_loss"]
    assert r["routing"][0]["max_ent"] == pytest.approx(math.log(4))


def test_sigterm_saves_and_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    cfg = fast(tmp_path / "full", max_iters=10, eval_interval=3)
    full = train(tiny("moe"), cfg, corpus=CORPUS)

    def send_sigterm(it, model):
        if it == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    part = replace(cfg, out_dir=str(tmp_path / "part"))
    stopped = train(tiny("moe"), part, corpus=CORPUS, callback=send_sigterm)
    assert stopped["interrupted"] == "SIGTERM" and stopped["iters"] in (5, 6)   # stops within a step
    assert torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["iter"] == stopped["iters"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                   # handlers restored
    resumed = train(tiny("moe"), replace(part, init_from="resume"), corpus=CORPUS)

    log_full, log_part = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["iter"] for r in log_full] == [r["iter"] for r in log_part] == [0, 3, 6, 9, 10]
    for a, b in zip(log_full, log_part):
        assert (a["train_loss"], a["val_loss"], a["ent_load"]) == (b["train_loss"], b["val_loss"], b["ent_load"])
    for p, q in zip(full["model"].parameters(), resumed["model"].parameters()):
        assert torch.equal(p, q)


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*ckpt.pt.*--init_from=scratch"):
        train(tiny(), fast(tmp_path / "none", init_from="resume"), corpus=CORPUS)
    train(tiny("aoe"), fast(tmp_path / "a", max_iters=2, eval_interval=2), corpus=CORPUS)
    resume = fast(tmp_path / "a", init_from="resume", max_iters=4)
    with pytest.raises(ValueError, match=r"different model \(ffn: checkpoint 'aoe', now 'moe'\)"):
        train(tiny("moe"), resume, corpus=CORPUS)
    with pytest.raises(ValueError, match=r"n_layer: checkpoint 2, now 3"):
        train(tiny("aoe", n_layer=3), resume, corpus=CORPUS)
    with pytest.raises(ValueError, match=r"seed: checkpoint 1337, now 1"):
        train(tiny("aoe"), replace(resume, seed=1), corpus=CORPUS)
    with pytest.raises(ValueError, match=r"tokens per step: checkpoint 128, now 256"):
        train(tiny("aoe"), replace(resume, total_batch_tokens=256), corpus=CORPUS)
    # the implementation of the dispatch may change on resume: it computes the same thing
    r = train(tiny("aoe", dispatch="loop"), resume, corpus=CORPUS)
    assert r["iters"] == 4


def test_nan_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    def poison(it, model):
        if it == 5:
            with torch.no_grad():
                model.wte.weight[0, 0] = float("nan")

    with pytest.raises(TrainingDiverged, match=r"train loss is nan at iter 6.*kept the last good checkpoint"):
        train(tiny("aoe"), fast(tmp_path), corpus=CORPUS, callback=poison)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 4 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_vocab_smaller_than_corpus(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=64 is invalid.*256 token ids.*--vocab_size=256"):
        train(tiny(vocab_size=64), fast(tmp_path), corpus=CORPUS)


# --------------------------------------------------------------------------- sample and plots

def test_sample_cli(tmp_path, capsys):
    train(tiny("moe"), fast(tmp_path / "m", max_iters=2, eval_interval=2), corpus=CORPUS)
    assert sample.main([f"--out_dir={tmp_path / 'm'}", "--start=def ", "--num_samples=2",
                        "--max_new_tokens=10", "--device=cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "\ndef " in out
    texts = sample.sample(sample.SampleConfig(out_dir=str(tmp_path / "m"), start="x", num_samples=1,
                                              max_new_tokens=5, temperature=0))
    assert len(texts) == 1 and texts[0].startswith("x")
    with pytest.raises(FileNotFoundError, match=r"checkpoints found in .*m\b"):
        sample.sample(sample.SampleConfig(out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="num_samples=0 is invalid"):
        sample.SampleConfig(num_samples=0)


def test_plots_write_pngs(tmp_path):
    rows = {}
    for kind in ("dense", "moe", "aoe"):
        runs = []
        for seed in (0, 1):
            out = tmp_path / kind / str(seed)
            train(tiny(kind), fast(out, max_iters=4, eval_interval=2, seed=seed), corpus=CORPUS)
            runs.append(read_log(out))
        rows[kind] = runs
    plots.plot_losses(rows, tmp_path / "loss.png")
    assert plots.plot_expert_load(rows, tmp_path / "experts.png")
    assert plots.plot_routing_entropy({k: v[0] for k, v in rows.items()}, tmp_path / "routing.png")
    for name in ("loss.png", "experts.png", "routing.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plots.plot_expert_load({"dense": rows["dense"]}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
