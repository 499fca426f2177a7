"""Bad input never ends in a traceback, a hang or lost work: every class of bad value or path is
refused up front with one line that names it and says what is allowed. CPU only, no network.

    1. config values that pass the type but not the meaning (every int/float field of every config)
    2. data paths that are not regular text files (FIFOs, devices, sockets, unreadable, binary)
    3. environment problems found late (tiktoken, shard headers and token ids, the cache folder)
    4. leftovers of an interrupted prepare / cache build
    5. one load-entropy helper, one unit
"""

from dataclasses import fields
import errno
import json
import math
import os
from pathlib import Path
import re
import socket
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch

import train_gpt
import train_small
from minimoe import data, plots, prepare, shards
from minimoe.data import BatchSampler, Corpus, DataError, load_corpus
from minimoe.shards import write_shard
from minimoe.files import remove_stale_tmp
from minimoe.dispatch import load_entropy
from minimoe.metrics import Rule, evaluate_rule
from minimoe.model import GPT, GPTConfig
from minimoe.sample import SampleConfig
from minimoe.cli import help_text, parse_overrides
from minimoe.train import TrainConfig, estimate_loss
from minimoe.validate import check_fields, interval, show, unranged_fields

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [GPTConfig, TrainConfig, SampleConfig, train_small.SmallConfig, train_gpt.ScriptConfig]


# --------------------------------------------------------------------------- 1. config values

def numeric_fields():
    """(config class, field name, base type, interval) for every int/float field of every config."""
    out = []
    for cls in CONFIGS:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            args = typing.get_args(hints[f.name]) or (hints[f.name],)
            base = next(a for a in args if a is not type(None))
            if base in (int, float):
                out.append((cls, f.name, base, interval(cls.RANGES[f.name])))
    return out


def bad_texts(base, span):
    """Command-line values of a field that must be refused: non-finite, overflowing, just outside."""
    texts = ["nan", "inf", "-inf", "1e999", "-1e999"]
    if base is int:
        texts += ["1" + "0" * 40, "1" * 5000]                       # huge, and too long to even print
        step = 1
    else:
        step = max(abs(span.hi), abs(span.lo), 1.0) * 1e-3 if math.isfinite(span.hi) else 1.0
    if math.isfinite(span.lo):
        texts.append(str(span.lo if span.lo_open else (int(span.lo) - 1 if base is int else span.lo - step)))
    if math.isfinite(span.hi):
        texts.append(str(span.hi if span.hi_open else (int(span.hi) + 1 if base is int else span.hi + step)))
    return texts


def test_every_number_of_every_config_has_a_declared_range():
    for cls in CONFIGS:
        assert unranged_fields(cls) == [], f"{cls.__name__}: give these fields a range in @ranges"
    assert len(numeric_fields()) >= 35                       # GPTConfig, TrainConfig, SampleConfig, SmallConfig


@pytest.mark.parametrize("cls, name, base, span", numeric_fields(),
                         ids=[f"{c.__name__}.{n}" for c, n, _, _ in numeric_fields()])
def test_out_of_range_or_non_finite_values_are_refused_at_parse_time(cls, name, base, span):
    for text in bad_texts(base, span):
        with pytest.raises(ValueError) as e:
            parse_overrides([f"--{name}={text}"], cls())
        msg = str(e.value)
        assert name in msg and "\n" not in msg and len(msg) < 300, msg
        assert span.text in msg or "allowed" in msg or "must be" in msg, msg


@pytest.mark.parametrize("cls, name, base, span", numeric_fields(),
                         ids=[f"{c.__name__}.{n}" for c, n, _, _ in numeric_fields()])
def test_the_same_values_are_refused_when_built_from_python(cls, name, base, span):
    values = [math.nan, math.inf, -math.inf, 10**400, -10**400, True]
    out = 1 if base is int else max(1.0, abs(span.hi), abs(span.lo)) / 2    # a step that float keeps
    values += [span.lo - (0 if span.lo_open else out)] if math.isfinite(span.lo) else []
    values += [span.hi + (0 if span.hi_open else out)] if math.isfinite(span.hi) else []
    if base is int:
        values += [2.0]                                          # a float where an int belongs
    for v in values:
        with pytest.raises(ValueError, match=rf"{name}=.* is invalid: must be"):
            cls(**{name: v})


