"""Dense SwiGLU feed-forward: the paper's Eq. 1 for a single expert that every token uses.

    FFN(x) = (SiLU(x W_g) * (x W_p)) W_o        W_g, W_p: (D, H)   W_o: (H, D)

Read it beside moe.py and aoe.py: those two keep this exact computation per expert and only
add a way of choosing which K of E experts each token visits.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import init


class DenseFFN(nn.Module):

    def __init__(self, config):
        super().__init__()
        D, H = config.n_embd, config.ffn_dim
        self.w_g = nn.Linear(D, H, bias=False)   # gate branch (goes through SiLU)
        self.w_p = nn.Linear(D, H, bias=False)   # "up"/projection branch
        self.w_o = nn.Linear(H, D, bias=False)   # back to the residual stream
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.n_layer)
        init.normal_(self.w_g.weight, std)
        init.normal_(self.w_p.weight, std)
        init.normal_(self.w_o.weight, out_std)  # GPT-2: scale residual writes by depth

    def forward(self, x):
        # x: (B, T, D) -> (B, T, D), plus an auxiliary loss (none for a dense layer)
        y = self.w_o(F.silu(self.w_g(x)) * self.w_p(x))
        return y, x.new_zeros((), dtype=torch.float32)

    def active_params(self) -> int:
        """Parameters a single token touches: all of them."""
        return sum(p.numel() for p in self.parameters())
