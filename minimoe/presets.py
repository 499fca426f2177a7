"""Named model + training presets for train_gpt.py, the laptop configs, and the table of their sizes.

    python -m minimoe.presets            # markdown table: total / active parameters, FLOPs per token,
                                         # and the memory per GPU under DDP and FSDP
    python train_gpt.py --preset=NAME [--field=value ...]

A preset is a GPTConfig (the model) plus defaults for TrainConfig fields (the run). Command-line
`--field=value` overrides go on top of both. Sizes are counted on the "meta" device: the model is
built without allocating memory, so even the ~750M-parameter presets are counted instantly.

The families (all but tiny-*: 12 layers x 768 wide, GPT-2 BPE vocabulary padded to 50304, block
1024, tied input/output embedding):

  gpt2-dense       GPT-2 small (~124M). GPT-2's MLP is 768 -> 3072 -> 768 with GELU (2 matrices);
                   a SwiGLU FFN has 3 matrices, so d_ffn = 2/3 * 3072 = 2048 keeps the same count.
  gpt2-moe/-aoe    every FFN becomes 8 experts, top-2. Each expert is exactly gpt2-dense's FFN
                   (d_ffn 2048), so the only change from the dense model is "8 copies, pick 2".
                   (The paper's width 3072 is what the paper-small presets use; with 3072 these two
                   would just be paper-small again.) AoE has the MoE's total parameters: d_low 256
                   (~n_embd/3, the paper's best, Table 2) and d_wide from Eq. 5 (2520).
  paper-small-*    the paper's small model, the one of its ablations (Table 2): 8 experts, top-2,
                   d_ffn 3072, d_low 256 -> d_wide 3840, and its optimizer settings (AdamW 0.9/0.95,
                   wd 0.1, clip 1.0, lr 2e-4 -> 1.28e-5, 4800 warmup steps, ~4.2M-token batches,
                   100B tokens).
                   The paper used a 32k vocabulary; we keep GPT-2's 50304 so the presets train on our
                   FineWeb shards. `python -m minimoe.presets` also counts the paper's exact configs
                   (32k vocabulary) against its reported 732M total / 247M active.
  paper-large-*    the paper's large model, the 4B of its headline Table 5 (AoE 49.80 vs MoE 48.06):
                   24 layers x 1280, 20 heads, 8 experts, top-2, d_ffn 5120, AoE d_low 400, and the
                   recipe of paper-small with lr 3.2e-4. Eq. 5 gives d_wide = 6469.2 here; the paper
                   writes 6470, our automatic width rounds to a multiple of 8, 6472 (+0.03% parameters
                   per expert), because torch._grouped_mm on CUDA needs 16-byte aligned strides (a
                   multiple of 8 bf16 values). Their weights, gradients and AdamW state alone are 65 GB
                   per GPU under DDP; they default to FSDP (minimoe/fsdp.py), ~10 GB per GPU at 8 GPUs.
  tiny-*           2 layers x 64 wide, byte vocabulary (256), the built-in stdlib corpus: seconds on a
                   CPU, for tests and for trying torchrun without a GPU.

The laptop configs (laptop_model, laptop_train) are the CPU regime of train_small.py and of the
studies (python -m minimoe.study laptop): 2 layers x 64, context 64, bytes, 8 experts of width 128,
top-2; 1500 steps of 32 x 64 tokens.

Micro-batch sizes (batch_size) of the GPT-2-scale presets are starting points for 80 GB GPUs, not
measured values; if a run runs out of memory lower --batch_size: total_batch_tokens (the optimizer's
batch) stays the same and gradient accumulation makes up the difference.
"""

from dataclasses import dataclass, field
import sys

import torch

from .config import TrainConfig
from .data import default_cache_dir
from .fsdp import state_bytes_per_gpu
from .model import GPT, GPTConfig


