"""GPT.generate: the KV-cache path equals the reference (no cache) path; sampling arguments' errors."""

import pytest
import torch

from minimoe import aoe, dispatch, moe, sample
from minimoe.model import GPT, GPTConfig, KVCache

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=48, d_ffn=96, n_experts=4, top_k=2)


def tiny_model(ffn, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, "ffn": ffn, **kw})).eval()


def prompt(B=3, T=5):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("ffn", ["dense", "moe", "aoe"])
@pytest.mark.parametrize("temperature, sample_top_k", [(0, None), (1.0, None), (0.8, 10)])
def test_cached_generation_equals_uncached(ffn, temperature, sample_top_k):
    """Same tokens with and without the cache, batch 3, 45 new tokens: 50 > block_size 32, so the
    window slides (and the cached path re-prefills) for the last 18 steps."""
    m = tiny_model(ffn)
    out = {}
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(7)
        out[use_cache] = m.generate(prompt(), 45, temperature=temperature, sample_top_k=sample_top_k,
                                    generator=gen, use_cache=use_cache)
    assert out[True].shape == (3, 50)
    assert torch.equal(out[True], out[False])
    assert not torch.equal(out[True][0], out[True][1])   # rows differ: the batch is really batched


@pytest.mark.parametrize("ffn", ["dense", "moe", "aoe"])
def test_cached_logits_match_the_full_forward(ffn):
    m = tiny_model(ffn)
    idx = torch.randint(0, 64, (2, TINY["block_size"]), generator=torch.Generator().manual_seed(3))
    cache = KVCache(m.config.n_layer, m.config.block_size)
    with torch.no_grad():
        m(idx[:, :4], kv_cache=cache)                                    # prefill 4 tokens
        chunk, _ = m(idx[:, 4:7], kv_cache=cache)                        # 3 at once: the masked path
        torch.testing.assert_close(chunk, m(idx[:, :7])[0], rtol=1e-5, atol=1e-5)
        for t in range(7, idx.size(1)):                                  # then one at a time
            step, _ = m(idx[:, t:t + 1], kv_cache=cache)
            for _, ffn_layer in m.expert_layers():
                assert ffn_layer.last_routing.experts.shape == (2, m.config.top_k)   # only the new token routed
            torch.testing.assert_close(step, m(idx[:, :t + 1])[0], rtol=1e-5, atol=1e-5)
        assert cache.pos == m.config.block_size
        with pytest.raises(ValueError, match=r"sequence length 33 \(32 cached \+ 1 new\) exceeds block_size=32"):
            m(idx[:, :1], kv_cache=cache)


def test_cache_under_bf16_autocast():
    m = tiny_model("aoe")
    idx = prompt(2, 12)
    cache = KVCache(m.config.n_layer, m.config.block_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(idx[:, :-1], kv_cache=cache)
        step, _ = m(idx[:, -1:], kv_cache=cache)
        full, _ = m(idx)
        assert cache.k[0].dtype == torch.bfloat16
        assert m.generate(idx, 3).shape == (2, 15)
    torch.testing.assert_close(step.float(), full.float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), r"temperature=nan must be a finite number >= 0"),
    (dict(temperature=float("inf")), r"temperature=inf must be a finite number >= 0"),
    (dict(temperature=-1), r"temperature=-1 must be a finite number >= 0"),
    (dict(temperature="0.8"), r"temperature='0.8' must be a finite number"),
    (dict(sample_top_k=0), r"sample_top_k=0 must be an integer between 1 and vocab_size=64"),
    (dict(sample_top_k=65), r"sample_top_k=65 must be an integer between 1 and vocab_size=64"),
    (dict(sample_top_k=float("nan")), r"sample_top_k=nan must be an integer"),
    (dict(sample_top_k=2.5), r"sample_top_k=2.5 must be an integer"),
    (dict(sample_top_k=-3), r"sample_top_k=-3 must be an integer"),
    (dict(max_new_tokens=-1), r"max_new_tokens=-1 must be an integer >= 0"),
    (dict(idx=torch.zeros(2, 3)), r"idx is a torch.float32 tensor of shape \(2, 3\): generate needs token ids"),
    (dict(idx=torch.zeros(4, dtype=torch.long)), r"idx is a torch.int64 tensor of shape \(4,\)"),
    (dict(idx=torch.zeros(2, 0, dtype=torch.long)), r"shape \(2, 0\).*T >= 1"),
    (dict(idx=torch.tensor([[3, 64]])), r"token ids in \[3, 64\]: they must be in \[0, vocab_size=64\)"),
])
def test_bad_sampling_arguments_give_one_line(kwargs, match):
    m = tiny_model("moe")
    args = dict(idx=torch.zeros(1, 1, dtype=torch.long), max_new_tokens=2, temperature=1.0, sample_top_k=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as e:
        m.generate(**args)
    assert "\n" not in str(e.value)


def test_sample_cli_names_the_renamed_flag():
    """--top_k is GPTConfig's experts per token; sample.py's token filter is --sample_top_k."""
    with pytest.raises(ValueError, match=r"unknown option --top_k: the token filter is --sample_top_k"):
        sample.main(["--top_k=5"])


@pytest.mark.parametrize("ffn, kw", [("moe", {}), ("aoe", {}), ("moe", dict(bias_update_rate=0.1)),
                                     ("aoe", dict(bias_update_rate=0.1)), ("moe", dict(expert_gate="lowrank")),
                                     ("moe", dict(router="mlp")), ("aoe", dict(fp32_scores=False))])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_steps_take_the_direct_path_and_keep_the_tokens(ffn, kw, batch, monkeypatch):
    """Batch 1 and 2 (N*K = 2, 4 slots): every cached decode step routes through dispatch's direct path,
    and the tokens still equal the reference's (no cache: the sorted path throughout)."""
    m = tiny_model(ffn, **kw)
    if kw.get("bias_update_rate"):   # a bias that changes choices
        for _, layer in m.expert_layers():
            layer.expert_bias.copy_(torch.randn(4, generator=torch.Generator().manual_seed(2)))
    impls = []
    resolve = dispatch.resolve_impl
    monkeypatch.setattr(dispatch, "resolve_impl", lambda *a: impls.append(resolve(*a)) or impls[-1])
    for mod in (moe, aoe):
        monkeypatch.setattr(mod, "resolve_impl", dispatch.resolve_impl)
    out = {}
    for use_cache in (True, False):
        impls.clear()
        gen = torch.Generator().manual_seed(7)
        out[use_cache] = m.generate(prompt(batch), 20, temperature=1.0, generator=gen, use_cache=use_cache)
        n_direct = impls.count("direct")
        assert n_direct == (19 * m.config.n_layer if use_cache else 0)   # every step after the prefill
    assert torch.equal(out[True], out[False])