def test_the_examples_of_the_issue():
    cases = {"--max_iters=1e999": "--max_iters='1e999' is not an integer; allowed: an integer in [1, 1e12]",
             "--aux_loss_coef=nan": "GPTConfig.aux_loss_coef=nan is invalid: must be a finite number in [0, 1e3]",
             "--learning_rate=inf": "TrainConfig.learning_rate=inf is invalid: must be a finite number in (0, 1]",
             "--init_std=-1": "GPTConfig.init_std=-1.0 is invalid: must be a finite number in (0, 1]",
             "--n_embd=1000000": "GPTConfig.n_embd=1000000 is invalid: must be an integer in [2, 65536]"}
    for arg, message in cases.items():
        with pytest.raises(ValueError) as e:
            parse_overrides([arg], GPTConfig(), TrainConfig())
        assert str(e.value) == message


@pytest.mark.parametrize("argv, match", [
    (["--min_lr=0.01", "--learning_rate=0.001"], r"TrainConfig.min_lr=0.01 is invalid: must be <= learning_rate=0.001"),
    (["--warmup_iters=50", "--lr_decay_iters=10"], r"TrainConfig.warmup_iters=50 is invalid: must be <= lr_decay_iters=10"),
    (["--weight_decay=200", "--learning_rate=0.01"], r"TrainConfig.weight_decay=200.0 is invalid: learning_rate x weight_decay"),
    (["--n_layer=1000", "--n_embd=16384", "--n_head=128"], r"GPTConfig is invalid: about 3.4e\+13 parameters"),
    (["--top_k=9"], r"GPTConfig.top_k=9 is invalid"),
    (["--data="], r"TrainConfig.data='' is invalid: must be a non-empty string"),
    (["--out_dir="], r"TrainConfig.out_dir='' is invalid"),
    (["--compile=2"], r"--compile='2' is not a boolean"),
])
def test_relations_and_strings(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_overrides(argv, GPTConfig(), TrainConfig())


def test_relations_from_python_and_what_stays_allowed():
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(learning_rate=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="temperature=1e-30 is invalid: must be 0 \\(greedy\\) or at least"):
        SampleConfig(temperature=1e-30)
    with pytest.raises(ValueError, match="compile=1 is invalid: must be true or false"):
        TrainConfig(compile=1)
    with pytest.raises(ValueError, match="unknown preset"):
        train_gpt.ScriptConfig(preset="gpt5")
    with pytest.raises(ValueError, match="plots='yes' is invalid"):
        train_gpt.ScriptConfig(plots="yes")
    with pytest.raises(ValueError, match=r"^--seeds=0 is invalid: must be an integer in \[1, 100\]$"):
        train_small.SmallConfig(seeds=0)
    # the edges themselves are fine, and so are the None of Optional fields and an empty prompt
    TrainConfig(learning_rate=1.0, min_lr=1.0, warmup_iters=0, lr_decay_iters=1, weight_decay=0.0,
                total_batch_tokens=None, peak_flops=None, sample_start="", seed=0)
    SampleConfig(temperature=0.0, sample_top_k=None)
    GPTConfig(d_ffn=None, d_low=None, d_wide=None, w_up_init_std=None, dropout=0.0)
    TrainConfig(learning_rate=1, min_lr=0)                   # ints where floats belong are fine
    TrainConfig(out_dir=Path("runs") / "a", data=Path("corpus.txt"))   # and paths where paths are meant


def test_help_shows_each_range():
    text = help_text(TrainConfig(), GPTConfig())
    assert "--learning_rate=0.001" in text and "(range (0, 1])" in text and "(range [1, 1e12])" in text


def test_show_keeps_the_message_one_short_line():
    assert show(10**5000).startswith("<a 16610-bit integer")
    assert len(show("x" * 1000)) < 45 and show(1.5) == "1.5"


def test_check_fields_on_a_new_field_without_range():
    from dataclasses import dataclass

    @dataclass
    class Demo:
        steps: int = 3
        scale: float = 1.0

        def __post_init__(self):
            check_fields(self)

    assert unranged_fields(Demo) == ["steps", "scale"]          # the first test above would name them
    Demo(steps=-5)                                               # int64 is still enforced, and finiteness
    for bad in (dict(steps=2**70), dict(scale=math.nan), dict(steps=None)):
        with pytest.raises(ValueError, match="Demo\\."):
            Demo(**bad)


@pytest.mark.parametrize("command, arg", [
    (["train_small.py"], "--max_iters=1e999"),
    (["train_small.py"], "--aux_loss_coef=nan"),
    (["train_gpt.py", "--preset=tiny-aoe"], "--learning_rate=inf"),
    (["-m", "minimoe.sample"], "--temperature=nan"),
])
def test_scripts_print_one_line_and_exit_2(command, arg, tmp_path):
    p = subprocess.run([sys.executable, *command, arg], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "MINIMOE_CACHE": str(tmp_path)})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and arg.split("=")[0].lstrip("-") in lines[0], p.stderr


