"""metrics.py: selection rules against a hand-written per-token loop, and the model-level swap."""

from dataclasses import replace
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minimoe.lowrank import moe_to_aoe, svd_factorize
from minimoe.metrics import (BYTE_CLASSES, NODES, Rule, bootstrap_batches, byte_class, chance_agreement, evaluate_rule,
                             expert_byte_classes, expert_choices, ffn_inputs, format_table,
                             node_activations, run_experts, select_experts, top_tokens_per_expert,
                             topk_agreement, train_or_load, use_rule)
from minimoe.model import GPT, GPTConfig
from minimoe.moe import MoE
from minimoe.train import TrainConfig

D, E, K, H = 32, 6, 2, 48


def make_moe(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=D, ffn="moe",
                    n_experts=E, top_k=K, d_ffn=H, **kw)
    moe = MoE(cfg)
    with torch.no_grad():  # bigger weights than the init, so the experts really differ
        for p in moe.parameters():
            p.mul_(10)
    return moe, cfg


def make_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=D, ffn="moe",
                    n_experts=E, top_k=K, d_ffn=H, **kw)
    return GPT(cfg).eval()


def expert_node_by_hand(moe, x, i, node, rank=None):
    """One token x (D,), one expert i, written out from Eq. 1."""
    g = x @ moe.w_g[i]
    p = x @ moe.w_p[i]
    return {"x_wg": lambda: g, "x_wp": lambda: p, "silu_x_wg": lambda: F.silu(g),
            "hidden": lambda: F.silu(g) * p, "output": lambda: (F.silu(g) * p) @ moe.w_o[i],
            "svd_down": lambda: x @ svd_factorize(moe.w_g[i], rank)[0]}[node]()


