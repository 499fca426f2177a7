"""Named model variants, the answers to "who picks the experts?", as GPTConfig overrides.

    from minimoe.variants import VARIANTS, variant_config
    variant_config("aoe", base)        # base: any GPTConfig; returns it with this variant's fields

A variant changes only the feed-forward layer and how its experts are chosen; everything else
(width, depth, context, vocabulary, init seed) comes from `base`, so runs of different variants
with one seed see the same batches and differ only in that choice. train_small.py (--model=NAME),
train_gpt.py and the study (python -m minimoe.study) all read this one table.

Matching: MoE-family variants keep the MoE's total parameters (AoE via Eq. 5); `dense` is one
SwiGLU FFN as wide as top_k experts, i.e. the MoE's active parameters.
"""

from dataclasses import dataclass, replace
from typing import Callable

from .model import GPTConfig


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
)}


def variant_config(name: str, base: GPTConfig) -> GPTConfig:
    """`base` with the fields of variant `name`; a clear error for an unknown name."""
    if name not in VARIANTS:
        raise ValueError(f"model variant {name!r} is unknown: allowed values are {', '.join(VARIANTS)}")
    return VARIANTS[name].config(base)


def variants_help() -> str:
    return "\n".join(f"  {v.name:<14} {v.about}" for v in VARIANTS.values())
