"""train_gpt.py and minimoe/presets.py: preset sizes, overrides, a run on token shards, exact resume,
and the bad inputs of the data path. CPU only, no network (the shards are written here)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from minimoe import presets
from minimoe.data import DataError
from minimoe.shards import write_shard
from minimoe.model import GPTConfig
from minimoe.presets import PRESETS, count, get_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()            # train() sets --threads process-wide: put it back
    yield tmp_path / "cache"
    torch.set_num_threads(threads)


def make_shards(folder, n_train=6000, n_val=2000, seed=0, vocab=256):
    """A prepared-data folder as minimoe.prepare writes it: train_/val_ shards + meta.json.
    The tokens are a noisy repeating pattern, so a tiny model has something to learn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, vocab, 97)
    def stream(n):
        t = np.resize(pattern, n)
        noise = rng.random(n) < 0.1
        t[noise] = rng.integers(0, vocab, noise.sum())
        return t.astype(np.uint8 if vocab <= 256 else np.uint16)
    write_shard(folder / "train_000000.bin", stream(n_train // 2))
    write_shard(folder / "train_000001.bin", stream(n_train - n_train // 2))
    write_shard(folder / "val_000000.bin", stream(n_val))
    (folder / "meta.json").write_text(json.dumps({"name": "test-shards", "vocab_size": vocab,
                                                  "tokenizer": "byte" if vocab <= 256 else "gpt2"}))
    return folder


# Small enough for seconds on a 2-core CPU; overrides on top of the tiny presets. One thread: tiny
# matmuls gain nothing from more, and on a busy machine every op would wait for a second core.
FAST = ["--n_layer=1", "--n_embd=32", "--block_size=32", "--d_ffn=64", "--batch_size=4",
        "--eval_iters=2", "--eval_interval=2", "--log_interval=1", "--device=cpu", "--threads=1",
        "--progress=false", "--sample_tokens=0", "--plots=false"]


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def assert_close_or_none(a, b, rel):
    """a == b within rel, where None (train_loss at iter 0 has no steps behind it) must match None.
    pytest.approx(None) is an error since pytest 9.1, so None is compared explicitly."""
    if b is None or a is None:
        assert a is None and b is None, f"{a!r} != {b!r}"
    else:
        assert a == pytest.approx(b, rel=rel)


# ----------------------------------------------------------------------------- presets

def test_every_preset_builds_and_is_the_size_we_claim():
    sizes = {name: count(p.model_config()) for name, p in PRESETS.items()}
    # GPT-2 small class: SwiGLU d_ffn 2048 has GPT-2's MLP parameter count -> ~124M in all
    assert abs(sizes["gpt2-dense"]["total"] - 124e6) / 124e6 < 0.01
    assert sizes["gpt2-dense"]["total"] == sizes["gpt2-dense"]["active"]
    # router MoE and AoE at equal total parameters (AoE's d_wide from Eq. 5), 8 experts top-2
    for fam in ("gpt2", "paper-small"):
        moe, aoe = sizes[f"{fam}-moe"], sizes[f"{fam}-aoe"]
        assert abs(moe["total"] - aoe["total"]) / moe["total"] < 0.005
        assert moe["active"] < moe["total"] / 2
        # AoE's active count exceeds MoE's: every expert's W_down runs for every token
        assert aoe["active"] > moe["active"] and aoe["flops_per_token"] > moe["flops_per_token"]
    assert sizes["gpt2-aoe"]["d_wide"] == 2520 and sizes["paper-small-aoe"]["d_wide"] == 3840  # notes: 3840
    assert 0.65e9 < sizes["paper-small-moe"]["total"] < 0.8e9    # the paper's ~700M starting point
    assert all(s["total"] < 1e6 for n, s in sizes.items() if n.startswith("tiny"))
    # nothing was allocated: counting runs on the meta device
    assert count(GPTConfig(n_layer=48, n_embd=4096, n_head=32))["total"] > 10e9


def test_paper_configs_match_the_paper_counts():
    # The paper's small model (32k vocabulary): 732M total / 247M active. Our tied-embedding count
    # gives the total, our untied count gives the active number: the paper evidently counts the
    # 32000 x 768 vocabulary matrix once in "total" and twice in "active" (embedding + head).
    moe_cfg = presets.PAPER_CONFIGS["paper-small-moe@32k"][0]
    tied = count(GPTConfig(**moe_cfg, tie_embeddings=True))
    untied = count(GPTConfig(**moe_cfg, tie_embeddings=False))
    assert abs(tied["total"] - 732e6) / 732e6 < 0.002
    assert abs(untied["active"] - 247e6) / 247e6 < 0.003
    assert untied["active"] - tied["active"] == 32000 * 768


def test_get_preset_unknown_names_all():
    with pytest.raises(ValueError, match="unknown preset 'gpt3'.*gpt2-dense.*tiny-aoe"):
        get_preset("gpt3")


def test_presets_main_prints_both_tables(capsys):
    assert presets.main([]) == 0
    out = capsys.readouterr().out
    for name in [*PRESETS, *presets.PAPER_CONFIGS]:
        assert f"| {name} |" in out
    assert "| gpt2-dense | dense | 12 x 768 | - | 2048 | 123.6M | 123.6M |" in out


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_training_defaults_are_valid(name):
    from minimoe.runtime import grad_accum_steps
    from minimoe.train import TrainConfig
    p = get_preset(name)
    cfg = TrainConfig(**p.train_defaults())            # validates every field
    block = p.model_config().block_size
    for world in (1, 2, 4, 8):                          # the global batch divides on 1..8 GPUs
        accum = grad_accum_steps(cfg, block, world)
        expected = cfg.total_batch_tokens or cfg.batch_size * block * world
        assert accum * cfg.batch_size * block * world == expected


def test_help_lists_presets_and_fields(capsys):
    with pytest.raises(SystemExit) as e:
        train_gpt.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "tiny-aoe" in out and "paper-small-moe" in out
    assert "--n_experts=" in out and "--total_batch_tokens=" in out and "--plots=True" in out


def test_preset_data_follows_cache_and_prepare_command(cache):
    p = get_preset("gpt2-aoe")
    assert p.train_defaults()["data"] == str(cache / "fineweb-edu-sample-10BT")
    assert p.prepare_command() == "python -m minimoe.prepare fineweb --name=sample-10BT"
    assert get_preset("tiny-moe").train_defaults()["data"] == "stdlib"


# ----------------------------------------------------------------------------- train_gpt.py

def test_split_preset():
    assert train_gpt.split_preset(["--preset=tiny-moe", "--n_layer=1"]) == ("tiny-moe", ["--n_layer=1"])
    assert train_gpt.split_preset(["--preset", "tiny-moe"]) == ("tiny-moe", [])
    assert train_gpt.split_preset([]) == (train_gpt.DEFAULT_PRESET, [])


def test_overrides_go_on_top_of_the_preset(tmp_path, monkeypatch):
    seen = {}
    fake_result = {"interrupted": None, "tokens_per_sec": None, "mfu": None, "iters": 0, "tokens": 0}
    monkeypatch.setattr(train_gpt, "train", lambda m, c: seen.update(model=m, cfg=c) or fake_result)
    train_gpt.main(["--preset=tiny-moe", "--n_experts=8", "--learning_rate=0.01", "--data=stdlib",
                    f"--out_dir={tmp_path}"])
    m, c = seen["model"], seen["cfg"]
    assert (m.ffn, m.n_experts, m.top_k, m.n_embd) == ("moe", 8, 2, 64)       # preset + override
    assert (c.learning_rate, c.max_iters, c.out_dir) == (0.01, 50, str(tmp_path))
    with pytest.raises(ValueError, match="unknown preset"):
        train_gpt.main(["--preset=nope"])


def test_missing_data_names_the_prepare_command(cache):
    with pytest.raises(ValueError, match=r"python -m minimoe\.prepare fineweb --name=sample-10BT"):
        train_gpt.main(["--preset=gpt2-dense"])
    with pytest.raises(ValueError, match=r"(?s)prepare fineweb --out_dir=nowhere/x.*--data=stdlib"):
        train_gpt.main(["--preset=tiny-aoe", "--data=nowhere/x"])


def test_cli_error_is_one_clear_line_not_a_traceback(cache):
    r = subprocess.run([sys.executable, "train_gpt.py", "--preset=gpt2-moe"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 2
    assert "python -m minimoe.prepare fineweb --name=sample-10BT" in r.stderr
    assert "Traceback" not in r.stderr


def test_train_on_shards_then_resume_is_identical(tmp_path):
    data = make_shards(tmp_path / "shards")
    # lr_decay_iters fixed: otherwise the cosine would follow each run's own max_iters
    common = ["--preset=tiny-aoe", f"--data={data}", *FAST, "--lr_decay_iters=6"]
    full = train_gpt.main([*common, "--max_iters=6", f"--out_dir={tmp_path / 'full'}", "--plots=true"])
    assert all((tmp_path / "full" / f).stat().st_size > 0 for f in ("loss.png", "experts.png", "routing.png"))
    train_gpt.main([*common, "--max_iters=4", f"--out_dir={tmp_path / 'part'}"])
    resumed = train_gpt.main([*common, "--max_iters=6", "--init_from=resume", f"--out_dir={tmp_path / 'part'}"])
    log_full, log_part = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["iter"] for r in log_full] == [r["iter"] for r in log_part]
    assert [r["iter"] for r in log_full] == [0, 2, 4, 6]
    for a, b in zip(log_full, log_part):
        assert_close_or_none(a["train_loss"], b["train_loss"], rel=1e-6)   # None at iter 0 in both
        assert_close_or_none(a["val_loss"], b["val_loss"], rel=1e-6)
    assert log_full[-1]["val_loss"] < log_full[0]["val_loss"]     # it learns the repeating pattern
    for p, q in zip(full["model"].parameters(), resumed["model"].parameters()):
        assert torch.equal(p, q)
    ckpt = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=False)
    assert ckpt["model_config"]["ffn"] == "aoe" and ckpt["train_config"]["data"] == str(data)
    # the routing statistics of AoE are logged per layer
    assert "ent_load" in log_full[-1] and full["params_active"] < full["params_total"]


# ----------------------------------------------------------------------------- bad data

def test_shard_of_wrong_version_or_format(tmp_path):
    data = make_shards(tmp_path / "shards")
    bad = data / "train_000001.bin"
    raw = bytearray(bad.read_bytes())
    raw[4:8] = np.array([99], dtype="<i4").tobytes()          # header word 1: format version
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="version 99, expected 1"):
        train_gpt.main(["--preset=tiny-aoe", f"--data={data}", *FAST, "--max_iters=1",
                        f"--out_dir={tmp_path / 'o'}"])
    bad.write_bytes(b"not a shard" * 200)
    with pytest.raises(DataError, match="not a minimoe shard"):
        train_gpt.main(["--preset=tiny-aoe", f"--data={data}", *FAST, "--max_iters=1",
                        f"--out_dir={tmp_path / 'o'}"])


def test_missing_shards_in_a_prepared_folder(tmp_path):
    data = make_shards(tmp_path / "shards")
    (data / "val_000000.bin").unlink()
    with pytest.raises(DataError, match="no val tokens"):
        train_gpt.main(["--preset=tiny-aoe", f"--data={data}", *FAST, "--max_iters=1",
                        f"--out_dir={tmp_path / 'o'}"])


def test_too_few_tokens_for_one_batch(tmp_path):
    data = make_shards(tmp_path / "shards", n_train=30, n_val=20)   # block_size 32 needs 33 per window
    with pytest.raises(DataError, match="only 30 tokens, but one window of block_size=32 needs 33"):
        train_gpt.main(["--preset=tiny-aoe", f"--data={data}", *FAST, "--max_iters=1",
                        f"--out_dir={tmp_path / 'o'}"])


def test_global_batch_must_divide(tmp_path):
    data = make_shards(tmp_path / "shards")
    # micro-batch 4 x 32 tokens = 128 per process; 200 is not a multiple
    with pytest.raises(ValueError, match="total_batch_tokens=200"):
        train_gpt.main(["--preset=tiny-aoe", f"--data={data}", *FAST, "--max_iters=1",
                        "--total_batch_tokens=200", f"--out_dir={tmp_path / 'o'}"])


def test_gpt2_preset_on_bpe_shards(tmp_path):
    # uint16 shards with GPT-2 token ids, as `prepare fineweb` writes them; the preset's model shrunk
    data = make_shards(tmp_path / "bpe", vocab=50257)
    r = train_gpt.main(["--preset=gpt2-moe", f"--data={data}", *FAST, "--n_head=2", "--max_iters=2",
                        "--compile=false", "--total_batch_tokens=None", f"--out_dir={tmp_path / 'o'}"])
    assert r["model"].config.vocab_size == 50304 and r["model"].config.n_experts == 8
    assert r["val_loss"] < 11.0                          # ~ln(50304) = 10.8 at the start
    # a byte-vocabulary preset cannot read GPT-2 tokens: the error says which vocab_size to use
    with pytest.raises(ValueError, match="vocab_size=256 is invalid.*--vocab_size=50257"):
        train_gpt.main(["--preset=tiny-aoe", f"--data={data}", *FAST, "--max_iters=1",
                        f"--out_dir={tmp_path / 'o2'}"])


def test_the_continue_command_is_shell_quoted(tmp_path, monkeypatch, capsys):
    """Pasting the printed command resumes exactly this run: an out_dir with spaces and `;` stays one
    argument instead of running `rm` (or another grid into another folder)."""
    import shlex
    out = tmp_path / "runs; touch PWNED" / "a b $(id)"
    argv = ["--preset=tiny-aoe", f"--out_dir={out}", "--init-from=scratch", "--data=stdlib", "--max_iters=5"]
    fake = dict(interrupted="SIGINT", iters=1, tokens=10, tokens_per_sec=1.0, mfu=None)
    monkeypatch.setattr(train_gpt, "train", lambda model_config, cfg: fake)
    train_gpt.main(argv)
    line = next(l for l in capsys.readouterr().out.splitlines() if "continue with:" in l)
    words = shlex.split(line.split("continue with:", 1)[1])
    assert words == ["python", "train_gpt.py", "--preset=tiny-aoe", f"--out_dir={out}", "--data=stdlib",
                     "--max_iters=5", "--init_from=resume"], line
    with pytest.raises(ValueError, match=re.escape("prepare fineweb '--out_dir=no where; x'")):
        train_gpt.main(["--preset=tiny-aoe", "--data=no where; x"])      # the prepare command it prints, too
