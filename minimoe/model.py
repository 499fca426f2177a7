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
generate() keeps a KVCache: the prompt is run once, then each step runs only the new token
(use_cache=False is the reference path that re-runs the whole context every step).
"""

from dataclasses import dataclass, fields
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import init
from .aoe import AoE, d_wide_for_matched_params
from .dense import DenseFFN
from .dispatch import AUX_REDUCTIONS, DISPATCH_IMPLS, routing_stats
from .moe import MoE
from .router import ROUTER_KINDS
from .validate import check_fields, ranges

FFN_KINDS = {"dense": DenseFFN, "moe": MoE, "aoe": AoE}
EXPERT_GATES = ("full", "lowrank")
MAX_PARAMS = 1e12                # GPTConfig refuses sizes whose parameter bound is above this


# Allowed interval of every number (minimoe/validate.py walks the fields by type hint). Sizes stop
# where no machine could hold the model; MAX_PARAMS bounds their product.
@ranges(vocab_size="[1, 2e6]", block_size="[1, 1048576]", n_layer="[1, 1024]", n_head="[1, 1024]",
        n_embd="[2, 65536]", n_experts="[1, 4096]", top_k="[1, 4096]", d_ffn="[1, 1048576]",
        d_low="[1, 65536]", d_wide="[1, 1048576]", moe_every="[1, 1024]", aux_loss_coef="[0, 1e3]",
        z_loss_coef="[0, 1e3]", dropout="[0, 1)", rope_theta="(1, 1e12]", init_std="(0, 1]",
        w_up_init_std="(0, 1]", bias_update_rate="[0, 1]", erc_loss_coef="[0, 1e3]", erc_alpha="[0, 1e3]")
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
    aux_loss_reduce: str = "mean"  # Eq. 6 over layers: "mean", "sum" (before Dec 2026) or "mean/k" (megablocks);
                                   # see dispatch.aux_coef_per_layer
    z_loss_coef: float = 0.0       # router z-loss weight (ST-MoE); 0 turns it off
    dispatch: str = "auto"         # "grouped" (torch._grouped_mm), "loop" (reference) or "auto"
    tie_embeddings: bool = True    # share the token embedding with the output head
    dropout: float = 0.0
    rope_theta: float = 10000.0
    init_std: float = 0.02         # normal(0, 0.02) as in the paper
    init_rng: str = "named"        # "named": each parameter from its own generator keyed by (seed, name, shape),
                                   # so variants share every common part at init (init.py); "sequential": the
                                   # global RNG in construction order (every result before the change)
    w_up_init_std: float | None = None  # AoE W_up init; None: 1/sqrt(d_low), see aoe.py (0.02 = the paper's)
    # --- who picks the experts: AoE's successors and the paper's controls (variants.py names them) ---
    fp32_scores: bool = True       # router logits / x W_down in fp32 under autocast (torchtitan); false: compute dtype
    bias_update_rate: float = 0.0  # gamma of DeepSeek-V3's aux-loss-free balancing bias (balance.py); 0 off
    erc_loss_coef: float = 0.0     # weight of the expert-router coupling loss (erc.py, MoE only); 0 off
    erc_alpha: float = 1.0         # ERC margin alpha: off-diagonal M[i,j] must stay below alpha*M[i,i]
    expert_gate: str = "full"      # MoE W_g: "full" or "lowrank" = W_down W_up with AoE's widths (Table 2 control)
    router: str = "linear"         # MoE router: "linear" or "mlp" = as many parameters as AoE's W_down (Table 2)

    def __post_init__(self):
        check_fields(self)                 # types, finiteness and RANGES, before the relations below
        def bad(name, allowed):
            raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")
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
        if self.dispatch not in DISPATCH_IMPLS:
            bad("dispatch", f"allowed values are {DISPATCH_IMPLS}")
        if self.aux_loss_reduce not in AUX_REDUCTIONS:
            bad("aux_loss_reduce", f"allowed values are {AUX_REDUCTIONS}")
        if self.init_rng not in init.INIT_RNGS:
            bad("init_rng", f"allowed values are {init.INIT_RNGS}")
        # an upper bound on the parameters (every layer with the widest expert): a cheap product
        # of the sizes, so a typo like --n_layer=1000 --n_embd=65536 stops here, not in an OOM
        D, H = self.n_embd, max(self.ffn_dim, self.wide_dim if self.ffn == "aoe" else 0)
        E = 1 if self.ffn == "dense" else self.n_experts
        n = self.vocab_size * D * 2 + self.n_layer * (4 * D * D + E * (3 * D * H + D * self.low_dim))
        if n > MAX_PARAMS:
            raise ValueError(f"GPTConfig is invalid: about {n:.1e} parameters (n_layer={self.n_layer}, "
                             f"n_embd={D}, n_experts={self.n_experts}, expert width {H}, vocab_size="
                             f"{self.vocab_size}), more than {MAX_PARAMS:.0e}; use smaller sizes")
        # the router-side options need a router (MoE); the balancing bias needs experts (MoE or AoE)
        if self.router not in ROUTER_KINDS:
            bad("router", f"allowed values are {ROUTER_KINDS}")
        if self.expert_gate not in EXPERT_GATES:
            bad("expert_gate", f"allowed values are {EXPERT_GATES}")
        for name, off in (("router", "linear"), ("expert_gate", "full"), ("erc_loss_coef", 0.0)):
            if getattr(self, name) != off and self.ffn != "moe":
                bad(name, f"needs ffn='moe' (a router MoE), not ffn={self.ffn!r}; leave it at {off!r}")
        if self.bias_update_rate > 0 and self.ffn == "dense":
            bad("bias_update_rate", "needs experts: ffn='moe' or 'aoe', not 'dense'; leave it at 0")
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

    @property
    def n_expert_layers(self) -> int:
        return sum(map(self.is_expert_layer, range(self.n_layer)))

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


class KVCache:
    """Keys and values of the tokens seen so far, so that generation computes each token once.

    One (B, nh, max_len, hd) buffer pair per layer, allocated at the first write in the dtype that
    attention produces (bf16 under autocast). `pos` counts the cached tokens; GPT.forward advances
    it after all layers have written the new tokens' keys and values."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len, self.pos = max_len, 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k, v):
        """Write k, v (B, nh, T, hd) at positions pos..pos+T-1; return all keys and values so far."""
        B, nh, T, hd = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, nh, self.max_len, hd)
            self.v[layer] = v.new_empty(B, nh, self.max_len, hd)
        end = self.pos + T
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]   # (B, nh, pos+T, hd) each


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.dropout, self.layer = config.n_head, config.dropout, layer
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        init.normal_(self.qkv.weight, config.init_std)
        init.normal_(self.proj.weight, config.init_std / math.sqrt(2 * config.n_layer))

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                     # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)   # (B, nh, T, hd); cos/sin start at pos
        past, mask = 0, None
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)              # (B, nh, past+T, hd)
        if past and T > 1:
            # New token t sits at position past+t and sees keys 0..past+t. (is_causal would align
            # the triangle to the top left, i.e. hide the cached tokens.)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0 and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)          # (B, T, C) heads side by side
        return F.dropout(self.proj(y), self.dropout, self.training)


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.norm_attn = nn.RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.norm_ffn = nn.RMSNorm(config.n_embd)
        kind = config.ffn if config.is_expert_layer(layer) else "dense"
        self.ffn = FFN_KINDS[kind](config)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None):
        x = x + self.attn(self.norm_attn(x), cos, sin, kv_cache)
        y, aux = self.ffn(self.norm_ffn(x))                        # aux: this layer's Eq. 6 loss
        return x + F.dropout(y, self.dropout, self.training), aux


