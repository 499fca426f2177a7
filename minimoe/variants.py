"""Named model variants, the answers to "who picks the experts?", as GPTConfig overrides.

    from minimoe.variants import VARIANTS, variant_config
    variant_config("aoe", base)        # base: any GPTConfig; returns it with this variant's fields

A variant changes only the feed-forward layer and how its experts are chosen; everything else
(width, depth, context, vocabulary, init seed) comes from `base`, so runs of different variants
with one seed see the same batches and differ only in that choice. train_small.py (--model=NAME),
train_gpt.py and the study (python -m minimoe.study) all read this one table.

Matching: MoE-family variants keep the MoE's total parameters (AoE and moe-lowrank via Eq. 5);
`dense` is one SwiGLU FFN as wide as top_k experts, i.e. the MoE's active parameters. The one
exception is moe-bigrouter: its router alone has AoE's W_down parameters (E*D*d_low), on top.

Chosen where the papers leave it open: the balancing bias replaces Eq. 6 (aux 0, the point of
"aux-loss-free") and moves by DeepSeek-V3's gamma = 0.001 per step; ERC uses coefficient 1 and
alpha 1 (the ERC paper's best alpha at n = 64 experts, the nearest it reports to our 8).
"""

from dataclasses import dataclass, replace
from typing import Callable

from .model import GPTConfig

DEEPSEEK_V3_GAMMA = 0.001   # bias update speed of DeepSeek-V3 (arXiv 2412.19437, §4.2)


@dataclass(frozen=True)
class Variant:
    name: str
    about: str                                       # one line for --help and tables
    overrides: Callable[[GPTConfig], dict]           # base config -> GPTConfig fields to set

    def config(self, base: GPTConfig) -> GPTConfig:
        return replace(base, **self.overrides(base))


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("dense", "one SwiGLU FFN as wide as top_k experts (the MoE's active parameters)",
            lambda b: {"ffn": "dense", "d_ffn": b.top_k * b.ffn_dim}),
    Variant("moe", "router MoE: a linear router picks top_k of n_experts (Alg. 1)",
            lambda b: {"ffn": "moe"}),
    Variant("aoe", "Autonomy-of-Experts: experts rank themselves by ||x W_down|| (Eq. 3, Alg. 2)",
            lambda b: {"ffn": "aoe"}),
    # AoE's successors: keep the router, fix what AoE fixed by other means
    Variant("moe+bias", "MoE, aux-loss-free balancing: a bias on the top-k choice (DeepSeek-V3 §2.1.2)",
            lambda b: {"ffn": "moe", "aux_loss_coef": 0.0, "bias_update_rate": DEEPSEEK_V3_GAMMA}),
    Variant("aoe+bias", "AoE with the same aux-loss-free bias on the norms, instead of Eq. 6",
            lambda b: {"ffn": "aoe", "aux_loss_coef": 0.0, "bias_update_rate": DEEPSEEK_V3_GAMMA}),
    Variant("moe+erc", "MoE + expert-router coupling loss, alpha=1 (arXiv 2512.23447)",
            lambda b: {"ffn": "moe", "erc_loss_coef": 1.0, "erc_alpha": 1.0}),
    # the AoE paper's own controls (Table 2): is it the factorization, or the scorer's size?
    Variant("moe-lowrank", "MoE whose W_g = W_down W_up like AoE's (Eq. 5 widths), router kept (Table 2)",
            lambda b: {"ffn": "moe", "expert_gate": "lowrank"}),
    Variant("moe-bigrouter", "MoE whose router has as many parameters as AoE's W_down (Table 2)",
            lambda b: {"ffn": "moe", "router": "mlp"}),
)}


def variant_config(name: str, base: GPTConfig) -> GPTConfig:
    """`base` with the fields of variant `name`; a clear error for an unknown name."""
    if name not in VARIANTS:
        raise ValueError(f"model variant {name!r} is unknown: allowed values are {', '.join(VARIANTS)}")
    return VARIANTS[name].config(base)


def variants_help() -> str:
    return "\n".join(f"  {v.name:<14} {v.about}" for v in VARIANTS.values())
