"""A small modern decoder-only transformer whose feed-forward is dense, router-MoE or AoE.

    idx (B, T) -> token embedding -> n_layer x Block -> RMSNorm -> lm_head -> logits (B, T, V)
    Block: x + Attention(RMSNorm(x)) ; x + FFN(RMSNorm(x))          (pre-norm, no biases)

Attention uses rotary position embeddings (RoPE) and PyTorch's fused causal
scaled_dot_product_attention. The FFN is chosen by `GPTConfig.ffn`:
    "dense"  dense.py  SwiGLU
    "moe"    moe.py    router picks K of E SwiGLU experts   (AoE paper, Alg. 1)
    "aoe"    aoe.py    experts pick themselves by ||x W_down^i||  (AoE paper, Eq. 3, Alg. 2)
and further options change who picks the experts (variants.py names the combinations): a balancing
bias (balance.py), the ERC loss (erc.py), the AoE paper's Table 2 controls (moe.py, router.py).
Style and API follow nanoGPT's model.py: forward(idx, targets) -> (logits, loss), generate().
"""

from dataclasses import dataclass, fields
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .aoe import AoE, d_wide_for_matched_params
from .dense import DenseFFN
from .dispatch import DISPATCH_IMPLS, routing_stats
from .moe import MoE
from .router import ROUTER_KINDS

FFN_KINDS = {"dense": DenseFFN, "moe": MoE, "aoe": AoE}
EXPERT_GATES = ("full", "lowrank")


