"""Tests for minimoe.prepare: the resumable shard writer and the `text` / `fineweb` commands."""

import json
import sys

import numpy as np
import pytest

from minimoe import prepare
from minimoe.data import Corpus, DataError, load_corpus
from minimoe.shards import ShardedArray, read_shard
from minimoe.prepare import main, write_shards


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _make_text(tmp_path, n_files=1):
    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(n_files):
        lines = [f"file {i} line {j}: the cat sat on the mat, naïvely ☕\n" for j in range(200)]
        (folder / f"doc{i:02d}.txt").write_text("".join(lines), encoding="utf-8")
    return folder if n_files > 1 else folder / "doc00.txt"


def _docs(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50257, rng.integers(0, 40)).astype(np.uint16) for _ in range(n)]


def _name(k):
    return f"{'val' if k == 0 else 'train'}_{k:06d}.bin"


def _all_tokens(out_dir, files):
    return np.concatenate([read_shard(out_dir / f) for f in files])


# -----------------------------------------------------------------------------
# write_shards: the core shared by `text` and `fineweb`

def test_write_shards_packs_documents(tmp_path):
    docs = _docs()
    state = write_shards(lambda d: iter(docs[d:]), tmp_path, _name, 64, np.uint16, config={"a": 1})
    files = [e["file"] for e in state["shards"]]
    assert files[0] == "val_000000.bin" and files[1] == "train_000001.bin" and state["done"]
    sizes = [len(read_shard(tmp_path / f)) for f in files]
    assert all(s == 64 for s in sizes[:-1]) and 0 < sizes[-1] <= 64
    assert np.array_equal(_all_tokens(tmp_path, files), np.concatenate(docs))
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["streams"]["all"]["shards"][-1]["doc"] == len(docs)  # all documents consumed


def test_write_shards_resumes_after_crash(tmp_path):
    docs = _docs(seed=1)
    calls = []

    def crashing(d):  # dies after handing out 30 documents
        calls.append(d)
        for i, doc in enumerate(docs[d:], start=d):
            if i == 30:
                raise KeyboardInterrupt
            yield doc

    with pytest.raises(KeyboardInterrupt):
        write_shards(crashing, tmp_path, _name, 64, np.uint16)
    done_before = json.loads((tmp_path / "progress.json").read_text())["streams"]["all"]["shards"]
    assert done_before and not (tmp_path / "meta.json").exists()
    mtimes = {e["file"]: (tmp_path / e["file"]).stat().st_mtime_ns for e in done_before}

    state = write_shards(lambda d: (calls.append(d), iter(docs[d:]))[1], tmp_path, _name, 64, np.uint16)
    assert calls[-1] == done_before[-1]["doc"] > 0  # restarted mid-stream, not from document 0
    files = [e["file"] for e in state["shards"]]
    assert np.array_equal(_all_tokens(tmp_path, files), np.concatenate(docs))
    assert all((tmp_path / f).stat().st_mtime_ns == t for f, t in mtimes.items())  # finished shards kept

    # a damaged shard is redone from there on
    (tmp_path / files[1]).write_bytes(b"garbage")
    state = write_shards(lambda d: iter(docs[d:]), tmp_path, _name, 64, np.uint16)
    assert np.array_equal(_all_tokens(tmp_path, [e["file"] for e in state["shards"]]), np.concatenate(docs))


def test_write_shards_max_tokens_and_errors(tmp_path):
    docs = _docs(seed=2)
    total = sum(len(d) for d in docs)
    state = write_shards(lambda d: iter(docs[d:]), tmp_path, _name, 64, np.uint16, max_tokens=150)
    assert sum(e["tokens"] for e in state["shards"]) == 150 and not state["done"]
    state = write_shards(lambda d: iter(docs[d:]), tmp_path, _name, 64, np.uint16)  # raise the limit
    files = [e["file"] for e in state["shards"]]
    assert state["done"] and np.array_equal(_all_tokens(tmp_path, files), np.concatenate(docs))
    assert sum(e["tokens"] for e in state["shards"]) == total

    with pytest.raises(DataError, match="different settings"):
        write_shards(lambda d: iter(docs[d:]), tmp_path, _name, 64, np.uint16, config={"other": 1})
    with pytest.raises(DataError, match=r"document 0.*70000.*uint16"):
        write_shards(lambda d: iter([np.array([1, 70000])]), tmp_path / "x", _name, 64, np.uint16)


# -----------------------------------------------------------------------------
# the `text` command

