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
    assert main(["text", str(src), f"--out_dir={out}", "--shard_tokens=500"]) == 2
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
    assert main(["text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["text", str(_make_text(tmp_path)), "--shard_tokens=0"]) == 2
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
    assert main(["fineweb", "--max_tokens=1000", "--shard_tokens=100"]) == 2
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
    assert main(["text", str(_make_text(tmp_path)), "--tokenizer=gpt2", f"--out_dir={tmp_path / 'o'}"]) == 2
    assert "pip install tiktoken" in capsys.readouterr().err
    corpus = Corpus("gpt", np.zeros(10, np.uint16), np.zeros(10, np.uint16), 50257, {})
    with pytest.raises(DataError, match="pip install tiktoken"):
        corpus.decode([1, 2, 3])


# -----------------------------------------------------------------------------
# reliability (issue 21): cost linear in the shards, Ctrl-C, out_dir inside the input, special files

def _count_progress_writes(monkeypatch):
    """{"writes": n, "bytes": b} of progress.json, however prepare writes it."""
    seen = {"writes": 0, "bytes": 0}
    real = prepare.atomic_write

    def counting(path, chunks):
        chunks = list(chunks)
        if path.name == "progress.json":
            seen["writes"] += 1
            seen["bytes"] += sum(len(c) for c in chunks)
        return real(path, chunks)
    monkeypatch.setattr(prepare, "atomic_write", counting)
    return seen


def test_progress_costs_o_of_the_shards_not_their_square(tmp_path, monkeypatch):
    """Tiny shards: progress.json used to be rewritten (and fsynced) after every shard, so its bytes grew
    with shards^2. Now a journal line per shard; progress.json is written a fixed number of times."""
    seen = _count_progress_writes(monkeypatch)
    docs = _docs(200, seed=3)
    counts = {}
    for n in (16, 4):                                   # 4x the shards
        out = tmp_path / f"s{n}"
        state = write_shards(lambda d: iter(docs[d:]), out, _name, n, np.uint16, config={"n": n})
        counts[len(state["shards"])] = dict(seen)
        seen.update(writes=0, bytes=0)
        assert np.array_equal(_all_tokens(out, [e["file"] for e in state["shards"]]), np.concatenate(docs))
        assert not (out / prepare.JOURNAL).exists()     # folded into progress.json at the end
    (few, a), (many, b) = sorted(counts.items())
    assert many >= 3.5 * few and a["writes"] == b["writes"] <= 3, counts
    assert b["bytes"] < 6 * a["bytes"], counts          # linear (~4x), not quadratic (~16x)


KILLED = """
import os, signal, sys
import numpy as np
from minimoe.prepare import write_shards
rng = np.random.default_rng(5)
docs = [rng.integers(0, 50000, 30).astype(np.uint16) for _ in range(60)]
def docs_from(d):
    for i, doc in enumerate(docs[d:], start=d):
        if i == 40 and sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)         # no handler, no finally: only the journal survives
        yield doc
write_shards(docs_from, sys.argv[1], lambda k: f"train_{k:06d}.bin", 50, np.uint16, config={"x": 1})
"""


def test_kill_9_mid_prepare_resumes_from_the_journal(tmp_path):
    import subprocess
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILLED, str(out), "kill"], capture_output=True, timeout=120)
    assert r.returncode == -9
    journal = (out / prepare.JOURNAL).read_text().splitlines()
    assert len(journal) >= 20                            # 40 docs x 30 tokens / 50 per shard
    with open(out / prepare.JOURNAL, "a") as f:
        f.write('{"stream": "all", "k": 99, "fi')       # a line torn by the kill: ignored
    r = subprocess.run([sys.executable, "-c", KILLED, str(out), "finish"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    progress = json.loads((out / "progress.json").read_text())["streams"]["all"]
    assert progress["done"] and progress["shards"][len(journal) - 1]["file"] == f"train_{len(journal) - 1:06d}.bin"
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 50000, 30).astype(np.uint16) for _ in range(60)]
    assert np.array_equal(_all_tokens(out, [e["file"] for e in progress["shards"]]), np.concatenate(docs))


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_or_sigterm_is_one_line_and_the_same_command_continues(tmp_path, monkeypatch, capsys, signame, code):
    import os
    import signal
    src = _make_text(tmp_path)
    out = tmp_path / "out"
    argv = ["text", str(src), f"--out_dir={out}", "--val_fraction=0.1", "--shard_tokens=500"]
    real, calls = prepare.write_shard, []

    def interrupted(path, tokens):
        calls.append(path)
        if len(calls) == 5:
            os.kill(os.getpid(), getattr(signal, signame))   # as the terminal or a scheduler would
        return real(path, tokens)
    monkeypatch.setattr(prepare, "write_shard", interrupted)
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"interrupted ({signame}): the finished shards are kept; run the same command again")
    assert not (out / "meta.json").exists() and not list(out.glob(".*tmp*"))
    kept = json.loads((out / "progress.json").read_text())["streams"]["train"]["shards"]
    assert len(kept) >= 4 and not (out / prepare.JOURNAL).exists()
    monkeypatch.setattr(prepare, "write_shard", real)
    assert main(argv) == 0                                      # continues: the kept shards are not rewritten
    direct = load_corpus(str(src), val_fraction=0.1)
    assert np.array_equal(np.asarray(load_corpus(str(out)).train), direct.train)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or signame == "SIGINT"


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def test_out_dir_inside_or_equal_to_the_input_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    src = _make_text(tmp_path, n_files=3)
    before = _tree(src)
    (tmp_path / "link").symlink_to(src)
    for out in (src, src / "prepared", src / "a" / "b", tmp_path / "link" / "x", f"{src}/../src/y"):
        assert main(["text", str(src), f"--out_dir={out}"]) == 2, out
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --out_dir={out} is ") and "input folder" in err and "\n" not in err, err
        assert "choose an --out_dir outside" in err
        assert _tree(src) == before                            # nothing written into the input
    monkeypatch.setenv("MINIMOE_CACHE", str(src / ".cache"))    # the default out_dir lands inside the input
    assert main(["text", str(src)]) == 2
    assert "inside the input folder" in capsys.readouterr().err and _tree(src) == before
    stdlib = prepare._input_folder("stdlib")
    assert main(["text", "stdlib", f"--out_dir={stdlib / 'minimoe-out'}"]) == 2
    assert not (stdlib / "minimoe-out").exists()
    assert main(["text", str(src), f"--out_dir={tmp_path / 'elsewhere'}"]) == 0   # a sibling is fine


