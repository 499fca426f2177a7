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

from .bench import pick_device
from .checkpoint import checkpoint_path, load_model
from .cli import parse_overrides
from .data import DataError, decode_bytes, encode_bytes
from .shards import path_kind, read_regular_file
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
    device: str = "auto"               # "auto" | "cpu" | "cuda" | "cuda:N" | "mps"

    def __post_init__(self):
        check_fields(self)
        if 0 < self.temperature < 0.01:     # logits / 1e-30 overflow to inf and the softmax to NaN
            raise ValueError(f"SampleConfig.temperature={self.temperature!r} is invalid: must be 0 "
                             f"(greedy) or at least 0.01")
        if not self.start.startswith("FILE:"):
            check_prompt(self.start, "--start")     # at parse time, not after the model is loaded


def check_prompt(text: str, flag: str = "--start") -> str:
    """`text` if every tokenizer can take it (UTF-8 text, no NUL), else a one-line DataError. A command
    line with bytes that are not UTF-8 reaches Python as lone surrogates, which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"the byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"the lone surrogate U+{c:04X}"
        raise DataError(f"{flag} is not UTF-8 text: character {e.start} is {what} (Latin-1?); give UTF-8 "
                        f"text, or FILE:path to a UTF-8 file") from None
    if "\0" in text:
        raise DataError(f"{flag} holds a NUL character at {text.index(chr(0))}: it looks binary; give text")
    return text


def read_prompt(spec: str) -> str:
    """The text of --start=FILE:path (~ expanded): a regular UTF-8 text file, else one DataError line.
    A FIFO, a device or a folder is refused without opening it for reading (no hang, no endless read)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        raise DataError(f"--start=FILE:{spec} is a folder; give a UTF-8 text file, or the prompt itself")
    data = read_regular_file(path, "--start=FILE: prompt file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--start=FILE:{spec} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}; "
                        f"Latin-1 or binary?); convert it, e.g. iconv -f latin1 -t utf-8, or give the prompt "
                        f"itself") from None
    return check_prompt(text, f"--start=FILE:{spec}")


def encode_tail(encode, text: str, n: int):
    """The last n tokens of encode(text), tokenizing only a tail of a long text: a prompt is cropped to
    the context BEFORE it is tokenized and repeated, so its memory is O(n), not O(len(text) x samples).
    (Each character is at least one byte token; a GPT-2 token may span several characters, so the
    tail doubles until it yields n tokens plus a margin, which hides the cut's first word.)"""
    size = 4 * n + 64
    while True:
        tokens = encode(text[-size:])
        if size >= len(text) or len(tokens) >= n + 64:
            return tokens[-n:], size < len(text) or len(tokens) > n
        size *= 2


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
    """The generated samples (prompt included, cropped to the model's context), as strings.
    Every input is checked before the model is loaded: the prompt, the device, the checkpoint's path."""
    start = read_prompt(cfg.start[5:]) if cfg.start.startswith("FILE:") else check_prompt(cfg.start)
    device = pick_device(cfg.device)
    given = Path(cfg.out_dir).expanduser()                     # ~ as --data expands it
    path = checkpoint_path(given)
    for p in dict.fromkeys((given, path)):  # a FIFO would block torch.load: name it instead
        kind = path_kind(p)
        if kind not in (None, "missing"):
            raise DataError(f"--out_dir={cfg.out_dir}: {p} is {kind}; point --out_dir at a folder with "
                            f"{path.name} (or at the file itself)")
    model, ckpt = load_model(path, device)
    encode, decode = tokenizer_for(ckpt)
    block_size = model.config.block_size
    tokens, cropped = encode_tail(encode, start or "\n", block_size)
    if len(tokens) == 0:
        raise DataError("--start is empty after encoding; give a non-empty prompt")
    if cropped:
        print(f"--start is longer than the model's context: only its last {block_size} tokens are used "
              f"(and shown)", file=sys.stderr)
    idx = torch.tensor(tokens, dtype=torch.long, device=device)[None].repeat(cfg.num_samples, 1)  # (S, T<=block)
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
    except KeyboardInterrupt:
        print("interrupted (SIGINT): nothing was written; run it again for the samples", file=sys.stderr)
        sys.exit(130)
