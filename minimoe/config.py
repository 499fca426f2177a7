"""TrainConfig: every knob of a training run, with nanoGPT's names (minimoe/train.py runs it).

Its own file so that what reads a config (checkpoint.py, runtime.py, outdir.py, the scripts) can
import it without importing the loop: the arrows point from train.py outwards, never back.
Every field is a `--field=value` option (cli.py) and is saved in every checkpoint and log.
"""

from dataclasses import dataclass
import re

from .validate import MAY_BE_EMPTY, check_fields, ranges

VAL_SEED = 0                     # the val batches: the same for every model, seed and run
PARALLEL_MODES = ("ddp", "fsdp")  # how several processes (torchrun) split the work: minimoe/fsdp.py


# Allowed interval of every number (minimoe/validate.py walks the fields by type hint). Counts stop
# where a run could never finish; evaluation and sampling stay short enough not to look like a hang.
@ranges(max_iters="[1, 1e12]", eval_interval="[1, 1e12]", eval_iters="[1, 100000]", log_interval="[1, 1e12]",
        batch_size="[1, 65536]", total_batch_tokens="[1, 1e13]", learning_rate="(0, 1]", min_lr="[0, 1]",
        warmup_iters="[0, 1e12]", lr_decay_iters="[1, 1e12]", weight_decay="[0, 1e3]", w_down_lr_scale="(0, 1e3]",
        w_up_lr_scale="(0, 1e3]", beta1="[0, 1)",
        beta2="[0, 1)", grad_clip="[0, 1e6]", threads="[0, 4096]", seed="[0, 1e18]", peak_flops="(0, 1e21]",
        final_eval_tokens="[0, 1e12]", sample_tokens="[0, 100000]",
        sample_start=MAY_BE_EMPTY)
@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"                 # ckpt.pt, log.jsonl, config.json, sample.txt go here
    data: str = "stdlib"                 # "stdlib" | "shakespeare" | a text file/folder | a prepare.py folder
    init_from: str = "scratch"           # "scratch" | "resume" (continue from out_dir/ckpt.pt)
    overwrite: bool = False              # let a scratch run replace out_dir/ckpt.pt (else it is refused)
    # how long, how often
    max_iters: int = 1000                # optimizer steps
    eval_interval: int = 100             # evaluate, log and checkpoint every this many steps
    eval_iters: int = 20                 # val batches per evaluation
    final_eval_tokens: int = 2**20       # the final evaluation: up to this many val tokens, in windows spread over
                                         # the whole val split (all of it when smaller); 0 turns it off
    log_interval: int = 10               # progress-bar update (and NaN check) every this many steps
    # batch
    batch_size: int = 16                 # sequences per micro-batch, per process
    total_batch_tokens: int | None = None  # tokens per optimizer step; None: one micro-batch per process
    # AdamW with linear warmup and cosine decay
    learning_rate: float = 1e-3          # peak learning rate
    min_lr: float = 1e-4                 # floor of the cosine decay
    warmup_iters: int = 100              # linear warmup steps
    lr_decay_iters: int | None = None    # end of the cosine; None: max_iters
    weight_decay: float = 0.1            # on matrices only (not norms)
    w_down_lr_scale: float = 1.0         # learning-rate multiplier of W_down in a factorized W_g (AoE, moe-lowrank)
    w_up_lr_scale: float = 1.0           # the same for W_up (configure_optimizer says why)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0               # max gradient norm; 0 turns clipping off
    # system
    device: str = "auto"                 # "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    dtype: str = "auto"                  # "auto" (bf16 autocast on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16
    compile: bool = False                # torch.compile the model
    parallel: str = "ddp"                # under torchrun: "ddp" (full copy per GPU) | "fsdp" (sharded, minimoe/fsdp.py)
    activation_checkpointing: bool = False  # recompute each Block in backward: far less activation memory, ~1/3 more compute
    threads: int = 0                     # CPU threads for PyTorch; 0: leave PyTorch's setting
    seed: int = 1337                     # model init and training batches
    peak_flops: float | None = None      # accelerator peak FLOP/s for MFU; None: from hardware.py's table
    # logging and sampling
    wandb: bool = False                  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "minimoe"
    sample_tokens: int = 200             # tokens generated into sample.txt at the end (0: none)
    sample_start: str = "\n"             # prompt for that sample
    progress: bool = True                # show a tqdm progress bar

    def __post_init__(self):
        check_fields(self)                 # types, finiteness and RANGES, before the relations below
        def bad(name, allowed):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")
        if self.init_from not in ("scratch", "resume"):
            bad("init_from", "allowed values are 'scratch' and 'resume'")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad("dtype", "allowed values are 'auto', 'float32', 'bfloat16', 'float16'")
        if self.parallel not in PARALLEL_MODES:
            bad("parallel", f"allowed values are {', '.join(map(repr, PARALLEL_MODES))}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            bad("device", "allowed values are 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
        if self.min_lr > self.learning_rate:
            bad("min_lr", f"must be <= learning_rate={self.learning_rate}: the cosine decays from "
                          f"learning_rate down to min_lr")
        if self.lr_decay_iters is not None and self.warmup_iters > self.lr_decay_iters:
            bad("warmup_iters", f"must be <= lr_decay_iters={self.lr_decay_iters}: the warmup ends "
                                f"before the cosine decay does")
        if self.learning_rate * self.weight_decay >= 1:
            bad("weight_decay", f"learning_rate x weight_decay = {self.learning_rate * self.weight_decay:g} "
                                f"must be < 1: AdamW multiplies every weight by (1 - lr x wd) each step")
