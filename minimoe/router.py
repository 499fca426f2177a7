"""The MoE's router W_r (Alg. 1), and the AoE paper's "large router" control (Table 2).

    linear   p = x W_r                               W_r: D x E                  the usual router
    mlp      p = SiLU(x W_r1) W_r2                   W_r1: D x R, W_r2: R x E    as many parameters as AoE's W_down

Table 2 of the AoE paper (arXiv 2501.13074) asks whether AoE wins only because its selection has more
parameters (all experts' W_down, D x E*d_low) than a router (D x E). Its control is an MoE "whose router
has as many parameters as AoE's W_down". The text we could read does not say how that router is built;
ours is a two-layer SiLU MLP with width R = D*E*d_low / (D + E) (rounded to a multiple of 8), so that
R*(D + E) ~= D*E*d_low. A wider single linear layer is impossible (its output must be E scores), and two
linear layers without a nonlinearity would compute the same function class as W_r.

Scores are computed in fp32 (dispatch.scoring_matmul), as torchtitan's router does.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import init
from .dispatch import scoring_matmul

ROUTER_KINDS = ("linear", "mlp")


def mlp_router_width(n_embd: int, n_experts: int, d_low: int, multiple_of: int = 8) -> int:
    """R with R*(D + E) ~= D*E*d_low: the hidden width of a router as large as AoE's W_down."""
    exact = n_embd * n_experts * d_low / (n_embd + n_experts)
    return max(multiple_of, int(round(exact / multiple_of)) * multiple_of)


class Router(nn.Linear):
    """An nn.Linear (its weight, E x D, holds the router rows R[i]; the key `router.weight` of older
    checkpoints, and nn.Linear's own init draws, so a seed gives the same model as before), plus W_r1."""

    def __init__(self, config):
        D, E = config.n_embd, config.n_experts
        R = mlp_router_width(D, E, config.low_dim) if config.router == "mlp" else None
        super().__init__(R or D, E, bias=False)              # weight: W_r (E, D), or W_r2 (E, R)
        self.fp32 = config.fp32_scores
        if R:
            self.w_in = nn.Parameter(torch.empty(R, D))     # W_r1 (stored transposed, like nn.Linear)
            init.normal_(self.w_in, config.init_std)
        else:
            self.register_parameter("w_in", None)
        init.normal_(self.weight, config.init_std)

    def forward(self, x):                                        # x (N, D) -> logits (N, E)
        if self.w_in is not None:
            x = F.silu(scoring_matmul(x, self.w_in.t(), self.fp32))   # (N, R)
        return scoring_matmul(x, self.weight.t(), self.fp32)
