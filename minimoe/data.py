"""Data layer: byte tokenizer, corpora and a deterministic batch sampler (token shards and safe file
reads live in shards.py, the atomic write and temp-file cleanup in files.py).

Public API
----------
BYTE_VOCAB_SIZE = 256
encode_bytes(text) -> np.ndarray[uint8]       UTF-8 bytes of `text`
decode_bytes(tokens) -> str                   inverse (list / ndarray / tensor; bad UTF-8 -> U+FFFD)
tokenizer(name, what) -> (encode, decode)     "byte" or GPT-2 BPE (tiktoken): the one place both are chosen
DataError(ValueError)                         every bad input raises this, with a hint on what to do

Corpus(name, train, val, vocab_size, meta)    train/val are 1-D token arrays (ndarray, np.memmap or
    .decode(tokens) -> str                    ShardedArray); uint8 for bytes, uint16 for GPT-2 BPE
    .encode(text) -> np.ndarray
    .check_decoder()                          raise DataError now if decode/encode would fail later
                                              (GPT-2 BPE without tiktoken): call it before step 0
default_cache_dir() -> Path                   $MINIMOE_CACHE, else ~/.cache/minimoe; a failed write
                                              there is a DataError naming the folder and MINIMOE_CACHE=
bpb_factor(corpus) -> float | None            nats/token -> bits per byte (needs bytes_per_token for BPE)
load_corpus(spec="stdlib", cache_dir=None, val_fraction=0.1, max_files=None) -> Corpus
    "stdlib"       the .py sources of this Python's standard library (no download), cached
    "shakespeare"  Tiny Shakespeare, downloaded once into the cache
    PATH           a UTF-8 text file, a folder of text files, or a folder of shards from prepare.py.
                   Only regular files are read (a FIFO, device or socket is refused, never opened),
                   each exactly to its size. Text means UTF-8: tokens are its bytes, and a file with
                   NUL bytes or more than 1% invalid UTF-8 is refused as binary.
  Train/val split: a folder (and stdlib) is split BY FILE: in sorted path order, file i is val iff
  i % k == k-1 with k = round(1/val_fraction) (every 10th file for 0.1; the last file if that picks
  none). A single file: the last val_fraction of its bytes. Shard folders keep prepare's split.
  stdlib is cached in cache_dir/stdlib-<pyver>-<hash8>/{train.bin,val.bin,meta.json} and memmapped.
  A shard folder is checked when loaded: every shard's header dtype against meta.json (dtype,
  tokenizer, vocab_size) and its largest token id against vocab_size (one pass over the memmap,
  ~1 s per GB), so a shard from another tokenizer fails here, not mid-training.

Shard folders (shards.py: write_shard, read_shard, ShardedArray) are loaded by load_corpus(PATH).

BatchSampler(tokens, batch_size, block_size, seed=0, mode="random", rank=0, world_size=1)
    .batch(i) -> (x, y)      int64 CPU tensors (batch_size, block_size), y = x shifted left by one.
                             A pure function of (seed, i): "random" draws window starts from a
                             generator seeded by (seed, i); "sequential" reads disjoint consecutive
                             windows, batch i starting at token i*batch_size*block_size (wrapping
                             after .n_windows = (len(tokens)-1)//block_size windows, i.e. one epoch).
                             "random" samples with replacement (nanoGPT style), so windows can overlap.
    next(sampler)            returns batch(counter * world_size + rank), then counter += 1
    .state_dict() / .load_state_dict(d)   save/restore the counter to resume exactly

How the training loop should use the sampler: call next() once per MICRO-step (each gradient
accumulation step). With accumulation A, micro-step m of optimizer step s on rank r then reads
global batch (s*A + m)*W + r. So the same global batches are seen by 1 process with A=W and by W
processes with A=1: optimizer step s consumes global batches s*W ... s*W + W-1 in both cases.
Batches are CPU tensors; move them with x.to(device, non_blocking=True).
"""

from contextlib import contextmanager
import hashlib
import json
import math
import os
import re
import stat
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write, remove_stale_tmp
from .shards import DataError, ShardedArray, path_kind, read_regular_file, read_shard, write_shard

BYTE_VOCAB_SIZE = 256
GPT2_VOCAB_SIZE = 50257
TOKENIZER_VOCAB = {"byte": BYTE_VOCAB_SIZE, "gpt2": GPT2_VOCAB_SIZE}   # what meta.json's tokenizer implies
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
MIN_CORPUS_TOKENS = 100  # anything smaller is almost certainly the wrong file

STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
ACCEPTED = ("'stdlib', 'shakespeare', a UTF-8 text file, a folder of text files, or a folder of shards "
            "written by minimoe.prepare")