def test_prepare_text_file_round_trip(tmp_path, capsys):
    src = _make_text(tmp_path)
    out = tmp_path / "out"
    assert main(["text", str(src), f"--out_dir={out}", "--val_fraction=0.1", "--shard_tokens=2000"]) == 0
    assert "--data=" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256 and meta["dtype"] == "uint8"
    assert len(meta["train_shards"]) > 1 and meta["val_shards"] == ["val_000000.bin"]

    direct = load_corpus(str(src), val_fraction=0.1)
    sharded = load_corpus(str(out))
    assert isinstance(sharded.train, ShardedArray) and sharded.vocab_size == 256
    assert np.array_equal(np.asarray(sharded.train), direct.train)
    assert np.array_equal(np.asarray(sharded.val), direct.val)
    assert meta["train_tokens"] == len(direct.train) and meta["val_tokens"] == len(direct.val)

    # running again is idempotent: nothing is rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert main(["text", str(src), f"--out_dir={out}", "--val_fraction=0.1", "--shard_tokens=2000"]) == 0
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    # ... but changed settings are refused rather than mixed in
    assert main(["text", str(src), f"--out_dir={out}", "--shard_tokens=500"]) == 1
    assert "different settings" in capsys.readouterr().err


def test_prepare_text_folder_default_out_dir(tmp_path, cache):
    src = _make_text(tmp_path, n_files=4)
    assert main(["text", str(src)]) == 0  # default --val_fraction=0.01: fewer than 100 files, last is val
    out = cache / "prepared" / "src-byte"
    c = load_corpus(out)
    assert c.decode(c.val[:7]) == "file 3 " and c.meta["val_tokens"] == (src / "doc03.txt").stat().st_size
    assert c.decode(c.train[:7]) == "file 0 "


def test_prepare_stdlib_byte(tmp_path):
    out = tmp_path / "out"
    assert main(["text", "stdlib", f"--out_dir={out}"]) == 0
    c = load_corpus(out)
    assert np.array_equal(c.val, load_corpus("stdlib", val_fraction=0.01).val)
    assert c.meta["source"] == "stdlib" and len(c.train) > 1_000_000


def test_prepare_errors(tmp_path, capsys):
    assert main(["text", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert main(["text", str(_make_text(tmp_path)), "--shard_tokens=0"]) == 1
    assert "--shard_tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["text", "x", "--tokenizer=wordpiece"])
    with pytest.raises(SystemExit):
        main(["--help"])


def test_unfinished_prepare_is_reported(tmp_path):
    docs = _docs()
    write_shards(lambda d: iter(docs[d:]), tmp_path, _name, 64, np.uint16)  # shards, but no meta.json
    with pytest.raises(DataError, match="no meta.json.*re-run"):
        load_corpus(tmp_path)


# -----------------------------------------------------------------------------
# the `fineweb` command (cannot download here: only the missing-dependency path is tested)

def test_fineweb_without_datasets(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    assert main(["fineweb", "--max_tokens=1000", "--shard_tokens=100"]) == 1
    assert "pip install datasets tiktoken" in capsys.readouterr().err
    with pytest.raises(DataError, match="max_tokens=10 must be larger"):
        prepare.prepare_fineweb(max_tokens=10, shard_tokens=100)


class _FakeEncoding:
    """Stands in for tiktoken's GPT-2 encoding (which would need a download): one token per char."""
    eot_token = 50256

    def encode_ordinary(self, text):
        return [ord(ch) % 50000 + 100 for ch in text]

    def decode(self, tokens):
        return "".join(chr(t - 100) for t in tokens)


def test_prepare_text_gpt2_with_fake_tiktoken(tmp_path, monkeypatch):
    fake = type(sys)("tiktoken")
    fake.get_encoding = lambda name: _FakeEncoding()
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 500)  # many chunks, each cut after a newline
    src = _make_text(tmp_path)
    out = tmp_path / "out"
    assert main(["text", str(src), "--tokenizer=gpt2", f"--out_dir={out}", "--val_fraction=0.1"]) == 0
    c = load_corpus(out)
    assert c.vocab_size == 50257 and c.train.dtype == np.uint16 and c.meta["dtype"] == "uint16"
    text = src.read_text(encoding="utf-8")
    assert c.decode(c.train) + c.decode(c.val) == text
    assert np.array_equal(c.encode("hi"), [204, 205])


def test_gpt2_without_tiktoken(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    assert main(["text", str(_make_text(tmp_path)), "--tokenizer=gpt2", f"--out_dir={tmp_path / 'o'}"]) == 1
    assert "pip install tiktoken" in capsys.readouterr().err
    corpus = Corpus("gpt", np.zeros(10, np.uint16), np.zeros(10, np.uint16), 50257, {})
    with pytest.raises(DataError, match="pip install tiktoken"):
        corpus.decode([1, 2, 3])