# --------------------------------------------------------------------------- 2. data paths

TEXT = "The quick brown fox jumps over the lazy dog.\n" * 20


CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))   # reading /dev/zero fails, not the machine
from minimoe.data import DataError, load_corpus
out = {}
for spec in json.loads(sys.argv[1]):
    try:
        load_corpus(spec)
        out[spec] = "loaded"
    except DataError as e:
        out[spec] = "DataError: " + str(e)
    print(json.dumps(out), flush=True)
"""


def load_in_child(specs, cwd):
    """{spec: 'DataError: ...'} from load_corpus(spec) in a child process: a regression that blocks
    (open() of a FIFO) or reads without bound (/dev/zero) fails the test after 60 s / 4 GiB instead
    of hanging the suite or filling the machine's memory."""
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(s) for s in specs])], cwd=cwd,
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"load_corpus blocked for 60 s; finished: {e.stdout}")
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and lines, p.stderr[-2000:]
    return json.loads(lines[-1])


def special_files(tmp_path):
    """{kind: path} of a FIFO, a socket (and its open socket), symlinks to a character device and to nothing."""
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(tmp_path)                                   # AF_UNIX paths are limited to ~100 bytes
    try:
        sock.bind("sock.txt")
    finally:
        os.chdir(cwd)
    dev = tmp_path / "zero.txt"
    dev.symlink_to("/dev/zero")
    broken = tmp_path / "broken.txt"
    broken.symlink_to(tmp_path / "nowhere")
    return {"FIFO": fifo, "socket": tmp_path / "sock.txt", "character device": dev,
            "broken symbolic link": broken}, sock


@pytest.mark.parametrize("spec, match", [
    ("", "data '' is invalid: give 'stdlib', 'shakespeare', a UTF-8 text file"),
    ("   ", "data '   ' is invalid"),
    (None, "data None is invalid"),
])
def test_empty_data_spec(spec, match):
    with pytest.raises(DataError, match=match):
        load_corpus(spec)


def test_special_files_as_data_inside_a_data_folder_and_named_like_shards(tmp_path):
    paths, sock = special_files(tmp_path)
    folders = {}
    for kind, path in paths.items():                     # the same kinds of file inside a text folder
        folder = tmp_path / f"folder-{path.stem}"
        folder.mkdir()
        (folder / "good.txt").write_text(TEXT)
        os.link(path, folder / path.name, follow_symlinks=False)
        folders[kind] = folder
    shards = tmp_path / "shards"                         # ... and named like a prepare.py shard
    shards.mkdir()
    (shards / "meta.json").write_text('{"vocab_size": 256}')
    os.mkfifo(shards / "train_000000.bin")
    try:
        got = load_in_child(["/dev/zero", "/dev/null", *paths.values(), *folders.values(), shards], tmp_path)
    finally:
        sock.close()
    assert re.fullmatch(r"DataError: data path '/dev/zero' is a character device \(like /dev/zero\): it has no "
                        r"end to read to; pass 'stdlib', 'shakespeare', a UTF-8 text file.*prepare", got["/dev/zero"])
    assert "'/dev/null' is a character device" in got["/dev/null"]
    for kind, path in paths.items():
        assert re.match(rf"DataError: data path '{path}' is an? {kind}", got[str(path)]), got[str(path)]
        assert re.match(rf"DataError: {folders[kind]}/{path.name} in data folder {folders[kind]} is an? {kind}.*"
                        r"may hold only regular UTF-8 text files", got[str(folders[kind])]), got[str(folders[kind])]
    assert re.match(r"DataError: shard .*train_000000.bin is a FIFO", got[str(shards)]), got[str(shards)]


