"""Where and how a training process runs, and the guards around the loop.

    setup(cfg) -> Runtime     device ("auto": CUDA, else MPS, else CPU), autocast dtype, DDP or FSDP
                              (--parallel) under torchrun (NCCL on CUDA, gloo on CPU), CPU threads
    grad_accum_steps(...)     micro-steps per optimizer step for cfg.total_batch_tokens on this many ranks
    preflight(...)            before step 0: memory for one micro-batch (every rank), the out_dir
                              claimed (rank 0, outdir.claim_out_dir); all ranks fail together
    StopRequest               SIGINT/SIGTERM: finish the step, save, return; under DDP the ranks vote
                              so all stop at the same step
"""

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
import atexit
import importlib.util
import os
from pathlib import Path
import signal
import threading
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import TrainConfig
from .fsdp import check_fsdp, state_bytes_per_gpu
from .hardware import format_bytes, keep_freed_memory
from .model import GPT, GPTConfig
from .outdir import claim_out_dir


@dataclass
class Runtime:
    """Where and how this process runs, resolved from TrainConfig and the environment."""
    device: torch.device
    dtype: torch.dtype             # autocast dtype (float32: no autocast)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False              # several processes (torchrun): DDP, or FSDP when `fsdp` is set too
    flag_group: object = None      # DDP: a gloo group for the CPU flags ranks agree on (stop, NaN)
    fsdp: bool = False             # --parallel=fsdp with several processes: the model is sharded (fsdp.py)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def share(self, n: int, per: int = 1):
        """This rank's part of n evaluation items taken `per` at a time: chunk c = items c*per.. goes to
        rank c % world_size. Yields (first item, counted). Under FSDP every forward all-gathers weights
        with the other ranks, so all ranks must run as many as the busiest: a rank short of a chunk runs
        chunk 0 again, with counted=False (its result is dropped)."""
        chunks = -(-n // per)
        end = -(-chunks // self.world_size) * self.world_size if self.fsdp else chunks
        for c in range(self.rank, end, self.world_size):
            yield (c * per, True) if c < chunks else (0, False)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (a small CPU all-reduce under DDP),
        so that all ranks take the same branch: raise together rather than leave one waiting."""
        if not self.ddp:
            return bool(flag)
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.flag_group)
        return t.item() > 0


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device={name!r} is invalid: CUDA is not available here "
                             f"(torch {torch.__version__}); use --device=cpu or --device=auto")
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{local_rank}"                          # DDP: one GPU per process
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("TrainConfig.device='mps' is invalid: MPS is not available here; use --device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "float16" and device.type != "cuda":
        raise ValueError(f"TrainConfig.dtype='float16' is invalid on {device.type}: it needs CUDA's "
                         f"loss scaling; use --dtype=bfloat16 or --dtype=float32")
    return getattr(torch, name)


def setup(cfg: TrainConfig) -> Runtime:
    """Device, dtype and DDP/FSDP. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; then each process
    joins the process group (NCCL on CUDA, gloo on CPU) and drives one device. --parallel=fsdp is
    checked here (a torch or device FSDP cannot run on fails in one line, before any collective);
    with one process there is nothing to shard and it trains as usual."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world_size, flag_group = 0, 0, 1, None
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(cfg.device, local_rank if ddp else None)
    dtype = resolve_dtype(cfg.dtype, device)
    fsdp = ddp and world_size > 1 and cfg.parallel == "fsdp"
    if fsdp:
        check_fsdp(device, dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True        # fp32 matmuls on tensor cores
    if ddp:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        flag_group = dist.new_group(backend="gloo")          # flags stay on the CPU: no GPU sync
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        keep_freed_memory()                                  # no page-fault tax per step (hardware.py)
    return Runtime(device, dtype, rank, local_rank, world_size, ddp, flag_group, fsdp)


def grad_accum_steps(cfg: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that one step sees cfg.total_batch_tokens tokens."""
    per_micro = cfg.batch_size * block_size * world_size
    if cfg.total_batch_tokens is None:
        return 1
    if cfg.total_batch_tokens % per_micro:
        raise ValueError(
            f"TrainConfig.total_batch_tokens={cfg.total_batch_tokens} is invalid: it must be a multiple of "
            f"batch_size x block_size x world_size = {cfg.batch_size} x {block_size} x {world_size} = "
            f"{per_micro} (the tokens of one micro-step on all ranks); try "
            f"--total_batch_tokens={max(1, round(cfg.total_batch_tokens / per_micro)) * per_micro}")
    return cfg.total_batch_tokens // per_micro


def estimate_memory(model_config: GPTConfig, cfg: TrainConfig, dtype: torch.dtype, n_params: int,
                    state_bytes: int | None = None) -> dict:
    """A lower bound on the bytes one training process needs, by part: fp32 weights, gradients and
    AdamW's two moments (16 bytes per parameter; or `state_bytes`, fsdp.state_bytes_per_gpu's figure
    when FSDP shards them); the activations backward keeps for one micro-batch of batch_size x
    block_size tokens (per layer: attention's input, q, k, v, output and projection input, and each
    FFN the token visits: its input and three hidden vectors; with activation checkpointing only each
    Block's input, plus one Block's worth while it is recomputed); and the logits (the head's output,
    its fp32 copy in the cross-entropy, the log-softmax saved for backward). Real use is higher
    (temporaries, the allocator), so a batch above it cannot fit."""
    c = model_config
    tokens = cfg.batch_size * c.block_size
    act = 4 if dtype == torch.float32 else 2          # bytes per activation (autocast: half precision)
    layers = []
    for layer in range(c.n_layer):
        per_token = 6 * c.n_embd
        if not c.is_expert_layer(layer):
            per_token += c.n_embd + 3 * c.ffn_dim
        elif c.ffn == "moe":
            per_token += c.n_experts + c.top_k * (c.n_embd + 3 * c.ffn_dim)            # router logits + K experts
        else:
            per_token += c.n_experts * c.low_dim + c.top_k * (c.n_embd + 3 * c.wide_dim)  # all x W_down + K experts
        layers.append(per_token)
    per_token = c.n_layer * c.n_embd + max(layers) if cfg.activation_checkpointing else sum(layers)
    return {"weights and optimizer": 16 * n_params if state_bytes is None else state_bytes,
            "activations": tokens * per_token * act, "logits": tokens * c.vocab_size * (act + 8)}


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate: free memory of the GPU on CUDA, MemAvailable of
    /proc/meminfo on CPU; None where unknown (MPS, systems without /proc)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return None


def check_memory(model_config: GPTConfig, cfg: TrainConfig, rt: Runtime, model: GPT) -> None:
    """Refuse, before step 0, a batch that clearly cannot fit (> 90% of the available memory).
    `model`: the GPT on the meta device (only its sizes are read)."""
    parts = estimate_memory(model_config, cfg, rt.dtype, model.num_params(),
                            state_bytes_per_gpu(model, rt.world_size, "fsdp" if rt.fsdp else "ddp"))
    need, sharing = sum(parts.values()), 1
    if rt.ddp and rt.device.type == "cpu":          # the ranks on this machine share its memory
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    available = available_memory(rt.device)
    if available is None or need * sharing <= 0.9 * available:
        return
    where = f"free on {rt.device}" if rt.device.type == "cuda" else "of available memory"
    raise ValueError(f"--batch_size={cfg.batch_size} does not fit: a step of {cfg.batch_size} x "
                     f"{model_config.block_size} tokens needs at least {format_bytes(need)} per process "
                     f"({', '.join(f'{k} {format_bytes(v)}' for k, v in parts.items())})"
                     f"{f' x {sharing} processes' if sharing > 1 else ''}, more than 90% of the "
                     f"{format_bytes(available)} {where}; lower --batch_size (with --total_batch_tokens set, gradient "
                     f"accumulation keeps the tokens per step) or use a smaller model")


# --------------------------------------------------------------------------- before step 0

@contextmanager
def preflight(model_config: GPTConfig, cfg: TrainConfig, rt: Runtime):
    """The checks before step 0, then the out_dir held for the run. Every rank: memory for one
    micro-batch. Rank 0: the out_dir (claim_out_dir: writable, unlocked, no checkpoint to lose,
    room on disk) and wandb. Under DDP the ranks agree on the outcome, so all fail together."""
    with torch.device("meta"):                           # count parameters without allocating
        model = GPT(model_config)
    n_params = model.num_params()
    with ExitStack() as held:
        error = None
        try:
            check_memory(model_config, cfg, rt, model)
            if rt.master:
                held.enter_context(claim_out_dir(Path(cfg.out_dir), cfg, checkpoint_bytes=12 * n_params + 2**20))
                if cfg.wandb and importlib.util.find_spec("wandb") is None:
                    raise ValueError("TrainConfig.wandb=True needs the wandb package: pip install wandb "
                                     "(or --wandb=false)")
        except (ValueError, FileNotFoundError) as e:
            error = e
        if rt.any_rank(error is not None):
            raise error or ValueError(f"rank {rt.rank}: another rank failed its checks before step 0 "
                                      f"(its error is printed above)")
        yield


# --------------------------------------------------------------------------- during the loop

class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, saves a checkpoint and returns.
    A second Ctrl-C aborts at once. Handlers are only installed in the main thread.

    Under DDP the ranks must stop at the same step, and before torchrun's SIGKILL (30 s after its
    SIGTERM) however slow a step is: every step each rank launches an all-reduce of its flag in
    the background and reads the previous step's result, so all ranks agree at most one step after
    the signal, and no step waits for the others more than training already does."""

    def __init__(self, rt: Runtime):
        self.rt, self.signum, self.previous, self.vote = rt, None, {}, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt                           # second Ctrl-C: stop right now
        self.signum = signum
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                   f"(Ctrl-C again to abort without saving)")

    def agreed(self) -> bool:
        """Whether to stop after this step (all ranks get the same answer at the same step)."""
        if not self.rt.ddp:
            return self.signum is not None
        stop = False
        if self.vote is not None:                              # the previous step's vote is in
            work, flag = self.vote
            work.wait()
            stop = flag.item() > 0
        flag = torch.tensor([float(self.signum is not None)])
        self.vote = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.rt.flag_group, async_op=True), flag)
        return stop

    @property
    def name(self) -> str:
        """The signal that stopped the run (a rank that only heard of it through the vote: SIGTERM)."""
        return signal.Signals(self.signum or signal.SIGTERM).name

    def __exit__(self, exc_type, *exc):
        if self.vote is not None and exc_type is None:
            self.vote[0].wait()                               # leave no collective in flight
        for s, handler in self.previous.items():
            signal.signal(s, handler)
