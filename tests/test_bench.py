"""The layer benchmark runs and compares what it says it compares (no timing is asserted)."""

from pathlib import Path
import platform
import subprocess
import sys

import pytest
import torch

from minimoe import bench

ROOT = Path(__file__).resolve().parent.parent


def test_bench_matches_params_and_flops_and_prints_a_table(capsys):
    rows = bench.main(["--tokens=64", "--n_embd=96", "--d_ffn=192", "--configs=4,2,32", "--repeats=1"])
    out = capsys.readouterr().out
    assert "| moe |" in out and "| aoe=P |" in out and "| dense |" in out
    assert list(dict.fromkeys(r["kind"] for r in rows)) == bench.layer_names()   # the names --layers accepts
    by = {(r["kind"], r["dispatch"]): r for r in rows}
    moe, aoe_p, aoe_f, dense = (next(r for k, r in by.items() if k[0] == n) for n in ("moe", "aoe=P", "aoe=F", "dense"))
    assert abs(aoe_p["params"] / moe["params"] - 1) < 0.03      # matched total parameters (Eq. 5)
    assert abs(aoe_f["active"] / moe["active"] - 1) < 0.03      # matched active FLOPs
    assert abs(dense["active"] / moe["active"] - 1) < 0.03      # dense = MoE's active size
    assert aoe_p["active"] > moe["active"]                      # AoE pays for all experts' W_down
    assert {d for _, d in by} >= {"loop"}
    # the variants: ERC's cost is a fixed per-step extra (6 n^2 D H), nobody else has one
    erc, low = (next(r for k, r in by.items() if k[0] == n) for n in ("moe+erc", "moe-lowrank"))
    assert erc["extra"] == 6 * 4 ** 2 * 96 * 192 and erc["flops_tok"] == moe["flops_tok"]
    assert all(r["extra"] == 0 for r in rows if r["kind"] != "moe+erc")
    assert abs(low["params"] / moe["params"] - 1) < 0.03        # Table 2 control: Eq. 5 widths
    assert low["width"] == aoe_p["width"]                       # ... AoE's own expert widths
    # the summary lines: time and FLOP ratios of the three pairs, computed from the rows above
    line = next(l for l in out.splitlines() if "aoe=P / moe-lowrank:" in l)
    t, f = aoe_p["ms"] / low["ms"], aoe_p["flops_tok"] / low["flops_tok"]
    assert f"time x{t:.3f}, FLOPs x{f:.3f}, time/FLOPs {t / f:.3f}" in line
    assert "moe / dense:" in out and "aoe=P / moe:" in out


def test_bench_shows_the_cost_of_fp32_scores_under_autocast(capsys):
    rows = bench.main(["--tokens=64", "--n_embd=96", "--d_ffn=192", "--configs=4,2,32", "--repeats=1", "--dtype=amp"])
    kinds = {r["kind"] for r in rows}
    assert kinds == set(bench.layer_names(amp=True))
    assert {"moe bf16-scores", "aoe=P bf16-scores"} <= kinds and "| moe bf16-scores |" in capsys.readouterr().out


def test_bench_rejects_a_malformed_config():
    with pytest.raises(SystemExit):
        bench.main(["--configs=8,2"])


def test_layers_are_timed_interleaved_in_rotated_order():
    """Every round times each layer once, starting one later each round, so drift hits all rows alike."""
    calls = []
    steps = [lambda i=i: calls.append(i) for i in range(3)]
    medians = bench.time_steps(steps, repeats=3, warmup=1)
    assert calls == [0, 1, 2] + [0, 1, 2, 1, 2, 0, 2, 0, 1]      # warmup, then rounds rotated by one
    assert len(medians) == 3 and all(m >= 0 for m in medians)


def test_bench_times_a_chosen_subset_and_refuses_unknown_layers(capsys):
    rows = bench.main(["--tokens=64", "--n_embd=96", "--d_ffn=192", "--configs=4,2,32", "--repeats=1",
                       "--layers=aoe=P,dense", "--dispatch=loop"])
    assert sorted((r["kind"], r["dispatch"]) for r in rows) == [("aoe=P", "loop"), ("dense", "-"), ("moe", "loop")]
    with pytest.raises(SystemExit):
        bench.main(["--layers=aoe,dense", "--repeats=1"])
    assert "--layers: 'aoe' not among moe, aoe=P" in capsys.readouterr().err


def test_bench_profiles_the_layers_asked_for(capsys):
    bench.main(["--tokens=64", "--n_embd=96", "--d_ffn=192", "--configs=4,2,32", "--repeats=1",
                "--layers=aoe=P", "--dispatch=loop", "--profile=aoe=P"])
    out = capsys.readouterr().out
    assert out.count("# profile:") == 1 and "# profile: aoe=P (loop)" in out
    assert "| aten::mm |" in out                      # the experts' matmuls are among the top ops
    with pytest.raises(SystemExit):
        bench.main(["--profile=aoe", "--repeats=1"])
    assert "--profile: 'aoe' not among moe, aoe=P" in capsys.readouterr().err