# -----------------------------------------------------------------------------
# byte tokenizer: token = one UTF-8 byte, so any text round-trips and vocab is 256

def encode_bytes(text):
    if not isinstance(text, str):
        raise DataError(f"encode_bytes expects a str, got {type(text).__name__}; decode bytes first")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode_bytes(tokens):
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= BYTE_VOCAB_SIZE):
        raise DataError(f"byte tokens must be in [0, {BYTE_VOCAB_SIZE}), got values in "
                        f"[{arr.min()}, {arr.max()}]; is this a GPT-2 token sequence?")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# writing into the cache

@contextmanager
def writing(folder, fix=None):
    """Turn an OSError (read-only, full disk, a file where a folder should be) raised while writing
    under `folder` into one DataError naming the folder and how to choose another one."""
    try:
        yield
    except OSError as e:
        env = os.environ.get("MINIMOE_CACHE")
        fix = fix or (f"choose another folder with MINIMOE_CACHE=/path/with/space (now "
                      f"{'MINIMOE_CACHE=' + env if env else 'unset: ~/.cache/minimoe'})")
        raise DataError(f"cannot write to {folder} ({e.strerror or e}{': ' + e.filename if e.filename else ''}); "
                        f"{fix}") from None


def tokenizer(name: str, what: str = "this data"):
    """(encode, decode) of the byte tokenizer (name "byte") or of GPT-2 BPE (any other name, via tiktoken):
    encode(text) -> np.ndarray (uint8 bytes / uint16 BPE ids), decode(tokens: list, array or tensor) -> str.
    The one place both are chosen (Corpus, sample.py); `what` names the corpus or checkpoint when
    tiktoken is missing."""
    if name == "byte":
        return encode_bytes, decode_bytes
    try:
        import tiktoken
    except ImportError:
        raise DataError(f"{what} uses GPT-2 BPE tokens, which need tiktoken: pip install tiktoken") from None
    enc = tiktoken.get_encoding("gpt2")

    def decode(tokens):
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        return enc.decode(np.asarray(tokens).reshape(-1).tolist())
    return (lambda text: np.array(enc.encode_ordinary(text), dtype=np.uint16)), decode


# -----------------------------------------------------------------------------
# corpora

@dataclass
class Corpus:
    name: str
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    meta: dict = field(default_factory=dict)

    def _tokenizer(self):
        return tokenizer("byte" if self.vocab_size == BYTE_VOCAB_SIZE else "gpt2", f"corpus {self.name!r}")

    def check_decoder(self):
        """Raise DataError now if decode()/encode() would fail later: GPT-2 BPE tokens need tiktoken,
        and only the byte and GPT-2 tokenizers are known. Cheap; train() calls it before step 0, so
        a missing package is not found only when sample.txt is written after the whole run."""
        if self.vocab_size == BYTE_VOCAB_SIZE:
            return
        tokenizer = self.meta.get("tokenizer", "gpt2")
        if tokenizer != "gpt2" or self.vocab_size > GPT2_VOCAB_SIZE:
            raise DataError(f"corpus {self.name!r} has tokenizer {tokenizer!r} with vocab_size {self.vocab_size}; "
                            f"minimoe decodes only 'byte' (256) and 'gpt2' ({GPT2_VOCAB_SIZE}) tokens: "
                            f"re-prepare the data with --tokenizer=byte or --tokenizer=gpt2")
        self._tokenizer()

    def decode(self, tokens):
        return self._tokenizer()[1](tokens)

    def encode(self, text):
        return self._tokenizer()[0](text)


def bpb_factor(corpus: Corpus) -> float | None:
    """Multiply a loss in nats/token by this to get bits per byte (a tokenizer-free unit).
    Byte tokens: 1/ln 2. Other tokenizers: needs bytes_per_token in the corpus meta, else None."""
    if corpus.meta.get("tokenizer", "byte") == "byte" and corpus.vocab_size == 256:
        return 1 / math.log(2)
    bpt = corpus.meta.get("bytes_per_token")
    return 1 / (math.log(2) * bpt) if bpt else None


