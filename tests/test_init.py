"""Common random numbers at init (init.py) and the Eq. 6 reduction over layers (dispatch.aux_coef_per_layer)."""

from dataclasses import replace
import math

import pytest
import torch

from minimoe.dispatch import Routing, aux_coef_per_layer, load_balance_loss
from minimoe.model import GPT, GPTConfig
from minimoe.variants import VARIANTS, variant_config

BASE = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=4, top_k=2, d_ffn=64,
                 d_low=8)


def build(config, seed=0):
    torch.manual_seed(seed)
    return GPT(config)


def params(model):
    return dict(model.named_parameters())


def test_every_variant_shares_all_but_the_ffn():
    """One seed: attention, norms and embedding start equal in every variant (they did not before: with draws in
    construction order, a variant with another FFN shifted every later draw)."""
    ref = params(build(variant_config("moe", BASE)))
    for name in VARIANTS:
        p = params(build(variant_config(name, BASE)))
        outside = [k for k in ref if ".ffn." not in k]
        assert outside and all(torch.equal(ref[k], p[k]) for k in outside), name


def test_ffn_weights_of_the_same_shape_and_meaning_start_equal():
    moe = params(build(variant_config("moe", BASE)))
    for name in ("moe+bias", "moe+erc"):                 # the same experts and router, another training rule
        p = params(build(variant_config(name, BASE)))
        assert p.keys() == moe.keys() and all(torch.equal(moe[k], p[k]) for k in moe), name
    aoe, low = params(build(variant_config("aoe", BASE))), params(build(variant_config("moe-lowrank", BASE)))
    E, D, L = BASE.n_experts, BASE.n_embd, BASE.low_dim
    for i in range(BASE.n_layer):
        f = f"blocks.{i}.ffn."
        # AoE keeps W_down as one (D, E*L) matrix; the control as (E, D, L): the same numbers
        assert torch.equal(aoe[f + "w_down"].view(D, E, L).permute(1, 0, 2), low[f + "w_down"])
        for w in ("w_up", "w_p", "w_o"):
            assert torch.equal(aoe[f + w], low[f + w]), w
    # another width: independent draws, not a prefix of the same stream
    assert not torch.equal(moe["blocks.0.ffn.w_p"][..., :8], aoe["blocks.0.ffn.w_p"][..., :8])


def test_init_depends_on_the_seed_and_keeps_the_declared_scale():
    a, b, c = (params(build(replace(BASE, n_embd=64, d_ffn=256), seed)) for seed in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if "norm" not in k)
    model = build(replace(BASE, n_embd=64, d_ffn=256, ffn="aoe"))
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name          # RMSNorm gains: constant
        else:
            assert p.numel() >= 1024 and abs(p.std().item() / p.init_std - 1) < 0.1, (name, p.std(), p.init_std)


def test_every_parameter_declares_its_init():
    """A new module that forgets init.normal_ would silently keep PyTorch's default draw, outside the pairing."""
    for name in VARIANTS:
        for tie in (True, False):
            model = build(replace(variant_config(name, BASE), tie_embeddings=tie))
            undeclared = [k for k, p in model.named_parameters() if not hasattr(p, "init_std") and "norm" not in k]
            assert not undeclared, (name, undeclared)


def test_the_global_rng_moves_the_same_whatever_the_variant():
    after = []
    for name in ("dense", "moe", "aoe", "moe-bigrouter"):
        build(variant_config(name, BASE))
        after.append(torch.rand(4))
    assert all(torch.equal(after[0], t) for t in after)


def test_sequential_draws_in_construction_order_from_the_global_rng():
    """init_rng='sequential' is the draw before the change: one stream in construction order, so only what is built
    before the first FFN (layer 0's attention) starts equal across variants, and the global RNG moves by the
    variant's size."""
    moe, aoe = (variant_config(v, replace(BASE, init_rng="sequential")) for v in ("moe", "aoe"))
    pm, pa = params(build(moe)), params(build(aoe))
    assert torch.equal(pm["blocks.0.attn.qkv.weight"], pa["blocks.0.attn.qkv.weight"])
    assert not torch.equal(pm["blocks.1.attn.qkv.weight"], pa["blocks.1.attn.qkv.weight"])
    assert not torch.equal(pm["wte.weight"], pa["wte.weight"])
    rng = [(build(c), torch.rand(4))[1] for c in (moe, aoe)]
    assert not torch.equal(*rng)
    with pytest.raises(ValueError, match=r"init_rng='global' is invalid: allowed values are \('named', 'sequential'\)"):
        replace(BASE, init_rng="global")


# --------------------------------------------------------------------------- Eq. 6 over layers

def hand_made_routing():
    """4 tokens, 4 experts, top-2: loads f = (3, 3, 1, 1)/4 (sum K = 2), mean probabilities P given."""
    experts = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 3]])
    probs = torch.tensor([[.4, .3, .2, .1], [.5, .3, .1, .1], [.4, .1, .4, .1], [.1, .5, .1, .3]])
    return Routing(probs.log(), probs, probs.gather(1, experts), experts)


@pytest.mark.parametrize("reduce,divisor", [("sum", 1), ("mean", 3), ("mean/k", 6)])
def test_each_reduction_on_a_hand_made_load(reduce, divisor):
    r = hand_made_routing()
    f = torch.tensor([3, 3, 1, 1]) / 4                              # per token, sums to K = 2
    P = torch.tensor([1.4, 1.2, 0.8, 0.6]) / 4
    per_layer = 4 * (f * P).sum()                                   # n sum_i f_i P_i (Eq. 6 without alpha)
    assert torch.allclose(load_balance_loss(r), per_layer)
    layers, K, alpha = 3, 2, 0.01
    total = layers * aux_coef_per_layer(alpha, reduce, layers, K) * load_balance_loss(r)
    expected = {"sum": alpha * layers * per_layer,                  # summed over layers
                "mean": alpha * per_layer,                          # mean over layers
                "mean/k": alpha * 4 * (f / K * P).sum()}[reduce]    # mean over layers, f summing to 1
    assert torch.allclose(total, expected)
    assert math.isclose(aux_coef_per_layer(alpha, reduce, layers, K) * divisor, alpha)


def test_the_model_reduces_its_expert_layers_as_configured():
    cfg = replace(BASE, n_layer=4, moe_every=2, ffn="moe", aux_loss_coef=0.1)    # 2 expert layers of 4
    assert cfg.n_expert_layers == 2
    x = torch.randint(0, 64, (2, 16))
    aux = {}
    for reduce in ("sum", "mean", "mean/k"):
        model = build(replace(cfg, aux_loss_reduce=reduce))
        model(x, x)
        aux[reduce] = model.last_aux_loss
    assert torch.allclose(aux["sum"], 2 * aux["mean"]) and torch.allclose(aux["mean"], 2 * aux["mean/k"])
    with pytest.raises(ValueError, match=r"aux_loss_reduce='max' is invalid: allowed values are"):
        replace(cfg, aux_loss_reduce="max")
