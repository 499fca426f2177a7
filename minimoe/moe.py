"""Router Mixture-of-Experts (the paper's baseline, Alg. 1; Mixtral-style top-k gating).

    p = x W_r                       router logits, one per expert              (N, E)
    I = topK(softmax(p))            the K experts this token visits            (N, K)
    y = sum_{i in I} g_i E_i(x)     E_i(x) = (SiLU(x W_g^i) * x W_p^i) W_o^i    (Eq. 1)

with g the softmax restricted to I (renormalized top-k). The router never sees what an expert
would compute: it guesses from x alone. That separation is what AoE (aoe.py) removes.
Shared machinery (gating, sorted dropless dispatch, aux losses) is in dispatch.py.
"""

import math

import torch
import torch.nn as nn

from .dispatch import (Routing, combine, grouped_mm, load_balance_loss, plan_dispatch,
                       resolve_impl, route, swiglu_experts, z_loss)


class MoE(nn.Module):

    def __init__(self, config):
        super().__init__()
        D, E, H = config.n_embd, config.n_experts, config.ffn_dim
        self.n_experts, self.top_k = E, config.top_k
        self.renormalize = config.norm_topk
        self.aux_loss_coef, self.z_loss_coef = config.aux_loss_coef, config.z_loss_coef
        self.dispatch = config.dispatch
        self.router = nn.Linear(D, E, bias=False)           # W_r: the separate scorer
        self.w_g = nn.Parameter(torch.empty(E, D, H))       # W_g^i stacked over experts
        self.w_p = nn.Parameter(torch.empty(E, D, H))       # W_p^i
        self.w_o = nn.Parameter(torch.empty(E, H, D))       # W_o^i
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.n_layer)
        for w in (self.router.weight, self.w_g, self.w_p):
            nn.init.normal_(w, std=std)
        nn.init.normal_(self.w_o, std=out_std)
        self.last_routing: Routing | None = None            # routing of the last forward, detached

    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(-1, D)                                # (N, D)
        impl = resolve_impl(self.dispatch, x)

        # --- scoring: a separate linear router looks at x ---
        r = route(self.router(x), self.top_k, self.renormalize)   # scores (N, E) -> gates/experts (N, K)

        # --- the chosen experts compute Eq. 1 ---
        plan = plan_dispatch(r.experts, self.n_experts)
        x_s = x[plan.token]                                  # (S, D) token rows, grouped by expert
        g = grouped_mm(x_s, self.w_g, plan, impl)            # (S, H) x W_g^i
        y = swiglu_experts(x_s, g, self.w_p, self.w_o, plan, impl)  # (S, D)
        out = combine(y, r.gates, plan, x.shape[0])          # (N, D) gate-weighted sum over K

        aux = self.aux_loss_coef * load_balance_loss(r) + self.z_loss_coef * z_loss(r)  # Eq. 6
        self.last_routing = r.detach()
        return out.view(B, T, D), aux

    def active_params(self) -> int:
        """Parameters a single token touches: the router plus K of the E experts."""
        per_expert = (self.w_g.numel() + self.w_p.numel() + self.w_o.numel()) // self.n_experts
        return self.router.weight.numel() + self.top_k * per_expert
