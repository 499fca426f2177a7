"""Faults of the training loop, one section per class: none may end in a traceback, a hang or lost
work. (1) a run into an out_dir that another run owns or that holds a trained checkpoint;
(2) a preempted or diverging DDP job; (3) corrupt or foreign checkpoints, for resume and sampling;
(4) an out_dir or a batch that cannot work, caught before step 0; (5) leftovers: temporary files of
an interrupted save, data changed under a checkpoint, a log line cut short; (6) each reaches the
scripts' user as `error: <one line>` with exit code 2. CPU only, no network.
"""

import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

import train_small
from minimoe import checkpoint, runtime, sample
from minimoe.data import Corpus, load_corpus
from minimoe.checkpoint import CheckpointError, data_fingerprint, load_model
from minimoe.train import TrainingDiverged, train
from test_train import CORPUS, fast, read_log, tiny
from test_train_gpt import FAST, make_shards

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()            # train() sets --threads process-wide: put it back
    yield
    torch.set_num_threads(threads)


def ckpt_iter(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)["iter"]


def script(name, *args):
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=120)


def assert_one_line_error(r, text):
    """A script's failure as the user sees it: exit 2, `error: ...` on one line, no traceback."""
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and text in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def train_small_args(tmp_path):
    data = tmp_path / "code.py"
    data.write_text(Path(shutil.__file__).read_text())
    return ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--d_ffn=32", "--batch_size=4",
            "--eval_iters=2", "--eval_interval=2", "--log_interval=1", "--warmup_iters=1", "--progress=false",
            "--device=cpu", "--threads=1", f"--data={data}", f"--out_dir={tmp_path / 'out'}"]


# --------------------------------------------------------------------------- 1. silent loss of work

def test_scratch_run_refuses_an_out_dir_with_a_checkpoint(tmp_path):
    train(tiny(), fast(tmp_path, max_iters=2, eval_interval=2), corpus=CORPUS)
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match=r"ckpt.pt already holds a checkpoint \(iter 2\); continue it with "
                                         r"--init_from=resume, start over with --overwrite=true"):
        train(tiny(), fast(tmp_path, max_iters=6), corpus=CORPUS)
    assert (tmp_path / "ckpt.pt").read_bytes() == before and len(read_log(tmp_path)) == 2   # untouched
    r = train(tiny(), fast(tmp_path, max_iters=4, eval_interval=4, overwrite=True), corpus=CORPUS)
    assert r["iters"] == 4 and ckpt_iter(tmp_path) == 4 and [x["iter"] for x in read_log(tmp_path)] == [0, 4]


def test_train_small_refuses_before_training_anything_and_still_resumes_partial_runs(tmp_path):
    common = [*train_small_args(tmp_path), "--max_iters=2", "--sample_tokens=0"]
    assert train_small.main([*common, "--model=aoe"]) == 0
    # --model=all would train dense and moe first, then overwrite aoe: refused before dense starts
    with pytest.raises(ValueError, match=r"aoe/ckpt.pt already holds a checkpoint \(iter 2\)"):
        train_small.main(common)
    assert not (tmp_path / "out" / "dense").exists()
    # resume with some kinds not trained yet: those start from scratch, aoe continues
    assert train_small.main([*common, "--max_iters=4", "--init_from=resume"]) == 0
    assert [ckpt_iter(tmp_path / "out" / k) for k in ("dense", "moe", "aoe")] == [4, 4, 4]
    assert [r["iter"] for r in read_log(tmp_path / "out" / "aoe")] == [0, 2, 4]
    assert train_small.main([*common, "--overwrite=true"]) == 0       # start over on purpose
    assert [ckpt_iter(tmp_path / "out" / k) for k in ("dense", "moe", "aoe")] == [2, 2, 2]


def test_second_run_into_a_locked_out_dir_fails_at_once(tmp_path):
    seen = {}

    def second_run(it, model):               # while the first run holds the folder
        if it == 1:
            with pytest.raises(ValueError) as e:
                train(tiny(), fast(tmp_path, overwrite=True), corpus=CORPUS)
            seen["error"] = str(e.value)

    train(tiny(), fast(tmp_path, max_iters=2, eval_interval=2), corpus=CORPUS, callback=second_run)
    assert seen["error"] == (f"--out_dir={tmp_path} is in use by another run (pid {os.getpid()}); wait for it "
                             f"to finish or stop it, or use another --out_dir")
    assert [r["iter"] for r in read_log(tmp_path)] == [0, 2]          # the first run's log, not interleaved
    # the lock ends with the run: a resume may follow at once
    assert train(tiny(), fast(tmp_path, max_iters=4, init_from="resume"), corpus=CORPUS)["iters"] == 4


