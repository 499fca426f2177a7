"""Autonomy-of-Experts (the paper's Eq. 3 and Alg. 2): no router; experts rank themselves.

Each expert's gate weight is factorized, W_g^i = W_down^i W_up^i (D x L times L x W, L = d_low).
All W_down^i sit side by side in one (D, E*L) matrix, so ONE matmul gives every expert's
low-rank activation a_i = x W_down^i. An expert that "recognizes" the token produces a large
activation, so the norm ||a_i|| is its own vote:

    a = x [W_down^1 ... W_down^E]   (N, E, L)   all experts start, cheaply (rank L)
    I = topK(softmax(||a_i||))      (N, K)      the experts with the largest activation norms
    y = sum_{i in I} g_i (SiLU(a_i W_up^i) * x W_p^i) W_o^i     reusing a_i: no work is redone

Compared with moe.py only the scoring changes (norms of a_i instead of router logits) and the
SiLU branch starts from the cached a_i instead of x. Unselected experts stop after W_down.
d_wide (W) is chosen so an AoE layer has as many parameters as the MoE layer (Eq. 5).

Initialization (our departure from the paper's plain normal(0, 0.02) everywhere): the SiLU branch
starts from a W_g that is now a product of two factors. With both at std 0.02 the pre-activation
x W_down W_up has std 0.02*sqrt(D) * 0.02*sqrt(L), sqrt(L)/50 times that of an MoE's x W_g: 8x
smaller at D=128, L=40 (3x at the paper's D=768, L=256), and small models then learn far slower
(train_small: val 2.25 vs 1.82 nats after 250 steps). Drawing W_up with std 1/sqrt(L) gives
x W_down W_up exactly the variance of the MoE's x W_g. `w_up_init_std=0.02` restores the paper's.

Scores in fp32 (issue 12, as torchtitan's router): under bf16 autocast x W_down is computed in fp32,
its norms rank the experts, and the cached a_i is cast to the compute dtype before it feeds W_up.
bias_update_rate > 0 adds DeepSeek-V3's aux-loss-free balancing bias to the norms for the choice
only (balance.py). ERC and the Table 2 controls need a router: they are MoE options (moe.py).
"""

import math

import torch
import torch.nn as nn

from . import init
from .balance import init_expert_bias, record_load
from .dispatch import (Routing, aux_coef_per_layer, aux_losses, combine, compute_dtype, gather_rows, grouped_mm,
                       plan_dispatch, resolve_impl, route, row_norms, scoring_matmul, swiglu_experts)


def d_wide_for_matched_params(n_embd: int, d_ffn: int, d_low: int, multiple_of: int = 8) -> int:
    """Eq. 5: d_wide = (3 D d_ffn - L D) / (L + 2 D), rounded to a multiple of 8 (kernel alignment).

    Then L*D + L*W + 2*D*W ~= 3*D*d_ffn: an AoE expert has the parameters of an MoE expert
    (the MoE's small router, D*E, is not matched; it is well under 1% of the layer).
    """
    exact = (3 * n_embd * d_ffn - d_low * n_embd) / (d_low + 2 * n_embd)
    return max(multiple_of, int(round(exact / multiple_of)) * multiple_of)


class AoE(nn.Module):

    def __init__(self, config):
        super().__init__()
        D, E, L, W = config.n_embd, config.n_experts, config.low_dim, config.wide_dim
        self.n_experts, self.top_k, self.d_low = E, config.top_k, L
        self.renormalize = config.norm_topk
        self.aux_loss_coef = aux_coef_per_layer(config.aux_loss_coef, config.aux_loss_reduce, config.n_expert_layers,
                                                config.top_k)   # alpha for this layer's Eq. 6 term
        self.z_loss_coef = config.z_loss_coef
        self.dispatch = config.dispatch
        self.fp32_scores = config.fp32_scores
        self.w_down = nn.Parameter(torch.empty(D, E * L))   # expert i owns columns i*L:(i+1)*L
        self.w_up = nn.Parameter(torch.empty(E, L, W))      # W_up^i    (W_g^i = W_down^i W_up^i)
        self.w_p = nn.Parameter(torch.empty(E, D, W))       # W_p^i
        self.w_o = nn.Parameter(torch.empty(E, W, D))       # W_o^i
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.n_layer)
        # W_down is drawn as (E, D, L), the layout of moe-lowrank's W_down, so that control starts equal (init.py)
        init.normal_(self.w_down, std, draw_shape=(E, D, L),
                     arrange=lambda w: w.permute(1, 0, 2).reshape(D, E * L))
        init.normal_(self.w_p, std)
        init.normal_(self.w_up, config.w_up_init_std or 1 / math.sqrt(L))   # see the docstring
        init.normal_(self.w_o, out_std)
        init_expert_bias(self, E, config.bias_update_rate)  # buffer expert_bias (E,) or None
        self.last_routing: Routing | None = None            # routing of the last forward, detached

    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(-1, D)                                # (N, D)
        impl = resolve_impl(self.dispatch, x, self.top_k)  # 'direct' for a decode step (dispatch.py)

        # --- scoring: every expert computes its low-rank activation, ranked by its L2 norm ---
        a = scoring_matmul(x, self.w_down, self.fp32_scores).view(-1, self.n_experts, self.d_low)  # (N, E, L) cache C
        r = route(row_norms(a), self.top_k, self.renormalize, self.expert_bias)  # (N, E) -> (N, K)
        record_load(self, r.experts)

        # --- the chosen experts finish Eq. 1, starting from their cached a_i ---
        plan = plan_dispatch(r.experts, self.n_experts, impl)
        x_s = gather_rows(x, plan.token)                     # (S, D) token rows, grouped by expert (direct: not)
        a_s = gather_rows(a.view(-1, self.d_low), plan.token * self.n_experts + plan.expert)  # (S, L) a_i of each slot
        g = grouped_mm(a_s.to(compute_dtype(x)), self.w_up, plan, impl)  # (S, W) a_i W_up^i, compute dtype
        y = swiglu_experts(x_s, g, self.w_p, self.w_o, plan, impl)  # (S, D)
        out = combine(y, r.gates, plan, x.shape[0])          # (N, D) gate-weighted sum over K

        aux = aux_losses(r, self.aux_loss_coef, self.z_loss_coef)  # Eq. 6 on norms (+ z-loss)
        self.last_routing = r.detach()
        return out.view(B, T, D), aux

    def active_params(self) -> int:
        """Parameters a single token touches: ALL experts' W_down (every expert scores every token,
        the paper's extra cost) plus W_up, W_p, W_o of K experts."""
        per_expert = (self.w_up.numel() + self.w_p.numel() + self.w_o.numel()) // self.n_experts
        return self.w_down.numel() + self.top_k * per_expert