@dataclass(frozen=True)
class Preset:
    name: str
    about: str
    model: dict                                   # GPTConfig fields
    train: dict = field(default_factory=dict)     # TrainConfig fields
    fineweb: str | None = None                    # FineWeb-Edu config it trains on (None: stdlib)

    def model_config(self, **overrides) -> GPTConfig:
        return GPTConfig(**{**self.model, **overrides})

    def train_defaults(self) -> dict:
        """TrainConfig fields of this preset. `data` is resolved now (not at import) so that it
        follows $MINIMOE_CACHE: it is the folder `python -m minimoe.prepare fineweb` writes."""
        data = fineweb_dir(self.fineweb) if self.fineweb else "stdlib"
        return {"data": data, "out_dir": f"out-{self.name}", **self.train}

    def prepare_command(self) -> str | None:
        """The exact command that writes this preset's default data folder."""
        return f"python -m minimoe.prepare fineweb --name={self.fineweb}" if self.fineweb else None


# --------------------------------------------------------------------------- the laptop configs

def laptop_model() -> GPTConfig:
    """The train_small regime: 2 layers x 64, context 64, bytes, 8 experts of width 128, top-2."""
    return GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64, ffn="moe",
                     n_experts=8, top_k=2, d_ffn=128)


def laptop_train() -> TrainConfig:
    """1500 steps x 32 x 64 = 3.1M tokens, ~20 tokens per total (MoE) parameter."""
    return TrainConfig(out_dir="out-study/laptop", max_iters=1500, eval_interval=100, eval_iters=20,
                       log_interval=25, batch_size=32, learning_rate=2e-3, min_lr=2e-4, warmup_iters=30,
                       sample_tokens=200, sample_start="def ")


# --------------------------------------------------------------------------- GPU presets

def fineweb_dir(name: str) -> str:
    # must match prepare.prepare_fineweb's default out_dir
    return str(default_cache_dir() / f"fineweb-edu-{name}")


# --------------------------------------------------------------------------- the presets

GPT2 = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)

# nanoGPT / llm.c's GPT-2 (124M) run on FineWeb 10B: 2^19 ~ 0.5M tokens per step, 19073 steps = 10B
# tokens (one epoch of sample-10BT), 6e-4 peak lr with 700 warmup steps, cosine to 10%.
GPT2_TRAIN = dict(batch_size=16, total_batch_tokens=2**19, max_iters=19073, learning_rate=6e-4,
                  min_lr=6e-5, warmup_iters=700, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                  eval_interval=250, eval_iters=20, log_interval=10, compile=True)

# The paper's recipe for its models: AdamW beta (0.9, 0.95), weight decay 0.1, clip 1.0, lr 2e-4 with 4800
# warmup steps and cosine decay to 1.28e-5, batch 4.2M tokens (2^22 here), 100B tokens = 23842 steps.
PAPER_TRAIN = dict(batch_size=16, total_batch_tokens=2**22, max_iters=23842, learning_rate=2e-4,
                   min_lr=1.28e-5, warmup_iters=4800, weight_decay=0.1, beta1=0.9, beta2=0.95,
                   grad_clip=1.0, eval_interval=250, eval_iters=20, log_interval=10, compile=True)

TINY = dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64, d_ffn=128)
TINY_TRAIN = dict(batch_size=8, max_iters=50, learning_rate=3e-3, min_lr=3e-4, warmup_iters=5,
                  eval_interval=25, eval_iters=4, log_interval=5, compile=False, sample_tokens=64)

EXPERTS = dict(n_experts=8, top_k=2)

# The paper's large model (Table 5): 24 x 1280, 20 heads (head size 64), d_ffn 5120; its recipe is
# PAPER_TRAIN's with a peak lr of 3.2e-4. 65 GB of weights, gradients and AdamW state: FSDP (minimoe/
# fsdp.py) shards them, and activation checkpointing keeps a 16 x 1024 micro-batch's activations
# small (~2 GB instead of ~30 GB by runtime.estimate_memory); not measured on a GPU yet.
PAPER_LARGE = dict(GPT2, n_layer=24, n_head=20, n_embd=1280, d_ffn=5120, **EXPERTS)
PAPER_LARGE_TRAIN = dict(PAPER_TRAIN, learning_rate=3.2e-4, parallel="fsdp", activation_checkpointing=True)