def default_cache_dir():
    env = os.environ.get("MINIMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minimoe"


def load_corpus(spec="stdlib", cache_dir=None, val_fraction=0.1, max_files=None):
    """Resolve `spec` ("stdlib", "shakespeare" or a path) to a Corpus; see the module docstring.
    max_files keeps only the first N files of a stdlib/folder corpus (for quick tests)."""
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    if max_files is not None and (not isinstance(max_files, int) or max_files < 1):
        raise DataError(f"max_files must be a positive int or None, got {max_files!r}")
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise DataError(f"data {spec!r} is invalid: give {ACCEPTED}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if spec == "stdlib":
        return _stdlib_corpus(cache_dir, val_fraction, max_files)
    if spec == "shakespeare":
        return _text_corpus("shakespeare", [_download_shakespeare(cache_dir)], val_fraction)
    path = Path(str(spec)).expanduser()
    kind = path_kind(path)
    if kind == "missing":
        raise DataError(f"data path {str(spec)!r} does not exist; pass {ACCEPTED}")
    if kind:
        raise DataError(f"data path {str(spec)!r} is {kind}; pass {ACCEPTED}")
    if path.is_dir() and (any(path.glob("train_*.bin")) or any(path.glob("val_*.bin"))):
        return _shard_corpus(path)
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise DataError(f"folder {path} contains no (non-hidden) files; point --data at text files")
        return _text_corpus(path.resolve().name, files[:max_files], val_fraction, source=str(path))
    return _text_corpus(path.stem, [path], val_fraction)


def _folder_files(folder):
    """The non-hidden regular files under `folder`, sorted; anything else there is an error."""
    files = []
    for p in sorted(folder.rglob("*")):              # (rglob does not follow symlinked folders)
        if _hidden(p.relative_to(folder)) or p.is_dir():
            continue
        kind = path_kind(p)
        if kind:
            raise DataError(f"{p} in data folder {folder} is {kind}; a text folder may hold only regular "
                            f"UTF-8 text files (hidden files are skipped): remove it or point --data elsewhere")
        files.append(p)
    return files


def _hidden(rel):  # hidden files/folders and Python bytecode caches are never text data
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


def _is_val_file(i, val_fraction):
    # deterministic split by file: every k-th file in sorted order goes to val (k=10 for 0.1)
    k = max(2, round(1 / val_fraction))
    return i % k == k - 1


def _split_rule(val_fraction):
    k = max(2, round(1 / val_fraction))
    return f"by file: file i (0-based, in sorted path order) is val iff i % {k} == {k - 1}"


def _check_split(name, train, val, fix):
    for split, tokens in (("train", train), ("val", val)):
        if len(tokens) < 2:
            raise DataError(f"corpus {name!r} has {len(tokens)} {split} tokens (need at least 2); {fix}")


def _stdlib_files(max_files):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]  # prune: never descend there
        rel = Path(dirpath).relative_to(root)
        files += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
    return root, sorted(files)[:max_files]


def _stdlib_corpus(cache_dir, val_fraction, max_files):
    root, files = _stdlib_files(max_files)
    if not files:
        raise DataError(f"found no .py files under the standard library at {root}; "
                        f"use --data=PATH with a local text file instead")
    # the cache key covers everything the content depends on, cheaply (names + sizes, not bytes)
    key = hashlib.sha256(repr((str(root), val_fraction, [(f, (root / f).stat().st_size)
                                                          for f in files])).encode()).hexdigest()
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = cache_dir / f"stdlib-{pyver}-{key[:8]}"
    meta_path = out / "meta.json"
    if meta_path.is_file():  # meta.json is written last, so if it exists the cache is complete
        try:
            return Corpus("stdlib", read_shard(out / "train.bin"), read_shard(out / "val.bin"),
                          BYTE_VOCAB_SIZE, json.loads(meta_path.read_text()))
        except (DataError, OSError, ValueError) as e:          # (JSONDecodeError is a ValueError)
            print(f"stdlib cache at {out} is broken ({e}); rebuilding", file=sys.stderr)
    with writing(out):
        meta = _build_stdlib(root, files, val_fraction, out)
    return Corpus("stdlib", read_shard(out / "train.bin"), read_shard(out / "val.bin"), BYTE_VOCAB_SIZE, meta)


def _build_stdlib(root, files, val_fraction, out):
    t0 = time.time()
    chunks = {"train": [], "val": []}
    sha = hashlib.sha256()
    for i, rel in enumerate(files):
        # a short header line tells the model (and you, when reading samples) where a file starts
        chunk = f"# file: {rel}\n".encode() + read_regular_file(root / rel, "standard library file")
        sha.update(chunk)
        chunks["val" if _is_val_file(i, val_fraction) else "train"].append(chunk)
    train, val = (np.frombuffer(b"".join(chunks[s]), dtype=np.uint8) for s in ("train", "val"))
    _check_split("stdlib", train, val, "use a smaller val_fraction or more files")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)                      # an earlier build that was killed mid-write
    write_shard(out / "train.bin", train)
    write_shard(out / "val.bin", val)
    meta = {"name": "stdlib", "tokenizer": "byte", "vocab_size": BYTE_VOCAB_SIZE,
            "python_version": sys.version.split()[0], "stdlib_path": str(root),
            "train_files": len(chunks["train"]), "val_files": len(chunks["val"]),
            "train_tokens": len(train), "val_tokens": len(val), "total_bytes": len(train) + len(val),
            "sha256": sha.hexdigest(), "split": _split_rule(val_fraction),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.time() - t0, 3)}
    atomic_write(out / "meta.json", [json.dumps(meta, indent=2).encode()])  # last: marks the cache complete
    return meta


