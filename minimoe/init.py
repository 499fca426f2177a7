"""Weight initialization with common random numbers: a parameter's first values depend on (seed, its name, its shape).

A paired comparison (study.py) trains every variant from the same seed, so that the difference between two
variants is the effect of the variant and not of a luckier draw. With one global RNG drawn in construction
order that pairing is weak: a variant that adds or reshapes one parameter (AoE's W_down, a router) shifts the
draws of every parameter built after it, and the same seed then gives the MoE and AoE different attention
weights in every layer but the first, and a different embedding. So each parameter gets its own generator:

    seed_of(name, shape) = hash(model seed, "blocks.3.attn.qkv.weight", (384, 128))
    W ~ normal(0, std; generator seeded by seed_of)

Every parameter two variants share in name, shape and meaning then starts identical: attention, norms and the
embedding in every variant, all expert weights of the MoE and its bias/ERC variants, and W_down, W_up, W_p, W_o
of AoE and the `moe-lowrank` control (AoE stores all W_down side by side as one (D, E*L) matrix, but draws it as
(E, D, L), the control's layout). Parameters that differ in shape are drawn independently.

`GPTConfig.init_rng = "sequential"` keeps the construction-order draws from torch's global RNG, which every
result before this change used (they reproduce with it).
"""

import hashlib

import torch

INIT_RNGS = ("named", "sequential")


def normal_(param: torch.nn.Parameter, std: float, draw_shape: tuple | None = None, arrange=None) -> None:
    """param ~ normal(0, std), drawn now from the global RNG in the parameter's own layout (so a layer built alone
    is ready to use; this is the whole init with init_rng="sequential"), and declared for GPT's redraw by name.

    draw_shape/arrange: for the redraw, draw a tensor of draw_shape and store arrange(drawn) in param, for a
    parameter that another variant keeps in another layout (see the module docstring)."""
    param.init_std, param.init_draw = std, (tuple(draw_shape or param.shape), arrange)
    torch.nn.init.normal_(param, std=std)


def param_seed(seed: int, name: str, shape: tuple) -> int:
    """A generator seed for one parameter: a function of the model seed, the parameter's name and shape only."""
    digest = hashlib.sha256(f"{seed}/{name}/{tuple(shape)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_named(model: torch.nn.Module, seed: int) -> None:
    """Draw every declared parameter from its own generator (parameters without a declaration, the RMSNorm
    gains, keep their constant init). A parameter shared by two modules (tied embeddings) is drawn once."""
    for name, p in model.named_parameters():
        if not hasattr(p, "init_std") or p.is_meta:     # a model built on the meta device (to count) has no values
            continue
        shape, arrange = p.init_draw
        g = torch.Generator(device=p.device).manual_seed(param_seed(seed, name, shape))
        drawn = torch.empty(shape, device=p.device, dtype=p.dtype).normal_(0.0, p.init_std, generator=g)
        p.copy_(arrange(drawn) if arrange else drawn)
