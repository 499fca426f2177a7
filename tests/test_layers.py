"""MoE / AoE layers: the fast paths against a plain per-token loop, gradients, losses, statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from minimoe import dispatch
from minimoe.aoe import AoE
from minimoe.dispatch import Routing, gather_rows, load_balance_loss, plan_dispatch, route, routing_stats, row_norms
from minimoe.model import GPTConfig
from minimoe.moe import MoE

D, E, K, H, L = 32, 6, 2, 48, 8


def make(kind, dispatch="loop", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=D, ffn=kind,
                    n_experts=kw.pop("n_experts", E), top_k=kw.pop("top_k", K), d_ffn=H,
                    d_low=L, d_wide=kw.pop("d_wide", 40), dispatch=dispatch, **kw)
    layer = (MoE if kind == "moe" else AoE)(cfg)
    with torch.no_grad():  # bigger weights than the init, so the experts really differ
        for p in layer.parameters():
            p.mul_(10)
    return layer


def expert_out(layer, x, i):
    """E_i(x) of Eq. 1 for one token x (D,), written out by hand."""
    if isinstance(layer, MoE) and layer.w_g is not None:
        g = x @ layer.w_g[i]
    elif isinstance(layer, MoE):   # the Table 2 control: W_g^i = W_down^i W_up^i, router kept
        g = (x @ layer.w_down[i]) @ layer.w_up[i]
    else:
        g = (x @ layer.w_down[:, i * layer.d_low:(i + 1) * layer.d_low]) @ layer.w_up[i]
    return (F.silu(g) * (x @ layer.w_p[i])) @ layer.w_o[i]


def scores_of(layer, x):
    """The per-token score vector (E,): router logits (Alg. 1) or ||x W_down^i|| (Alg. 2)."""
    if isinstance(layer, MoE):
        r = layer.router   # linear: W_r x; the Table 2 "large router": W_r2 SiLU(W_r1 x)
        return r.weight @ (x if r.w_in is None else F.silu(r.w_in @ x))
    L = layer.d_low
    return torch.stack([(x @ layer.w_down[:, i * L:(i + 1) * L]).norm() for i in range(layer.n_experts)])


def per_token_reference(layer, x):
    """One token at a time: score, softmax over all experts, top-k, (renormalize), weighted sum.
    With a balancing bias b (DeepSeek-V3): the top-k of s + b, weighted by the softmax of s alone."""
    outs = []
    for n in range(x.shape[0]):
        s = scores_of(layer, x[n])
        p = torch.softmax(s, dim=-1)
        if layer.expert_bias is None:
            g, idx = p.topk(layer.top_k)
        else:
            idx = (s + layer.expert_bias).topk(layer.top_k).indices
            g = p[idx]
        if layer.renormalize:
            g = g / g.sum()
        outs.append(sum(g[k] * expert_out(layer, x[n], idx[k]) for k in range(layer.top_k)))
    return torch.stack(outs)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
@pytest.mark.parametrize("norm_topk", [True, False])
def test_fast_path_equals_per_token_loop(kind, dispatch, norm_topk):
    layer = make(kind, dispatch, norm_topk=norm_topk)
    assert_equals_per_token_loop(layer, torch.randn(3, 7, D, requires_grad=True))


def assert_equals_per_token_loop(layer, x):
    """The layer's output, and its gradients for the input and every parameter, equal the loop's."""
    y, _ = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = per_token_reference(layer, x_ref.view(-1, D)).view_as(y)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, *layer.parameters()])
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x_ref, *layer.parameters()])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


VARIANT_LAYERS = {"moe-lowrank": ("moe", dict(expert_gate="lowrank")), "moe-bigrouter": ("moe", dict(router="mlp")),
                  "moe+bias": ("moe", dict(bias_update_rate=0.1)), "aoe+bias": ("aoe", dict(bias_update_rate=0.1))}


@pytest.mark.parametrize("name", VARIANT_LAYERS)
@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_variant_fast_path_equals_per_token_loop(name, dispatch):
    kind, kw = VARIANT_LAYERS[name]
    layer = make(kind, dispatch, **kw)
    x = torch.randn(3, 7, D, requires_grad=True)
    if layer.expert_bias is not None:   # a bias on the scale of the scores, so it changes choices
        with torch.no_grad():
            s = torch.stack([scores_of(layer, t) for t in x.view(-1, D)])         # (N, E)
            layer.expert_bias.copy_(torch.randn(E) * s.std(dim=-1).mean())
            plain = s.topk(K).indices.sort().values
            biased = (s + layer.expert_bias).topk(K).indices.sort().values
        assert (plain != biased).any()      # the bias does move some choices
    assert_equals_per_token_loop(layer, x)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_grouped_and_loop_dispatch_agree(kind):
    fast, slow = make(kind, "grouped"), make(kind, "loop")
    x = torch.randn(4, 16, D)
    (y1, a1), (y2, a2) = fast(x), slow(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(a1, a2)
    (y1.square().sum() + a1).backward()
    (y2.square().sum() + a2).backward()
    for (name, p1), p2 in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=lambda m: f"{name}: {m}")


def test_dispatch_handles_experts_with_no_tokens():
    layer = make("moe", "grouped")
    with torch.no_grad():   # a router that sends every token to experts 0 and 1
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
        layer.router.weight[1] = 0.5
    x = torch.rand(2, 5, D) + 0.1       # positive, so experts 0 > 1 > the rest
    y, _ = layer(x)
    assert layer.last_routing.experts.unique().tolist() == [0, 1]
    torch.testing.assert_close(y, per_token_reference(layer, x.view(-1, D)).view_as(y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_gradient_reaches_the_scorer_through_the_gates(kind):
    # aux loss off: the only way to the router / W_down is the gate weights of the output
    layer = make(kind, aux_loss_coef=0.0)
    y, aux = layer(torch.randn(2, 8, D))
    assert aux.item() == 0.0
    y.square().sum().backward()
    scorer = layer.router.weight if kind == "moe" else layer.w_down
    assert scorer.grad is not None and scorer.grad.abs().sum() > 0
    if kind == "aoe":  # and every expert's slice of W_down that scored a token
        L = layer.d_low
        used = layer.last_routing.experts.unique().tolist()
        for i in used:
            assert layer.w_down.grad[:, i * L:(i + 1) * L].abs().sum() > 0


def test_aux_loss_is_k_at_perfect_balance_and_larger_when_imbalanced():
    N = 12
    # perfect balance: uniform probabilities, each expert chosen by exactly N*K/E tokens
    experts = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], dim=1)   # (N, K)
    uniform = Routing(torch.zeros(N, E), torch.full((N, E), 1 / E), torch.full((N, K), 0.5), experts)
    assert load_balance_loss(uniform).item() == pytest.approx(K)
    # imbalance the probabilities follow: everybody picks experts 0 and 1, and they get the mass
    scores = torch.tensor([4.0, 3.0] + [0.0] * (E - 2)).expand(N, E)
    skewed = route(scores, K)
    assert load_balance_loss(skewed).item() > K + 0.5
    # and the layer returns alpha times it, summing over layers; averaging, alpha / (the number of expert layers)
    for reduce, share in (("sum", 0.25), ("mean", 0.25 / 2)):
        layer = make("moe", aux_loss_coef=0.25, aux_loss_reduce=reduce)   # n_layer=2
        _, aux = layer(torch.randn(1, 10, D))
        assert aux.item() == pytest.approx(share * load_balance_loss(layer.last_routing).item(), rel=1e-5)


def test_z_loss_is_added_when_enabled():
    x = torch.randn(1, 10, D)
    _, aux0 = make("moe", aux_loss_coef=0.0)(x)
    layer = make("moe", aux_loss_coef=0.0, z_loss_coef=1e-3)
    _, aux1 = layer(x)
    lse = torch.logsumexp(layer.last_routing.scores, -1)
    assert aux0.item() == 0.0
    assert aux1.item() == pytest.approx(1e-3 * lse.square().mean().item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_top_k_equal_to_n_experts_is_a_weighted_sum_of_all_experts(kind):
    layer = make(kind, top_k=E, norm_topk=False)
    if kind == "moe":
        with torch.no_grad():
            layer.router.weight.zero_()   # equal logits -> every weight is exactly 1/E
    x = torch.randn(5, D)
    y, _ = layer(x[None])
    p = torch.softmax(torch.stack([scores_of(layer, t) for t in x]), dim=-1)   # (N, E)
    expected = torch.stack([sum(p[n, i] * expert_out(layer, x[n], i) for i in range(E)) for n in range(5)])
    torch.testing.assert_close(y[0], expected, rtol=1e-4, atol=1e-4)
    if kind == "moe":   # equal weights: the output is just the mean (sum / E) of all experts
        plain_sum = torch.stack([sum(expert_out(layer, x[n], i) for i in range(E)) for n in range(5)])
        torch.testing.assert_close(y[0] * E, plain_sum, rtol=1e-4, atol=1e-4)


def test_plan_dispatch_groups_slots_by_expert():
    experts = torch.tensor([[2, 0], [0, 1], [2, 1], [2, 0]])
    plan = plan_dispatch(experts, 4)
    assert plan.expert.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert plan.token.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]   # stable: token order kept inside a group
    assert plan.counts.tolist() == [3, 2, 3, 0]
    assert plan.offsets.tolist() == [3, 5, 8, 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_row_norms_equal_torch_norm_with_gradients(dtype):
    # AoE's one-pass norm backward against torch's own, including a zero row (subgradient 0 in both)
    torch.manual_seed(0)
    a = torch.randn(64, E, L, dtype=dtype)
    a[1, 2] = 0.0
    a1, a2 = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    n1, n2 = row_norms(a1), torch.linalg.vector_norm(a2, dim=-1)
    assert n1.dtype == n2.dtype == dtype and n1.shape == (64, E)
    assert torch.equal(n1, n2)
    w = torch.randn(64, E, dtype=dtype)
    (n1 * w).sum().backward()
    (n2 * w).sum().backward()
    assert a1.grad.dtype == dtype and (a1.grad[1, 2] == 0).all()
    assert torch.equal(a1.grad, a2.grad)          # bit-equal: training with it is what it was with torch's


def test_gather_rows_equals_indexing_with_repeated_rows():
    # index_select's backward adds the gradient of every repeat, as x[index]'s does
    x1 = torch.randn(6, D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    index = torch.tensor([3, 0, 3, 5, 3, 1])
    y1, y2 = gather_rows(x1, index), x2[index]
    torch.testing.assert_close(y1, y2)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_aoe_aux_loss_gradient_equals_plain_autograd():
    # the aux loss reaches EVERY expert's W_down through the norms (row_norms' backward); a copy of the
    # layer scoring with torch's norm and plain indexing must get the same gradients
    layer = make("aoe", "grouped", aux_loss_coef=0.5)
    x = torch.randn(2, 9, D)
    y, aux = layer(x)
    grads = torch.autograd.grad(y.square().sum() + aux, list(layer.parameters()))
    a = (x.view(-1, D) @ layer.w_down).view(-1, E, L)
    r = route(torch.linalg.vector_norm(a, dim=-1), K, layer.renormalize)
    torch.testing.assert_close(r.experts, layer.last_routing.experts)
    y_ref = per_token_reference(layer, x.view(-1, D)).view_as(y)
    grads_ref = torch.autograd.grad(y_ref.square().sum() + 0.5 * load_balance_loss(r), list(layer.parameters()))
    for (name, _), g, g_ref in zip(layer.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_routing_statistics_match_the_paper_definitions():
    layer = make("aoe")
    layer(torch.randn(2, 20, D))
    s = routing_stats(layer.last_routing)
    f = torch.tensor(s["load"])
    assert f.sum().item() == pytest.approx(1.0)
    assert s["ent_load"] == pytest.approx(-(f * f.clamp_min(1e-12).log()).sum().item(), rel=1e-5)
    assert 0 < s["ent_load"] <= math.log(E) + 1e-6 and s["max_ent"] == pytest.approx(math.log(E))
    p = layer.last_routing.probs
    assert s["ent_conf"] == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-5)
    # perfectly balanced routing: Ent_load = log E, CV = 0
    experts = torch.arange(E * 2).view(E, 2) % E
    even = routing_stats(Routing(torch.zeros(E, E), torch.full((E, E), 1 / E), torch.ones(E, 2), experts))
    assert even["ent_load"] == pytest.approx(math.log(E)) and even["load_cv"] == pytest.approx(0.0)
    assert even["ent_conf"] == pytest.approx(math.log(E))


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_grouped_and_loop_agree_under_bf16_autocast(kind):
    # the grouped path casts to the autocast dtype itself (torch._grouped_mm is not autocast-aware)
    fast, slow = make(kind, "grouped"), make(kind, "loop")
    x = torch.randn(2, 16, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y1, _), (y2, _) = fast(x), slow(x)
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(fast.last_routing.experts, slow.last_routing.experts)
    torch.testing.assert_close(y1.float(), y2.float(), rtol=2e-2, atol=2e-2 * y2.float().abs().max().item())


def test_aoe_gate_preactivation_starts_at_the_scale_of_the_moe():
    # w_up_init_std=None: x W_down W_up has the variance of the MoE's x W_g (aoe.py docstring)
    kw = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=256, d_ffn=512, d_low=32, ffn="aoe")
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    moe = MoE(GPTConfig(**{**kw, "ffn": "moe"}))
    aoe, paper = AoE(GPTConfig(**kw)), AoE(GPTConfig(**kw, w_up_init_std=0.02))
    with torch.no_grad():
        g_moe = (x @ moe.w_g[0]).std().item()
        g_aoe = ((x @ aoe.w_down[:, :32]) @ aoe.w_up[0]).std().item()
        g_paper = ((x @ paper.w_down[:, :32]) @ paper.w_up[0]).std().item()
    assert abs(g_aoe / g_moe - 1) < 0.1
    assert g_paper / g_moe == pytest.approx(0.02 * 32 ** 0.5, rel=0.15)   # the paper's init: sqrt(L)/50


DECODE_LAYERS = {**VARIANT_LAYERS, "moe": ("moe", {}), "aoe": ("aoe", {}),
                 "moe-bf16-scores": ("moe", dict(fp32_scores=False)), "aoe-bf16-scores": ("aoe", dict(fp32_scores=False))}


@pytest.mark.parametrize("name", DECODE_LAYERS)
@pytest.mark.parametrize("n_tokens", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_direct_decode_path_equals_the_sorted_path(name, n_tokens, training, monkeypatch):
    """A decode-sized step without autograd (N*K <= DIRECT_MAX_SLOTS) takes the direct path, and gives the
    sorted path's output, aux loss and routing; neither records bias load (no autograd: not a training step)."""
    kind, kw = DECODE_LAYERS[name]
    layer = make(kind, "grouped", **kw).train(training)
    if layer.expert_bias is not None:
        with torch.no_grad():
            layer.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(5)) * 20)
    x = torch.randn(n_tokens, 1, D)                          # B sequences, one new token each
    with torch.no_grad():
        assert dispatch.resolve_impl(layer.dispatch, x.view(-1, D), layer.top_k) == "direct"
        y, aux = layer(x)
        r = layer.last_routing
        monkeypatch.setattr(dispatch, "DIRECT_MAX_SLOTS", 0)  # the sorted path (grouped_mm), same weights
        y_ref, aux_ref = layer(x)
    r_ref = layer.last_routing
    assert torch.equal(r.experts, r_ref.experts)
    for a, b in ((r.scores, r_ref.scores), (r.probs, r_ref.probs), (r.gates, r_ref.gates), (aux, aux_ref)):
        assert torch.equal(a, b)                             # scoring is the same code: bit-equal
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6 * y_ref.abs().max().item())
    torch.testing.assert_close(y, per_token_reference(layer, x.view(-1, D)).view_as(y), rtol=1e-4, atol=1e-4)
    assert layer.load_counts is None


def test_direct_path_only_without_autograd_and_for_few_slots():
    x = torch.randn(dispatch.DIRECT_MAX_SLOTS // K, D)
    with torch.no_grad():
        assert dispatch.resolve_impl("loop", x, K) == "direct"
        assert dispatch.resolve_impl("grouped", torch.randn(x.shape[0] + 1, D), K) != "direct"
        assert dispatch.resolve_impl("grouped", x) == "grouped"   # no top_k (metrics.py): never direct
    assert dispatch.resolve_impl("grouped", x, K) == "grouped"    # autograd on: training keeps the sorted path


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_direct_path_under_bf16_autocast(kind, monkeypatch):
    layer = make(kind, "grouped")
    x = torch.randn(2, 1, D)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
        experts = layer.last_routing.experts
        monkeypatch.setattr(dispatch, "DIRECT_MAX_SLOTS", 0)
        y_ref, _ = layer(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(experts, layer.last_routing.experts)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2 * y_ref.float().abs().max().item())