def test_lock_of_another_process_names_its_pid_and_dies_with_it(tmp_path):
    # another process holds out_dir/.lock the way a run does (flock + its pid in the file)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(tmp_path / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.truncate(0); f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid}\)"):
            train(tiny(), fast(tmp_path), corpus=CORPUS)
    finally:
        holder.kill()                                                   # kill -9: no cleanup runs
        holder.wait()
    r = train(tiny(), fast(tmp_path, max_iters=2, eval_interval=2), corpus=CORPUS)   # no stale lock
    assert r["iters"] == 2


# --------------------------------------------------------------------------- 2. DDP: preemption, NaN on one rank

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py"]


def test_sigterm_to_a_ddp_job_saves_at_once_whatever_the_log_interval(tmp_path):
    """Before, 2 ranks agreed to stop only at a log_interval step: with a large one, torchrun's
    SIGKILL (30 s after SIGTERM) came first and the work since the last evaluation was lost."""
    data = make_shards(tmp_path / "shards")
    out = tmp_path / "run"
    common = ["--preset=tiny-aoe", f"--data={data}", *FAST, "--eval_interval=1000000", "--log_interval=1000000",
              "--lr_decay_iters=1000", f"--out_dir={out}"]
    p = subprocess.Popen([*TORCHRUN, *common, "--max_iters=1000000"], cwd=ROOT, env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    for line in p.stdout:                        # rank 0 prints the iter-0 evaluation, then trains
        lines.append(line)
        if "aoe iter 0:" in line:
            break
    time.sleep(2)                                # some steps
    t0 = time.monotonic()
    os.killpg(p.pid, signal.SIGTERM)             # as a scheduler preempts: the whole group
    out_text = "".join(lines) + p.communicate(timeout=90)[0]
    assert time.monotonic() - t0 < 20, out_text[-3000:]        # well before torchrun's SIGKILL
    stopped = ckpt_iter(out)
    assert stopped > 0 and f"stopped at iter {stopped}; checkpoint saved" in out_text, out_text[-3000:]
    assert 'train.py", line' not in out_text     # (torchrun itself prints one for its own SIGTERM)
    r = subprocess.run([*TORCHRUN, *common, f"--max_iters={stopped + 2}", "--init_from=resume"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ckpt_iter(out) == stopped + 2 and [row["iter"] for row in read_log(out)] == [0, stopped + 2]


def _poisoned_rank(rank, port, out_dir, result_dir):
    """One of 2 gloo ranks: rank 1's weights turn NaN after step 2 (rank 0's stay finite)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    def poison(it, model):
        if rank == 1 and it == 2:
            with torch.no_grad():
                model.wte.weight[0, 0] = float("nan")

    try:
        # eval_iters=1: only rank 0 evaluates, so the val loss stays finite and only the weights tell
        train(tiny(), fast(out_dir, max_iters=2, eval_interval=2, eval_iters=1, log_interval=1000),
              corpus=CORPUS, callback=poison)
        outcome = "finished"
    except TrainingDiverged as e:
        outcome = f"TrainingDiverged: {e}"
    Path(result_dir, f"rank{rank}").write_text(outcome)


def test_nan_weights_on_one_rank_stop_every_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_poisoned_rank, args=(r, port, str(tmp_path / "run"), str(tmp_path)))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert alive == [False, False]               # nobody hangs
    for r in (0, 1):
        assert (tmp_path / f"rank{r}").read_text().startswith("TrainingDiverged: weights became NaN/inf by iter 2")
    assert ckpt_iter(tmp_path / "run") == 0      # the last good checkpoint is kept


# --------------------------------------------------------------------------- 3. corrupt or foreign checkpoints

@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    train(tiny(), fast(out, max_iters=2, eval_interval=2), corpus=CORPUS)
    return (out / "ckpt.pt").read_bytes()


def _edit(**changes):
    def f(raw, path):
        ckpt = torch.load(path, weights_only=True)
        for k, v in changes.items():
            if v is KeyError:
                del ckpt[k]
            else:
                ckpt[k] = v(ckpt) if callable(v) else v
        torch.save(ckpt, path)
    return f


Thing = namedtuple("Thing", "a b")             # a class: weights_only loading refuses it


CORRUPTIONS = {   # name: (how to spoil out_dir/ckpt.pt, what the error says)
    "truncated": (lambda raw, p: p.write_bytes(raw[:len(raw) // 2]), "is not a readable checkpoint"),
    "empty": (lambda raw, p: p.write_bytes(b""), "is empty (0 bytes)"),
    "random bytes": (lambda raw, p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "is not a readable"),
    "text file": (lambda raw, p: p.write_text("hello\n"), "is not a readable checkpoint"),
    "a list": (lambda raw, p: torch.save([1, 2, 3], p), "holds a list, not a minimoe checkpoint"),
    "a tensor": (lambda raw, p: torch.save(torch.zeros(3), p), "holds a Tensor, not a minimoe checkpoint"),
    "a bare state_dict": (lambda raw, p: torch.save(torch.nn.Linear(2, 2).state_dict(), p),
                          "is not a minimoe checkpoint: it lacks model, model_config"),
    "a pickled object": (lambda raw, p: p.write_bytes(pickle.dumps(Thing(1, 2), protocol=2)),
                         "is not a readable checkpoint"),
    "torch-saved object": (lambda raw, p: torch.save({"model": Thing(1, 2)}, p), "is not a readable checkpoint"),
    "no model_config": (_edit(model_config=KeyError), "lacks model_config"),
    "model is a string": (_edit(model="weights"), "is corrupt: model is a str"),
    "weights of another shape": (_edit(model=lambda c: {**c["model"], "wte.weight": torch.zeros(3, 3)}),
                                 "cannot be restored (RuntimeError: Error(s) in loading state_dict"),
    "a folder named ckpt.pt": (lambda raw, p: (p.unlink(), p.mkdir()), "ckpt.pt is a directory, not a checkpoint"),
}
SAMPLE_ONLY = {   # a resume refuses these earlier, as a different model (tested below)
    "unknown config field": (_edit(model_config=lambda c: {**c["model_config"], "n_wings": 2}),
                             "its model cannot be restored (ValueError: unknown GPTConfig field"),
}
RESUME_ONLY = {   # usable for sampling, not for a resume
    "no optimizer": (_edit(optimizer=KeyError), "is an incomplete minimoe checkpoint: it lacks optimizer"),
    "iter is a string": (_edit(iter="2"), "is corrupt: iter is a str"),
    "sampler of another run": (_edit(sampler={"counter": 2, "seed": 99}), "its training state cannot be restored"),
    "optimizer of another model": (_edit(optimizer=lambda c: {**c["optimizer"], "param_groups": []}),
                                   "its training state cannot be restored"),
}


def _spoil(tmp_path, good_ckpt, how):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(good_ckpt)
    how(good_ckpt, out / "ckpt.pt")
    return out


@pytest.mark.parametrize("name", [*CORRUPTIONS, *RESUME_ONLY])
def test_corrupt_checkpoint_on_resume_is_one_line_naming_the_file(tmp_path, good_ckpt, name):
    how, says = {**CORRUPTIONS, **RESUME_ONLY}[name]
    out = _spoil(tmp_path, good_ckpt, how)
    with pytest.raises(CheckpointError) as e:
        train(tiny(), fast(out, max_iters=4, init_from="resume"), corpus=CORPUS)
    msg = str(e.value)
    assert "\n" not in msg and str(out / "ckpt.pt") in msg and says in msg, msg


@pytest.mark.parametrize("name", [*CORRUPTIONS, *SAMPLE_ONLY])
def test_corrupt_checkpoint_for_sampling_is_one_line_naming_the_file(tmp_path, good_ckpt, name):
    how, says = {**CORRUPTIONS, **SAMPLE_ONLY}[name]
    out = _spoil(tmp_path, good_ckpt, how)
    with pytest.raises(CheckpointError) as e:
        sample.sample(sample.SampleConfig(out_dir=str(out), num_samples=1, max_new_tokens=2, device="cpu"))
    msg = str(e.value)
    assert "\n" not in msg and str(out / "ckpt.pt") in msg and says in msg, msg


def test_a_checkpoint_that_only_samples_still_samples(tmp_path, good_ckpt):
    out = _spoil(tmp_path, good_ckpt, _edit(optimizer=KeyError, sampler=KeyError))
    model, _ = load_model(out)
    assert model.config.ffn == "aoe"


def test_resume_from_a_checkpoint_of_a_model_this_version_does_not_know(tmp_path, good_ckpt):
    out = _spoil(tmp_path, good_ckpt, SAMPLE_ONLY["unknown config field"][0])
    with pytest.raises(ValueError, match=r"holds a different model \(n_wings: checkpoint 2, now None\)"):
        train(tiny(), fast(out, max_iters=4, init_from="resume"), corpus=CORPUS)


def test_corrupt_checkpoint_from_the_command_line(tmp_path, good_ckpt):
    out = _spoil(tmp_path, good_ckpt, CORRUPTIONS["truncated"][0])
    r = script("-m", "minimoe.sample", f"--out_dir={out}", "--device=cpu")
    assert_one_line_error(r, f"{out / 'ckpt.pt'} is not a readable checkpoint")


# --------------------------------------------------------------------------- 4. checks before step 0

def test_out_dir_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):       # a file; a folder under a file
        with pytest.raises(ValueError, match=rf"--out_dir={out} is not a writable folder \((FileExistsError|"
                                             rf"NotADirectoryError)"):
            train(tiny(), fast(out), corpus=CORPUS)


def test_full_disk_is_refused_before_step_0(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=50_000))
    with pytest.raises(ValueError, match=rf"--out_dir={tmp_path} has 0 MiB free, but a checkpoint of this model "
                                         rf"needs about \d MiB"):
        train(tiny(), fast(tmp_path), corpus=CORPUS)
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "log.jsonl").exists()


def test_save_on_a_disk_that_filled_up_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def full(it, model):
        if it == 3:                              # the disk fills up during the run
            monkeypatch.setattr(torch, "save", no_space)

    with pytest.raises(CheckpointError, match=r"could not write .*ckpt.pt \(OSError: \[Errno 28\] No space left "
                                              r"on device\); the previous checkpoint is kept"):
        train(tiny(), fast(tmp_path), corpus=CORPUS, callback=full)
    assert ckpt_iter(tmp_path) == 0 and not list(tmp_path.glob(".ckpt.pt.tmp*"))


def test_batch_far_beyond_memory_is_refused_before_step_0(tmp_path, monkeypatch):
    parts = runtime.estimate_memory(tiny(), fast(tmp_path), torch.float32, n_params=1000)
    assert parts["logits"] == 4 * 32 * 256 * 12 and parts["weights and optimizer"] == 16_000
    double = runtime.estimate_memory(tiny(), fast(tmp_path, batch_size=8), torch.float32, n_params=1000)
    assert double["activations"] == 2 * parts["activations"] > 0
    monkeypatch.setattr(runtime, "available_memory", lambda device: 1_000_000)   # 1 MB left
    with pytest.raises(ValueError, match=r"--batch_size=64 does not fit: a step of 64 x 32 tokens needs at least "
                                         r"\d+ MiB .*logits 6 MiB.*more than 90% of the 1 MiB of available memory"):
        train(tiny(), fast(tmp_path, batch_size=64), corpus=CORPUS)
    assert not (tmp_path / "ckpt.pt").exists()


def test_batch_far_beyond_memory_from_the_command_line(tmp_path):
    # inside the range the validator allows (batch_size <= 65536), far beyond this machine's memory
    r = script("train_small.py", *train_small_args(tmp_path), "--batch_size=65536", "--block_size=512",
               "--model=aoe")
    assert_one_line_error(r, "error: --batch_size=65536 does not fit")
    assert not (tmp_path / "out" / "aoe" / "ckpt.pt").exists()


# --------------------------------------------------------------------------- 5. leftovers

def test_stale_temporary_checkpoints_are_removed(tmp_path, capsys):
    train(tiny(), fast(tmp_path, max_iters=2, eval_interval=2), corpus=CORPUS)
    for pid in (12345, 99999):                   # saves that a kill -9 cut short
        (tmp_path / f".ckpt.pt.tmp{pid}").write_bytes(b"half a checkpoint")
    train(tiny(), fast(tmp_path, max_iters=4, init_from="resume"), corpus=CORPUS)
    assert not list(tmp_path.glob(".ckpt.pt.tmp*"))
    assert "removed" in capsys.readouterr().err and ckpt_iter(tmp_path) == 4


def test_resume_on_changed_data_is_refused_naming_both(tmp_path):
    train(tiny(), fast(tmp_path, max_iters=2, eval_interval=2), corpus=CORPUS)
    changed = CORPUS.train.copy()
    changed[1000] ^= 1                           # one token differs, same name, same length
    other = Corpus("toy", changed, CORPUS.val, 256, CORPUS.meta)
    fp_old, fp_new = data_fingerprint(CORPUS), data_fingerprint(other)
    assert fp_old != fp_new and data_fingerprint(Corpus("x", CORPUS.train.copy(), CORPUS.val, 256)) == fp_old
    with pytest.raises(ValueError, match=rf"the data changed since it was written \(checkpoint: 'toy' with "
                                         rf"fingerprint {fp_old}; now --data=toy: {fp_new}\)"):
        train(tiny(), fast(tmp_path, max_iters=4, init_from="resume"), corpus=other)
    assert train(tiny(), fast(tmp_path, max_iters=4, init_from="resume"), corpus=CORPUS)["iters"] == 4


def test_checkpoint_without_fingerprint_resumes_with_a_notice(tmp_path, capsys):
    train(tiny(), fast(tmp_path, max_iters=2, eval_interval=2), corpus=CORPUS)
    _edit(data_fingerprint=KeyError)(None, tmp_path / "ckpt.pt")    # as an older minimoe wrote it
    capsys.readouterr()
    assert train(tiny(), fast(tmp_path, max_iters=4, init_from="resume"), corpus=CORPUS)["iters"] == 4
    assert "has no data fingerprint" in capsys.readouterr().out


def test_shard_fingerprint_sees_a_changed_shard(tmp_path, monkeypatch):
    data = make_shards(tmp_path / "shards", n_train=40000)
    shard = data / "train_000000.bin"
    raw = bytearray(shard.read_bytes())
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "FINGERPRINT_WHOLE_BYTES", 1000)       # these shards count as large here
        base = data_fingerprint(load_corpus(str(data)))
        assert data_fingerprint(load_corpus(str(data))) == base         # stable
        raw[1024 + 5] ^= 1                                               # a token near the start
        shard.write_bytes(bytes(raw))
        assert data_fingerprint(load_corpus(str(data))) != base
    # through train_gpt: a resume after the shards changed is refused
    out = tmp_path / "run"
    import train_gpt
    common = ["--preset=tiny-aoe", f"--data={data}", *FAST, f"--out_dir={out}"]
    train_gpt.main([*common, "--max_iters=2"])
    raw[1024 + 7] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="the data changed since it was written"):
        train_gpt.main([*common, "--max_iters=4", "--init_from=resume"])


def test_log_line_cut_short_by_a_crash_does_not_block_the_resume(tmp_path):
    train(tiny(), fast(tmp_path, max_iters=4), corpus=CORPUS)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"iter": 8, "val_lo')               # killed mid-write
    r = train(tiny(), fast(tmp_path, max_iters=8, init_from="resume"), corpus=CORPUS)
    assert r["iters"] == 8 and [row["iter"] for row in read_log(tmp_path)] == [0, 4, 8]


# --------------------------------------------------------------------------- 6. what the scripts' user sees

def test_refusals_reach_the_user_as_one_line_and_exit_2(tmp_path):
    args = [*train_small_args(tmp_path), "--max_iters=2", "--model=moe"]
    assert train_small.main(args) == 0
    r = script("train_small.py", *args)
    assert_one_line_error(r, f"error: {tmp_path / 'out' / 'moe' / 'ckpt.pt'} already holds a checkpoint (iter 2)")
    (tmp_path / "out" / "moe" / "ckpt.pt").write_bytes(b"")
    r = script("train_small.py", *args, "--init_from=resume")
    assert_one_line_error(r, f"error: {tmp_path / 'out' / 'moe' / 'ckpt.pt'} is empty (0 bytes)")
