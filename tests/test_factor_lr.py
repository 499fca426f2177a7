"""Learning-rate multipliers for the two factors of a factorized W_g (TrainConfig.w_down_lr_scale, w_up_lr_scale)."""

import pytest
import torch

from minimoe.data import Corpus, encode_bytes
from minimoe.model import GPT, GPTConfig
from minimoe.train import TrainConfig, configure_optimizer, train

TOKENS = encode_bytes(open(__file__).read() * 4)
CORPUS = Corpus("toy", TOKENS[:3000], TOKENS[3000:], 256, {"tokenizer": "byte"})


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))


def tiny(**kw):
    return GPTConfig(**{**dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16, ffn="aoe",
                               n_experts=4, top_k=2, d_ffn=16, d_low=8), **kw})


def test_default_keeps_two_groups_and_scales_add_one_group_per_factor():
    model = GPT(tiny())
    assert len(configure_optimizer(model, TrainConfig()).param_groups) == 2
    opt = configure_optimizer(model, TrainConfig(w_down_lr_scale=0.5, w_up_lr_scale=2.0))
    extra = {g["lr_scale"]: g["params"] for g in opt.param_groups if "lr_scale" in g}
    named = dict(model.named_parameters())
    assert {id(p) for p in extra[0.5]} == {id(p) for n, p in named.items() if n.endswith(".w_down")}
    assert {id(p) for p in extra[2.0]} == {id(p) for n, p in named.items() if n.endswith(".w_up")}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)          # every parameter once


@pytest.mark.parametrize("ffn,extra", [("aoe", {}), ("moe", {"expert_gate": "lowrank"})])
def test_a_scaled_factor_takes_a_scaled_first_step(tmp_path, ffn, extra):
    """Adam's first step moves every entry by about lr (|m/sqrt(v)| = 1), so the factors move by the scale x it."""
    moved = {}
    for scale in (1.0, 0.5):
        cfg = TrainConfig(out_dir=str(tmp_path / str(scale)), max_iters=1, eval_interval=1, eval_iters=1, batch_size=4,
                          warmup_iters=0, weight_decay=0.0, threads=1, progress=False, sample_tokens=0,
                          final_eval_tokens=0, w_down_lr_scale=scale, w_up_lr_scale=scale)
        torch.manual_seed(cfg.seed)                          # train() builds the model the same way
        start = {n: p.detach().clone() for n, p in GPT(tiny(ffn=ffn, **extra)).named_parameters()}
        model = train(tiny(ffn=ffn, **extra), cfg, corpus=CORPUS)["model"]
        moved[scale] = {n: (p.detach() - start[n]).abs().max().item() for n, p in model.named_parameters()}
    for n, d in moved[1.0].items():
        ratio = moved[0.5][n] / d
        factor = n.endswith((".w_down", ".w_up"))
        assert ratio == pytest.approx(0.5 if factor else 1.0, rel=1e-3), (n, ratio)
