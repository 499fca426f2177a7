"""The layer benchmark runs and compares what it says it compares (no timing is asserted)."""

import pytest

from minimoe import bench


def test_bench_matches_params_and_flops_and_prints_a_table(capsys):
    rows = bench.main(["--tokens=64", "--n_embd=96", "--d_ffn=192", "--configs=4,2,32", "--repeats=1"])
    out = capsys.readouterr().out
    assert "| moe |" in out and "| aoe=P |" in out and "| dense |" in out
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


def test_bench_shows_the_cost_of_fp32_scores_under_autocast(capsys):
    rows = bench.main(["--tokens=64", "--n_embd=96", "--d_ffn=192", "--configs=4,2,32", "--repeats=1", "--dtype=amp"])
    kinds = {r["kind"] for r in rows}
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