def _download_shakespeare(cache_dir):
    path = cache_dir / "shakespeare" / "input.txt"
    if not path.is_file():
        with writing(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(path.parent)
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                data = r.read()
        except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
            raise DataError(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL} failed ({e}); "
                            f"if you are offline pass --data=PATH to a local text file instead") from None
        with writing(path.parent):
            atomic_write(path, [data])
    return path


def _read_text_file(path):
    data = read_regular_file(path, "text file")
    # byte tokens can encode anything, but NULs or lots of invalid UTF-8 mean a non-text file
    bad = data.decode("utf-8", errors="replace").count("\ufffd")
    if b"\x00" in data or bad > 0.01 * len(data):
        raise DataError(f"{path} looks binary ({data.count(0)} NUL bytes, {bad} invalid UTF-8 sequences in "
                        f"{len(data)} bytes); only UTF-8 text is allowed (at most 1% invalid sequences, "
                        f"no NUL bytes): remove it or point at text files")
    return data


def _text_corpus(name, files, val_fraction, source=None):
    texts = [(f, _read_text_file(f)) for f in files]
    texts = [(f, d) for f, d in texts if d]  # empty files carry no text
    total = sum(len(d) for _, d in texts)
    where = source or str(files[0])
    if total == 0:
        raise DataError(f"{where} contains no text (empty file(s)); point --data at a non-empty text file")
    if total < MIN_CORPUS_TOKENS:
        raise DataError(f"{where} has only {total} bytes of text, need at least {MIN_CORPUS_TOKENS}; "
                        f"use a larger text file")
    if len(texts) >= 2:
        train = b"".join(d for i, (_, d) in enumerate(texts) if not _is_val_file(i, val_fraction))
        val = b"".join(d for i, (_, d) in enumerate(texts) if _is_val_file(i, val_fraction))
        if not val:  # fewer than k files: hold out the last one
            train, val = b"".join(d for _, d in texts[:-1]), texts[-1][1]
        rule = _split_rule(val_fraction) + " (the last file if that selects none)"
    else:
        n_val = max(1, int(total * val_fraction))
        train, val = texts[0][1][:-n_val], texts[0][1][-n_val:]
        rule = f"last {val_fraction} of the bytes"
    train, val = np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8)
    _check_split(name, train, val, "use more text or a different val_fraction")
    meta = {"name": name, "tokenizer": "byte", "vocab_size": BYTE_VOCAB_SIZE, "source": where,
            "files": len(texts), "train_tokens": len(train), "val_tokens": len(val), "split": rule}
    return Corpus(name, train, val, BYTE_VOCAB_SIZE, meta)


def _shard_corpus(path):
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{path} has shard files but no meta.json, so prepare did not finish; "
                        f"re-run `python -m minimoe.prepare` with --out_dir={path} to complete it")
    try:
        meta = json.loads(meta_path.read_text())
        vocab_size = int(meta["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_path} is not a valid prepare meta.json ({e!r}); re-run prepare") from None
    tokenizer = meta.get("tokenizer")
    if not 1 <= vocab_size <= 2**16 or (tokenizer in TOKENIZER_VOCAB and vocab_size != TOKENIZER_VOCAB[tokenizer]):
        raise DataError(f"{meta_path} says tokenizer {tokenizer!r} with vocab_size {vocab_size}; expected "
                        f"{TOKENIZER_VOCAB} and at most 65536 (uint16 shards): {_reprepare(path)}")
    splits = {}
    for split in ("train", "val"):
        shards = [read_shard(p) for p in sorted(path.glob(f"{split}_*.bin"))]
        if not shards or sum(len(s) for s in shards) < 2:
            raise DataError(f"{path} has no {split} tokens ({split}_*.bin shards); re-run prepare "
                            f"with a larger input or a different --val_fraction")
        for p, shard in zip(sorted(path.glob(f"{split}_*.bin")), shards):
            _check_shard_tokens(p, shard, meta, vocab_size, path)
        splits[split] = shards[0] if len(shards) == 1 else ShardedArray(shards)
    return Corpus(meta.get("name", path.name), splits["train"], splits["val"], vocab_size, meta)


def _check_shard_tokens(p, shard, meta, vocab_size, folder):
    # a uint8 shard cannot hold GPT-2 ids, a shard from another tokenizer has ids past the vocabulary:
    # either would crash (or silently mislearn) mid-training, so look now: one pass over the memmap
    dtype = np.dtype(shard.dtype)
    if meta.get("dtype", dtype.name) != dtype.name or vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"shard {p} holds {dtype.name} tokens but meta.json says dtype "
                        f"{meta.get('dtype', '(none)')!r}, vocab_size {vocab_size}: they do not belong "
                        f"together; {_reprepare(folder)}")
    top = int(shard.max()) if len(shard) else -1
    if top >= vocab_size:
        raise DataError(f"shard {p} holds token id {top}, but meta.json says vocab_size {vocab_size} "
                        f"(ids 0..{vocab_size - 1}): the shard is corrupt or from another tokenizer; "
                        f"{_reprepare(folder)}")