@pytest.mark.parametrize("node", list(NODES))
def test_node_activations_match_per_token_loop(node):
    moe, _ = make_moe()
    x = torch.randn(5, D)
    rank = 4 if node == "svd_down" else None
    a = node_activations(moe, x, node, rank)
    ref = torch.stack([torch.stack([expert_node_by_hand(moe, x[n], i, node, rank) for i in range(E)])
                       for n in range(5)])
    torch.testing.assert_close(a, ref.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("node,ord_", [("x_wg", 2), ("hidden", 2), ("output", 1), ("x_wp", math.inf),
                                       ("svd_down", 2)])
def test_norm_rule_picks_and_weights_like_a_per_token_loop(node, ord_):
    moe, _ = make_moe(seed=1)
    x = torch.randn(7, D)
    rank = 8 if node == "svd_down" else None
    r = select_experts(moe, x, Rule("norm", node, rank=rank, ord=ord_))
    for n in range(7):
        norms = torch.stack([torch.linalg.vector_norm(expert_node_by_hand(moe, x[n], i, node, rank), ord=ord_)
                             for i in range(E)])
        g, idx = torch.softmax(norms, -1).topk(K)
        assert r.experts[n].tolist() == idx.tolist()
        torch.testing.assert_close(r.gates[n], (g / g.sum()).detach())


@pytest.mark.parametrize("part", ["pos", "neg"])
def test_norm_of_one_sign_like_a_per_token_loop(part):
    moe, _ = make_moe(seed=6)
    x = torch.randn(7, D)
    r = select_experts(moe, x, Rule("norm", "x_wg", part=part))
    sign = 1 if part == "pos" else -1
    for n in range(7):
        a = torch.stack([expert_node_by_hand(moe, x[n], i, "x_wg") for i in range(E)])   # (E, H)
        norms = F.relu(sign * a).norm(dim=-1)
        g, idx = torch.softmax(norms, -1).topk(K)
        assert r.experts[n].tolist() == idx.tolist()
        torch.testing.assert_close(r.gates[n], (g / g.sum()).detach())
    # the two parts split the squared norm: ||a||^2 = ||a+||^2 + ||a-||^2
    pos, neg = (select_experts(moe, x, Rule("norm", "x_wg", part=p)).scores for p in ("pos", "neg"))
    torch.testing.assert_close(pos ** 2 + neg ** 2, select_experts(moe, x, Rule("norm", "x_wg")).scores ** 2)


def test_swapped_gates_keep_the_experts_and_change_only_the_weights():
    moe, _ = make_moe(seed=7)
    x = torch.randn(9, D)
    router = select_experts(moe, x, Rule("router"))
    norm = select_experts(moe, x, Rule("norm", "hidden"))
    assert not torch.equal(router.experts, norm.experts)          # the swap is not trivial here
    logits = moe.router(x).detach()
    for n in range(9):
        # the norm's experts, weighted by the router's softmax over all E, renormalized over the K
        r = select_experts(moe, x, Rule("norm", "hidden", gates="router"))
        assert torch.equal(r.experts, norm.experts)
        p = torch.softmax(logits[n], -1)[norm.experts[n]]
        torch.testing.assert_close(r.gates[n], p / p.sum())
        # the router's experts, weighted by the softmax of the hidden node's norms
        r = select_experts(moe, x, Rule("router", "hidden", gates="norm"))
        assert torch.equal(r.experts, router.experts)
        p = torch.softmax(norm.scores[n], -1)[router.experts[n]]
        torch.testing.assert_close(r.gates[n], p / p.sum())
    for rule in (Rule("router", gates="equal"), Rule("norm", "x_wp", gates="equal")):
        torch.testing.assert_close(select_experts(moe, x, rule).gates, torch.full((9, K), 1 / K))
    rnd = select_experts(moe, x, Rule("random", seed=1, gates="router"), torch.Generator().manual_seed(3))
    same = select_experts(moe, x, Rule("random", seed=1), torch.Generator().manual_seed(3))
    assert torch.equal(rnd.experts, same.experts) and not torch.allclose(rnd.gates, same.gates)
    # asking for a rule's own weighting is the rule itself
    own = select_experts(moe, x, Rule("router", gates="router"))
    assert torch.equal(own.gates, router.gates) and not Rule("router", gates="router").swapped


def test_router_rule_reproduces_the_moe_layer():
    moe, _ = make_moe(seed=2)
    x = torch.randn(2, 9, D)
    y_ref, _ = moe(x)
    r = select_experts(moe, x.view(-1, D), Rule("router"))
    assert torch.equal(r.experts, moe.last_routing.experts)
    torch.testing.assert_close(run_experts(moe, x.view(-1, D), r).view_as(y_ref), y_ref)


def test_run_experts_matches_per_token_loop_for_any_choice():
    moe, _ = make_moe(seed=3)
    x = torch.randn(6, D)
    r = select_experts(moe, x, Rule("random", seed=5))
    y = run_experts(moe, x, r)
    for n in range(6):
        ref = sum(r.gates[n, k] * expert_node_by_hand(moe, x[n], r.experts[n, k], "output") for k in range(K))
        torch.testing.assert_close(y[n], ref.detach(), rtol=1e-4, atol=1e-4)


def test_a_factorized_moe_is_analysed_through_its_product_w_down_w_up():
    """moe-lowrank (Table 2's control: W_g^i = W_down^i W_up^i, no W_g stored) goes through the same
    analyses: the nodes read the product, run_experts reproduces the layer, and moe_to_aoe at full rank
    gives an AoE that chooses and computes like the SVD rule says."""
    moe, cfg = make_moe(seed=6, expert_gate="lowrank", d_low=8)
    assert moe.w_g is None
    x = torch.randn(2, 7, D)
    y_ref, _ = moe(x)
    xf = x.view(-1, D)
    w_g = moe.w_down @ moe.w_up                                     # (E, D, W) the product, by hand
    torch.testing.assert_close(node_activations(moe, xf, "x_wg"), torch.einsum("nd,edh->neh", xf, w_g).detach())
    r = select_experts(moe, xf, Rule("router"))
    torch.testing.assert_close(run_experts(moe, xf, r).view_as(y_ref), y_ref)
    aoe = moe_to_aoe(moe, cfg, D)                                   # full rank: the experts are unchanged
    assert aoe.w_up.shape[-1] == moe.w_p.shape[-1] == cfg.wide_dim
    aoe(x)
    svd = select_experts(moe, xf, Rule("norm", "svd_down", rank=D))
    assert torch.equal(svd.experts, aoe.last_routing.experts)


def test_random_rule_is_uniform_reproducible_and_distinct():
    moe, _ = make_moe()
    x = torch.randn(3000, D)
    r1 = select_experts(moe, x, Rule("random"), torch.Generator().manual_seed(0))
    r2 = select_experts(moe, x, Rule("random"), torch.Generator().manual_seed(0))
    assert torch.equal(r1.experts, r2.experts)
    assert (r1.experts[:, 0] != r1.experts[:, 1]).all()           # K distinct experts per token
    torch.testing.assert_close(r1.gates, torch.full((3000, K), 1 / K))
    share = torch.bincount(r1.experts.flatten(), minlength=E).float() / r1.experts.numel()
    assert (share - 1 / E).abs().max() < 0.02                      # every expert about equally often
    router = select_experts(moe, x, Rule("router"))
    agree = topk_agreement(r1.experts, router.experts)
    chance = chance_agreement(E, K)
    for key in ("same_set", "overlap", "top1"):
        assert abs(agree[key] - chance[key]) < 0.04, (key, agree[key], chance[key])


def test_svd_down_rule_chooses_like_the_converted_aoe_layer():
    moe, cfg = make_moe(seed=4)
    x = torch.randn(2, 8, D)
    for rank in (4, 8, D):   # (rank 3 hits a grouped_mm stride limit in AoE itself: reported)
        aoe = moe_to_aoe(moe, cfg, rank)
        aoe(x)
        r = select_experts(moe, x.view(-1, D), Rule("norm", "svd_down", rank=rank))
        assert torch.equal(r.experts, aoe.last_routing.experts)
        torch.testing.assert_close(r.gates, aoe.last_routing.gates)


def test_topk_agreement_by_hand():
    a = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])
    b = torch.tensor([[1, 0], [2, 4], [0, 1], [1, 0]])
    got = topk_agreement(a, b)
    assert got["same_set"] == pytest.approx(2 / 4)
    assert got["overlap"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert got["top1"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="same shape"):
        topk_agreement(a, b[:, :1])
    assert chance_agreement(8, 2) == {"same_set": 1 / 28, "overlap": 0.25, "top1": 0.125}


def test_rule_validation_messages():
    with pytest.raises(ValueError, match="Rule.kind='best'"):
        Rule("best")
    with pytest.raises(ValueError, match="Rule.node='x_w'.*x_wg"):
        Rule("norm", "x_w")
    with pytest.raises(ValueError, match="Rule.rank=None"):
        Rule("norm", "svd_down")
    with pytest.raises(ValueError, match="rank only applies"):
        Rule("norm", "x_wg", rank=4)
    with pytest.raises(ValueError, match="Rule.ord=3"):
        Rule("norm", "x_wg", ord=3)
    with pytest.raises(ValueError, match="takes no node"):
        Rule("router", "x_wg")
    assert Rule("norm", "svd_down", rank=16).label == "L2 norm of x W_down (rank-16 SVD of W_g)"
    assert Rule("norm", "hidden", ord=math.inf).label == "Linf norm of SiLU(x W_g) * x W_p"
    with pytest.raises(ValueError, match="Rule.gates='best'"):
        Rule("norm", "x_wg", gates="best")
    with pytest.raises(ValueError, match="Rule.part='abs'"):
        Rule("norm", "x_wg", part="abs")
    with pytest.raises(ValueError, match="takes no node/rank/part"):
        Rule("random", part="pos")
    with pytest.raises(ValueError, match="Rule.node=None"):
        Rule("router", gates="norm")                                # weighing by norms needs a node
    assert Rule("router", "x_wg", gates="norm").label == "router, gates by L2 norm of x W_g"
    assert Rule("norm", "x_wg", gates="router").label == "L2 norm of x W_g, router gates"
    assert Rule("random", gates="equal").label == "random experts"
    assert Rule("norm", "x_wg", part="neg").label == "L2 norm of x W_g, negative part"
    moe, cfg = make_moe()
    aoe = moe_to_aoe(moe, cfg, 4)
    with pytest.raises(TypeError, match="got AoE"):
        select_experts(aoe, torch.randn(2, D), Rule("router"))
    with pytest.raises(ValueError, match="rank=40 must be between 1 and"):
        select_experts(moe, torch.randn(2, D), Rule("norm", "svd_down", rank=40))


def test_evaluate_rule_router_is_the_model_itself_and_swaps_back():
    model = make_gpt(moe_every=2)          # layer 0 dense, layer 1 MoE: dense layers are left alone
    x = torch.randint(0, 64, (3, 16))
    y = torch.randint(0, 64, (3, 16))
    originals = [b.ffn for b in model.blocks]
    with torch.no_grad():
        model(x, y)
    plain = model.last_ce_loss.item()
    res = evaluate_rule(model, [(x, y)], Rule("router"))
    assert res["val_loss"] == pytest.approx(plain, abs=1e-6)
    assert res["same_set"] == res["overlap"] == res["top1"] == 1.0
    assert list(res["per_layer"]) == [1]
    assert [b.ffn for b in model.blocks] == originals
    # a norm rule changes the choice and the loss; the model is restored afterwards
    res2 = evaluate_rule(model, [(x, y)], Rule("norm", "x_wg"))
    assert res2["val_loss"] != res["val_loss"] and res2["same_set"] < 1.0
    assert [b.ffn for b in model.blocks] == originals
    # ... also when the forward raises inside the swap
    with pytest.raises(ValueError, match="exceeds block_size"):
        evaluate_rule(model, [(torch.zeros(1, 17, dtype=torch.long),) * 2], Rule("random"))
    assert [b.ffn for b in model.blocks] == originals


def test_evaluate_rule_loss_matches_a_manual_forward_under_the_rule():
    model = make_gpt(seed=5)
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    rule = Rule("norm", "output")
    # by hand: walk the blocks, replacing each MoE's choice with the norm rule
    with torch.no_grad():
        h = model.wte(x)
        cos, sin = model.rope_cos[:16], model.rope_sin[:16]
        for b in model.blocks:
            h = h + b.attn(b.norm_attn(h), cos, sin)
            u = b.norm_ffn(h).view(-1, D)
            h = h + run_experts(b.ffn, u, select_experts(b.ffn, u, rule)).view_as(h)
        logits = model.lm_head(model.norm_f(h))
        ref = F.cross_entropy(logits.view(-1, 64), y.view(-1)).item()
    assert evaluate_rule(model, [(x, y)], rule)["val_loss"] == pytest.approx(ref, rel=1e-5)


def test_evaluate_rule_reports_each_batch():
    model = make_gpt(seed=3)
    batches = [(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))) for _ in range(3)]
    res = evaluate_rule(model, batches, Rule("norm", "x_wg", gates="router"))
    assert len(res["batch_losses"]) == 3 and res["val_loss"] == pytest.approx(np.mean(res["batch_losses"]))
    assert res["rule"] == "L2 norm of x W_g, router gates"


