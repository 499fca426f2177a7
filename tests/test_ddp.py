"""DDP on CPU: 2 gloo processes under torchrun follow the same loss trajectory, and end at the same
weights, as 1 process that accumulates 2 micro-batches (same global batch), also when the DDP run
is stopped and resumed. Plus the one bad input that needs several ranks: a global batch that does
not divide across them.

Both runs read the same prepared shard folder, written here (nothing is downloaded). With
accumulation A and W ranks, micro-step m of step s on rank r reads global batch (s*A + m)*W + r
(see minimoe/data.py), so the two runs see the same tokens at every optimizer step; only the order
of float additions differs (all-reduce of two gradients vs. accumulating them), hence allclose.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt
from test_train_gpt import FAST, assert_close_or_none, cache, make_shards, read_log  # noqa: F401  (cache: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(args, timeout=240):
    # OMP_NUM_THREADS=1: two ranks on a small CPU machine must not fight over cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run([*TORCHRUN, "train_gpt.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("preset, resume", [("tiny-aoe", True), ("tiny-moe", False)])
def test_two_ranks_match_one_process_with_accumulation(tmp_path, preset, resume):
    data = make_shards(tmp_path / "shards")
    # micro-batch 4 x 32 tokens; global batch 256 tokens = 2 ranks x 1 micro-step = 1 rank x 2 micro-steps
    # FAST has --threads=1: the single process does its math with one thread, as each rank does
    common = [f"--preset={preset}", f"--data={data}", *FAST, "--eval_interval=2", "--lr_decay_iters=6",
              "--total_batch_tokens=256", "--peak_flops=1e12"]
    if resume:   # the DDP run stops at iter 4 and a second torchrun continues it from ckpt.pt
        r = torchrun([*common, "--max_iters=4", f"--out_dir={tmp_path / 'ddp'}"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = torchrun([*common, "--max_iters=6", f"--out_dir={tmp_path / 'ddp'}"]
                 + ["--init_from=resume"] * resume)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "256 tokens/step = 4 x 32 x 2 rank(s) x 1 micro-step(s)" in r.stdout + r.stderr
    single = train_gpt.main([*common, "--max_iters=6", f"--out_dir={tmp_path / 'one'}"])
    assert json.loads((tmp_path / "one" / "config.json").read_text())["resolved"]["grad_accum_steps"] == 2

    log_ddp, log_one = read_log(tmp_path / "ddp"), read_log(tmp_path / "one")
    assert [row["iter"] for row in log_ddp] == [row["iter"] for row in log_one] == [0, 2, 4, 6]
    for a, b in zip(log_ddp, log_one):   # train_loss: mean over the ranks (DDP) or micro-steps (one)
        assert_close_or_none(a["train_loss"], b["train_loss"], rel=1e-4)   # None at iter 0 in both
        assert_close_or_none(a["val_loss"], b["val_loss"], rel=1e-4)
    assert log_one[-1]["val_loss"] < log_one[0]["val_loss"]   # training happened
    assert log_ddp[-1]["routing"][0]["load"] == pytest.approx(log_one[-1]["routing"][0]["load"], abs=1e-6)
    # MFU: FLOPs of the *active* parameters (+ attention) x tokens/s per rank, over one device's peak
    flops = single["model"].flops_per_token()
    assert flops == json.loads((tmp_path / "ddp" / "config.json").read_text())["resolved"]["flops_per_token"]
    for log, world in ((log_ddp, 2), (log_one, 1)):
        row = log[-1]
        assert row["mfu"] == pytest.approx(flops * row["tokens_per_sec"] / world / 1e12, rel=1e-9)
    # the weights the DDP run saved equal the single-process weights
    saved = torch.load(tmp_path / "ddp" / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    for name, p in single["model"].state_dict().items():
        torch.testing.assert_close(saved[name], p, rtol=1e-4, atol=1e-5, msg=name)


def test_global_batch_that_does_not_divide_across_ranks(tmp_path):
    data = make_shards(tmp_path / "shards")
    # 2 ranks x micro-batch 4 x 32 tokens = 256 tokens per micro-step; 384 = 1.5 micro-steps
    r = torchrun(["--preset=tiny-aoe", f"--data={data}", *FAST, "--max_iters=1",
                  "--total_batch_tokens=384", f"--out_dir={tmp_path / 'o'}"])
    assert r.returncode != 0
    # a rank prints the one-line reason, then torchrun reports the failed children (it may kill
    # the other rank before that one prints, so one rank's line is enough)
    assert re.search(r"error \(rank [01]\): TrainConfig.total_batch_tokens=384 is invalid", r.stderr)
    assert "try --total_batch_tokens=512" in r.stderr             # the nearest valid value
    assert 'train.py", line' not in r.stderr                       # no traceback from our code
    assert not (tmp_path / "o" / "ckpt.pt").exists()
