"""What router-MoE and AoE share: top-k gating, dropless dispatch, aux losses, routing statistics.

Both layers end up with a score matrix (N tokens x E experts): router logits for MoE, activation
norms for AoE. Everything after the scores is the same and lives here:

    scores (N, E) --route--> gates (N, K), experts (N, K)
                  --plan---> the N*K token-slots sorted by expert (S = N*K rows, E groups)
                  --grouped_mm--> one matmul per projection over all experts at once
                  --combine--> weighted sum of each token's K expert outputs, back to (N, D)

Shape letters used in comments: N tokens (B*T), E experts, K experts per token (top_k),
S = N*K token-slots, D model width (n_embd), H an expert's hidden width, L AoE rank (d_low).

Scores are computed in fp32 (`scoring_matmul`), as torchtitan's router does: under bf16 autocast a
bf16 matmul would round the scores before top-k, and near-ties would be broken on rounded numbers.
An optional per-expert bias (balance.py, DeepSeek-V3's auxiliary-loss-free balancing) shifts the
top-k choice only; the gates always come from the unbiased scores.

Dispatch is dropless (no capacity factor): every token gets all K of its experts, as in
torchtitan/megablocks. The fast path sorts the slots by expert and runs `torch._grouped_mm`
(one kernel for all experts); the reference path is a plain Python loop over experts.
Tests hold the two equal, and both equal a per-token loop written in the tests.

A decode step (generation with a KV cache) routes one token per sequence: sorting N*K = 2 slots and
launching grouped kernels costs more than the matmuls. Without autograd and with few slots,
`resolve_impl` picks "direct" instead: the slots stay in token order and each one multiplies by its own
expert's matrix, w[e] (a view: no copy, no sort). Tests hold it equal to the other two. It reads the K
chosen ids back to the host (on a GPU, one sync per layer); gathering w[experts] into a (S, D, H) copy
for one batched matmul avoids that, but on this 2-core CPU its copies made the layer no faster than the
sorted path.
"""

from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
import math

import torch
import torch.nn.functional as F

DISPATCH_IMPLS = ("auto", "grouped", "loop")
AUX_REDUCTIONS = ("sum", "mean", "mean/k")   # how a model combines its layers' Eq. 6 terms (aux_coef_per_layer)
# The direct path runs one small matmul per slot, so it pays only while the slots are few. Measured (2 CPU
# threads, D=128, E=4, K=2, no grad; the layer's median time, interleaved): it beats the sorted path at
# N=1 (MoE 135 vs 185 us, AoE 139 vs 168) and N=2, ties at N=3, loses from N=4 (S=8) on. Training
# (autograd on) always takes the sorted path: its backward is what the tests hold to the per-token loop.
DIRECT_MAX_SLOTS = 4


# --------------------------------------------------------------------------- gating

@dataclass
class Routing:
    """The result of scoring + top-k for one forward pass (all tensors have N rows)."""
    scores: torch.Tensor   # (N, E) raw scores: router logits (MoE) or L2 norms (AoE)
    probs: torch.Tensor    # (N, E) fp32 softmax over all E scores
    gates: torch.Tensor    # (N, K) weights of the chosen experts
    experts: torch.Tensor  # (N, K) int64 indices of the chosen experts

    def detach(self) -> "Routing":
        return Routing(*(t.detach() for t in (self.scores, self.probs, self.gates, self.experts)))


def route(scores: torch.Tensor, top_k: int, renormalize: bool = True,
          bias: torch.Tensor | None = None) -> Routing:
    """Softmax over all experts (fp32), keep the top-k, optionally renormalize them to sum to 1.

    Renormalized, this equals Softmax(scores[topK]) of the paper's Alg. 1 (MoE) and Alg. 2 (AoE).
    bias (E,): DeepSeek-V3's balancing bias (balance.py). It decides WHO computes, topK(scores + bias),
    but not how much each output weighs: the gates are still the unbiased softmax at those experts.
    """
    probs = F.softmax(scores.float(), dim=-1)           # (N, E) fp32: exp() of bf16 logits is lossy
    if bias is None:
        gates, experts = probs.topk(top_k, dim=-1)      # (N, K), (N, K)
    else:
        experts = (scores.float() + bias).topk(top_k, dim=-1).indices   # (N, K) choice: biased
        gates = probs.gather(-1, experts)                               # (N, K) weight: unbiased
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return Routing(scores, probs, gates, experts)


# --------------------------------------------------------------------------- dispatch