PRESETS = {p.name: p for p in [
    Preset("gpt2-dense", "GPT-2 small class dense SwiGLU (~124M)",
           dict(GPT2, ffn="dense", d_ffn=2048), GPT2_TRAIN, fineweb="sample-10BT"),
    Preset("gpt2-moe", "router MoE, 8 experts of gpt2-dense's FFN, top-2",
           dict(GPT2, ffn="moe", d_ffn=2048, **EXPERTS), GPT2_TRAIN, fineweb="sample-10BT"),
    Preset("gpt2-aoe", "AoE with gpt2-moe's total params (d_low 256, d_wide by Eq. 5)",
           dict(GPT2, ffn="aoe", d_ffn=2048, d_low=256, **EXPERTS), GPT2_TRAIN, fineweb="sample-10BT"),
    Preset("paper-small-moe", "the paper's small router MoE (12x768, 8 experts, top-2, d_ffn 3072)",
           dict(GPT2, ffn="moe", d_ffn=3072, **EXPERTS), PAPER_TRAIN, fineweb="sample-100BT"),
    Preset("paper-small-aoe", "the paper's small AoE (d_low 256, d_wide 3840)",
           dict(GPT2, ffn="aoe", d_ffn=3072, d_low=256, **EXPERTS), PAPER_TRAIN, fineweb="sample-100BT"),
    Preset("paper-large-moe", "the paper's large router MoE (24x1280, 8 experts, top-2, d_ffn 5120; 4B)",
           dict(PAPER_LARGE, ffn="moe"), PAPER_LARGE_TRAIN, fineweb="sample-100BT"),
    Preset("paper-large-aoe", "the paper's large AoE (d_low 400, d_wide 6472 by Eq. 5; 4B)",
           dict(PAPER_LARGE, ffn="aoe", d_low=400), PAPER_LARGE_TRAIN, fineweb="sample-100BT"),
    Preset("tiny-dense", "2x64 dense, byte vocabulary: a CPU demo in seconds",
           dict(TINY, ffn="dense"), TINY_TRAIN),
    Preset("tiny-moe", "2x64 router MoE, 4 experts, top-2",
           dict(TINY, ffn="moe", n_experts=4, top_k=2), TINY_TRAIN),
    Preset("tiny-aoe", "2x64 AoE, 4 experts, top-2, d_low 16",
           dict(TINY, ffn="aoe", n_experts=4, top_k=2, d_low=16), TINY_TRAIN),
]}

# The paper's own configurations, only for checking our parameter counts against its numbers (small:
# 732M / 247M; large, the 4B of Table 5: 4B / 1.18B). They use a 32k vocabulary, which our GPT-2 BPE
# data cannot feed, so they are not presets. The large AoE's d_wide is the paper's 6470 (Eq. 5 gives
# 6469.2; our automatic width rounds to a multiple of 8, 6472).
PAPER_CONFIGS = {
    "paper-small-moe@32k": (dict(GPT2, vocab_size=32000, ffn="moe", d_ffn=3072, **EXPERTS), (732e6, 247e6)),
    "paper-small-aoe@32k": (dict(GPT2, vocab_size=32000, ffn="aoe", d_ffn=3072, d_low=256, **EXPERTS),
                            (732e6, 247e6)),
    "paper-large-moe@32k": (dict(vocab_size=32000, block_size=1024, n_layer=24, n_head=20, n_embd=1280,
                                 ffn="moe", d_ffn=5120, **EXPERTS), (4.0e9, 1.18e9)),
    "paper-large-aoe@32k": (dict(vocab_size=32000, block_size=1024, n_layer=24, n_head=20, n_embd=1280,
                                 ffn="aoe", d_ffn=5120, d_low=400, d_wide=6470, **EXPERTS), (4.0e9, 1.18e9)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)} "
                         f"(`python -m minimoe.presets` shows their sizes)")
    return PRESETS[name]


# --------------------------------------------------------------------------- sizes