def test_unreadable_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text(TEXT)
    real_open = os.open

    def refuse(p, *args, **kw):                           # as a non-root user after chmod 000
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kw)
    monkeypatch.setattr(data.os, "open", refuse)
    with pytest.raises(DataError, match=r"cannot read text file .*secret.txt: Permission denied"):
        load_corpus(path)


def test_binary_junk_says_what_is_accepted(tmp_path):
    junk = tmp_path / "junk.dat"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError, match=r"junk.dat looks binary \(8 NUL bytes, .* only UTF-8 text is allowed "
                                        r"\(at most 1% invalid"):
        load_corpus(junk)
    mostly_text = tmp_path / "mostly.txt"             # one stray Latin-1 byte in 900: accepted as bytes
    mostly_text.write_bytes(TEXT.encode() + b"caf\xe9\n")
    c = load_corpus(mostly_text)
    assert bytes(c.train) + bytes(c.val) == mostly_text.read_bytes()


def test_read_regular_file_reads_exactly_the_size(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"abc")
    assert shards.read_regular_file(path) == b"abc"
    with pytest.raises(DataError, match="is a character device"):
        shards.read_regular_file("/dev/zero")


# --------------------------------------------------------------------------- 3. environment problems

def shard_folder(folder, tokens, meta, dtype=np.uint16, progress=None):
    """A prepared folder by hand: one train and one val shard of `tokens`, meta.json, progress.json."""
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "train_000000.bin", np.asarray(tokens, dtype=dtype))
    write_shard(folder / "val_000000.bin", np.asarray(tokens, dtype=dtype))
    (folder / "meta.json").write_text(json.dumps(meta))
    if progress:
        (folder / "progress.json").write_text(json.dumps({"config": progress, "streams": {}}))
    return folder


def test_check_decoder_finds_a_missing_tiktoken_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)             # `import tiktoken` fails
    bpe = load_corpus(shard_folder(tmp_path / "bpe", [1, 50000, 7] * 10, {"vocab_size": 50257, "tokenizer": "gpt2"}))
    with pytest.raises(DataError, match="corpus 'bpe' uses GPT-2 BPE tokens, which need tiktoken: pip install tiktoken"):
        bpe.check_decoder()
    Corpus("bytes", np.zeros(4, np.uint8), np.zeros(4, np.uint8), 256, {}).check_decoder()   # nothing needed
    odd = Corpus("odd", np.zeros(4, np.uint16), np.zeros(4, np.uint16), 32000, {"tokenizer": "sentencepiece"})
    with pytest.raises(DataError, match="tokenizer 'sentencepiece' with vocab_size 32000; minimoe decodes only"):
        odd.check_decoder()


@pytest.mark.parametrize("tokens, meta, dtype, match", [
    ([1, 2, 60000] * 10, {"vocab_size": 50257, "tokenizer": "gpt2"}, np.uint16,
     r"train_000000.bin holds token id 60000, but meta.json says vocab_size 50257 \(ids 0..50256\).*delete .* and "
     r"prepare it again: python -m minimoe.prepare text corpus.txt --tokenizer=gpt2 --out_dir="),
    ([1, 2, 3] * 10, {"vocab_size": 50257, "tokenizer": "gpt2"}, np.uint8,
     r"holds uint8 tokens but meta.json says dtype '\(none\)', vocab_size 50257: they do not belong together"),
    ([1, 2, 3] * 10, {"vocab_size": 256, "tokenizer": "byte", "dtype": "uint16"}, np.uint8,
     r"holds uint8 tokens but meta.json says dtype 'uint16'"),
    ([1, 2, 3] * 10, {"vocab_size": 256, "tokenizer": "gpt2"}, np.uint16,
     r"says tokenizer 'gpt2' with vocab_size 256; expected"),
    ([1, 2, 300] * 10, {"vocab_size": 100}, np.uint16, r"holds token id 300, but meta.json says vocab_size 100"),
    ([1, 2, 3] * 10, {"vocab_size": 100000}, np.uint16, r"vocab_size 100000; expected .* at most 65536"),
])
def test_shards_that_disagree_with_their_vocabulary_fail_at_load_time(tmp_path, tokens, meta, dtype, match):
    folder = shard_folder(tmp_path / "shards", tokens, meta, dtype,
                          progress={"command": "text", "source": "corpus.txt", "tokenizer": "gpt2"})
    with pytest.raises(DataError, match=match):
        load_corpus(folder)