RSS_AFTER_FREE = """
import sys, torch
from minimoe.hardware import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
base = rss_mib()
x = torch.ones(64 * 2**20 // 4)          # 64 MiB, written: resident
del x
print(kept, rss_mib() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory acts on glibc's malloc only (elsewhere it returns False)")
def test_keep_freed_memory_keeps_a_freed_buffer_mapped():
    # glibc's default unmaps a freed 64 MiB buffer (resident memory drops back); after keep_freed_memory
    # it stays mapped for the next step's tensor of that size. Each case in a fresh process.
    out = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, mode], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        kept, grown = r.stdout.split()
        out[mode] = (kept == "True", float(grown))
    assert out["default"][0] is False and out["default"][1] < 16, out     # returned to the OS
    assert out["keep"][0] is True and out["keep"][1] > 48, out            # still mapped


def test_split_replays_exactly_the_matmuls_the_flops_column_counts(capsys):
    """--split records every matmul of one forward+backward (autograd's too) and replays them alone. What it
    records must be what the FLOPs/tok column assumes, 6 x active parameters per token (2 forward, 4
    backward), to the FLOP, for every layer: so the column is right, and the replay leaves nothing out."""
    tokens = 64
    rows = bench.main([f"--tokens={tokens}", "--n_embd=96", "--d_ffn=192", "--configs=4,2,32", "--repeats=1",
                       "--split"])
    out = capsys.readouterr().out
    assert "| matmul ms | rest ms | matmul GFLOP/s |" in out and "matmuls alone: time x" in out
    for r in rows:
        assert r["mm_flops"] == tokens * r["flops_tok"] + r["extra"], r["kind"]   # ERC: + its fixed extra
        assert r["mm_ms"] > 0 and abs(r["mm_ms"] + r["rest_ms"] - r["ms"]) < 1e-9


def test_recorded_matmuls_count_grouped_and_weight_gradient_shapes():
    """matmul_flops on hand-made calls: 2*M*K*N for mm and both _grouped_mm layouts, batch times that for bmm."""
    from minimoe.dispatch import plan_dispatch
    x, w = torch.randn(12, 8, requires_grad=True), torch.randn(3, 8, 4, requires_grad=True)   # 16-byte strides
    plan = plan_dispatch(torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 1, 2, 0, 1])[:, None], 3)

    def step():
        y = torch._grouped_mm(x, w, offs=plan.offsets)             # (12, 4): rows grouped
        (y.square().mean() + torch.bmm(w, w.transpose(1, 2)).sum()).backward()
    calls = bench.record_matmuls(step)
    names = [f.overloadpacket.__name__ for f, _, _ in calls]
    assert names.count("_grouped_mm") == 3 and names.count("bmm") == 3   # forward, grad x, grad w (each)
    assert bench.matmul_flops(calls) == 3 * 2 * 12 * 8 * 4 + 3 * 2 * 3 * 8 * 4 * 8
    bench.replay_step(calls)()                                      # runs them again, no autograd


# --------------------------------------------------------------------------- bad input: one line, before any timing

def _refused(argv, capsys, monkeypatch, says):
    """bench.main(argv) exits 2 with one `error:` line naming the value, and never reaches the timing."""
    def no_timing(*a, **k):
        raise AssertionError("timing started before the input was checked")
    monkeypatch.setattr(bench, "time_steps", no_timing)
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert torch.get_num_threads() == threads                      # nothing changed before the check


@pytest.mark.parametrize("arg, says", [
    ("--threads=-1", "--threads=-1 is outside [0, 4096]"), ("--tokens=0", "--tokens=0 is outside"),
    ("--tokens=-64", "--tokens=-64"), ("--repeats=0", "--repeats=0"), ("--repeats=-3", "--repeats=-3"),
    ("--n_embd=0", "--n_embd=0"), ("--d_ffn=-1", "--d_ffn=-1"), ("--threads=100000", "--threads=100000"),
    ("--device=foo", "--device='foo' is not a device: allowed are auto, cpu, cuda, cuda:N, mps"),
    ("--device=cuda:x", "--device='cuda:x' is not a device"), ("--device=meta", "--device='meta'"),
    ("--configs=8,2,32;8,0,32", "config E=8,K=0,d_low=32"), ("--configs=8,2,32;4,8,32", "config E=4,K=8"),
    ("--configs=8,2,32;8,2,-5", "config E=8,K=2,d_low=-5"), ("--tokens=ten", "--tokens: invalid int value"),
])
def test_bad_values_are_one_line_before_any_timing(arg, says, capsys, monkeypatch):
    _refused(["--n_embd=32", "--d_ffn=64", "--tokens=32", "--repeats=1", arg], capsys, monkeypatch, says)


def test_an_absent_gpu_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)     # as on a machine without one
    _refused(["--device=cuda"], capsys, monkeypatch, "--device='cuda' is invalid: CUDA is not available")
    _refused(["--device=cuda:1"], capsys, monkeypatch, "CUDA is not available")


def test_a_gpu_index_past_the_last_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert bench.pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"--device=cuda:2: this machine has 2 GPU\(s\) \(cuda:0 to cuda:1\)"):
        bench.pick_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.pick_device("auto").type in ("cpu", "mps")
