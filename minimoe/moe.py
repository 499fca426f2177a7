"""Router Mixture-of-Experts (the paper's baseline, Alg. 1; Mixtral-style top-k gating).

    p = x W_r                       router logits, one per expert              (N, E)
    I = topK(softmax(p))            the K experts this token visits            (N, K)
    y = sum_{i in I} g_i E_i(x)     E_i(x) = (SiLU(x W_g^i) * x W_p^i) W_o^i    (Eq. 1)

with g the softmax restricted to I (renormalized top-k). The router never sees what an expert
would compute: it guesses from x alone. That separation is what AoE (aoe.py) removes.
Shared machinery (gating, sorted dropless dispatch, aux losses) is in dispatch.py.

Options (GPTConfig), each a successor or a control of AoE:
    bias_update_rate > 0     DeepSeek-V3's aux-loss-free balancing bias on the choice (balance.py)
    erc_loss_coef > 0        expert-router coupling loss on the router rows (erc.py, arXiv 2512.23447)
    expert_gate="lowrank"    Table 2 control: W_g^i = W_down^i W_up^i as in AoE (Eq. 5 widths), router kept
    router="mlp"             Table 2 control: a router with as many parameters as AoE's W_down (router.py)
"""

import math

import torch
import torch.nn as nn

from . import init
from .balance import init_expert_bias, record_load
from .dispatch import (Routing, aux_coef_per_layer, aux_losses, combine, gather_rows, grouped_mm,
                       plan_dispatch, resolve_impl, route, swiglu_experts)
from .erc import erc_flops, erc_loss
from .router import Router


class MoE(nn.Module):

    def __init__(self, config):
        super().__init__()
        D, E = config.n_embd, config.n_experts
        self.n_experts, self.top_k = E, config.top_k
        self.renormalize = config.norm_topk
        self.aux_loss_coef = aux_coef_per_layer(config.aux_loss_coef, config.aux_loss_reduce, config.n_expert_layers,
                                                config.top_k)   # alpha for this layer's Eq. 6 term
        self.z_loss_coef = config.z_loss_coef
        self.erc_loss_coef, self.erc_alpha = config.erc_loss_coef, config.erc_alpha
        self.dispatch = config.dispatch
        self.router = Router(config)                        # W_r: the separate scorer
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.n_layer)
        if config.expert_gate == "lowrank":                 # W_g^i = W_down^i W_up^i, AoE's widths (Eq. 5)
            L, H = config.low_dim, config.wide_dim
            self.register_parameter("w_g", None)
            self.w_down = nn.Parameter(torch.empty(E, D, L))  # W_down^i, but only the K chosen compute it
            self.w_up = nn.Parameter(torch.empty(E, L, H))    # W_up^i
            init.normal_(self.w_down, std)
            init.normal_(self.w_up, config.w_up_init_std or 1 / math.sqrt(L))   # as aoe.py
        else:
            H = config.ffn_dim
            self.w_g = nn.Parameter(torch.empty(E, D, H))   # W_g^i stacked over experts
            init.normal_(self.w_g, std)
        self.w_p = nn.Parameter(torch.empty(E, D, H))       # W_p^i
        self.w_o = nn.Parameter(torch.empty(E, H, D))       # W_o^i
        init.normal_(self.w_p, std)
        init.normal_(self.w_o, out_std)
        init_expert_bias(self, E, config.bias_update_rate)  # buffer expert_bias (E,) or None
        self.last_routing: Routing | None = None            # routing of the last forward, detached

    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(-1, D)                                # (N, D)
        impl = resolve_impl(self.dispatch, x, self.top_k)  # 'direct' for a decode step (dispatch.py)

        # --- scoring: a separate router looks at x (fp32 logits) ---
        r = route(self.router(x), self.top_k, self.renormalize, self.expert_bias)  # (N, E) -> (N, K)
        record_load(self, r.experts)

        # --- the chosen experts compute Eq. 1 ---
        plan = plan_dispatch(r.experts, self.n_experts, impl)
        x_s = gather_rows(x, plan.token)                     # (S, D) token rows, grouped by expert (direct: not)
        g = self.gate_preactivation(x_s, plan, impl)         # (S, H) x W_g^i
        y = swiglu_experts(x_s, g, self.w_p, self.w_o, plan, impl)  # (S, D)
        out = combine(y, r.gates, plan, x.shape[0])          # (N, D) gate-weighted sum over K

        aux = aux_losses(r, self.aux_loss_coef, self.z_loss_coef)  # Eq. 6 (+ z-loss)
        if self.erc_loss_coef and self.training:             # a fixed n^2 cost per forward, not per token
            aux = aux + self.erc_loss_coef * erc_loss(self.router.weight, *self.gate_weights(), alpha=self.erc_alpha)
        self.last_routing = r.detach()
        return out.view(B, T, D), aux

    def gate_weights(self) -> tuple:
        """(W_g,) or, factorized, (W_down, W_up)."""
        return (self.w_g, None) if self.w_g is not None else (self.w_down, self.w_up)

    def gate_matrix(self) -> torch.Tensor:
        """W_g^i stacked, (E, D, H); factorized, the product W_down^i W_up^i. For analyses that read W_g
        (metrics.py, lowrank.py); the forward never forms the product."""
        return self.w_g if self.w_g is not None else self.w_down @ self.w_up

    def gate_preactivation(self, x_s, plan, impl):
        """x W_g^i per slot; two grouped matmuls when W_g is factorized.   x_s (S, D) -> (S, H)"""
        if self.w_g is not None:
            return grouped_mm(x_s, self.w_g, plan, impl)
        return grouped_mm(grouped_mm(x_s, self.w_down, plan, impl), self.w_up, plan, impl)

    def active_params(self) -> int:
        """Parameters a single token touches: the router plus K of the E experts."""
        router = sum(p.numel() for p in self.router.parameters())
        experts = sum(p.numel() for p in self.parameters()) - router
        return router + self.top_k * experts // self.n_experts

    def flops_per_forward_extra(self) -> int:
        """Training FLOPs that do not scale with tokens: the ERC loss (erc.py), per forward."""
        if not self.erc_loss_coef:
            return 0
        w = [t for t in self.gate_weights() if t is not None]
        return erc_flops(self.n_experts, w[0].shape[1], [t.shape[2] for t in w])