MEMORY_GPUS = 8           # the memory column: per GPU on one node of 8


def count(config: GPTConfig, seq_len: int | None = None) -> dict:
    """Total / active parameters, training FLOPs per token and the bytes of weights + gradients +
    AdamW state per GPU at MEMORY_GPUS GPUs (DDP and FSDP), without allocating the model."""
    with torch.device("meta"):
        model = GPT(config)
    return {"total": model.num_params(), "active": model.num_active_params(),
            "flops_per_token": model.flops_per_token(seq_len), "d_wide": config.wide_dim
            if config.ffn == "aoe" else None,
            **{f"state_{p}": state_bytes_per_gpu(model, MEMORY_GPUS, p) for p in ("ddp", "fsdp")}}


def _m(n):
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 10e6 else f"{n / 1e6:.3f}M"


def _gb(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def size_line(config: GPTConfig) -> str:
    """One line for the start of a run: 'ffn=aoe  params 519.4M total, 194.2M active, 1.28 GFLOPs/token'."""
    c = count(config)
    return (f"ffn={config.ffn}  params {_m(c['total'])} total, {_m(c['active'])} active "
            f"({c['active'] / c['total']:.0%}), {c['flops_per_token'] / 1e9:.3g} GFLOPs/token "
            f"(training, T={config.block_size})")


def preset_table() -> str:
    rows = ["| preset | ffn | layers x width | experts (top-k) | expert width | total params | "
            f"active params | GFLOPs/token (train, T=block) | state/GPU at {MEMORY_GPUS} GPUs: DDP / FSDP | about |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p in PRESETS.values():
        cfg = p.model_config()
        c = count(cfg)
        experts = "-" if cfg.ffn == "dense" else f"{cfg.n_experts} ({cfg.top_k})"
        width = str(cfg.ffn_dim) if cfg.ffn != "aoe" else f"d_low {cfg.low_dim}, d_wide {cfg.wide_dim}"
        rows.append(f"| {p.name} | {cfg.ffn} | {cfg.n_layer} x {cfg.n_embd} | {experts} | {width} | "
                    f"{_m(c['total'])} | {_m(c['active'])} | {c['flops_per_token'] / 1e9:.3g} | "
                    f"{_gb(c['state_ddp'])} / {_gb(c['state_fsdp'])} | {p.about} |")
    return "\n".join(rows)


def paper_check() -> str:
    """Our counts for the paper's exact configs, tied and untied embeddings, against its numbers."""
    rows = ["| paper config | embeddings | total (ours) | active (ours) | paper: total / active |",
            "|---|---|---|---|---|"]
    for name, (model, (p_total, p_active)) in PAPER_CONFIGS.items():
        for tied in (True, False):
            c = count(GPTConfig(**model, tie_embeddings=tied))
            rows.append(f"| {name} | {'tied' if tied else 'untied'} | {_m(c['total'])} "
                        f"({c['total'] / p_total - 1:+.1%}) | {_m(c['active'])} "
                        f"({c['active'] / p_active - 1:+.1%}) | {_m(p_total)} / {_m(p_active)} |")
    return "\n".join(rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        print("usage: python -m minimoe.presets   (no arguments: prints the preset and paper-check tables)",
              file=sys.stderr)
        return 2
    print("Presets (counted on the meta device; a tied embedding counts once; active = what one token "
          "touches: K experts, plus every expert's W_down for AoE; FLOPs = 6 x active matmul params + "
          "attention 12 x L x C x T; state/GPU = weights + gradients + AdamW state per GPU, before "
          "activations: DDP 16 bytes/param (fp32 weight, gradient and two moments) on every GPU, FSDP "
          "16/N bytes/param plus the bf16 weights of the root and two Blocks gathered at once and one "
          "Block's gradients before their reduce-scatter, minimoe/fsdp.py)\n")
    print(preset_table())
    print("\nThe paper's configurations (32k vocabulary) against its reported sizes\n")
    print(paper_check())
    return 0


if __name__ == "__main__":
    sys.exit(main())