@dataclass
class GPTConfig:
    """Defaults: the paper's small model (12 x 768, 8 experts, top-2, d_ffn 3072, d_low 256)."""
    vocab_size: int = 50304        # GPT-2's 50257 padded up to a multiple of 64
    block_size: int = 1024         # longest context
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ffn: str = "aoe"               # "dense" | "moe" | "aoe"
    n_experts: int = 8
    top_k: int = 2
    d_ffn: int | None = None       # hidden width of one expert (or of the dense FFN); None: 4*n_embd
    d_low: int | None = None       # AoE rank of W_down; None: ~n_embd/3 (the paper's best, Table 2)
    d_wide: int | None = None      # AoE expert hidden width; None: matches MoE parameters (Eq. 5)
    moe_every: int = 1             # experts in every n-th layer (dense FFN of width d_ffn elsewhere)
    norm_topk: bool = True         # renormalize the K gate weights to sum to 1 (Alg. 1 & 2)
    aux_loss_coef: float = 0.01    # alpha of the load-balancing loss, Eq. 6 (0 turns it off)
    z_loss_coef: float = 0.0       # router z-loss weight (ST-MoE); 0 turns it off
    dispatch: str = "auto"         # "grouped" (torch._grouped_mm), "loop" (reference) or "auto"
    tie_embeddings: bool = True    # share the token embedding with the output head
    dropout: float = 0.0
    rope_theta: float = 10000.0
    init_std: float = 0.02         # normal(0, 0.02) as in the paper
    w_up_init_std: float | None = None  # AoE W_up init; None: 1/sqrt(d_low), see aoe.py (0.02 = the paper's)
    # --- who picks the experts: AoE's successors and the paper's controls (variants.py names them) ---
    fp32_scores: bool = True       # router logits / x W_down in fp32 under autocast (torchtitan); false: compute dtype
    bias_update_rate: float = 0.0  # gamma of DeepSeek-V3's aux-loss-free balancing bias (balance.py); 0 off
    erc_loss_coef: float = 0.0     # weight of the expert-router coupling loss (erc.py, MoE only); 0 off
    erc_alpha: float = 1.0         # ERC margin alpha: off-diagonal M[i,j] must stay below alpha*M[i,i]
    expert_gate: str = "full"      # MoE W_g: "full" or "lowrank" = W_down W_up with AoE's widths (Table 2 control)
    router: str = "linear"         # MoE router: "linear" or "mlp" = as many parameters as AoE's W_down (Table 2)

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_experts", "top_k",
                     "moe_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer")
        for name in ("d_ffn", "d_low", "d_wide"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(name, "must be a positive integer, or None to choose it automatically")
        if self.ffn not in FFN_KINDS:
            bad("ffn", f"allowed values are {sorted(FFN_KINDS)}")
        if self.n_embd % self.n_head:
            bad("n_embd", f"must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            bad("n_head", f"head size n_embd/n_head={self.n_embd // self.n_head} must be even for RoPE")
        if self.top_k > self.n_experts:
            bad("top_k", f"must be between 1 and n_experts={self.n_experts}")
        if self.low_dim > self.n_embd:
            bad("d_low", f"the rank of W_down cannot exceed n_embd={self.n_embd} (the paper uses d_low < d_model)")
        if self.moe_every > self.n_layer:
            bad("moe_every", f"must be between 1 and n_layer={self.n_layer}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            bad("aux_loss_coef" if self.aux_loss_coef < 0 else "z_loss_coef", "must be >= 0 (0 turns it off)")
        if self.w_up_init_std is not None and not self.w_up_init_std > 0:
            bad("w_up_init_std", "must be > 0, or None for 1/sqrt(d_low)")
        if self.dispatch not in DISPATCH_IMPLS:
            bad("dispatch", f"allowed values are {DISPATCH_IMPLS}")
        # the router-side options need a router (MoE); the balancing bias needs experts (MoE or AoE)
        if self.router not in ROUTER_KINDS:
            bad("router", f"allowed values are {ROUTER_KINDS}")
        if self.expert_gate not in EXPERT_GATES:
            bad("expert_gate", f"allowed values are {EXPERT_GATES}")
        for name, off in (("router", "linear"), ("expert_gate", "full"), ("erc_loss_coef", 0.0)):
            if getattr(self, name) != off and self.ffn != "moe":
                bad(name, f"needs ffn='moe' (a router MoE), not ffn={self.ffn!r}; leave it at {off!r}")
        if not 0.0 <= self.bias_update_rate < math.inf:
            bad("bias_update_rate", "must be >= 0 (0 turns the balancing bias off)")
        if self.bias_update_rate > 0 and self.ffn == "dense":
            bad("bias_update_rate", "needs experts: ffn='moe' or 'aoe', not 'dense'; leave it at 0")
        if not 0.0 <= self.erc_loss_coef < math.inf:
            bad("erc_loss_coef", "must be >= 0 (0 turns the ERC loss off)")
        if not 0.0 <= self.erc_alpha < math.inf:
            bad("erc_alpha", "must be >= 0 (the paper uses 0.5 to 1)")
        if self.erc_loss_coef > 0 and self.router != "linear":
            bad("erc_loss_coef", "needs router='linear': ERC uses the router's rows as proxy tokens")

    # The three "None = automatic" widths, resolved. Properties (not stored values) so that a
    # config copied with dataclasses.replace(n_embd=...) never carries a stale width.
    @property
    def ffn_dim(self) -> int:
        return self.d_ffn if self.d_ffn is not None else 4 * self.n_embd

    @property
    def low_dim(self) -> int:
        return self.d_low if self.d_low is not None else max(8, round(self.n_embd / 3 / 8) * 8)

    @property
    def wide_dim(self) -> int:
        if self.d_wide is not None:
            return self.d_wide
        return d_wide_for_matched_params(self.n_embd, self.ffn_dim, self.low_dim)

    def is_expert_layer(self, i: int) -> bool:
        return self.ffn != "dense" and (i + 1) % self.moe_every == 0

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build from a saved dict (checkpoint, JSON), naming any field this version doesn't know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)


# --------------------------------------------------------------------------- attention

def rope_cache(T: int, head_dim: int, theta: float):
    """cos, sin tables (T, head_dim/2) for rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)   # (hd/2,)
    angles = torch.outer(torch.arange(T).float(), inv_freq)                       # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1, x2) of each head by a position-dependent angle.  x (B, nh, T, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)                       # (B, nh, T, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        nn.init.normal_(self.qkv.weight, std=config.init_std)
        nn.init.normal_(self.proj.weight, std=config.init_std / math.sqrt(2 * config.n_layer))

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                     # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)   # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)          # (B, T, C) heads side by side
        return F.dropout(self.proj(y), self.dropout, self.training)


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.norm_attn = nn.RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.norm_ffn = nn.RMSNorm(config.n_embd)
        kind = config.ffn if config.is_expert_layer(layer) else "dense"
        self.ffn = FFN_KINDS[kind](config)
        self.dropout = config.dropout

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm_attn(x), cos, sin)
        y, aux = self.ffn(self.norm_ffn(x))                        # aux: this layer's Eq. 6 loss
        return x + F.dropout(y, self.dropout, self.training), aux


# --------------------------------------------------------------------------- the model

class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        nn.init.normal_(self.wte.weight, std=config.init_std)
        nn.init.normal_(self.lm_head.weight, std=config.init_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = rope_cache(config.block_size, config.n_embd // config.n_head, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)   # derived, not saved
        self.register_buffer("rope_sin", sin, persistent=False)
        # The two parts of the last training loss, for logging (detached; the sum is returned).
        self.last_ce_loss: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]            # (T, hd/2)
        x = self.wte(idx)                                          # (B, T, C)
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, aux_layer = block(x, cos, sin)
            aux = aux + aux_layer
        x = self.norm_f(x)
        if targets is None:
            # Inference: only the last position's logits are needed.
            return self.lm_head(x[:, [-1], :]), None               # (B, 1, V)
        logits = self.lm_head(x)                                   # (B, T, V)
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        self.last_ce_loss, self.last_aux_loss = ce.detach(), aux.detach()
        return logits, ce + aux

    # ----------------------------------------------------------------- routing

    def expert_layers(self) -> list[tuple[int, nn.Module]]:
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if isinstance(b.ffn, (MoE, AoE))]

    def routing_stats(self) -> list[dict]:
        """Eq. 7/8 statistics of the last forward, one dict per expert layer (see dispatch.routing_stats)."""
        return [{"layer": i, **routing_stats(ffn.last_routing)}
                for i, ffn in self.expert_layers() if ffn.last_routing is not None]

    # ----------------------------------------------------------------- sizes

    def num_params(self) -> int:
        """All parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters one token touches: unselected experts excluded, AoE's W_down included."""
        n = self.num_params()
        for b in self.blocks:
            n += b.ffn.active_params() - sum(p.numel() for p in b.ffn.parameters())
        return n

    def flops_per_step_extra(self, accum_steps: int = 1) -> int:
        """Training FLOPs per optimizer step that do not scale with the tokens (ERC's n^2 proxies,
        erc.py), for accum_steps forward+backward passes. Not included in flops_per_token."""
        return accum_steps * sum(b.ffn.flops_per_forward_extra() for b in self.blocks
                                 if hasattr(b.ffn, "flops_per_forward_extra"))

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM-style: 6 * matmul parameters that
        the token touches + 12 * n_layer * n_embd * seq_len for attention scores. Counts only
        *active* experts; the embedding lookup is free unless it doubles as the output head."""
        T = seq_len or self.config.block_size
        n = self.num_active_params()
        if not self.config.tie_embeddings:
            n -= self.wte.weight.numel()
        return 6 * n + 12 * self.config.n_layer * self.config.n_embd * T

    # ----------------------------------------------------------------- sampling

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """Extend idx (B, T) by max_new_tokens. temperature=0 is greedy; pass a seeded generator
        for reproducible samples."""
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k={top_k} must be between 1 and vocab_size={self.config.vocab_size}")
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]              # crop to the context window
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()                        # (B, V)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, top_k).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, 1, generator=generator)   # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
