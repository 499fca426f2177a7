"""Tokenize a corpus once into token shards that `load_corpus(OUT_DIR)` memory-maps.

    python -m minimoe.prepare text PATH|stdlib [--tokenizer=byte|gpt2] [--out_dir=DIR]
                                               [--val_fraction=0.01] [--shard_tokens=N]
    python -m minimoe.prepare fineweb [--out_dir=DIR] [--name=sample-10BT]
                                      [--shard_tokens=100_000_000] [--max_tokens=N]

Output folder:
    train_000000.bin ...   shards in the data.write_shard format (uint8 bytes or uint16 GPT-2 BPE)
    val_000000.bin ...
    meta.json              tokenizer, vocab_size, token counts, source; written last
    progress.json          resume state: the finished shards and where the next one starts
    progress.jsonl         one line per shard finished since progress.json was last written

`text` splits train/val exactly like load_corpus (by file for a folder, the tail of a single
file) and writes each split as its own stream of shards. `fineweb` streams FineWeb-Edu through
GPT-2 BPE with an end-of-text token before every document; like nanoGPT/llm.c, shard 0 is val
and the rest are train.

Both feed documents (1-D token arrays) into write_shards(), which packs them into fixed-size
shards and records after every shard where the next one starts (document index, token offset).
A restart verifies the shards on disk, skips the documents already consumed and continues.
Exit codes: 0 done; 2 bad input or a failed write (`error: ...`, one line); 130 (Ctrl-C) or 143
(SIGTERM) interrupted, with the finished shards recorded: the same command continues.
"""

import hashlib
import importlib
import json
import shlex
import signal
import sys
import sysconfig
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minimoe.bench import OneLineParser
from minimoe.data import BYTE_VOCAB_SIZE, GPT2_VOCAB_SIZE, DataError, default_cache_dir, load_corpus, writing
from minimoe.files import atomic_write, remove_stale_tmp
from minimoe.shards import path_kind, read_shard, write_shard

FINEWEB_DATASET = "HuggingFaceFW/fineweb-edu"
CHUNK_BYTES = 1 << 20  # local text is fed to the tokenizer in ~1 MB pieces (progress + bounded memory)


def _require(*modules):
    # optional heavy dependencies are only imported by the commands that need them
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise DataError(f"this command needs the {' and '.join(modules)} package(s) ({e}); "
                        f"install them with: pip install {' '.join(modules)}") from None


def _read_json(path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read ({e}); delete it (and the shards next to it) to start "
                        f"this folder over") from None


def _is_progress(p):
    # the shape write_shards reads back: {"config", "streams": {name: {"shards": [entry], "done"}}}
    try:
        return "config" in p and all(isinstance(st["done"], bool) and all(
            {"file", "tokens", "doc", "offset"} <= set(e) for e in st["shards"]) for st in p["streams"].values())
    except (KeyError, TypeError, AttributeError):
        return False


def _write_json(path, obj):
    atomic_write(path, [json.dumps(obj, indent=2).encode()])


# -----------------------------------------------------------------------------
# progress: progress.json (rewritten a few times per run) + a journal (one line appended per shard)
#
# Rewriting progress.json after every shard costs O(shards) per shard, O(shards^2) in all: hours with
# tiny shards. So each finished shard appends one line to progress.jsonl instead, and progress.json is
# rewritten (and the journal emptied) only when a stream starts, stops or fails. Each journal line
# names its shard's index: replaying it twice (a crash between the rewrite and the emptying) or a
# torn last line (a crash mid-append) are both harmless; a lost line only means that shard is redone.

JOURNAL = "progress.jsonl"
OWN_FILES = ("progress.json", JOURNAL, "meta.json")


def _load_progress(out_dir, config):
    """progress.json with the journal's entries replayed, and whether it differs from the file."""
    progress_path, journal = out_dir / "progress.json", out_dir / JOURNAL
    progress = _read_json(progress_path, None)
    if progress is None:                       # a journal without its progress.json is stale
        journal.unlink(missing_ok=True)
        return {"config": config, "streams": {}}, True
    if not _is_progress(progress):
        raise DataError(f"{progress_path} is not a minimoe.prepare progress file; delete it (and the "
                        f"shards next to it) to start this folder over")
    if progress["config"] != config:
        raise DataError(f"{out_dir} was prepared with different settings ({progress['config']}, now "
                        f"{config}); use a new --out_dir or delete {out_dir} to start over")
    lines = journal.read_bytes().splitlines() if journal.is_file() else []
    for line in lines:
        try:
            e = json.loads(line)
            st = progress["streams"].setdefault(e["stream"], {"shards": [], "done": False})
            k, entry = e["k"], {key: e[key] for key in ("file", "tokens", "doc", "offset")}
        except (ValueError, KeyError, TypeError, AttributeError):
            break                              # torn by a crash: this shard and later ones are redone
        if k > len(st["shards"]):
            break
        if k == len(st["shards"]):
            st["shards"].append(entry)
            st["done"] = False
    return progress, bool(lines)


