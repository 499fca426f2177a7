"""Tests for minimoe.data: byte tokenizer, corpora, shard files, BatchSampler. CPU only, no network."""

import json
import re

import numpy as np
import pytest
import torch

from minimoe import data
from minimoe.data import (BYTE_VOCAB_SIZE, BatchSampler, Corpus, DataError, decode_bytes, default_cache_dir,
                          encode_bytes, load_corpus)
from minimoe.shards import ShardedArray, read_shard, write_shard

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    # every test gets its own empty cache; nothing touches ~/.cache
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -----------------------------------------------------------------------------
# byte tokenizer

def test_byte_round_trip_non_ascii():
    text = "héllo wörld — ∑ 日本語 🚀\n"
    tokens = encode_bytes(text)
    assert tokens.dtype == np.uint8 and len(tokens) == len(text.encode("utf-8"))
    assert decode_bytes(tokens) == text
    assert decode_bytes(tokens.tolist()) == text
    assert decode_bytes(torch.from_numpy(tokens.astype(np.int64))) == text
    assert decode_bytes(tokens[:-2]).endswith("\ufffd")  # a cut multi-byte char decodes as U+FFFD


def test_byte_errors():
    with pytest.raises(DataError, match="str"):
        encode_bytes(b"bytes")
    with pytest.raises(DataError, match="300"):
        decode_bytes([65, 300])


def test_default_cache_dir(cache, monkeypatch):
    assert default_cache_dir() == cache
    monkeypatch.delenv("MINIMOE_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "minimoe")


# -----------------------------------------------------------------------------
# stdlib corpus

def test_stdlib_builds_deterministic_and_cached(cache, monkeypatch):
    c1 = load_corpus()  # the default spec is "stdlib"
    assert c1.name == "stdlib" and c1.vocab_size == BYTE_VOCAB_SIZE
    assert c1.train.dtype == np.uint8 and c1.train.ndim == 1 and len(c1.val) > 0
    meta = c1.meta
    assert meta["train_files"] > 100 and meta["val_files"] > 10
    assert meta["total_bytes"] == len(c1.train) + len(c1.val)
    out = next(cache.glob("stdlib-*"))
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text())["sha256"] == meta["sha256"]

    def no_rebuild(*args):
        raise AssertionError("should have loaded from the cache")
    monkeypatch.setattr(data, "_build_stdlib", no_rebuild)
    c2 = load_corpus("stdlib")
    assert isinstance(c2.train, np.memmap)
    assert c2.meta == meta
    assert np.array_equal(c1.val, c2.val) and np.array_equal(c1.train[:1000], c2.train[:1000])


def test_stdlib_split_by_file(cache):
    c = load_corpus("stdlib", max_files=30)
    _, files = data._stdlib_files(30)
    headers = lambda a: [m.decode() for m in re.findall(rb"^# file: (.*)$", bytes(a), re.M)]
    assert headers(c.val) == files[9::10]  # every 10th file in sorted order is val
    assert headers(c.train) == [f for i, f in enumerate(files) if i % 10 != 9]
    assert c.meta["val_files"] == 3 and "% 10 == 9" in c.meta["split"]
    # a different val_fraction is a different cache entry
    c5 = load_corpus("stdlib", max_files=30, val_fraction=0.2)
    assert headers(c5.val) == files[4::5] and len(list(cache.glob("stdlib-*"))) == 2


def test_stdlib_broken_cache_is_rebuilt(cache):
    c = load_corpus("stdlib", max_files=20)
    train_bin = next(cache.glob("stdlib-*")) / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:2000])  # truncate
    c2 = load_corpus("stdlib", max_files=20)
    assert c2.meta["sha256"] == c.meta["sha256"] and len(c2.train) == len(c.train)


def test_bad_arguments():
    with pytest.raises(DataError, match="val_fraction.*1.5"):
        load_corpus("stdlib", val_fraction=1.5)
    with pytest.raises(DataError, match="max_files"):
        load_corpus("stdlib", max_files=0)


# -----------------------------------------------------------------------------
# text corpora

def test_text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT + "ünïcode\n", encoding="utf-8")
    c = load_corpus(str(path), val_fraction=0.25)
    raw = path.read_bytes()
    assert c.name == "book" and c.vocab_size == 256
    assert len(c.val) == int(len(raw) * 0.25)
    assert bytes(c.train) + bytes(c.val) == raw  # val is the tail of the file
    assert c.decode(c.val).endswith("ünïcode\n")