# --------------------------------------------------------------------------- the model

class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        named = config.init_rng == "named"
        # "named": one draw from torch's RNG seeds the whole model; the modules' own default draws (nn.Linear)
        # are forked off, so the global RNG moves by that one draw whatever the variant (init.py)
        seed = int(torch.randint(0, 2**62, (), device="cpu")) if named else None
        with torch.random.fork_rng(devices=[], enabled=named):
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
            self.norm_f = nn.RMSNorm(config.n_embd)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            init.normal_(self.wte.weight, config.init_std)
            init.normal_(self.lm_head.weight, config.init_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if named:
            init.init_named(self, seed)
        cos, sin = rope_cache(config.block_size, config.n_embd // config.n_head, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)   # derived, not saved
        self.register_buffer("rope_sin", sin, persistent=False)
        # The two parts of the last training loss, for logging (detached; the sum is returned).
        self.last_ce_loss: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None):
        """idx (B, T) -> (logits, loss). With a kv_cache (generation), idx holds only the new tokens:
        they take positions kv_cache.pos.., attend to the cached ones too, and are cached in turn."""
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence length {pos + T}" + (f" ({pos} cached + {T} new)" if pos else "")
                             + f" exceeds block_size={self.config.block_size}")
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]   # (T, hd/2)
        x = self.wte(idx)                                          # (B, T, C)
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, aux_layer = block(x, cos, sin, kv_cache)
            aux = aux + aux_layer
        if kv_cache is not None:
            kv_cache.pos += T
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
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, sample_top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True):
        """Extend idx (B, T) by max_new_tokens. temperature=0 is greedy; sample_top_k keeps only the
        k most likely tokens (not to be confused with GPTConfig.top_k, the experts per token); pass
        a seeded generator for reproducible samples.

        use_cache=True (the fast path): the prompt goes through the model once ("prefill"), then each
        step feeds only the newest token and reuses every layer's cached keys and values (KVCache);
        expert layers route just that token. use_cache=False is the reference: every step re-runs
        the whole context. Past block_size both crop the context to its last block_size tokens, whose
        positions then restart at 0, so every cached key changes: the cached path re-prefills that
        window, which keeps the two paths equal but makes each step beyond block_size cost a full
        forward, as without the cache.
        """
        check_generate_args(idx, max_new_tokens, temperature, sample_top_k, self.config.vocab_size)
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and cache.pos < self.config.block_size:
                logits, _ = self(idx[:, -1:], kv_cache=cache)       # the new token only
            else:
                idx_cond = idx[:, -self.config.block_size:]          # crop to the context window
                cache = KVCache(self.config.n_layer, self.config.block_size) if use_cache else None
                logits, _ = self(idx_cond, kv_cache=cache)           # prefill (or the reference path)
            idx_next = sample_next(logits[:, -1, :], temperature, sample_top_k, generator)   # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def sample_next(logits, temperature: float, sample_top_k: int | None, generator=None):
    """Next token ids (B, 1) from last-position logits (B, V): greedy at temperature 0."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if sample_top_k is not None:
        kth = torch.topk(logits, sample_top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def check_generate_args(idx, max_new_tokens, temperature, sample_top_k, vocab_size: int):
    """One-line ValueErrors for generate's arguments (instead of a traceback from deep in torch)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0 or idx.dtype != torch.long:
        desc = f"a {idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else repr(type(idx))
        raise ValueError(f"idx is {desc}: generate needs token ids, an int64 tensor (B, T) with T >= 1")
    if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < vocab_size:
        raise ValueError(f"idx has token ids in [{int(idx.min())}, {int(idx.max())}]: they must be in "
                         f"[0, vocab_size={vocab_size})")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if sample_top_k is not None and (not is_int(sample_top_k) or not 1 <= sample_top_k <= vocab_size):
        raise ValueError(f"sample_top_k={sample_top_k!r} must be an integer between 1 and "
                         f"vocab_size={vocab_size}, or None to sample from all tokens")