SPECIAL = """
import os, sys
from pathlib import Path
from minimoe.prepare import main
src, out, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
name, kind = what.split(":")
target = out if name == "out_dir" else out / name
target.parent.mkdir(parents=True, exist_ok=True)
if kind == "fifo":
    os.mkfifo(target)
elif kind == "dir":
    target.mkdir()
elif kind == "loop":
    target.symlink_to(target)
elif kind == "file":
    target.write_text("x")
sys.exit(main(["text", str(src), f"--out_dir={out}", "--shard_tokens=500"]))
"""


@pytest.mark.parametrize("what", ["out_dir:file", "out_dir:fifo", "out_dir:loop", "progress.json:fifo",
                                  "progress.json:dir", "progress.jsonl:fifo", "meta.json:dir", "meta.json:fifo",
                                  "train_000001.bin:fifo", "train_000000.bin:dir", "progress.json:loop"])
def test_special_files_where_prepare_writes_are_one_line_before_any_work(tmp_path, what):
    import subprocess
    src = _make_text(tmp_path)
    out = tmp_path / "out"
    try:
        r = subprocess.run([sys.executable, "-c", SPECIAL, str(src), str(out), what], capture_output=True,
                           text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"prepare blocked on {what}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    name = what.split(":")[0]
    assert (f"cannot write to {out} (it is " if name == "out_dir" else str(out / name)) in lines[0]
    assert not out.is_dir() or not [p for p in out.glob("*.bin") if p.is_file()]   # before any work


def test_usage_errors_are_one_line_exit_2(capsys):
    for argv in (["text"], ["text", "x", "--tokenizer=wordpiece"], ["nope"], ["text", "x", "--shard_tokens=ten"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)


def test_out_dir_with_a_tilde_expands_like_data(tmp_path, monkeypatch, capsys):
    src = _make_text(tmp_path)
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["text", str(src), "--out_dir=~/prepared x"]) == 0
    assert (home / "prepared x" / "meta.json").exists() and not (cwd / "~").exists()
    assert "--data='" + str(home / "prepared x") + "'" in capsys.readouterr().out   # quoted: a command to paste