def test_fineweb_folder_names_its_own_prepare_command(tmp_path):
    folder = shard_folder(tmp_path / "fw", [5, 70000 - 65536, 9] * 10, {"vocab_size": 3},
                          progress={"command": "fineweb", "name": "sample-10BT"})
    with pytest.raises(DataError, match=r"python -m minimoe.prepare fineweb --name=sample-10BT --out_dir=.*fw"):
        load_corpus(folder)


def test_unwritable_cache_is_one_line_naming_it(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("x")
    monkeypatch.setenv("MINIMOE_CACHE", str(not_a_folder))
    with pytest.raises(DataError, match=rf"cannot write to {not_a_folder}/stdlib-\S+ \(Not a directory.*\); "
                                        rf"choose another folder with MINIMOE_CACHE=/path/with/space \(now "
                                        rf"MINIMOE_CACHE={not_a_folder}\)"):
        load_corpus("stdlib", max_files=20)
    with pytest.raises(DataError, match=rf"cannot write to {not_a_folder}/shakespeare .*MINIMOE_CACHE="):
        load_corpus("shakespeare")
    from minimoe.metrics import train_or_load                     # notebooks' run cache: before training
    with pytest.raises(DataError, match=rf"cannot write to {not_a_folder}/runs"):
        train_or_load(GPTConfig(vocab_size=256, block_size=8, n_layer=1, n_head=2, n_embd=8, d_ffn=8),
                      TrainConfig(max_iters=1), "demo")
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    with pytest.raises(DataError, match=rf"cannot write to {not_a_folder}/x .*choose another --out_dir"):
        prepare.prepare_text(src, out_dir=not_a_folder / "x")


def test_full_disk_during_the_cache_build_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(data.os, "fsync", full)
    with pytest.raises(DataError, match=r"cannot write to \S+/stdlib-\S+ \(No space left on device.*MINIMOE_CACHE="):
        load_corpus("stdlib", cache_dir=tmp_path, max_files=20)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]   # the half-written temp file is gone


# --------------------------------------------------------------------------- 4. leftovers

def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def plant_leftovers(folder):
    """Temp files of a killed writer (removed), and others that must stay: a live writer's, not ours."""
    pid = dead_pid()
    stale = [folder / f".train_000000.bin.tmp{pid}", folder / f".progress.json.tmp{pid}"]
    keep = [folder / f".meta.json.tmp{os.getppid()}", folder / f"notes.tmp{pid}", folder / f".x.tmp{pid}.bak"]
    for p in stale + keep:
        p.write_bytes(b"\0" * 10)
    (folder / f".dir.tmp{pid}").mkdir()
    keep.append(folder / f".dir.tmp{pid}")
    return stale, keep