def test_text_folder_split_by_file(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i in range(12):
        (folder / ("sub" if i % 2 else "") / f"f{i:02d}.txt").write_text(f"file {i} " + TEXT)
    (folder / ".hidden.txt").write_text("SECRET " * 100)
    (folder / "empty.txt").write_text("")
    c = load_corpus(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.txt")
                   if not p.name.startswith(".") and p.stat().st_size)
    expected_val = b"".join((folder / n).read_bytes() for n in names[9::10])
    assert bytes(c.val) == expected_val and c.meta["files"] == 12
    assert b"SECRET" not in bytes(c.train) + bytes(c.val)
    assert len(c.train) + len(c.val) == sum((folder / n).stat().st_size for n in names)
    # fewer than 10 files: the last one is held out
    small = tmp_path / "small"
    small.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (small / name).write_text(name + TEXT)
    assert bytes(load_corpus(small).val) == (small / "c.txt").read_bytes()


def test_text_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt.*does not exist"):
        load_corpus(str(missing))

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt.*no text"):
        load_corpus(empty)

    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="empty_dir.*no"):
        load_corpus(empty_dir)
    (empty_dir / "blank.txt").write_text("")
    with pytest.raises(DataError, match="empty_dir.*no text"):
        load_corpus(empty_dir)

    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match="image.png.*binary"):
        load_corpus(binary)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("déjà vu, ça va? ".encode("latin-1") * 20)
    with pytest.raises(DataError, match="latin1.txt.*binary"):
        load_corpus(latin1)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(DataError, match="b.bin"):
        load_corpus(folder)

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world")
    with pytest.raises(DataError, match=r"tiny.txt.*only 11 bytes.*at least 100"):
        load_corpus(tiny)


# -----------------------------------------------------------------------------
# shakespeare (URL monkeypatched: no network)

def test_shakespeare_download_once(tmp_path, cache, monkeypatch):
    src = tmp_path / "input.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    monkeypatch.setattr(data, "SHAKESPEARE_URL", src.as_uri())
    c = load_corpus("shakespeare")
    assert c.name == "shakespeare"
    assert bytes(c.train) + bytes(c.val) == src.read_bytes()
    assert (cache / "shakespeare" / "input.txt").read_bytes() == src.read_bytes()
    src.unlink()  # the second load must come from the cache
    assert len(load_corpus("shakespeare").train) == len(c.train)


def test_shakespeare_offline(monkeypatch):
    monkeypatch.setattr(data, "SHAKESPEARE_URL", "file:///nonexistent/input.txt")
    with pytest.raises(DataError, match=r"file:///nonexistent/input.txt.*--data"):
        load_corpus("shakespeare")


