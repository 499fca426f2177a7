"""Past one GPU's memory: FSDP2 sharding, activation checkpointing, and checkpoints that any run reads.

DDP keeps a full copy of the weights, gradients and AdamW state on every GPU: 16 bytes per parameter
(fp32 weight 4, fp32 gradient 4, AdamW's two moments 8) before activations, 64 GB for the paper's 4B
models. FSDP2 (`torch.distributed.fsdp.fully_shard`, the engine torchtitan trains MoE with) keeps
1/N of each on each of N GPUs and all-gathers a Block's weights only while that Block computes:

    shard(model)                 fully_shard each Block, then the root (embedding, head, final norm)
        forward:   all-gather Block i's weights (bf16 on CUDA), compute, free them again
        backward:  all-gather again, compute, reduce-scatter the gradients in fp32: each rank
                   keeps the gradient of its own shard, and AdamW updates only that shard

    checkpoint_blocks(model)     activation checkpointing: keep only each Block's input, recompute
                                 the Block in backward (one more forward, ~1/3 more compute)
    full_state_dicts(...)        the checkpoint's "model" and "optimizer", gathered to rank 0 in the
    load_full_state_dicts(...)   format one process writes, and back: any run resumes any other's

Gradient accumulation: the inner micro-steps DO reduce-scatter (FSDP2's default; there is no
no_sync here). Skipping it (set_requires_gradient_sync(False), DDP's no_sync) would keep every
micro-step's *unsharded* gradient until the last one: the full model's gradients in fp32 (4 bytes
per parameter, 16 GB at 4B) on every GPU, which gives back most of what sharding saved. Reducing
every micro-step costs one reduce-scatter per micro-step instead of per optimizer step (the same
bytes as the backward's all-gather, overlapped with compute), and the sharded fp32 gradients
accumulate across micro-steps in place.

Everything here also works for a plain model (one process) or a DDP-wrapped one: the functions
look at whether the parameters are DTensors, so the training loop calls them the same way in all
three modes. This file does not import the training loop.
"""

from contextlib import contextmanager, nullcontext
import importlib
import types

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from .config import PARALLEL_MODES

try:                                         # torch >= 2.5; absent from builds without distributed
    from torch.distributed.tensor import DTensor
except ImportError:                          # pragma: no cover (this torch has it)
    DTensor = ()


# --------------------------------------------------------------------------- can FSDP run here?

def _fully_shard():
    """torch.distributed.fsdp.fully_shard, or None where this torch lacks it (before 2.6, or a
    build without torch.distributed)."""
    if not dist.is_available():
        return None
    try:
        return getattr(importlib.import_module("torch.distributed.fsdp"), "fully_shard", None)
    except ImportError:
        return None


