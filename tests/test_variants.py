"""Who picks the experts: the aux-loss-free balancing bias (DeepSeek-V3), the ERC loss (arXiv 2512.23447),
the AoE paper's Table 2 controls, fp32 scores, and the named variants, each against a plain reference
written here. (The variants' layer outputs against a per-token loop are in test_layers.py.)"""

import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt
import train_small
from minimoe.balance import bias_step, update_biases
from minimoe.dispatch import route, routing_stats
from minimoe.erc import erc_activation_norms, erc_loss, erc_noise_bound, erc_penalty, erc_proxies
from minimoe.model import GPT, GPTConfig
from minimoe.router import mlp_router_width
from minimoe.train import train
from minimoe.variants import VARIANTS, variant_config, variants_help
from test_layers import D, E, K, make, scores_of
from test_train import CORPUS, fast, tiny
from test_train_gpt import FAST, cache, make_shards  # noqa: F401  (cache: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- balancing bias

def test_route_chooses_by_biased_scores_and_weighs_by_unbiased_ones():
    torch.manual_seed(0)
    scores, bias = torch.randn(50, E), torch.randn(E)
    r = route(scores, K, renormalize=True, bias=bias)
    for n in range(50):   # plain reference, one token at a time
        chosen = sorted(torch.argsort(scores[n] + bias, descending=True)[:K].tolist())
        assert sorted(r.experts[n].tolist()) == chosen
        p = torch.softmax(scores[n], dim=-1)[r.experts[n]]
        torch.testing.assert_close(r.gates[n], p / p.sum())
    assert not torch.equal(r.experts, route(scores, K).experts)   # the bias did change choices


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_bias_is_a_saved_buffer_without_gradient_and_counts_only_training_forwards(kind):
    layer = make(kind, bias_update_rate=0.1)
    assert "expert_bias" in layer.state_dict() and all(p is not layer.expert_bias for p in layer.parameters())
    x1, x2 = torch.randn(2, 9, D), torch.randn(1, 5, D)
    y, aux = layer(x1)
    c1 = torch.bincount(layer.last_routing.experts.flatten(), minlength=E)
    (y.square().sum() + aux).backward()
    assert layer.expert_bias.grad is None and not layer.expert_bias.requires_grad
    layer(x2)
    c2 = torch.bincount(layer.last_routing.experts.flatten(), minlength=E)
    layer.eval()
    layer(torch.randn(4, 8, D))                   # evaluation forwards do not count
    layer.train()
    with torch.no_grad():
        layer(torch.randn(4, 8, D))               # nor do forwards without gradients (sampling)
    assert layer.load_counts.tolist() == (c1 + c2).tolist()
    before = layer.expert_bias.clone()
    assert update_biases([layer]) == 1 and layer.load_counts is None
    c = (c1 + c2).double()
    torch.testing.assert_close(layer.expert_bias, before + 0.1 * torch.sign(c.mean() - c).float())


def test_bias_update_equals_the_formula_on_a_hand_made_load():
    bias = torch.tensor([0.5, -0.25, 0.0, 0.125])
    counts = torch.tensor([5, 1, 3, 3])           # mean 3: expert 0 over, 1 under, 2 and 3 exact
    assert bias_step(bias, counts, 0.01).tolist() == pytest.approx([0.49, -0.24, 0.0, 0.125])


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_bias_balances_a_deliberately_skewed_layer(kind):
    layer = make(kind, bias_update_rate=0.05, aux_loss_coef=0.0)
    x = torch.randn(1, 256, D) + 1.0          # every token shares a direction (all ones) ...
    with torch.no_grad():   # ... along which experts 0 and 1 score high
        if kind == "moe":
            layer.router.weight[:2] += 0.1
        else:
            layer.w_down[:, :2 * layer.d_low] *= 3
    layer(x)
    before = routing_stats(layer.last_routing)["ent_load"]
    for _ in range(200):    # weights frozen: only the bias moves
        layer(x)
        update_biases([layer])
    layer(x)
    after = routing_stats(layer.last_routing)["ent_load"]
    assert before < 0.75 * math.log(E) and after > 0.97 * math.log(E), (before, after)