@dataclass
class DispatchPlan:
    """Where each of the S = N*K token-slots goes, with slots sorted (stably) by expert."""
    token: torch.Tensor    # (S,) token row that each sorted slot reads
    expert: torch.Tensor   # (S,) expert of each sorted slot (non-decreasing)
    slot: torch.Tensor     # (S,) flat index n*K+k of each sorted slot, to pick its gate
    counts: torch.Tensor | None   # (E,) slots per expert (None: the direct plan, slots in token order)
    offsets: torch.Tensor | None  # (E,) int32 cumulative counts: group e is rows offsets[e-1]:offsets[e]
    expert_ids: list[int] | None = None   # the direct plan's `expert` as Python ints

    @property
    def bounds(self) -> list[int]:
        """[0, end_0, end_1, ...] as Python ints, for the reference loop."""
        return [0] + self.offsets.tolist()


def count_per_expert(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many slots each expert got, (E,) int64. Like bincount(minlength=E), but with a static
    output shape, so torch.compile keeps the whole layer in one graph."""
    return flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))


def plan_dispatch(experts: torch.Tensor, n_experts: int, impl: str = "grouped") -> DispatchPlan:
    """Sort the (N, K) expert choices into contiguous per-expert groups (impl 'direct': keep token order)."""
    N, K = experts.shape
    flat = experts.reshape(-1)                                 # (S,)
    if impl == "direct":                                       # slot n*K+k stays at row n*K+k
        slot = torch.arange(flat.shape[0], device=flat.device)
        return DispatchPlan(token=slot // K, expert=flat, slot=slot, counts=None, offsets=None,
                            expert_ids=flat.tolist())
    slot = torch.argsort(flat, stable=True)                    # (S,) stable: tokens keep their order
    counts = count_per_expert(flat, n_experts)                 # (E,)
    offsets = torch.cumsum(counts, dim=0).to(torch.int32)      # (E,)
    return DispatchPlan(token=slot // K, expert=flat[slot], slot=slot, counts=counts, offsets=offsets)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0.   x (N, C), index (S,) -> (S, C).

    Written as index_select because of its backward: an index_add_, where x[index]'s backward is an
    accumulating index_put_ that on CPU took 8x as long for the (S, D) token rows (issue 12's profile)."""
    return x.index_select(0, index)


class _RowNorms(torch.autograd.Function):
    """||v|| over the last dim, with a two-pass backward: grad_v = grad * (v / ||v||).

    torch's own backward computes the same expression in the same order (so training is bit-for-bit what
    it was with `a.norm(dim=-1)`), plus a masked_fill over the whole input for zero norms; for AoE's
    (N, E, L) cache that pass and its temporary were a visible share of the layer (issue 12). Here a zero
    norm is clamped to the smallest normal float instead: 0 / tiny = 0, the same subgradient 0.
    Tests hold values and gradients bit-equal to torch.linalg.vector_norm's."""

    @staticmethod
    def forward(ctx, a):
        norms = torch.linalg.vector_norm(a, dim=-1)
        ctx.save_for_backward(a, norms)
        return norms

    @staticmethod
    def backward(ctx, grad):
        a, norms = ctx.saved_tensors
        unit = a / norms.clamp_min(torch.finfo(norms.dtype).tiny).unsqueeze(-1)   # v / ||v||, 0 where v = 0
        return grad.unsqueeze(-1) * unit


def row_norms(a: torch.Tensor) -> torch.Tensor:
    """L2 norms over the last dim, e.g. AoE's scores ||a_i||.   (..., L) -> (...)
    Without autograd, torch's norm itself (the same kernel, without the Function's bookkeeping)."""
    return _RowNorms.apply(a) if torch.is_grad_enabled() else torch.linalg.vector_norm(a, dim=-1)


@lru_cache(maxsize=None)
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm exists and runs on this device type and dtype.

    It is a private op whose coverage changes between releases (CPU fp32 and bf16 run in 2.13;
    CUDA wants bf16 on sm90+), so we ask it once by calling it rather than by version checks."""
    device = device_type
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.zeros(2, 8, device=device, dtype=dtype)
        w = torch.zeros(2, 8, 8, device=device, dtype=dtype)
        torch._grouped_mm(x, w, offs=torch.tensor([1, 2], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: the autocast dtype when autocast is on, else x's own."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def scoring_matmul(x: torch.Tensor, w: torch.Tensor, fp32: bool = True) -> torch.Tensor:
    """x @ w for expert scores.   x (N, I), w (I, O) -> (N, O).

    fp32=True: autocast off and both operands in fp32, as torchtitan's router computes its logits, so
    which experts win is decided on unrounded scores. fp32=False: the compute dtype, i.e. what autocast
    would do anyway (kept to measure what fp32 scoring costs, see bench.py)."""
    dt = torch.float32 if fp32 else compute_dtype(x)
    off = torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext()
    with off:
        return x.to(dt) @ w.to(dt)


def resolve_impl(impl: str, x: torch.Tensor, top_k: int | None = None) -> str:
    """'auto' -> 'grouped' where torch._grouped_mm runs for x's device and compute dtype, else 'loop'.
    Under torch.compile, 2.13's tracer accepts _grouped_mm in bf16 only, so fp32 takes the loop.
    Any impl -> 'direct' for a decode-sized step: no autograd and N*top_k <= DIRECT_MAX_SLOTS."""
    if impl not in DISPATCH_IMPLS:
        raise ValueError(f"dispatch={impl!r} is not one of {DISPATCH_IMPLS}")
    if top_k is not None and not torch.is_grad_enabled() and x.shape[0] * top_k <= DIRECT_MAX_SLOTS:
        return "direct"
    if impl == "auto":
        dtype = compute_dtype(x)
        if torch.compiler.is_compiling():   # no probing inside a trace: decide from the dtype alone
            ok = dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
        else:
            ok = grouped_mm_available(x.device.type, dtype)
        return "grouped" if ok else "loop"
    return impl


def grouped_mm(x: torch.Tensor, w: torch.Tensor, plan: DispatchPlan, impl: str) -> torch.Tensor:
    """y[rows of group e] = x[rows of group e] @ w[e].   x (S, I), w (E, I, O) -> (S, O)."""
    if impl == "direct":   # row s @ w[its expert]: a view, no copy (matmul casts under autocast)
        return torch.cat([x[s:s + 1] @ w[e] for s, e in enumerate(plan.expert_ids)], dim=0)
    if impl == "grouped":
        # _grouped_mm is not autocast-aware: cast both operands to the compute dtype ourselves.
        # Its backward wants dense strides; .contiguous() is free when they already are.
        dt = compute_dtype(x)
        return torch._grouped_mm(x.to(dt).contiguous(), w.to(dt), offs=plan.offsets)
    # Reference path: one plain matmul per expert.
    b = plan.bounds
    return torch.cat([x[b[e]:b[e + 1]] @ w[e] for e in range(w.shape[0])], dim=0)


def combine(y: torch.Tensor, gates: torch.Tensor, plan: DispatchPlan, n_tokens: int) -> torch.Tensor:
    """out[n] = sum_k gates[n, k] * y[slot of (n, k)].   y (S, D), gates (N, K) -> (N, D)."""
    if plan.offsets is None:   # direct plan: slot n*K+k is row n*K+k, so sum a (N, K, D) view over K
        return (y.float().view(n_tokens, -1, y.shape[-1]) * gates.unsqueeze(-1)).sum(1).to(y.dtype)
    w = gates.reshape(-1)[plan.slot]                           # (S,) fp32 gate of each sorted slot
    out = y.new_zeros(n_tokens, y.shape[-1], dtype=torch.float32)  # (N, D) sum in fp32, then cast
    return out.index_add_(0, plan.token, y.float() * w[:, None]).to(y.dtype)


def swiglu_experts(x: torch.Tensor, g: torch.Tensor, w_p: torch.Tensor, w_o: torch.Tensor,
                   plan: DispatchPlan, impl: str) -> torch.Tensor:
    """The rest of Eq. 1 once the SiLU branch's pre-activation g is known:
    (SiLU(g) * (x W_p)) W_o, per slot with its own expert's weights.   x (S, D), g (S, H) -> (S, D)."""
    h = F.silu(g) * grouped_mm(x, w_p, plan, impl)             # (S, H)
    return grouped_mm(h, w_o, plan, impl)                      # (S, D)


# --------------------------------------------------------------------------- losses

def expert_fraction(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """f_i of Eq. 6: fraction of tokens that have expert i among their top-k. Sums to K.  (E,)"""
    return count_per_expert(experts.reshape(-1), n_experts).float() / experts.shape[0]


def load_balance_loss(r: Routing) -> torch.Tensor:
    """Eq. 6 without alpha: n * sum_i f_i * P_i  (f from the top-k choice, P = mean softmax).

    f is a count (no gradient); the gradient flows through P into the router logits (MoE) or the
    norms and hence W_down (AoE). With f summing to K, perfect balance (f_i = K/n, P_i = 1/n)
    gives exactly K; any imbalance that the probabilities follow gives more.
    """
    E = r.probs.shape[-1]
    f = expert_fraction(r.experts, E)                          # (E,)
    P = r.probs.mean(dim=0)                                    # (E,)
    return E * (f * P).sum()


def aux_coef_per_layer(alpha: float, reduce: str, n_expert_layers: int, top_k: int) -> float:
    """The weight of one layer's Eq. 6 term, so that the model's aux loss (the sum of its layers' terms) is

        "sum"     alpha * sum_l  n sum_i f_i P_i      f sums to K; perfect balance gives alpha * K * L
        "mean"    alpha * mean_l n sum_i f_i P_i      perfect balance gives alpha * K, whatever the depth
        "mean/k"  alpha * mean_l n sum_i (f_i/K) P_i  f sums to 1; perfect balance gives alpha

    The paper (Eq. 6, alpha = 0.01) defines one layer's term. How the others combine their layers:
    - The AoE authors' released PyTorch layer (trestad/Autonomy-of-Experts, moe.py at commit 280e2276,
      deleted later) returns n sum_i f_i P_i per layer with f summing to K, our term; the code that adds the
      layers up (their internal "mirage" package) was never released, so their reduction is unknown.
    - Hugging Face Mixtral (load_balancing_loss_func) concatenates every layer's logits and computes one
      n sum_i mean_l(f_i) mean_l(P_i), f summing to K: about "mean" (it differs by a covariance over
      layers, so one layer's imbalance can offset another's; we do not copy that).
    - megablocks (batched_load_balancing_loss), which the authors' fast AoE version is built on, divides
      by the number of layers and by K: "mean/k".
    Our default is "mean": the authors' per-layer term, with the depth normalization that both libraries
    their code derives from apply, so alpha means the same at 2 layers and at 24. Before Dec 2026 minimoe
    used "sum" (2x "mean" at 2 expert layers, 12x at 12).
    """
    if reduce not in AUX_REDUCTIONS:
        raise ValueError(f"aux_loss_reduce={reduce!r} is invalid: allowed values are {AUX_REDUCTIONS}")
    if reduce == "sum":
        return alpha
    return alpha / n_expert_layers / (top_k if reduce == "mean/k" else 1)


def aux_losses(r: Routing, aux_coef: float, z_coef: float) -> torch.Tensor:
    """alpha * Eq. 6 + z_coef * z-loss, each term computed only when its coefficient is non-zero (the
    bias-balanced variants run with alpha = 0, and z-loss is off by default): a () fp32 tensor."""
    aux = r.probs.new_zeros(())
    if aux_coef:
        aux = aux + aux_coef * load_balance_loss(r)
    if z_coef:
        aux = aux + z_coef * z_loss(r)
    return aux


def z_loss(r: Routing) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-sum-exp of the scores; keeps logits small."""
    return torch.logsumexp(r.scores.float(), dim=-1).square().mean()


# --------------------------------------------------------------------------- statistics

def load_entropy(load) -> float:
    """Ent_load (Eq. 7) in nats: -sum_i f_i log f_i of the per-expert load f (a share, or counts,
    which are normalized to sum to 1; an expert with no tokens adds 0). 0 when one expert takes
    every token, log E (the max_ent the statistics report next to it) when all E take the same.
    The one place this is computed: routing_summary calls it for every routing statistic."""
    f = torch.as_tensor(load, dtype=torch.float64).reshape(-1)            # (E,)
    if f.numel() == 0 or not torch.isfinite(f).all() or (f < 0).any():
        raise ValueError(f"load must be E >= 1 finite, non-negative shares or counts, got {f.tolist()[:8]}")
    total = f.sum()
    if total == 0:                           # no tokens routed yet: nothing is unbalanced
        return 0.0
    f = f / total
    return float(-(f * f.clamp_min(1e-300).log()).sum())


def routing_summary(load: torch.Tensor, ent_conf: float | None = None) -> dict:
    """The paper's per-layer statistics from the load share f (E,) (summing to 1) and the mean
    Ent_conf, as Python floats/lists: load, ent_load (Eq. 7, load_entropy), ent_conf (Eq. 8; left out
    when None), load_cv (coefficient of variation of f; 0 = perfect balance), max_ent = log E.
    The one place they are put together: routing_stats (one forward), train.estimate_loss (averaged
    over the val batches) and metrics (a scoring rule's choices) call it."""
    out = {"load": load.tolist(), "ent_load": load_entropy(load)}
    if ent_conf is not None:
        out["ent_conf"] = ent_conf
    return {**out, "load_cv": (load.std(unbiased=False) / load.mean()).item(), "max_ent": math.log(load.numel())}


def routing_stats(r: Routing) -> dict:
    """The paper's per-layer statistics for one forward pass (routing_summary):

    load:      f normalized to sum to 1 (share of token-slots per expert)
    ent_load:  Eq. 7, load_entropy(f) in nats; max_ent = log(E) at perfect balance
    ent_conf:  Eq. 8, -sum p log p of the softmax over all E scores, averaged over tokens;
               lower = experts (or router) more confident about who should take the token
    load_cv:   coefficient of variation of the per-expert load (0 = perfect balance)
    """
    E = r.probs.shape[-1]
    counts = count_per_expert(r.experts.reshape(-1), E).float()
    p = r.probs.float()
    ent_conf = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    return routing_summary(counts / counts.sum(), ent_conf.item())
