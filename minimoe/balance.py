"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, §2.1.2), for MoE and AoE alike.

Each expert layer keeps a bias b (E,): a persistent buffer (saved with the model) with no gradient.
It is added to the scores for the top-k CHOICE only; the gate weights come from the unbiased scores:

    I   = topK(s + b)                    who computes                         (N, K)
    g   = Softmax(s)[I] (renormalized)   how much each chosen output weighs   (N, K)

s are the router logits (MoE) or the norms ||x W_down^i|| (AoE). After every optimizer step, with
c_i the token-slots expert i took during that step (summed over its micro-steps and, under DDP, over
all ranks, so every rank keeps the same b):

    b_i <- b_i + gamma * sign(mean(c) - c_i)        overloaded experts lose, idle experts gain

No gradient ever flows into b, and no loss term competes with the language-model loss (the point of
"auxiliary-loss-free"). gamma is `GPTConfig.bias_update_rate` (DeepSeek-V3 used 0.001).
"""

import torch

from .dispatch import count_per_expert


def init_expert_bias(layer: torch.nn.Module, n_experts: int, rate: float) -> None:
    """Give `layer` its bias buffer (only when rate > 0, so older checkpoints load unchanged)."""
    layer.bias_update_rate = rate
    layer.register_buffer("expert_bias", torch.zeros(n_experts) if rate > 0 else None)  # persistent: resume is exact
    layer.load_counts = None   # (E,) int64 slots per expert since the last update; a plain attribute,
    #                            not a buffer, so DDP's buffer broadcast never overwrites a rank's own counts


def record_load(layer: torch.nn.Module, experts: torch.Tensor) -> None:
    """Add this forward's per-expert slot counts to `layer.load_counts` (training forwards only)."""
    if layer.expert_bias is None or not layer.training or not torch.is_grad_enabled():
        return
    counts = count_per_expert(experts.detach().reshape(-1), layer.expert_bias.numel())   # (E,)
    layer.load_counts = counts if layer.load_counts is None else layer.load_counts + counts


def bias_step(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """The update: bias + rate * sign(mean(counts) - counts).   bias, counts (E,) -> (E,)"""
    c = counts.to(torch.float64)              # exact for any count a run can reach
    return bias + rate * torch.sign(c.mean() - c).to(bias.dtype)


@torch.no_grad()
def update_biases(layers, all_reduce=None) -> int:
    """Apply `bias_step` to every layer that has a bias and saw tokens, then reset its counts.

    all_reduce: None (one process) or an in-place sum over ranks (torch.distributed.all_reduce); the
    counts of all layers go in ONE call. Returns how many layers were updated."""
    layers = [m for m in layers if getattr(m, "expert_bias", None) is not None]
    for m in layers:   # a layer with no training forward this step counts zeros (same on every rank)
        if m.load_counts is None:
            m.load_counts = torch.zeros(m.expert_bias.numel(), dtype=torch.int64, device=m.expert_bias.device)
    if not layers:
        return 0
    counts = torch.stack([m.load_counts for m in layers])        # (layers, E) int64
    if all_reduce is not None:
        all_reduce(counts)
    for m, c in zip(layers, counts):
        m.expert_bias.copy_(bias_step(m.expert_bias, c, m.bias_update_rate))
        m.load_counts = None
    return len(layers)