# -----------------------------------------------------------------------------
# shard files

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_shard_round_trip(tmp_path, dtype):
    tokens = np.random.default_rng(0).integers(0, np.iinfo(dtype).max + 1, 1000).astype(dtype)
    path = tmp_path / "s.bin"
    write_shard(path, tokens)
    assert path.stat().st_size == 1024 + tokens.nbytes
    back = read_shard(path)
    assert isinstance(back, np.memmap) and back.dtype == dtype and np.array_equal(back, tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp files left behind
    write_shard(path, tokens[:0])
    assert len(read_shard(path)) == 0


def test_shard_errors(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    good = path.read_bytes()

    bad = tmp_path / "magic.bin"
    bad.write_bytes(np.int32(12345).tobytes() + good[4:])
    with pytest.raises(DataError, match=r"magic.bin.*12345.*20251074"):
        read_shard(bad)

    bad = tmp_path / "version.bin"
    bad.write_bytes(good[:4] + np.int32(7).tobytes() + good[8:])
    with pytest.raises(DataError, match=r"version.bin.*version 7.*expected 1"):
        read_shard(bad)

    bad = tmp_path / "truncated.bin"
    bad.write_bytes(good[:-10])
    with pytest.raises(DataError, match=r"truncated.bin.*1214 bytes.*100 tokens.*1224"):
        read_shard(bad)
    bad.write_bytes(good[:100])
    with pytest.raises(DataError, match=r"truncated.bin.*header"):
        read_shard(bad)

    with pytest.raises(DataError, match="missing.bin.*does not exist"):
        read_shard(tmp_path / "missing.bin")
    with pytest.raises(DataError, match="int64"):
        write_shard(tmp_path / "x.bin", np.arange(10))


def test_sharded_array():
    parts = [np.arange(0, 5), np.arange(5, 7), np.arange(7, 20)]
    a, full = ShardedArray(parts), np.arange(20)
    assert len(a) == 20 and a.shape == (20,)
    for start in range(21):
        for stop in range(start, 21):
            assert np.array_equal(a[start:stop], full[start:stop])
    assert a[6] == 6 and a[-1] == 19 and np.array_equal(np.asarray(a), full)
    with pytest.raises(IndexError):
        a[20]


# -----------------------------------------------------------------------------
# BatchSampler

TOKENS = np.arange(10_000, dtype=np.uint16) % 1000


def test_sampler_shapes_and_shift():
    s = BatchSampler(TOKENS, batch_size=4, block_size=8, seed=3)
    x, y = next(s)
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y, start in zip(x, y, s.starts(0)):
        assert torch.equal(row_x, torch.from_numpy(TOKENS[start:start + 8].astype(np.int64)))
        assert torch.equal(row_y, torch.from_numpy(TOKENS[start + 1:start + 9].astype(np.int64)))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_sampler_deterministic_and_resume(mode):
    a = BatchSampler(TOKENS, 4, 16, seed=7, mode=mode)
    b = BatchSampler(TOKENS, 4, 16, seed=7, mode=mode)
    batches = [next(a) for _ in range(5)]
    for i, (x, y) in enumerate(batches):
        assert torch.equal(x, b.batch(i)[0]) and torch.equal(y, b.batch(i)[1])
    if mode == "random":
        assert not torch.equal(BatchSampler(TOKENS, 4, 16, seed=8).batch(0)[0], batches[0][0])

    state = a.state_dict()
    assert state["counter"] == 5
    expected = [next(a) for _ in range(3)]
    resumed = BatchSampler(TOKENS, 4, 16, seed=7, mode=mode)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = next(resumed)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(DataError, match="seed"):
        BatchSampler(TOKENS, 4, 16, seed=99, mode=mode).load_state_dict(state)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_sampler_world_size_invariance(mode):
    single = BatchSampler(TOKENS, 2, 8, seed=1, mode=mode)
    ranks = [BatchSampler(TOKENS, 2, 8, seed=1, mode=mode, rank=r, world_size=2) for r in range(2)]
    for c in range(4):
        one_proc = [next(single), next(single)]  # 1 process, grad accumulation 2: indices 2c, 2c+1
        for r in range(2):
            x, y = next(ranks[r])
            assert torch.equal(x, one_proc[r][0]) and torch.equal(y, one_proc[r][1])
    # resuming a 2-rank run on 1 process continues at global batch 2 * counter
    s = BatchSampler(TOKENS, 2, 8, seed=1, mode=mode)
    s.load_state_dict(ranks[0].state_dict())
    assert s.counter == 8 and torch.equal(next(s)[0], single.batch(8)[0])


def test_sampler_sequential_disjoint_epoch():
    tokens = np.arange(1000, dtype=np.uint16)
    s = BatchSampler(tokens, batch_size=3, block_size=10, mode="sequential")
    assert s.n_windows == 99
    starts = [st for i in range(33) for st in s.starts(i)]  # exactly one epoch
    assert sorted(starts) == list(range(0, 990, 10))
    seen = torch.cat([s.batch(i)[0].reshape(-1) for i in range(33)])
    assert len(set(seen.tolist())) == len(seen) == 990  # no token read twice as input
    assert s.starts(33) == [0, 10, 20]  # then wrap around


def test_sampler_on_sharded_and_tensor_tokens():
    parts = [TOKENS[:3000], TOKENS[3000:3005], TOKENS[3005:]]
    for tokens in (ShardedArray(parts), torch.from_numpy(TOKENS.astype(np.int64))):
        x, y = BatchSampler(tokens, 4, 32, seed=5).batch(11)
        x0, y0 = BatchSampler(TOKENS, 4, 32, seed=5).batch(11)
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_sampler_errors():
    with pytest.raises(DataError, match=r"only 8 tokens.*block_size=8.*9"):
        BatchSampler(np.arange(8, dtype=np.uint8), 1, 8)
    BatchSampler(np.arange(9, dtype=np.uint8), 1, 8).batch(0)  # exactly one window is fine
    with pytest.raises(DataError, match="mode.*'shuffle'"):
        BatchSampler(TOKENS, 1, 8, mode="shuffle")
    with pytest.raises(DataError, match="rank.*2"):
        BatchSampler(TOKENS, 1, 8, rank=2, world_size=2)
    with pytest.raises(DataError, match="batch_size.*0"):
        BatchSampler(TOKENS, 0, 8)
    with pytest.raises(DataError, match="batch index.*-1"):
        BatchSampler(TOKENS, 1, 8).batch(-1)


def test_corpus_decode_bytes():
    c = Corpus("t", encode_bytes(TEXT), encode_bytes("val text"), 256, {})
    assert c.decode(c.train[:9]) == TEXT[:9] and c.decode(torch.tensor([104, 105])) == "hi"
    assert np.array_equal(c.encode("hi"), [104, 105])