def test_prepare_removes_the_temp_files_of_an_interrupted_run(tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_text(TEXT * 5)
    out = tmp_path / "out"
    out.mkdir()
    stale, keep = plant_leftovers(out)
    assert prepare.main(["text", str(src), f"--out_dir={out}"]) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert "removed 2 temporary file(s)" in capsys.readouterr().err
    assert len(load_corpus(out).train) > 0


def test_cache_build_removes_the_temp_files_of_an_interrupted_build(tmp_path):
    load_corpus("stdlib", cache_dir=tmp_path, max_files=20)
    (folder,) = tmp_path.glob("stdlib-*")
    (folder / "meta.json").unlink()                              # as if killed before the end
    stale, keep = plant_leftovers(folder)
    load_corpus("stdlib", cache_dir=tmp_path, max_files=20)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert remove_stale_tmp(tmp_path / "missing") == []


# --------------------------------------------------------------------------- 5. one load entropy, in nats

def test_load_entropy_by_hand():
    assert load_entropy([1, 1, 1, 1]) == pytest.approx(math.log(4))          # counts or shares alike
    assert load_entropy([0.25] * 4) == pytest.approx(math.log(4))
    assert load_entropy([5, 0, 0]) == 0.0 and load_entropy([0, 0]) == 0.0   # one expert; nothing routed
    assert load_entropy(torch.tensor([3.0, 1.0])) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    for bad in ([], [1, -1], [math.nan, 1]):
        with pytest.raises(ValueError, match="load must be"):
            load_entropy(bad)


def test_every_ent_load_is_load_entropy_in_nats_with_its_max():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, ffn="moe", n_experts=6,
                    top_k=2, d_ffn=48)
    model = GPT(cfg).eval()
    tokens = torch.randint(0, 64, (4000,))
    sampler = BatchSampler(tokens, 4, 16, seed=0)
    stats = estimate_loss(model, sampler, 3)                               # train.py
    for layer in stats["routing"]:
        assert layer["ent_load"] == pytest.approx(load_entropy(layer["load"]))
        assert layer["max_ent"] == pytest.approx(math.log(6)) and 1.0 < layer["ent_load"] <= math.log(6)
    for layer in model.routing_stats():                                     # dispatch.routing_stats
        assert layer["ent_load"] == pytest.approx(load_entropy(layer["load"]), rel=1e-6)
    x, y = sampler.batch(0)
    res = evaluate_rule(model, [(x, y)], Rule("norm", "x_wg"))              # metrics.py
    for layer in res["per_layer"].values():
        assert layer["ent_load"] == pytest.approx(load_entropy(layer["load"]))
        assert layer["max_ent"] == pytest.approx(math.log(6)) and layer["ent_load"] > 1.0   # nats, not a ratio
    assert res["max_ent"] == pytest.approx(math.log(6))


