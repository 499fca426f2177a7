"""GPT: configs and their errors, parameter counts, forward/generate, state_dict, low rank."""

import io
from dataclasses import replace

import pytest
import torch

from minimoe.aoe import AoE, d_wide_for_matched_params
from minimoe.lowrank import gpt_moe_to_aoe, moe_to_aoe, rank_profile, svd_factorize
from minimoe.model import GPT, GPTConfig
from minimoe.moe import MoE

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=48, d_ffn=96, n_experts=4, top_k=2)


def tiny(ffn, **kw):
    return GPTConfig(**{**TINY, "ffn": ffn, **kw})


# --------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("overrides, field", [
    (dict(ffn="mlp"), "ffn"),
    (dict(top_k=5), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(d_low=49), "d_low"),
    (dict(n_embd=50), "n_embd"),           # not divisible by n_head=4
    (dict(n_head=16), "n_head"),           # head size 3 is odd: RoPE needs pairs
    (dict(n_layer=0), "n_layer"),
    (dict(d_ffn=-1), "d_ffn"),
    (dict(d_wide=0), "d_wide"),
    (dict(moe_every=3), "moe_every"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(z_loss_coef=-1.0), "z_loss_coef"),
    (dict(dropout=1.0), "dropout"),
    (dict(dispatch="fast"), "dispatch"),
    (dict(vocab_size=2.5), "vocab_size"),
])
def test_invalid_config_names_field_value_and_what_is_allowed(overrides, field):
    with pytest.raises(ValueError) as e:
        GPTConfig(**{**TINY, "ffn": "aoe", **overrides})
    msg = str(e.value)
    assert f"GPTConfig.{field}={overrides[field]!r} is invalid:" in msg   # names the field and the value
    assert len(msg.split("invalid:")[1].strip()) > 10                      # ... and says what is allowed


def test_unknown_config_field_from_a_saved_dict():
    with pytest.raises(ValueError, match="unknown GPTConfig field.*'n_expert'"):
        GPTConfig.from_dict({**TINY, "n_expert": 4})


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size=32"):
        GPT(tiny("dense"))(torch.zeros(1, 33, dtype=torch.long))


def test_defaults_follow_the_papers_small_model():
    c = GPTConfig()
    assert (c.n_layer, c.n_head, c.n_embd, c.n_experts, c.top_k, c.ffn_dim, c.low_dim) == (12, 12, 768, 8, 2, 3072, 256)
    assert c.wide_dim == 3840 and c.aux_loss_coef == 0.01


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("d_low, paper_d_wide", [(64, 4393), (128, 4194), (256, 3840), (512, 3264)])
def test_d_wide_matches_the_papers_values_and_parameters(d_low, paper_d_wide):
    # Eq. 5 as the paper reports it for d_model 768, d_ffn 3072 (Table 2), to our multiple of 8
    w = d_wide_for_matched_params(768, 3072, d_low)
    assert w % 8 == 0 and abs(w - paper_d_wide) <= 4
    aoe_expert = 768 * d_low + d_low * w + 2 * 768 * w
    assert abs(aoe_expert / (3 * 768 * 3072) - 1) < 0.005


def test_moe_and_aoe_layers_have_matched_parameter_counts():
    cfg = GPTConfig(n_layer=1, n_embd=256, n_head=4, d_ffn=1024, d_low=96)
    moe, aoe = MoE(replace(cfg, ffn="moe")), AoE(cfg)
    n_moe, n_aoe = (sum(p.numel() for p in m.parameters()) for m in (moe, aoe))
    assert abs(n_aoe / n_moe - 1) < 0.02
    assert dict(aoe.named_parameters())["w_down"].shape == (256, 8 * 96)
    assert dict(aoe.named_parameters())["w_up"].shape == (8, 96, cfg.wide_dim)


def test_active_parameter_counts():
    for ffn in ("dense", "moe", "aoe"):
        m = GPT(tiny(ffn))
        C, F, E, Kk, V = 48, 96, 4, 2, 64
        attn_norms = 2 * (4 * C * C + 2 * C) + C + V * C      # attention, norms, final norm, tied embedding
        if ffn == "dense":
            total = active = attn_norms + 2 * 3 * C * F
        elif ffn == "moe":
            total = attn_norms + 2 * (C * E + E * 3 * C * F)
            active = attn_norms + 2 * (C * E + Kk * 3 * C * F)
        else:
            Lr, W = m.config.low_dim, m.config.wide_dim
            total = attn_norms + 2 * (C * E * Lr + E * (Lr * W + 2 * C * W))
            active = attn_norms + 2 * (C * E * Lr + Kk * (Lr * W + 2 * C * W))
        assert m.num_params() == total and m.num_active_params() == active, ffn
        assert m.flops_per_token(16) == 6 * active + 12 * 2 * C * 16


def test_moe_every_interleaves_dense_layers():
    m = GPT(tiny("moe", n_layer=4, moe_every=2))
    assert [i for i, _ in m.expert_layers()] == [1, 3]
    assert type(m.blocks[0].ffn).__name__ == "DenseFFN"


# --------------------------------------------------------------------------- forward, generate, state

