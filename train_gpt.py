"""Pretrain a dense / router-MoE / AoE GPT at GPT-2 scale and beyond, on one GPU or many (DDP or FSDP).

    python train_gpt.py --preset=gpt2-aoe                                   # one process
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset=gpt2-aoe # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset=paper-large-aoe  # 4B: FSDP (its default)
    torchrun --standalone --nproc_per_node=2 train_gpt.py --preset=tiny-aoe --device=cpu   # no GPU: gloo

This file is thin on purpose: it picks a preset (minimoe/presets.py: a GPTConfig plus training
defaults), applies `--field=value` overrides for any GPTConfig or TrainConfig field on top, and
hands both to minimoe.train.train, the same loop train_small.py uses. train() notices torchrun
(RANK / WORLD_SIZE / LOCAL_RANK in the environment) and runs DDP: NCCL on CUDA, gloo on CPU;
--parallel=fsdp shards weights, gradients and AdamW state instead (minimoe/fsdp.py; the paper-large
presets' default), --activation_checkpointing=true recomputes each Block in backward. Checkpoints
have one format: a run continues under any of one process, DDP and FSDP.

out_dir holds one run: a second run into it fails at once (a lock), and a new run refuses an out_dir
that holds ckpt.pt: --init_from=resume continues it, --overwrite=true starts over (minimoe/train.py).

Data: the GPT-2-scale presets read the FineWeb-Edu shards that
`python -m minimoe.prepare fineweb` writes; the tiny presets read the built-in stdlib corpus.
`python -m minimoe.presets` lists the presets with their parameter and FLOP counts.
"""

from dataclasses import dataclass
import os
import shlex
import sys
from pathlib import Path

import torch

from minimoe.presets import PRESETS, get_preset, size_line
from minimoe.cli import parse_overrides
from minimoe.runtime import resolve_device
from minimoe.train import TrainConfig, TrainingDiverged, train
from minimoe.validate import check_fields

DEFAULT_PRESET = "gpt2-aoe"
BUILTIN_CORPORA = ("stdlib", "shakespeare")


@dataclass
class ScriptConfig:
    preset: str = DEFAULT_PRESET   # named model + training defaults (python -m minimoe.presets)
    plots: bool = True             # write loss.png, experts.png, routing.png into out_dir at the end

    def __post_init__(self):
        check_fields(self)             # minimoe/validate.py: a str and a bool
        get_preset(self.preset)        # an unknown name lists the presets


def split_preset(argv):
    """Take --preset=NAME (or --preset NAME) out of argv; the rest are --field=value overrides."""
    name, rest, i = DEFAULT_PRESET, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
        elif arg == "--preset":
            if i + 1 == len(argv):
                raise ValueError(f"--preset needs a value; available presets: {', '.join(PRESETS)}")
            name, i = argv[i + 1], i + 1
        else:
            rest.append(arg)
        i += 1
    return name, rest


def check_data(data: str, default_data: str, preset) -> None:
    """A missing data folder is the most likely first error: say exactly how to make it."""
    if data in BUILTIN_CORPORA or Path(data).expanduser().exists():
        return
    if data == default_data and preset.prepare_command():
        how = f"{preset.prepare_command()}   (writes {data}; needs `pip install datasets tiktoken`)"
    else:
        out = shlex.quote(f"--out_dir={data}")                  # a command to paste: quoted
        how = (f"python -m minimoe.prepare fineweb {out}   (FineWeb-Edu, GPT-2 BPE; needs "
               f"`pip install datasets tiktoken`)\n  or: python -m minimoe.prepare text YOUR_TEXT "
               f"--tokenizer=gpt2 {out}")
    raise ValueError(f"--data={data} does not exist. Prepare it first:\n  {how}\n"
                     f"or train on the built-in corpus without downloading anything: --data=stdlib")


def write_plots(out_dir, label: str) -> list[str]:
    """The figures of train_small.py, for this one run, from its log.jsonl."""
    from minimoe.files import read_log
    from minimoe.plots import plot_expert_load, plot_losses, plot_routing_entropy
    out_dir = Path(out_dir)
    logs = {label: read_log(out_dir)}
    plot_losses(logs, out_dir / "loss.png", title=f"{label}: validation loss vs tokens")
    files = ["loss.png"]
    if plot_expert_load(logs, out_dir / "experts.png", title=f"{label}: expert load per layer"):
        files.append("experts.png")
    if plot_routing_entropy(logs, out_dir / "routing.png", title=f"{label}: routing statistics"):
        files.append("routing.png")
    return files


def throughput_line(result: dict, cfg: TrainConfig) -> str:
    """tokens/s, MFU (active-parameter FLOPs, see minimoe/model.py) and peak memory of the run."""
    tps = f"{result['tokens_per_sec']:,.0f}" if result["tokens_per_sec"] else "n/a"
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (no peak FLOP/s for this device)"
    mem = ""
    if resolve_device(cfg.device).type == "cuda":
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (rank 0)"
    return f"{result['iters']} steps, {result['tokens']:,} tokens: {tps} tokens/s (all ranks), MFU {mfu}{mem}"


def main(argv=None) -> dict:
    """Parse the command line, train, plot. Returns train()'s result dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print(f"presets: {', '.join(PRESETS)}\n")
    # The preset first: it decides the defaults that the other --field=value flags override.
    name, overrides = split_preset(argv)
    preset = get_preset(name)
    defaults = preset.train_defaults()
    model_config, cfg, script = parse_overrides(overrides, preset.model_config(), TrainConfig(**defaults),
                                                ScriptConfig(preset=name))
    check_data(cfg.data, defaults["data"], preset)
    if rank0:
        print(f"preset {name}: {preset.about}\n{size_line(model_config)}", flush=True)
    result = train(model_config, cfg)
    if rank0:
        print(throughput_line(result, cfg))
    log = Path(cfg.out_dir) / "log.jsonl"
    if rank0 and script.plots and log.exists() and len(log.read_text().splitlines()) >= 2:  # a curve
        files = write_plots(cfg.out_dir, f"{model_config.ffn} ({name})")
        print(f"wrote {', '.join(files)} to {cfg.out_dir}")
    if result["interrupted"] and rank0:
        print(f"interrupted ({result['interrupted']}); continue with:  {continue_command(argv)}")
    return result


def continue_command(argv) -> str:
    """The command that resumes this run: the same options with --init_from=resume, shell-quoted, so
    that pasting it runs exactly this (an out_dir with spaces or `;` stays one argument)."""
    launcher = "torchrun [same options] train_gpt.py" if "WORLD_SIZE" in os.environ else "python train_gpt.py"
    keep = [a for a in argv if a.split("=")[0].replace("-", "_") != "__init_from"]
    return f"{launcher} {shlex.join([*keep, '--init_from=resume'])}"


if __name__ == "__main__":
    try:
        result = main()
    # Bad input (DataError is a ValueError), a resume without a checkpoint, a NaN loss: each says
    # what happened and what to do, so print that line instead of a traceback.
    except (ValueError, FileNotFoundError, TrainingDiverged) as e:
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingDiverged) else 2)
    sys.exit({None: 0, "SIGINT": 130}.get(result["interrupted"], 143))   # 128 + signal number