def test_plots_and_the_table_say_nats(tmp_path, monkeypatch):
    E = 4
    rows = [{"iter": i, "tokens": 1000 * i, "val_loss": 3.0 - 0.1 * i, "train_loss": 3.1 - 0.1 * i,
             "val_bpb": None, "ent_load": 1.3, "ent_conf": 1.1,
             "routing": [{"layer": 0, "load": [0.25] * E, "ent_load": 1.3, "ent_conf": 1.1,
                          "load_cv": 0.0, "max_ent": math.log(E)}]} for i in range(3)]
    figures = []
    monkeypatch.setattr(plots.Figure, "savefig", lambda fig, *a, **kw: figures.append(fig))
    assert plots.plot_expert_load({"moe": rows}, tmp_path / "e.png")
    assert plots.plot_routing_entropy({"moe": rows}, tmp_path / "r.png")
    texts = [t for fig in figures for ax in fig.axes for t in (ax.get_title(), ax.get_ylabel())]
    shown = [t for t in texts if "Ent_" in t or "entropy" in t]
    assert len(shown) >= 3 and all("nats" in t for t in shown), shown
    result = {"params_total": 1e6, "params_active": 5e5, "val_loss": 2.0, "val_bpb": 2.9, "tokens_per_sec": 100,
              "ent_load": 1.3, "ent_conf": 1.1, "routing": rows[-1]["routing"]}
    header = train_small.models_table({"moe": [result]}).splitlines()[0]
    assert "Ent_load (nats, max 1.386)" in header and "Ent_conf (nats)" in header


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"config": null, "streams": {"train": {"shards": [1]}}}'])
def test_a_corrupt_progress_file_is_one_line(tmp_path, content, capsys):
    src = tmp_path / "t.txt"
    src.write_text(TEXT * 5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "progress.json").write_text(content)
    assert prepare.main(["text", str(src), f"--out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "progress.json" in err and "delete it" in err and "\n" not in err
    with pytest.raises(SystemExit, match="2"):                   # argparse's own usage error for a non-int
        prepare.main(["text", str(src), f"--out_dir={out}", "--shard_tokens=1e20"])
    capsys.readouterr()
    assert prepare.main(["text", str(src), f"--out_dir={out}", f"--shard_tokens={2**40}"]) == 2
    assert "--shard_tokens must be in [1, 2**31 - 1], got 1099511627776" in capsys.readouterr().err


# --------------------------------------------------------------------------- 6. sample: the prompt, the device, the paths

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A byte-level checkpoint with block_size 16, saved as train.py saves one (no training needed)."""
    from dataclasses import asdict
    from minimoe.checkpoint import save_checkpoint
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=1, n_embd=16, ffn="dense", d_ffn=32)
    save_checkpoint(out / "ckpt.pt", {"model": GPT(cfg).state_dict(), "model_config": asdict(cfg)})
    return out


SAMPLE_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))   # a prompt repeated into tens of GB fails, not the machine
from minimoe import sample
out = {}
for case in json.loads(sys.argv[1]):
    try:
        texts = sample.sample(sample.SampleConfig(**case["cfg"]))
        out[case["name"]] = ["ok", [len(t) for t in texts], texts[0][-40:]]
    except (ValueError, FileNotFoundError) as e:
        out[case["name"]] = ["error", type(e).__name__ + ": " + str(e)]
    except BaseException as e:
        out[case["name"]] = ["crash", type(e).__name__ + ": " + str(e)[:300]]
    print(json.dumps(out), flush=True)
"""


def sample_in_child(cases, cwd):
    """{name: result} of sample.sample(SampleConfig(**cfg)) per case, in a child process: a FIFO that
    blocks or a prompt that asks for tens of GB fails the test (60 s, 4 GiB) instead of the machine."""
    try:
        p = subprocess.run([sys.executable, "-c", SAMPLE_CHILD, json.dumps(cases)], cwd=cwd, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"sample blocked for 60 s; finished: {e.stdout}")
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and lines, p.stderr[-2000:]
    return json.loads(lines[-1])


def test_prompt_files_that_are_not_utf8_text_are_one_line_before_the_model_loads(tmp_path, tiny_ckpt):
    paths, sock = special_files(tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"\x7fELF\x00\x00\x01\x02" * 10)
    (tmp_path / "latin1.txt").write_bytes("café crème, naïve\n".encode("latin-1"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    (tmp_path / "good.txt").write_text("déjà vu ☕\n", encoding="utf-8")
    expect = {"bin.txt": "looks binary", "latin1.txt": "is not UTF-8 text (byte 0xe9 at offset 3",
              "folder": "is a folder", "loop.txt": "Too many levels of symbolic links",
              "missing.txt": "No such file", "pipe.txt": "FIFO", "sock.txt": "socket", "zero.txt": "character device",
              "broken.txt": "broken symbolic link"}
    cases = [{"name": n, "cfg": {"out_dir": "/nonexistent-until-the-prompt-is-read", "start": f"FILE:{tmp_path / n}",
                                 "device": "cpu"}} for n in expect]
    cases.append({"name": "good", "cfg": {"out_dir": str(tiny_ckpt), "start": f"FILE:{tmp_path / 'good.txt'}",
                                          "device": "cpu", "num_samples": 1, "max_new_tokens": 2}})
    got = sample_in_child(cases, tmp_path)
    sock.close()
    for name, says in expect.items():
        status, msg = got[name][:2]
        assert status == "error" and msg.startswith("DataError: ") and "\n" not in msg, (name, got[name])
        assert says in msg and str(tmp_path / name) in msg, (name, msg)
    assert got["good"][0] == "ok" and "déjà vu ☕\n" in got["good"][2], got["good"]


def test_a_huge_prompt_is_cropped_to_the_context_before_it_is_repeated(tmp_path, tiny_ckpt):
    """10 MB of prompt x 1024 samples was an 80 GB tensor before the model cropped it to block_size."""
    prompt = tmp_path / "long.txt"
    prompt.write_text("ab" * 5_000_000 + "the end")
    got = sample_in_child([{"name": "long", "cfg": {"out_dir": str(tiny_ckpt), "start": f"FILE:{prompt}",
                                                    "num_samples": 1024, "max_new_tokens": 3, "temperature": 0,
                                                    "device": "cpu"}}], tmp_path)["long"]
    assert got[0] == "ok" and got[1] == [16 + 3] * 1024, got         # block_size prompt tokens + 3 new
    from minimoe import sample
    short = sample.sample(sample.SampleConfig(out_dir=str(tiny_ckpt), start=("ab" * 8 + "the end")[-16:],
                                              num_samples=1, max_new_tokens=3, temperature=0, device="cpu"))
    assert got[2] == short[0][-40:]                                  # the same continuation as the cropped prompt


def test_encode_tail_is_the_tail_of_the_whole_encoding():
    from minimoe.sample import encode_tail
    words = lambda s: s.split(" ")                                    # a token may span many characters
    text = " ".join(f"w{i}" * (1 + i % 7) for i in range(5000))
    for n in (1, 16, 300):
        tokens, cropped = encode_tail(words, text, n)
        assert tokens == words(text)[-n:] and cropped
    assert encode_tail(words, "a b c", 16) == (["a", "b", "c"], False)


def test_a_prompt_the_tokenizer_cannot_take_is_refused_at_parse_time(tmp_path):
    with pytest.raises(DataError, match=r"--start is not UTF-8 text: character 3 is the byte 0xe9 \(Latin-1\?\)"):
        SampleConfig(start="caf\udce9")                               # how Python receives a Latin-1 argv byte
    p = subprocess.run([sys.executable, "-m", "minimoe.sample", b"--start=caf\xe9", "--out_dir=/nonexistent"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "LC_ALL": "C.UTF-8"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "--start is not UTF-8 text" in lines[0], p.stderr


@pytest.mark.parametrize("device, says", [("foo", "--device='foo' is not a device"), ("cuda:x", "not a device"),
                                          ("cuda", "CUDA is not available")])
def test_an_unknown_or_absent_device_is_one_line_before_the_model_loads(device, says, monkeypatch, tiny_ckpt):
    from minimoe import sample
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sample, "load_model", lambda *a: pytest.fail("loaded the model first"))
    with pytest.raises(ValueError, match=re.escape(says)):
        sample.sample(SampleConfig(out_dir=str(tiny_ckpt), device=device))


def test_sample_paths_special_files_and_tilde(tmp_path, monkeypatch, tiny_ckpt):
    from minimoe import sample
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "ckpt.pt")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out, says in ((tmp_path / "fifo", "ckpt.pt is a FIFO"), (tmp_path / "loop", "Too many levels"),
                      (tmp_path / "fifo" / "ckpt.pt", "is a FIFO")):
        with pytest.raises(DataError, match=re.escape(says)):
            sample.sample(SampleConfig(out_dir=str(out), device="cpu", num_samples=1, max_new_tokens=1))
    monkeypatch.setenv("HOME", str(tiny_ckpt.parent))
    (tmp_path / "p.txt").write_text("hi")
    monkeypatch.chdir(tmp_path)
    texts = sample.sample(SampleConfig(out_dir=f"~/{tiny_ckpt.name}", start="FILE:p.txt", device="cpu",
                                       num_samples=1, max_new_tokens=1))
    assert texts[0].startswith("hi")
    monkeypatch.setenv("HOME", str(tmp_path))
    texts = sample.sample(SampleConfig(out_dir=str(tiny_ckpt), start="FILE:~/p.txt", device="cpu",
                                       num_samples=1, max_new_tokens=1))
    assert texts[0].startswith("hi")


def test_ctrl_c_while_sampling_is_one_line():
    code = ("import os, runpy, signal, sys, time; import minimoe.checkpoint as t; "
            # Ctrl-C while it loads; the sleep is where Python runs the handler (a bare os.kill may return first)
            "t.load_model = lambda *a: (os.kill(os.getpid(), signal.SIGINT), time.sleep(30)); "
            "sys.argv = ['sample', '--device=cpu', '--out_dir=/nonexistent']; "
            "runpy.run_module('minimoe.sample', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 130 and len(lines) == 1 and lines[0].startswith("interrupted (SIGINT)"), p.stderr