def _save_progress(out_dir, progress):
    _write_json(out_dir / "progress.json", progress)
    (out_dir / JOURNAL).unlink(missing_ok=True)   # its lines are in progress.json now


def check_own_files(out_dir, fix=None):
    """Refuse, before any work, an out_dir that is not a folder, or a file prepare writes that is a
    folder, a FIFO, a socket, a device or a symlink loop (writing or reading it would fail or block)."""
    out_dir = Path(out_dir)
    kind = "a file" if out_dir.is_file() else path_kind(out_dir)
    if kind and kind != "missing":
        raise DataError(f"cannot write to {out_dir} (it is {kind}, not a folder); {fix or 'choose another --out_dir'}")
    if not out_dir.is_dir():
        return
    for p in out_dir.iterdir():
        if p.name in OWN_FILES or p.suffix == ".bin":
            kind = "a folder" if p.is_dir() else path_kind(p)
            if kind:
                raise DataError(f"{p} is {kind}, where prepare keeps a regular file; remove it or "
                                f"choose another --out_dir")


# -----------------------------------------------------------------------------
# the resumable shard writer shared by both commands

def write_shards(docs_from, out_dir, shard_name, shard_tokens, dtype, stream="all", config=None,
                 max_tokens=None, fix=None):
    """Pack documents into shards of exactly `shard_tokens` tokens (the last one may be shorter).

    docs_from(d): yields documents d, d+1, ... as 1-D int arrays, in the same order on every call.
    shard_name(k): file name of this stream's k-th shard. `stream` names this stream inside
    progress.json (one folder may hold several, e.g. "train" and "val"); `config` must be equal
    between the first run and any resume. Stops after `max_tokens` tokens if given.
    Returns this stream's entry of progress.json: {"shards": [...], "done": bool}.
    A failed write (read-only, disk full) is a DataError naming out_dir, with `fix` (default: how
    to choose another MINIMOE_CACHE); errors while reading documents (a download) pass through.
    Whatever stops it (an error, Ctrl-C), the finished shards are recorded and a rerun continues.
    """
    out_dir = Path(out_dir)
    check_own_files(out_dir, fix)
    with writing(out_dir, fix):
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out_dir)              # half-written shards of an interrupted run
    progress, changed = _load_progress(out_dir, config)
    changed |= stream not in progress["streams"]
    state = progress["streams"].setdefault(stream, {"shards": [], "done": False})

    # keep the finished shards that are still intact on disk; redo from the first bad one
    for k, entry in enumerate(state["shards"]):
        try:
            ok = len(read_shard(out_dir / entry["file"])) == entry["tokens"]
        except DataError:
            ok = False
        if not ok:
            print(f"shard {entry['file']} is missing or damaged; redoing from there", file=sys.stderr)
            state["shards"], state["done"], changed = state["shards"][:k], False, True
            break
    total = sum(e["tokens"] for e in state["shards"])
    limit = max_tokens if max_tokens is not None else float("inf")
    if state["done"] or total >= limit:
        if changed:
            with writing(out_dir, fix):
                _save_progress(out_dir, progress)
        return state
    with writing(out_dir, fix):
        _save_progress(out_dir, progress)      # the journal starts empty
        (out_dir / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until we finish

    doc, offset = (state["shards"][-1]["doc"], state["shards"][-1]["offset"]) if state["shards"] else (0, 0)
    buf = np.empty(shard_tokens, dtype=dtype)
    fill = 0
    max_id = np.iinfo(dtype).max

    def flush():
        # write the shard (fsynced), then append where the next one starts (doc, offset) to the
        # journal; a crash between the two only means this shard is written again, identically
        name = shard_name(len(state["shards"]))
        with writing(out_dir, fix):
            write_shard(out_dir / name, buf[:fill])
            entry = {"file": name, "tokens": fill, "doc": doc, "offset": offset}
            journal.write(json.dumps({"stream": stream, "k": len(state["shards"]), **entry}) + "\n")
            journal.flush()
            state["shards"].append(entry)

    bar = tqdm(total=max_tokens, initial=total, unit="tok", unit_scale=True, desc=f"{stream} shards")
    stopped = False
    try:
        with writing(out_dir, fix):
            journal = open(out_dir / JOURNAL, "a")
        with journal:
            for tokens in docs_from(doc):
                tokens = np.asarray(tokens)
                if tokens.size and (tokens.min() < 0 or tokens.max() > max_id):
                    raise DataError(f"document {doc} has token ids in [{tokens.min()}, {tokens.max()}], which "
                                    f"do not fit {np.dtype(dtype).name} shards; check the tokenizer")
                while offset < len(tokens) and not stopped:
                    take = int(min(len(tokens) - offset, shard_tokens - fill, limit - total))
                    buf[fill:fill + take] = tokens[offset:offset + take]
                    fill, offset, total = fill + take, offset + take, total + take
                    bar.update(take)
                    if fill == shard_tokens:
                        flush()
                        fill = 0
                    stopped = total >= limit
                if stopped:
                    break
                doc, offset = doc + 1, 0
            if fill:
                flush()
    except BaseException:                      # an error, Ctrl-C: record the finished shards, then go on failing
        bar.close()
        with suppress(DataError):
            with writing(out_dir, fix):
                _save_progress(out_dir, progress)
        raise
    bar.close()
    state["done"] = not stopped  # stopped by max_tokens: a later run with a larger limit continues
    with writing(out_dir, fix):
        _save_progress(out_dir, progress)
    return state


def _write_meta(out_dir, streams, **info):
    # meta.json is written last: its presence tells load_corpus the folder is complete
    meta = {"format": "minimoe-shards", **info}
    for split in ("train", "val"):
        shards = [e for s in streams for e in s["shards"] if e["file"].startswith(split + "_")]
        meta[f"{split}_tokens"] = sum(e["tokens"] for e in shards)
        meta[f"{split}_shards"] = [e["file"] for e in shards]
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write_json(Path(out_dir) / "meta.json", meta)
    return meta


# -----------------------------------------------------------------------------
# commands

def _chunks(data):
    """Split bytes into ~CHUNK_BYTES pieces ending at a newline, so no UTF-8 character is cut."""
    bounds, start = [], 0
    while start < len(data):
        end = min(start + CHUNK_BYTES, len(data))
        if end < len(data):
            cut = data.rfind(b"\n", start, end)
            end = cut + 1 if cut >= 0 else end
        bounds.append((start, end))
        start = end
    return bounds


def _input_folder(path):
    """The folder `prepare text PATH` reads (stdlib: the standard library), or None for one file."""
    if path == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    folder = Path(str(path)).expanduser()
    return folder if path != "shakespeare" and folder.is_dir() else None


def check_not_inside(out_dir, folder):
    """An out_dir equal to or inside the input folder would be read back as input: its shards make the
    next prepare or training on that folder fail ("looks binary") or learn from token files."""
    try:
        out, src = Path(out_dir).expanduser().resolve(), Path(folder).resolve()
    except (OSError, RuntimeError):        # a symlink loop: check_own_files names it
        return
    if out == src or src in out.parents:
        where = "is the input folder itself" if out == src else f"is inside the input folder {folder}"
        raise DataError(f"--out_dir={out_dir} {where}: its shards would be read as text the next time that "
                        f"folder is prepared or trained on; choose an --out_dir outside {folder}")


def prepare_text(path, tokenizer="byte", out_dir=None, val_fraction=0.01, shard_tokens=100_000_000):
    if tokenizer not in ("byte", "gpt2"):
        raise DataError(f"--tokenizer must be 'byte' or 'gpt2', got {tokenizer!r}")
    fix = "choose another --out_dir" if out_dir else None           # None: say MINIMOE_CACHE=
    out_dir = Path(out_dir).expanduser() if out_dir else None       # ~ as load_corpus expands --data
    folder = _input_folder(path)
    if folder is not None:                 # before any work: the default folder too (it is under this root)
        check_not_inside(out_dir or default_cache_dir() / "prepared", folder)
    if out_dir is not None:
        check_own_files(out_dir)
    corpus = load_corpus(path, val_fraction=val_fraction)  # byte tokens, split the same way as training
    if tokenizer == "byte":
        encode, dtype, vocab = (lambda b: b), np.uint8, BYTE_VOCAB_SIZE
    else:
        enc = _require("tiktoken")[0].get_encoding("gpt2")
        encode = lambda b: np.array(enc.encode_ordinary(b.tobytes().decode("utf-8", "replace")), np.uint16)
        dtype, vocab = np.uint16, GPT2_VOCAB_SIZE
    out_dir = out_dir or default_cache_dir() / "prepared" / f"{corpus.name}-{tokenizer}"
    if folder is not None:
        check_not_inside(out_dir, folder)
    sha = hashlib.sha256(np.asarray(corpus.train).tobytes() + np.asarray(corpus.val).tobytes()).hexdigest()
    config = {"command": "text", "source": str(path), "source_sha256": sha, "tokenizer": tokenizer,
              "val_fraction": val_fraction, "shard_tokens": shard_tokens}
    streams = []
    for split in ("train", "val"):
        data = np.asarray(getattr(corpus, split))
        bounds = _chunks(data.tobytes())

        def docs_from(d, data=data, bounds=bounds):
            for start, end in bounds[d:]:
                yield encode(data[start:end])

        streams.append(write_shards(docs_from, out_dir, lambda k, split=split: f"{split}_{k:06d}.bin",
                                    shard_tokens, dtype, stream=split, config=config, fix=fix))
    with writing(out_dir, fix):
        return out_dir, _write_meta(out_dir, streams, name=corpus.name, source=str(path), tokenizer=tokenizer,
                                    vocab_size=vocab, dtype=np.dtype(dtype).name, split=corpus.meta["split"])


def prepare_fineweb(out_dir=None, name="sample-10BT", shard_tokens=100_000_000, max_tokens=None):
    if max_tokens is not None and max_tokens <= shard_tokens:
        raise DataError(f"--max_tokens={max_tokens} must be larger than --shard_tokens={shard_tokens}: "
                        f"the first shard is val, so otherwise there would be no training tokens")
    datasets, tiktoken = _require("datasets", "tiktoken")
    enc = tiktoken.get_encoding("gpt2")
    eot = enc.eot_token  # 50256, <|endoftext|>: marks document boundaries

    def docs_from(d):
        ds = datasets.load_dataset(FINEWEB_DATASET, name=name, split="train", streaming=True)
        for row in (ds.skip(d) if d else ds):  # skip() still downloads, but we don't re-tokenize
            yield np.array([eot] + enc.encode_ordinary(row["text"]), dtype=np.uint16)

    fix = "choose another --out_dir" if out_dir else None           # None: say MINIMOE_CACHE=
    out_dir = Path(out_dir).expanduser() if out_dir else default_cache_dir() / f"fineweb-edu-{name}"
    config = {"command": "fineweb", "dataset": FINEWEB_DATASET, "name": name, "shard_tokens": shard_tokens}
    state = write_shards(docs_from, out_dir, lambda k: f"{'val' if k == 0 else 'train'}_{k:06d}.bin",
                         shard_tokens, np.uint16, stream="fineweb", config=config, max_tokens=max_tokens, fix=fix)
    with writing(out_dir, fix):
        return out_dir, _write_meta(out_dir, [state], name=f"fineweb-edu-{name}", source=FINEWEB_DATASET,
                                    tokenizer="gpt2", vocab_size=GPT2_VOCAB_SIZE, dtype="uint16",
                                    split="shard 0 is val, the rest train")


def _stop(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)   # SIGTERM ends like Ctrl-C: progress recorded


def main(argv=None):
    """The command line. Exit codes: 0 done, 2 bad input or a failed write (one line, `error: ...`),
    130 / 143 interrupted by Ctrl-C / SIGTERM (the finished shards are kept: the same command continues)."""
    parser = OneLineParser(prog="python -m minimoe.prepare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("text", help="tokenize a local text file, folder of text files, or 'stdlib'")
    p.add_argument("path", help="text file, folder of text files, or the literal 'stdlib'")
    p.add_argument("--tokenizer", default="byte", choices=["byte", "gpt2"])
    p.add_argument("--out_dir", default=None, help="default: $MINIMOE_CACHE/prepared/<name>-<tokenizer>")
    p.add_argument("--val_fraction", type=float, default=0.01)
    p.add_argument("--shard_tokens", type=int, default=100_000_000)
    p = sub.add_parser("fineweb", help="download + GPT-2-tokenize FineWeb-Edu (needs datasets, tiktoken)")
    p.add_argument("--out_dir", default=None, help="default: $MINIMOE_CACHE/fineweb-edu-<name>")
    p.add_argument("--name", default="sample-10BT", help="FineWeb-Edu config, e.g. sample-10BT")
    p.add_argument("--shard_tokens", type=int, default=100_000_000)
    p.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens")
    args = parser.parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _stop)
    except ValueError:                                   # not the main thread: leave signals alone
        previous = None
    try:
        if not 1 <= args.shard_tokens < 2**31:         # the shard header counts tokens in an int32
            raise DataError(f"--shard_tokens must be in [1, 2**31 - 1], got {args.shard_tokens}")
        if args.command == "text":
            out_dir, meta = prepare_text(args.path, args.tokenizer, args.out_dir, args.val_fraction,
                                         args.shard_tokens)
        else:
            out_dir, meta = prepare_fineweb(args.out_dir, args.name, args.shard_tokens, args.max_tokens)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        print(f"interrupted ({name}): the finished shards are kept; run the same command again to continue",
              file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"{out_dir}: {meta['train_tokens']:,} train tokens in {len(meta['train_shards'])} shard(s), "
          f"{meta['val_tokens']:,} val tokens in {len(meta['val_shards'])} shard(s); "
          f"use it with --data={shlex.quote(str(out_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