def test_resume_with_a_balancing_bias_is_exact(tmp_path):
    model = tiny("moe", bias_update_rate=0.01, aux_loss_coef=0.0)
    cfg = fast(tmp_path / "full", max_iters=6, eval_interval=3)
    full = train(model, cfg, corpus=CORPUS)
    part = replace(cfg, out_dir=str(tmp_path / "part"), max_iters=3)
    train(model, part, corpus=CORPUS)
    resumed = train(model, replace(part, max_iters=6, init_from="resume"), corpus=CORPUS)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    bias = a["blocks.0.ffn.expert_bias"]
    steps = bias / 0.01
    assert bias.abs().sum() > 0 and (steps - steps.round()).abs().max() < 1e-4   # whole steps of gamma


def test_two_ranks_keep_the_same_bias_as_one_process_with_accumulation(tmp_path):
    data = make_shards(tmp_path / "shards")
    common = ["--preset=tiny-moe", f"--data={data}", *FAST, "--eval_interval=3", "--lr_decay_iters=6",
              "--total_batch_tokens=256", "--max_iters=6", "--bias_update_rate=0.01", "--aux_loss_coef=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_gpt.py", *common, f"--out_dir={tmp_path / 'ddp'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    single = train_gpt.main([*common, f"--out_dir={tmp_path / 'one'}"])
    assert json.loads((tmp_path / "one" / "config.json").read_text())["resolved"]["grad_accum_steps"] == 2
    saved = torch.load(tmp_path / "ddp" / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    mine = single["model"].state_dict()
    biases = [k for k in mine if k.endswith("expert_bias")]
    assert biases
    for k in biases:   # integer counts, summed in the same groups: the bias is identical, not just close
        assert torch.equal(saved[k], mine[k]), (k, saved[k], mine[k])
        assert mine[k].abs().sum() > 0


# --------------------------------------------------------------------------- ERC loss

def erc_reference(R, W_g, alpha, u):
    """arXiv 2512.23447 §3 written pair by pair, with the uniform draws u (n, d) in [0, 1) given."""
    n = R.shape[0]
    eps = [min((R[i] - R[j]).norm() for j in range(n) if j != i) / (2 * R[i].norm()) for i in range(n)]
    proxy = [R[i] * (1 - eps[i] + 2 * eps[i] * u[i]) for i in range(n)]   # delta ~ U(1 - eps, 1 + eps)
    M = [[(proxy[i] @ W_g[j]).norm() for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if j != i:
                total = total + max(M[i][j] - alpha * M[i][i], 0) + max(M[j][i] - alpha * M[i][i], 0)
    return total / n ** 2


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_erc_loss_equals_the_paper_pair_by_pair(alpha):
    torch.manual_seed(0)
    R, W_g = torch.randn(E, D), torch.randn(E, D, 12)
    torch.manual_seed(1)
    loss = erc_loss(R, W_g, None, alpha)
    torch.manual_seed(1)
    expected = erc_reference(R, W_g, alpha, torch.rand(E, D))
    assert loss.item() > 0
    torch.testing.assert_close(loss, expected)
    # factorized W_g (moe-lowrank): the same loss as the product W_down W_up
    W_down, W_up = torch.randn(E, D, 5), torch.randn(E, 5, 12)
    torch.manual_seed(2)
    a = erc_loss(R, W_down, W_up, alpha)
    torch.manual_seed(2)
    torch.testing.assert_close(a, erc_loss(R, W_down @ W_up, None, alpha))


def test_erc_noise_stays_inside_each_cluster():
    torch.manual_seed(0)
    R = torch.randn(E, D)
    for _ in range(20):
        proxy, eps = erc_proxies(R)
        ratio = proxy / R                                                    # delta (n, d)
        assert ((ratio - 1).abs() <= eps[:, None] + 1e-6).all()
        assert (torch.cdist(proxy, R).argmin(dim=1) == torch.arange(E)).all()  # nearest centre: its own
    for i in range(E):
        d = min((R[i] - R[j]).norm() for j in range(E) if j != i)
        assert erc_noise_bound(R)[i].item() == pytest.approx((d / (2 * R[i].norm())).item(), rel=1e-5)


def test_erc_loss_is_zero_when_the_margins_hold():
    # router rows = basis vectors, W_g^j responds only along e_j: M is diagonal, whatever the noise
    R = torch.eye(E, D) * 2.0
    W_g = torch.zeros(E, D, 6)
    for j in range(E):
        W_g[j, j] = torch.randn(6)
    assert erc_loss(R, W_g, None, 1.0).item() == 0.0
    M = torch.tensor([[3.0, 1.0], [0.5, 2.0]])       # hand-made: every margin holds at alpha 1
    assert erc_penalty(M, 1.0).item() == 0.0
    # at alpha 0.25 (alpha M[0,0] = 0.75, alpha M[1,1] = 0.5) two of the four break:
    # M[0,1] = 1 > 0.75 (proxy 0 excites expert 1) and M[0,1] = 1 > 0.5 (expert 1 answers proxy 0)
    assert erc_penalty(M, 0.25).item() == pytest.approx(((1 - 0.75) + (1 - 0.5)) / 4)


@pytest.mark.parametrize("gate", ["full", "lowrank"])
def test_erc_in_the_layer_reaches_router_rows_and_expert_gates(gate):
    layer = make("moe", aux_loss_coef=0.0, erc_loss_coef=0.5, erc_alpha=1.0, expert_gate=gate)
    x = torch.randn(1, 6, D)
    torch.manual_seed(3)
    _, aux = layer(x)
    torch.manual_seed(3)
    expected = 0.5 * erc_loss(layer.router.weight, *layer.gate_weights(), alpha=1.0)
    torch.testing.assert_close(aux, expected)
    assert aux.item() > 0
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    for w in layer.gate_weights():
        if w is not None:
            assert w.grad.abs().sum() > 0
    layer.eval()
    assert layer(x)[1].item() == 0.0            # evaluation: no ERC (and no noise)
    n, h = E, layer.w_p.shape[2]
    widths = [h] if gate == "full" else [layer.w_down.shape[2], h]
    dims = [D, *widths]
    assert layer.flops_per_forward_extra() == 6 * n * n * sum(a * b for a, b in zip(dims, dims[1:]))


def test_model_reports_erc_flops_per_step_not_per_token():
    base = tiny("moe")
    plain, erc = GPT(base), GPT(replace(base, erc_loss_coef=1.0))
    assert erc.flops_per_token() == plain.flops_per_token() and plain.flops_per_step_extra() == 0
    per_layer = 6 * base.n_experts ** 2 * base.n_embd * base.ffn_dim
    assert erc.flops_per_step_extra(accum_steps=3) == 3 * base.n_layer * per_layer


# --------------------------------------------------------------------------- Table 2 controls

def test_table2_controls_have_the_parameters_the_paper_states():
    base = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128, n_experts=8, top_k=2, d_ffn=256)
    moe, aoe, low, big = (GPT(variant_config(v, base)).blocks[0].ffn
                          for v in ("moe", "aoe", "moe-lowrank", "moe-bigrouter"))
    count = lambda m, pre="": sum(p.numel() for n, p in m.named_parameters() if n.startswith(pre))  # noqa: E731
    D, E_, L = base.n_embd, base.n_experts, base.low_dim
    # factorized W_g: exactly AoE's experts (same d_low, d_wide from Eq. 5), plus the MoE's router
    assert count(low) - count(low, "router") == count(aoe)
    assert count(low, "router") == count(moe, "router") == D * E_
    assert abs(count(low) / count(moe) - 1) < 0.01                  # Eq. 5: the MoE's total parameters
    # large router: as many parameters as AoE's W_down (up to rounding its width to a multiple of 8)
    assert abs(count(big, "router") / aoe.w_down.numel() - 1) < 0.02 and aoe.w_down.numel() == D * E_ * L
    assert count(big) - count(big, "router") == count(moe) - count(moe, "router")   # experts unchanged
    assert mlp_router_width(D, E_, L) * (D + E_) == count(big, "router")
    # active parameters: the whole router, K experts
    assert big.active_params() == count(big, "router") + 2 * (count(moe) - count(moe, "router")) // E_


# --------------------------------------------------------------------------- fp32 scores

@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_under_bf16_autocast_the_choice_is_the_choice_of_fp32_scores(kind):
    torch.manual_seed(0)
    layer = make(kind, n_experts=8)
    with torch.no_grad():   # crowd the scores together: many near-ties that bf16 would round apart
        if kind == "moe":
            layer.router.weight.mul_(0.01).add_(layer.router.weight[:1].clone())
        else:
            layer.w_down.mul_(0.1)
    x = torch.randn(1, 2048, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    chosen = layer.last_routing.experts
    assert layer.last_routing.scores.dtype == torch.float32
    with torch.no_grad():   # plain reference in fp64, one token at a time
        s = torch.stack([scores_of(copy.deepcopy(layer).double(), t) for t in x[0].double()])   # (N, E)
    top = s.topk(K + 1, dim=-1)
    ref = top.indices[:, :K]
    decidable = (top.values[:, K - 1] - top.values[:, K]) > 1e-5 * top.values[:, 0].abs()  # fp32 can tell
    assert decidable.float().mean() > 0.99
    assert torch.equal(chosen.sort(-1).values[decidable], ref.sort(-1).values[decidable])
    # the control: scoring in the compute dtype (fp32_scores=False) breaks some of those near-ties
    bf16 = make(kind, n_experts=8, fp32_scores=False)
    bf16.load_state_dict(layer.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16(x)
    assert not torch.equal(bf16.last_routing.experts.sort(-1).values[decidable], ref.sort(-1).values[decidable])


# --------------------------------------------------------------------------- configs and scripts

@pytest.mark.parametrize("kw, match", [
    (dict(ffn="aoe", erc_loss_coef=1.0), r"GPTConfig.erc_loss_coef=1.0 is invalid: needs ffn='moe'"),
    (dict(ffn="aoe", router="mlp"), r"GPTConfig.router='mlp' is invalid: needs ffn='moe'"),
    (dict(ffn="aoe", expert_gate="lowrank"), r"GPTConfig.expert_gate='lowrank' is invalid: needs ffn='moe'"),
    (dict(ffn="moe", router="mlp", erc_loss_coef=1.0), r"erc_loss_coef=1.0 is invalid: needs router='linear'"),
    (dict(ffn="dense", bias_update_rate=0.01), r"bias_update_rate=0.01 is invalid: needs experts"),
    (dict(ffn="moe", bias_update_rate=-1.0), r"bias_update_rate=-1.0 is invalid: must be a finite number in \[0, 1\]"),
    (dict(ffn="moe", erc_alpha=-0.5), r"erc_alpha=-0.5 is invalid: must be a finite number in \[0, 1e3\]"),
    (dict(ffn="moe", router="big"), r"GPTConfig.router='big' is invalid: allowed values are \('linear', 'mlp'\)"),
    (dict(ffn="moe", expert_gate="svd"), r"expert_gate='svd' is invalid: allowed values are \('full', 'lowrank'\)"),
])
def test_impossible_combinations_raise_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        tiny(**kw)
    assert "\n" not in str(e.value)


def test_every_variant_trains_from_train_small_and_is_listed_in_help(tmp_path, capsys):
    import textwrap
    data = tmp_path / "code.py"
    data.write_text(Path(textwrap.__file__).read_text())
    with pytest.raises(SystemExit):
        train_small.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in VARIANTS) and variants_help() in out
    tiny_args = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--d_ffn=32", "--batch_size=4",
                 "--eval_iters=1", "--eval_interval=2", "--max_iters=2", "--warmup_iters=1", "--sample_tokens=0",
                 "--progress=false", "--device=cpu", "--threads=1", f"--data={data}", f"--out_dir={tmp_path / 'o'}"]
    for name in VARIANTS:
        assert train_small.main([*tiny_args, f"--model={name}"]) == 0, name
        log = [json.loads(s) for s in (tmp_path / "o" / name / "log.jsonl").read_text().splitlines()]
        assert log[-1]["iter"] == 2 and math.isfinite(log[-1]["val_loss"])


def test_variant_fields_are_flags_of_train_gpt(tmp_path):
    data = make_shards(tmp_path / "shards")
    r = train_gpt.main(["--preset=tiny-moe", f"--data={data}", *FAST, "--max_iters=3", "--router=mlp",
                        "--expert_gate=lowrank", "--bias_update_rate=0.01", f"--out_dir={tmp_path / 'o'}"])
    ffn = r["model"].blocks[0].ffn
    assert ffn.router.w_in is not None and ffn.w_g is None and ffn.expert_bias.abs().sum() > 0