def check_fsdp(device: torch.device, dtype: torch.dtype) -> None:
    """Raise a one-line ValueError where --parallel=fsdp cannot run: a torch without fully_shard,
    a device with no FSDP backend (FSDP runs on CUDA with NCCL and on CPU with gloo), or float16
    (its GradScaler does not unscale sharded gradients; bfloat16 needs no scaler)."""
    if _fully_shard() is None:
        raise ValueError(f"TrainConfig.parallel='fsdp' is invalid here: torch {torch.__version__} has no "
                         f"torch.distributed.fsdp.fully_shard (FSDP2, PyTorch >= 2.6); upgrade torch or "
                         f"use --parallel=ddp")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"TrainConfig.parallel='fsdp' is invalid on {device.type}: FSDP runs on CUDA "
                         f"(NCCL) or CPU (gloo); use --parallel=ddp or --device=cpu")
    if dtype == torch.float16:
        raise ValueError("TrainConfig.parallel='fsdp' is invalid with --dtype=float16: its loss scaler "
                         "does not unscale sharded gradients; use --dtype=bfloat16 (no scaler needed)")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether fully_shard has sharded this model (its parameters are DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------- sharding

def shard(model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Shard `model` (a GPT, in place) across the default process group with FSDP2: each Block is
    one unit (its weights are gathered together, just before it runs), then the root holds what is
    left (token embedding = tied head, final norm). Every parameter becomes a DTensor holding 1/N
    of the rows of the full one; buffers (the expert-balancing bias) are not sharded.

    param_dtype: bfloat16 on CUDA: the gathered weights (and the gradients backward computes) are
    bf16, halving the all-gather, while the sharded weights AdamW updates stay fp32 and gradients
    are reduce-scattered in fp32 (MixedPrecisionPolicy). None (CPU): everything stays fp32.
    Build the optimizer *after* this: it must hold the sharded parameters."""
    fully_shard = _fully_shard()
    kwargs = {}
    if param_dtype is not None and param_dtype != torch.float32:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


# --------------------------------------------------------------------------- activation checkpointing

@contextmanager
def _keep_load_counts(ffn: torch.nn.Module):
    """Around a Block's recompute in backward: the expert layer counts its tokens (balance.py) in
    every training forward, so undo what the recompute adds; the step counts each token once."""
    saved = getattr(ffn, "load_counts", None)
    try:
        yield
    finally:
        if hasattr(ffn, "load_counts"):
            ffn.load_counts = saved


def _checkpointed_forward(block, x, cos, sin, kv_cache=None):
    """A Block's forward that saves only its input x for backward and recomputes the rest then
    (torch.utils.checkpoint, non-reentrant: the RNG state is replayed, so dropout masks match)."""
    forward = type(block).forward
    if kv_cache is not None or not (block.training and torch.is_grad_enabled()):
        return forward(block, x, cos, sin, kv_cache)            # nothing to save memory on
    return checkpoint(forward, block, x, cos, sin, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), _keep_load_counts(block.ffn)))


def checkpoint_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Activation checkpointing per Block (in place). Backward then keeps one (B, T, C) tensor per
    Block instead of everything the Block computed (attention's q, k, v, the experts' hidden
    vectors: ~10-40x more), at the cost of running each Block's forward twice.

    The Block's forward is replaced on the instance, not wrapped in another module, so parameter
    names, state dicts and checkpoints are unchanged; it composes with DDP, FSDP (the recompute
    runs while FSDP has the Block's weights gathered for backward) and one process."""
    for block in model.blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)
    return model


# --------------------------------------------------------------------------- checkpoints

def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Name of each optimizer parameter, in the order optimizer.state_dict() numbers them (group by
    group). That order comes from configure_optimizer, identical in every mode, so index i means
    the same parameter in a checkpoint from one process, DDP or FSDP."""
    names = {p: name for name, p in model.named_parameters()}   # a tied weight: its first name
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) as one process's model.state_dict() and
    optimizer.state_dict() return them: full tensors, optimizer state numbered 0..n-1.

    Sharded model: ALL ranks must call this (it all-gathers); rank 0 gets the full dicts on the
    CPU, gathered one tensor at a time (never the whole model on one GPU), other ranks ({}, {})."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    model_sd = get_model_state_dict(model, options=_options())
    if not optimizer.state:
        # Before the first step there is no state, only the groups: the optimizer's own state_dict()
        # is already the one-process one. (get_optimizer_state_dict would first run optimizer.step()
        # at lr 0 to create the state, and AdamW's step count would start at 1: another run.)
        return (model_sd, optimizer.state_dict()) if model_sd else ({}, {})
    named = get_optimizer_state_dict(model, optimizer, options=_options())   # keyed by parameter name
    if not model_sd:                                             # rank > 0: nothing to save
        return {}, {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    optim_sd = {"state": {index[name]: state for name, state in named["state"].items()},
                "param_groups": [{**g, "params": [index[name] for name in g["params"]]}
                                 for g in named["param_groups"]]}
    return model_sd, optim_sd


def load_full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                          model_sd: dict, optim_sd: dict | None) -> None:
    """Load full state dicts (full_state_dicts' format: what every mode saves) into `model` and
    `optimizer`. Sharded model: every rank passes the full dicts (read from ckpt.pt, on the CPU is
    enough) and keeps its own shard of each tensor."""
    if not is_sharded(model):
        model.load_state_dict(model_sd)
        if optimizer is not None:
            optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is None:
        return
    if not optim_sd["state"]:              # saved before the first step: groups only (see full_state_dicts)
        optimizer.load_state_dict(optim_sd)
        return
    names = _param_names(model, optimizer)
    named = {"state": {names[i]: state for i, state in optim_sd["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_sd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=options)
    for group, saved in zip(optimizer.param_groups, optim_sd["param_groups"]):   # as load_state_dict:
        group.update({k: v for k, v in saved.items() if k != "params"})           # betas stay a tuple


# --------------------------------------------------------------------------- memory

BYTES_STATE = 16       # per parameter: fp32 weight 4 + fp32 gradient 4 + AdamW exp_avg 4 + exp_avg_sq 4


def state_bytes_per_gpu(model: torch.nn.Module, world_size: int, parallel: str) -> int:
    """Bytes of weights + gradients + AdamW state on each GPU (activations and allocator slack not
    included), for a GPT built on any device (meta is enough).

    ddp:  16 bytes per parameter on every GPU (nothing is split).
    fsdp: 16 / world_size bytes per parameter (every one of the four is sharded), plus what is
          gathered at once in bf16: the root's parameters (kept gathered from forward to backward),
          two Blocks' weights (the one computing and the next, prefetched: 2 bytes each) and one
          Block's gradients before their reduce-scatter (bf16 2 + the fp32 copy reduced, 4)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r} is invalid: allowed values are {PARALLEL_MODES}")
    total = sum(p.numel() for p in model.parameters())
    if parallel == "ddp" or world_size == 1:
        return BYTES_STATE * total
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    root = total - sum(p.numel() for b in model.blocks for p in b.parameters())
    return -(-BYTES_STATE * total // world_size) + 2 * root + 2 * 2 * block + (2 + 4) * block