def test_bootstrap_batches_is_paired_and_covers_the_mean():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.3, size=40)
    losses = np.stack([base, base + 0.05])               # rule 1 is worse by exactly 0.05 on every batch
    lo, hi = bootstrap_batches(losses, lambda L: L.mean(1))
    assert lo.shape == (2,) and (lo < losses.mean(1)).all() and (losses.mean(1) < hi).all()
    assert 0.05 < hi[0] - lo[0] < 0.4                     # about 2 * 1.96 * 0.3 / sqrt(40) = 0.19
    # paired: the batch-to-batch noise cancels in the difference
    lo_d, hi_d = bootstrap_batches(losses, lambda L: L[1].mean() - L[0].mean())
    assert lo_d == pytest.approx(0.05) and hi_d == pytest.approx(0.05)
    # the same seed gives the same interval, another one a different interval
    assert bootstrap_batches(losses, lambda L: L.mean(1))[0][0] == lo[0]
    assert bootstrap_batches(losses, lambda L: L.mean(1), seed=1)[0][0] != lo[0]
    with pytest.raises(ValueError, match="at least 2 batches"):
        bootstrap_batches(np.ones((3, 1)), lambda L: L.mean())


def test_use_rule_needs_expert_layers():
    torch.manual_seed(0)
    dense = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=D, ffn="dense"))
    with pytest.raises(ValueError, match="no expert layers"):
        with use_rule(dense, Rule("router")):
            pass


