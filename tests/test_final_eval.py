"""The end-of-run evaluation (train.final_val_loss): windows over the whole val split, a mean and its error."""

import math

import numpy as np
import pytest
import torch

from minimoe.data import Corpus, encode_bytes
from minimoe.model import GPT, GPTConfig
from minimoe.outdir import FINAL_VAL_FILE
from minimoe.train import TrainConfig, final_val_loss, train

TOKENS = encode_bytes(open(__file__).read() * 3)
CORPUS = Corpus("toy", TOKENS[:6000], TOKENS[6000:], 256, {"tokenizer": "byte"})
CFG = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, ffn="moe", n_experts=4, top_k=2,
                d_ffn=16)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("max_tokens", [10**9, 160])
def test_final_val_loss_is_the_mean_over_evenly_spread_windows(max_tokens):
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    val, T = CORPUS.val, CFG.block_size
    total = (len(val) - 1) // T
    n = min(total, max_tokens // T)
    starts = [(i * total // n) * T for i in range(n)]
    assert len(set(starts)) == n and starts[-1] + T + 1 <= len(val)         # no overlap, all inside the split
    expected = []
    for s in starts:
        w = torch.as_tensor(val[s:s + T + 1].astype("int64"))[None]
        model(w[:, :-1], w[:, 1:])
        expected.append(model.last_ce_loss.item())                        # this window's mean cross-entropy
    got = final_val_loss(model, val, T, batch_size=7, max_tokens=max_tokens)
    assert got["final_val_windows"] == n and got["final_val_tokens"] == n * T
    assert got["final_val_loss"] == pytest.approx(np.mean(expected), rel=1e-6)
    assert got["final_val_se"] == pytest.approx(np.std(expected, ddof=1) / math.sqrt(n), rel=1e-4)
    np.testing.assert_allclose(got["window_losses"], expected, rtol=1e-5)


def test_a_run_ends_with_it_and_keeps_the_windows(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data="toy", max_iters=4, eval_interval=2, eval_iters=1,
                      batch_size=4, threads=1, progress=False, sample_tokens=0, warmup_iters=1)
    result = train(CFG, cfg, corpus=CORPUS)
    windows = np.load(tmp_path / "run" / FINAL_VAL_FILE)
    assert len(windows) == result["final_val_windows"] == (len(CORPUS.val) - 1) // CFG.block_size
    assert result["final_val_loss"] == pytest.approx(float(windows.astype(np.float64).mean()), rel=1e-6)
    assert 0 < result["final_val_se"] < 1 and "window_losses" not in result
    off = train(CFG, TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "off"), "final_eval_tokens": 0}),
                corpus=CORPUS)
    assert "final_val_loss" not in off and not (tmp_path / "off" / FINAL_VAL_FILE).exists()
