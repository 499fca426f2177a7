"""Generate text from a trained checkpoint.

    python -m minimoe.sample --out_dir=out-small/aoe --start="def " --num_samples=3
    python -m minimoe.sample --out_dir=out-small/moe --start=FILE:prompt.txt --temperature=0.5 --sample_top_k=None

Options are the fields of SampleConfig below (`--help` lists them). The tokenizer is the one the
checkpoint was trained with (bytes, or GPT-2 BPE via tiktoken).
"""

from dataclasses import dataclass
from pathlib import Path
import sys

import numpy as np
import torch

from .data import DataError, decode_bytes, encode_bytes
from .checkpoint import load_model
from .cli import parse_overrides
from .runtime import resolve_device
from .validate import check_fields, ranges


@ranges(num_samples="[1, 1024]", max_new_tokens="[0, 100000]", temperature="[0, 100]", sample_top_k="[1, 2e6]",
        seed="[0, 1e18]")           # minimoe/validate.py: every number finite and inside its interval
@dataclass
class SampleConfig:
    out_dir: str = "out-small/aoe"     # folder with ckpt.pt (or the file itself)
    start: str = "\n"                  # prompt, or FILE:path to read it from a file
    num_samples: int = 3               # independent samples
    max_new_tokens: int = 300          # tokens generated per sample
    temperature: float = 0.8           # 1.0 = the model's distribution, < 1 sharper, 0 = greedy
    sample_top_k: int | None = 40      # keep only the k most likely tokens (None: all); not GPTConfig.top_k
    seed: int = 1337
    device: str = "auto"               # "auto" | "cpu" | "cuda" | "mps"

    def __post_init__(self):
        check_fields(self)
        if 0 < self.temperature < 0.01:     # logits / 1e-30 overflow to inf and the softmax to NaN
            raise ValueError(f"SampleConfig.temperature={self.temperature!r} is invalid: must be 0 "
                             f"(greedy) or at least 0.01")


def tokenizer_for(ckpt: dict):
    """(encode, decode) for the tokenizer the checkpoint's corpus used."""
    if ckpt.get("tokenizer", "byte") == "byte":
        return encode_bytes, decode_bytes
    try:
        import tiktoken
    except ImportError:
        raise DataError("this checkpoint uses GPT-2 BPE tokens, which need tiktoken: pip install tiktoken") from None
    enc = tiktoken.get_encoding("gpt2")
    return (lambda s: np.array(enc.encode_ordinary(s))), (lambda t: enc.decode(np.asarray(t).tolist()))


def sample(cfg: SampleConfig) -> list[str]:
    """The generated samples (prompt included), as strings."""
    device = resolve_device(cfg.device)
    model, ckpt = load_model(cfg.out_dir, device)
    encode, decode = tokenizer_for(ckpt)
    start = cfg.start
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            raise DataError(f"--start=FILE:{path}: no such file; give a prompt or an existing file")
        start = path.read_text()
    tokens = encode(start or "\n")
    if len(tokens) == 0:
        raise DataError("--start is empty after encoding; give a non-empty prompt")
    idx = torch.tensor(tokens, dtype=torch.long, device=device)[None].repeat(cfg.num_samples, 1)  # (S, T)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature,
                         sample_top_k=cfg.sample_top_k, generator=gen)
    return [decode(row.cpu()) for row in out]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a.split("=")[0] in ("--top_k", "--top-k") for a in argv):   # the flag's old name
        raise ValueError("unknown option --top_k: the token filter is --sample_top_k "
                         "(top_k is GPTConfig's number of experts per token)")
    (cfg,) = parse_overrides(argv, SampleConfig())
    for i, text in enumerate(sample(cfg)):
        print(f"--- sample {i + 1}/{cfg.num_samples} ({cfg.out_dir}) ---\n{text}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