def _reprepare(folder):
    """How to re-create a prepared folder: the prepare command its progress.json remembers."""
    try:
        cfg = json.loads((Path(folder) / "progress.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        cfg = {}
    if cfg.get("command") == "fineweb":
        cmd = f"python -m minimoe.prepare fineweb --name={cfg.get('name')} --out_dir={folder}"
    elif cfg.get("command") == "text":
        cmd = f"python -m minimoe.prepare text {cfg.get('source')} --tokenizer={cfg.get('tokenizer')} --out_dir={folder}"
    else:
        cmd = f"python -m minimoe.prepare text|fineweb ... --out_dir={folder}"
    return f"delete {folder} and prepare it again: {cmd}"


# -----------------------------------------------------------------------------
# batch sampler

class BatchSampler:
    """Deterministic (x, y) batches; batch(i) depends only on (seed, i). See the module docstring."""

    def __init__(self, tokens, batch_size, block_size, seed=0, mode="random", rank=0, world_size=1):
        for name, value, low in (("batch_size", batch_size, 1), ("block_size", block_size, 1),
                                 ("seed", seed, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DataError(f"BatchSampler {name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise DataError(f"BatchSampler rank must be in [0, world_size={world_size}), got {rank}")
        if mode not in ("random", "sequential"):
            raise DataError(f"BatchSampler mode must be 'random' or 'sequential', got {mode!r}")
        if len(tokens) <= block_size:
            raise DataError(f"only {len(tokens)} tokens, but one window of block_size={block_size} "
                            f"needs {block_size + 1}; use a smaller block_size or more data")
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.seed, self.mode, self.rank, self.world_size = seed, mode, rank, world_size
        self.n_windows = (len(tokens) - 1) // block_size  # disjoint windows per sequential epoch
        self.counter = 0  # micro-batches this rank has drawn so far

    def starts(self, i):
        """Token offsets of the batch_size windows of global batch i."""
        B, T = self.batch_size, self.block_size
        if self.mode == "random":
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + i) % 2**63)
            return torch.randint(len(self.tokens) - T, (B,), generator=g).tolist()
        return [((i * B + j) % self.n_windows) * T for j in range(B)]

    def batch(self, i):
        if not isinstance(i, (int, np.integer)) or i < 0:
            raise DataError(f"batch index must be an int >= 0, got {i!r}")
        T = self.block_size
        rows = np.stack([np.asarray(self.tokens[s:s + T + 1], dtype=np.int64) for s in self.starts(i)])
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def __iter__(self):
        return self

    def __next__(self):
        x, y = self.batch(self.counter * self.world_size + self.rank)
        self.counter += 1
        return x, y

    def state_dict(self):
        return {"counter": self.counter, "seed": self.seed, "mode": self.mode, "world_size": self.world_size,
                "batch_size": self.batch_size, "block_size": self.block_size}

    def load_state_dict(self, d):
        for key in ("seed", "mode", "batch_size", "block_size"):
            if key in d and d[key] != getattr(self, key):
                raise DataError(f"sampler state has {key}={d[key]!r} but this sampler has "
                                f"{getattr(self, key)!r}; resume with the same data settings")
        if "counter" not in d:
            raise DataError(f"sampler state needs a 'counter' entry, got keys {sorted(d)}")
        # the counter is per rank; convert via the global index so a resume may change world_size
        consumed = int(d["counter"]) * int(d.get("world_size", self.world_size))
        if consumed % self.world_size:
            raise DataError(f"cannot resume: {consumed} global batches consumed is not divisible "
                            f"by world_size={self.world_size}")
        self.counter = consumed // self.world_size