@pytest.mark.parametrize("ffn", ["dense", "moe", "aoe"])
def test_forward_shapes_and_loss(ffn):
    torch.manual_seed(0)
    m = GPT(tiny(ffn))
    idx, targets = torch.randint(0, 64, (2, 3, 32))
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 32, 64) and loss.ndim == 0
    assert loss.item() == pytest.approx((m.last_ce_loss + m.last_aux_loss).item())
    assert abs(m.last_ce_loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5   # ~uniform at init
    logits, loss = m(idx)
    assert logits.shape == (3, 1, 64) and loss is None
    stats = m.routing_stats()
    assert len(stats) == (0 if ffn == "dense" else 2)


@pytest.mark.parametrize("ffn", ["moe", "aoe"])
def test_generate_is_deterministic_under_a_seed(ffn):
    torch.manual_seed(0)
    m = GPT(tiny(ffn)).eval()
    start = torch.zeros(2, 1, dtype=torch.long)
    a = m.generate(start, 40, temperature=1.0, sample_top_k=10, generator=torch.Generator().manual_seed(7))
    b = m.generate(start, 40, temperature=1.0, sample_top_k=10, generator=torch.Generator().manual_seed(7))
    c = m.generate(start, 40, temperature=1.0, sample_top_k=10, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 41) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(m.generate(start, 5, temperature=0), m.generate(start, 5, temperature=0))
    with pytest.raises(ValueError, match="temperature"):
        m.generate(start, 1, temperature=-1)


@pytest.mark.parametrize("ffn", ["dense", "moe", "aoe"])
def test_state_dict_round_trip(ffn):
    torch.manual_seed(0)
    m = GPT(tiny(ffn))
    buf = io.BytesIO()
    torch.save({"config": m.config.__dict__, "model": m.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    torch.manual_seed(1)
    m2 = GPT(GPTConfig.from_dict(ck["config"]))
    m2.load_state_dict(ck["model"])
    idx = torch.randint(0, 64, (2, 32))
    torch.testing.assert_close(m(idx, idx)[0], m2(idx, idx)[0])


# --------------------------------------------------------------------------- low rank

def test_svd_factorization_is_exact_at_full_rank_and_optimal_below():
    torch.manual_seed(0)
    W = torch.randn(24, 40)
    A, B = svd_factorize(W, 24)
    torch.testing.assert_close(A @ B, W, rtol=1e-4, atol=1e-4)
    prof = rank_profile(W)
    for r in (1, 5, 12):
        A, B = svd_factorize(W, r)
        err = (W - A @ B).norm() / W.norm()
        assert err.item() == pytest.approx(prof["rel_error"][r - 1].item(), rel=1e-4)
        # Eckart-Young: no other rank-r product does better, e.g. a random one fitted by least squares
        Q = torch.linalg.qr(torch.randn(24, r)).Q
        assert err <= (W - Q @ (Q.T @ W)).norm() / W.norm()
        # the singular values are split evenly: both factors carry sqrt(S)
        torch.testing.assert_close(A.norm(dim=0), B.norm(dim=1))
    assert prof["energy"][-1].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rank=25"):
        svd_factorize(W, 25)


def test_moe_expert_factorized_at_full_rank_is_the_same_aoe_expert():
    torch.manual_seed(0)
    cfg = tiny("moe")
    moe = MoE(cfg)
    aoe = moe_to_aoe(moe, cfg, d_low=cfg.n_embd)
    x = torch.randn(10, cfg.n_embd)
    L = aoe.d_low
    for i in range(cfg.n_experts):
        e_moe = (torch.nn.functional.silu(x @ moe.w_g[i]) * (x @ moe.w_p[i])) @ moe.w_o[i]
        a = x @ aoe.w_down[:, i * L:(i + 1) * L]
        e_aoe = (torch.nn.functional.silu(a @ aoe.w_up[i]) * (x @ aoe.w_p[i])) @ aoe.w_o[i]
        torch.testing.assert_close(e_moe, e_aoe, rtol=1e-4, atol=1e-5)
    # below full rank the expert changes, by no more than the truncation error of W_g
    low = moe_to_aoe(moe, cfg, d_low=8)
    Wg = low.w_down[:, :8] @ low.w_up[0]
    err = (Wg - moe.w_g[0]).norm() / moe.w_g[0].norm()
    assert err.item() == pytest.approx(rank_profile(moe.w_g[0])["rel_error"][7].item(), rel=1e-3)


def test_whole_gpt_conversion_keeps_everything_but_the_router():
    torch.manual_seed(0)
    moe_model = GPT(tiny("moe"))
    aoe_model = gpt_moe_to_aoe(moe_model, d_low=48)
    assert aoe_model.config.ffn == "aoe" and aoe_model.config.wide_dim == 96
    torch.testing.assert_close(aoe_model.wte.weight, moe_model.wte.weight)
    torch.testing.assert_close(aoe_model.blocks[1].attn.qkv.weight, moe_model.blocks[1].attn.qkv.weight)
    idx = torch.randint(0, 64, (2, 32))
    _, loss = aoe_model(idx, idx)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="ffn='moe'"):
        gpt_moe_to_aoe(aoe_model, 8)