def test_ffn_inputs_and_expert_choices():
    model = make_gpt(seed=6)
    idx = torch.randint(0, 64, (2, 16))
    xs = ffn_inputs(model, idx)
    choices = expert_choices(model, idx)
    assert sorted(xs) == sorted(choices) == [0, 1]
    for i, moe in model.expert_layers():
        assert xs[i].shape == (2, 16, D) and choices[i].shape == (2, 16, K)
        r = select_experts(moe, xs[i].view(-1, D), Rule("router"))
        assert torch.equal(r.experts.view(2, 16, K), choices[i])


def test_byte_statistics():
    text = b"ab 1\n;\xc3"
    assert [BYTE_CLASSES[c] for c in byte_class(list(text))] == [
        "letters", "letters", "space", "digits", "newline", "punctuation", "other"]
    shares = expert_byte_classes(list(b"aa11"), [0, 0, 1, 2], 4)
    np.testing.assert_allclose(shares[0], [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(shares[1], [0, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(shares[3], 0)                  # expert 3 took nothing
    with pytest.raises(ValueError, match="same number"):
        expert_byte_classes([1, 2], [0], 2)
    # expert 0 takes every 'x' and half the 'y's: 'x' has the higher lift for it
    tokens = [ord("x")] * 30 + [ord("y")] * 60
    experts = [0] * 30 + [0, 1] * 30
    best = top_tokens_per_expert(tokens, experts, 2, k=2, min_count=10)
    assert best[0][0][0] == ord("x") and best[0][0][1] == pytest.approx((30 / 60) / (30 / 90))
    assert [t for t, _, _ in best[1]] == [ord("y")]
    # equal lift: the more frequent token first
    tied = top_tokens_per_expert([1] * 20 + [2] * 50 + [3] * 30, [0] * 70 + [1] * 30, 2, min_count=5)
    assert [t for t, _, _ in tied[0]] == [2, 1]


def test_format_table():
    rows = [{"rule": "router", "loss": 1.23456}, {"rule": "random experts", "loss": 10.0}]
    out = format_table(rows, [("rule", "rule", ""), ("loss", "val loss", ".3f")])
    assert out.splitlines() == ["rule            val loss",
                                "--------------  --------",
                                "router             1.235",
                                "random experts    10.000"]


def test_train_or_load_trains_once_then_reuses_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "code.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    mc = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, ffn="moe", n_experts=4,
                   top_k=2, d_ffn=16)
    tc = TrainConfig(data=str(text), max_iters=4, eval_interval=2, eval_iters=1, batch_size=2, warmup_iters=1,
                     threads=1, sample_tokens=0, progress=False)
    torch.manual_seed(123)
    first = train_or_load(mc, tc, name="tiny")
    after_training = torch.rand(3)
    assert not first["cached"] and first["out_dir"].parent == tmp_path / "cache" / "runs"
    assert [r["iter"] for r in first["log"]] == [0, 2, 4] and not first["model"].training
    torch.manual_seed(123)
    second = train_or_load(mc, tc, name="tiny")
    after_loading = torch.rand(3)
    assert second["cached"] and second["out_dir"] == first["out_dir"]
    # the caller's RNG is untouched either way: what a notebook draws next does not depend on its cache
    torch.manual_seed(123)
    assert torch.equal(after_training, torch.rand(3)) and torch.equal(after_loading, after_training)
    assert second["result"]["val_loss"] == first["result"]["val_loss"]
    for a, b in zip(first["model"].state_dict().values(), second["model"].state_dict().values()):
        assert torch.equal(a, b)
    # another setting is another run; out_dir and progress are not settings
    other = train_or_load(mc, replace(tc, max_iters=2), name="tiny")
    assert not other["cached"] and other["out_dir"] != first["out_dir"]
    assert train_or_load(mc, replace(tc, out_dir="elsewhere", progress=True), name="tiny")["cached"]
    # a folder without result.json is an unfinished attempt: continued from its checkpoint (same result on CPU)
    (first["out_dir"] / "result.json").unlink()
    again = train_or_load(mc, tc, name="tiny")
    assert not again["cached"] and again["result"]["val_loss"] == first["result"]["val_loss"]


def test_train_or_load_respects_the_lock_of_a_run_in_progress(tmp_path, monkeypatch):
    # issue 21: an unfinished run folder whose lock another process holds is never deleted under it
    from minimoe.outdir import OutDirLock
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    mc = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, ffn="moe", n_experts=4,
                   top_k=2, d_ffn=16)
    tc = TrainConfig(max_iters=2, eval_interval=2, eval_iters=1, batch_size=2, threads=1, sample_tokens=0,
                     progress=False)
    folder = train_or_load(mc, tc, name="tiny")["out_dir"]
    (folder / "result.json").unlink()                             # unfinished, as far as the cache can tell
    kept = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}
    with OutDirLock(folder):                                      # another process is on it
        with pytest.raises(ValueError, match=r"is in use by another run \(pid \d+\)"):
            train_or_load(mc, tc, name="tiny")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"} == kept


# --------------------------------------------------------------------------- information between labels

def test_mutual_information_known_values():
    from minimoe.metrics import entropy_bits, mutual_information
    a = np.repeat(np.arange(8), 100)                       # uniform over 8 labels: 3 bits
    assert entropy_bits(a) == pytest.approx(3.0)
    assert mutual_information(a, a) == pytest.approx(3.0)              # a determines a
    assert mutual_information(a, a % 2) == pytest.approx(1.0)          # a determines its parity (1 bit)
    b = np.tile(np.arange(2), 400)                         # independent of a by construction
    assert mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)
    # conditional: c = a // 2, so given c only the parity of a is left, and b = a % 2 carries all of it
    assert mutual_information(a, a % 2, given=a // 2) == pytest.approx(1.0)
    assert mutual_information(a // 2, a % 2, given=a % 2) == pytest.approx(0.0, abs=1e-12)


def test_shuffled_within_keeps_groups_and_breaks_the_rest():
    from minimoe.metrics import mutual_information, shuffled_within
    rng = np.random.default_rng(0)
    group = rng.integers(0, 4, 20_000)
    other = rng.integers(0, 4, 20_000)
    label = (group + other) % 4                            # depends on both
    s = shuffled_within(label, group, seed=1)
    for g in range(4):                                     # the same labels in every group, in another order
        assert sorted(s[group == g]) == sorted(label[group == g])
    assert not (s == label).all()
    assert mutual_information(s, group) == pytest.approx(mutual_information(label, group))
    assert mutual_information(label, other, given=group) == pytest.approx(2.0, abs=0.01)
    assert mutual_information(s, other, given=group) < 0.01          # only the estimator's bias is left
