"""FSDP2 on CPU (minimoe/fsdp.py): 2 gloo ranks under torchrun against one process.

Part 1, the mechanism: one torchrun launch (this file run as a script, `worker()`) does every
multi-rank part and writes its results and checkpoints to a folder; the tests compare them with
one-process runs of the same tiny AoE model (with the aux-loss-free balancing bias: a buffer FSDP does not shard). Batches are
a pure function of their index: micro-step m of step s on rank r reads batch (s*A + m)*W + r, so
2 ranks x 2 micro-steps see the same tokens per optimizer step as 1 process x 4 micro-steps.

Tolerances: the sharded run reduce-scatters (sums) two ranks' gradients where one process adds
its micro-steps' gradients in another order, so the float sums differ in the last bits; over 6
AdamW steps that stays below rel 1e-4 on the loss and rtol 1e-4 / atol 1e-5 on the weights (the
tolerances of test_ddp.py). Activation checkpointing recomputes the same ops on the same inputs:
identical results are asserted to 1e-6.

Part 2, train_gpt.py: the paper-large-aoe preset (FSDP and activation checkpointing by default) at
tiny widths trains on 2 gloo ranks, stops and resumes under FSDP, DDP and one process in turn, and
ends where one uninterrupted process ends (test_ddp.py's tolerances).
"""

from contextlib import nullcontext
import json
import os
from pathlib import Path
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from minimoe import fsdp, runtime
from minimoe.balance import update_biases
from minimoe.model import GPT, GPTConfig
from minimoe.presets import get_preset
from minimoe.train import TrainConfig, configure_optimizer
import train_gpt
from test_ddp import torchrun
from test_train_gpt import FAST, assert_close_or_none, cache, make_shards, read_log  # noqa: F401  (cache: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64, d_ffn=128, ffn="aoe",
           n_experts=4, top_k=2, d_low=16, bias_update_rate=0.01)
BATCH, ACCUM_ONE, WORLD, STEPS, MID = 4, 4, 2, 6, 3
CLIP = 0.05                      # below the gradient norms of this model: clipping acts on every step


TEXT = torch.arange(4096) * 7 % 61                  # a learnable sequence: the loss falls within 6 steps


def batch(i: int):
    """Batch i: BATCH windows of TEXT at seeded random offsets."""
    starts = torch.randint(0, len(TEXT) - CFG["block_size"] - 1, (BATCH,), generator=torch.Generator().manual_seed(i))
    t = torch.stack([TEXT[s:s + CFG["block_size"] + 1] for s in starts.tolist()])
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()          # (B, T) inputs, (B, T) targets


def make(seed: int = 0, ac: bool = False, **overrides) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**CFG, **overrides}))
    if ac:
        fsdp.checkpoint_blocks(model)
    return model


def optimizer(model):
    return configure_optimizer(model, TrainConfig(learning_rate=1e-2))


def run_steps(model, opt, steps, accum, fwd=None, rank=0, world=1):
    """Train steps `steps` (a range); returns ([loss per step], [gradient norm per step]): the loss
    is the step's cross-entropy averaged over micro-steps and ranks, the norm the global one."""
    fwd = fwd or model
    losses, norms = [], []
    for s in steps:
        ce = torch.zeros(())
        for m in range(accum):
            x, y = batch((s * accum + m) * world + rank)
            with fwd.no_sync() if isinstance(fwd, DDP) and m < accum - 1 else nullcontext():
                _, loss = fwd(x, y)
                (loss / accum).backward()
            ce += model.last_ce_loss / accum
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        update_biases([f for _, f in model.expert_layers()], dist.all_reduce if world > 1 else None)
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(ce)
            ce /= world
        losses.append(ce.item())
        norms.append((norm.full_tensor() if isinstance(norm, fsdp.DTensor) else norm).item())
    return losses, norms


def full_state(model, opt) -> dict:
    model_sd, optim_sd = fsdp.full_state_dicts(model, opt)
    return {"model": model_sd, "optimizer": optim_sd}


# --------------------------------------------------------------------------- the 2-rank side

def worker(out: Path) -> None:
    """torchrun --nproc_per_node=2 tests/test_fsdp.py OUT: every multi-rank scenario, one launch."""
    dist.init_process_group("gloo")
    rank, accum = dist.get_rank(), ACCUM_ONE // WORLD
    master = rank == 0
    results = {}

    def save(name, state):
        if master:
            torch.save(state, out / name)

    # 1. FSDP training, checkpointed before step 0 (as train() does) and in the middle
    model = fsdp.shard(make())
    opt = optimizer(model)
    save("fsdp_init.pt", full_state(model, opt))
    l1, n1 = run_steps(model, opt, range(MID), accum, rank=rank, world=WORLD)
    save("fsdp_mid.pt", full_state(model, opt))
    dist.barrier()
    mid = torch.load(out / "fsdp_mid.pt", weights_only=True)
    # 2. the round trip: the gathered checkpoint into a differently initialized sharded model
    other = fsdp.shard(make(seed=99))
    other_opt = optimizer(other)
    fsdp.load_full_state_dicts(other, other_opt, mid["model"], mid["optimizer"])
    save("fsdp_roundtrip.pt", full_state(other, other_opt))
    l2, n2 = run_steps(model, opt, range(MID, STEPS), accum, rank=rank, world=WORLD)
    results["fsdp"] = {"losses": l1 + l2, "norms": n1 + n2}
    save("fsdp_end.pt", full_state(model, opt))
    # 3. a one-process checkpoint (written by the test before this launch) resumed under FSDP
    one_mid = torch.load(out / "one_mid.pt", weights_only=True)
    resumed = fsdp.shard(make(seed=7))
    resumed_opt = optimizer(resumed)
    fsdp.load_full_state_dicts(resumed, resumed_opt, one_mid["model"], one_mid["optimizer"])
    run_steps(resumed, resumed_opt, range(MID, STEPS), accum, rank=rank, world=WORLD)
    save("fsdp_from_one_end.pt", full_state(resumed, resumed_opt))
    # 4. activation checkpointing under FSDP and under DDP
    ac = fsdp.shard(make(ac=True))
    results["fsdp_ac"] = dict(zip(("losses", "norms"), run_steps(ac, optimizer(ac), range(STEPS), accum,
                                                                 rank=rank, world=WORLD)))
    ddp_model = make(ac=True)
    results["ddp_ac"] = dict(zip(("losses", "norms"), run_steps(ddp_model, optimizer(ddp_model), range(STEPS),
                                                                accum, fwd=DDP(ddp_model), rank=rank,
                                                                world=WORLD)))
    if master:
        (out / "results.json").write_text(json.dumps(results))
    dist.barrier()                  # no rank closes its connections while the other still reads from them
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the one-process side

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process trains STEPS steps of 4 micro-steps (writing one_mid.pt at MID), then torchrun
    runs worker() on 2 ranks; returns the folder and both sides' results."""
    out = tmp_path_factory.mktemp("fsdp")
    torch.set_num_threads(1)                       # each rank runs with one thread too
    model = make()
    opt = optimizer(model)
    l1, n1 = run_steps(model, opt, range(MID), ACCUM_ONE)
    torch.save(full_state(model, opt), out / "one_mid.pt")
    l2, n2 = run_steps(model, opt, range(MID, STEPS), ACCUM_ONE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={WORLD}", __file__, str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[:6000]
    return {"out": out, "one": {"losses": l1 + l2, "norms": n1 + n2, "end": full_state(model, opt)},
            **json.loads((out / "results.json").read_text())}


def load(runs, name):
    return torch.load(runs["out"] / name, weights_only=True)


def assert_same_weights(a: dict, b: dict, rtol=1e-4, atol=1e-5):
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def assert_same_format(a: dict, b: dict):
    """Same keys, shapes and dtypes: model state dict, optimizer state (numbered) and groups."""
    assert {k: (v.shape, v.dtype) for k, v in a["model"].items()} == \
           {k: (v.shape, v.dtype) for k, v in b["model"].items()}
    shapes = lambda sd: {i: {k: (v.shape, v.dtype) for k, v in s.items()} for i, s in sd["state"].items()}  # noqa: E731
    assert shapes(a["optimizer"]) == shapes(b["optimizer"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def test_fsdp_matches_one_process_with_accumulation(runs):
    one, two = runs["one"], runs["fsdp"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert one["losses"][-1] < one["losses"][0]                       # training happened
    # clip_grad_norm_ on the sharded gradients: the global norm, and it clipped every step
    assert two["norms"] == pytest.approx(one["norms"], rel=1e-4)
    assert min(one["norms"]) > CLIP
    assert_same_weights(load(runs, "fsdp_end.pt")["model"], one["end"]["model"])


def test_full_state_dict_has_the_one_process_format_and_round_trips(runs):
    fresh = make()
    assert_same_format(load(runs, "fsdp_init.pt"), full_state(fresh, optimizer(fresh)))   # no state yet
    mid = load(runs, "fsdp_mid.pt")
    assert_same_format(mid, load(runs, "one_mid.pt"))
    assert list(mid["model"]) == list(make().state_dict())           # incl. lm_head (tied) and expert_bias
    again = load(runs, "fsdp_roundtrip.pt")                          # gathered -> loaded -> gathered
    assert_same_format(again, mid)
    assert_same_weights(again["model"], mid["model"], rtol=0, atol=0)
    for i, state in mid["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(again["optimizer"]["state"][i][k], v, rtol=0, atol=0)


def test_fsdp_checkpoint_resumes_in_one_process(runs):
    mid = load(runs, "fsdp_mid.pt")
    model = make(seed=5)
    opt = optimizer(model)
    fsdp.load_full_state_dicts(model, opt, mid["model"], mid["optimizer"])
    losses, _ = run_steps(model, opt, range(MID, STEPS), ACCUM_ONE)
    assert losses == pytest.approx(runs["one"]["losses"][MID:], rel=1e-4)
    assert_same_weights(model.state_dict(), runs["one"]["end"]["model"])
    assert_same_format(full_state(model, opt), runs["one"]["end"])


def test_one_process_checkpoint_resumes_under_fsdp(runs):
    end = load(runs, "fsdp_from_one_end.pt")
    assert_same_weights(end["model"], runs["one"]["end"]["model"])
    for i, state in runs["one"]["end"]["optimizer"]["state"].items():
        torch.testing.assert_close(end["optimizer"]["state"][i]["exp_avg_sq"], state["exp_avg_sq"],
                                   rtol=1e-3, atol=1e-9)


def test_activation_checkpointing_under_fsdp_and_ddp(runs):
    assert runs["fsdp_ac"]["losses"] == pytest.approx(runs["fsdp"]["losses"], rel=1e-6)
    assert runs["fsdp_ac"]["norms"] == pytest.approx(runs["fsdp"]["norms"], rel=1e-6)
    assert runs["ddp_ac"]["losses"] == pytest.approx(runs["one"]["losses"], rel=1e-4)


# --------------------------------------------------------------------------- one process only

@pytest.mark.parametrize("ffn", ["aoe", "moe"])
def test_activation_checkpointing_equals_without(ffn):
    """Same loss, gradients and balancing counts; dropout on, so the recompute must replay the RNG."""
    grads, counts, losses = [], [], []
    for ac in (False, True):
        model = make(ac=ac, ffn=ffn, dropout=0.1)
        torch.manual_seed(3)
        x, y = batch(0)
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
        counts.append([f.load_counts.clone() for _, f in model.expert_layers()])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    for a, b in zip(*counts):                    # tokens counted once, not again by the recompute
        assert torch.equal(a, b) and a.sum() == BATCH * CFG["block_size"] * CFG["top_k"]


def test_activation_checkpointing_keeps_names_and_generation():
    model = make(ac=True)
    assert list(model.state_dict()) == list(make().state_dict())
    with torch.no_grad():                        # no recompute outside training: the plain forward
        a = model.generate(batch(0)[0][:1, :4], 5, temperature=0)
    assert torch.equal(a, make().generate(batch(0)[0][:1, :4], 5, temperature=0))


def test_fsdp_cannot_run_is_one_line(monkeypatch):
    cpu = torch.device("cpu")
    fsdp.check_fsdp(cpu, torch.float32)                              # runs here: no error
    with pytest.raises(ValueError, match=r"^TrainConfig.parallel='fsdp' is invalid with --dtype=float16"):
        fsdp.check_fsdp(cpu, torch.float16)
    with pytest.raises(ValueError, match=r"invalid on mps: FSDP runs on CUDA \(NCCL\) or CPU \(gloo\)"):
        fsdp.check_fsdp(torch.device("mps"), torch.float32)
    import torch.distributed.fsdp as fsdp_module
    monkeypatch.delattr(fsdp_module, "fully_shard")                  # a torch before FSDP2
    with pytest.raises(ValueError) as e:
        fsdp.check_fsdp(cpu, torch.float32)
    assert "has no torch.distributed.fsdp.fully_shard (FSDP2, PyTorch >= 2.6)" in str(e.value)
    assert "\n" not in str(e.value) and "--parallel=ddp" in str(e.value)


def test_state_bytes_per_gpu():
    model = make()
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = total - 2 * block                                         # embedding (= tied head), final norm
    assert fsdp.state_bytes_per_gpu(model, 8, "ddp") == 16 * total
    assert fsdp.state_bytes_per_gpu(model, 1, "fsdp") == 16 * total
    assert fsdp.state_bytes_per_gpu(model, 8, "fsdp") == 2 * total + 2 * root + 10 * block
    with torch.device("meta"):                                       # the paper's 4B model
        large = GPT(get_preset("paper-large-moe").model_config())
    ddp, sharded = (fsdp.state_bytes_per_gpu(large, 8, p) for p in ("ddp", "fsdp"))
    assert ddp > 60e9 and sharded < 12e9


def test_paper_large_presets():
    """The paper's 4B models (Table 5): its widths, lr 3.2e-4, d_wide by Eq. 5 rounded for the kernels."""
    from minimoe.aoe import d_wide_for_matched_params
    from minimoe.presets import count
    moe, aoe = (get_preset(f"paper-large-{f}") for f in ("moe", "aoe"))
    for p in (moe, aoe):
        c = p.model_config()
        assert (c.n_layer, c.n_head, c.n_embd, c.ffn_dim, c.n_experts, c.top_k) == (24, 20, 1280, 5120, 8, 2)
        assert p.train_defaults()["learning_rate"] == 3.2e-4
    exact = (3 * 1280 * 5120 - 400 * 1280) / (400 + 2 * 1280)     # Eq. 5: 6469.2 (the paper writes 6470)
    assert round(exact, 1) == 6469.2 and aoe.model_config().wide_dim == d_wide_for_matched_params(1280, 5120, 400) == 6472
    sizes = [count(p.model_config()) for p in (moe, aoe)]
    assert all(abs(s["total"] - 4.0e9) / 4.0e9 < 0.01 for s in sizes)     # 4B (GPT-2 vocabulary, tied)
    assert abs(sizes[0]["total"] - sizes[1]["total"]) / sizes[0]["total"] < 0.001


def test_parallel_option_and_where_fsdp_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match=r"^TrainConfig.parallel='zero3' is invalid: allowed values are 'ddp', 'fsdp'$"):
        TrainConfig(parallel="zero3")
    # under torchrun, setup() checks FSDP before it joins the process group: one line, no hang
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "0")
    import torch.distributed.fsdp as fsdp_module
    monkeypatch.delattr(fsdp_module, "fully_shard")
    with pytest.raises(ValueError, match=r"has no torch.distributed.fsdp.fully_shard .* use --parallel=ddp$"):
        runtime.setup(TrainConfig(parallel="fsdp", device="cpu"))
    assert not dist.is_initialized()


def test_memory_estimate_with_sharding_and_activation_checkpointing():
    cfg = get_preset("paper-large-aoe").model_config()
    plain = runtime.estimate_memory(cfg, TrainConfig(batch_size=16), torch.bfloat16, n_params=4_000_000_000)
    ac = runtime.estimate_memory(cfg, TrainConfig(batch_size=16, activation_checkpointing=True), torch.bfloat16,
                                 n_params=4_000_000_000, state_bytes=10**10)
    assert plain["weights and optimizer"] == 64e9 and ac["weights and optimizer"] == 1e10
    per_token = 16 * 1024 * 2                                        # bf16 values of one micro-batch
    assert ac["activations"] < plain["activations"] / 10
    assert ac["activations"] > 24 * 1280 * per_token                 # every Block's input is kept
    assert ac["logits"] == plain["logits"]


def test_share_gives_every_fsdp_rank_as_many_forwards():
    """9 items in chunks of 4 on 2 ranks: DDP splits 2 + 1; FSDP pads rank 1 with an uncounted chunk 0."""
    def parts(fsdp_on):
        return [list(runtime.Runtime(torch.device("cpu"), torch.float32, rank=r, world_size=2, ddp=True,
                                     fsdp=fsdp_on).share(9, 4)) for r in (0, 1)]
    assert parts(False) == [[(0, True), (8, True)], [(4, True)]]
    assert parts(True) == [[(0, True), (8, True)], [(4, True), (0, False)]]
    assert list(runtime.Runtime(torch.device("cpu"), torch.float32).share(3)) == [(0, True), (1, True), (2, True)]


# --------------------------------------------------------------------------- train_gpt.py

def test_large_preset_under_fsdp_resumes_across_fsdp_ddp_and_one_process(tmp_path):
    data = make_shards(tmp_path / "shards")
    # paper-large-aoe at tiny widths; its parallel=fsdp and activation_checkpointing=true stay on.
    # 512 tokens per step = 4 x 32 x 2 ranks x 2 micro-steps = 4 x 32 x 1 process x 4 micro-steps
    common = ["--preset=paper-large-aoe", f"--data={data}", *FAST, "--n_layer=2", "--n_head=2", "--d_low=8",
              "--vocab_size=256", "--compile=false", "--total_batch_tokens=512", "--learning_rate=3e-3",
              "--min_lr=3e-4", "--warmup_iters=1", "--lr_decay_iters=6", "--eval_iters=3",   # 3: uneven over 2 ranks
              "--bias_update_rate=0.01", "--peak_flops=1e12", "--final_eval_tokens=640"]   # 20 windows

    def step(out, iters, how, resume=True):
        args = [*common, f"--max_iters={iters}", f"--out_dir={out}"] + ["--init_from=resume"] * resume
        if how == "one":
            return train_gpt.main(args)
        r = torchrun([*args, f"--parallel={how}"] + ["--sample_tokens=8"] * (iters == 6))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout + r.stderr

    first = step(tmp_path / "a", 2, "fsdp", resume=False)          # chain a: FSDP -> DDP -> FSDP
    assert "512 tokens/step = 4 x 32 x 2 rank(s) x 2 micro-step(s)" in first
    step(tmp_path / "a", 4, "ddp")
    last = step(tmp_path / "a", 6, "fsdp")
    step(tmp_path / "b", 2, "one", resume=False)                    # chain b: one process -> FSDP -> one process
    step(tmp_path / "b", 4, "fsdp")
    step(tmp_path / "b", 6, "one")
    single = step(tmp_path / "one", 6, "one", resume=False)         # uninterrupted, one process
    assert single["model"].blocks[0].forward.__func__ is fsdp._checkpointed_forward   # the preset's AC is on

    ref = read_log(tmp_path / "one")
    for chain in ("a", "b"):
        log = read_log(tmp_path / chain)
        assert [row["iter"] for row in log] == [row["iter"] for row in ref] == [0, 2, 4, 6]
        for a, b in zip(log, ref):
            assert_close_or_none(a["train_loss"], b["train_loss"], rel=1e-4)
            assert_close_or_none(a["val_loss"], b["val_loss"], rel=1e-4)
        saved = torch.load(tmp_path / chain / "ckpt.pt", map_location="cpu", weights_only=False)
        assert_same_weights(saved["model"], single["model"].state_dict())
        assert_same_format(saved, {"model": single["model"].state_dict(), "optimizer": torch.load(
            tmp_path / "one" / "ckpt.pt", weights_only=False)["optimizer"]})
    assert ref[-1]["val_loss"] < ref[0]["val_loss"]                   # training happened
    # the final evaluation's windows split unevenly over the ranks (FSDP pads): the same numbers
    final = re.search(r"final val ([\d.]+) ± ([\d.]+) nats \(standard error over ([\d,]+) windows", last)
    assert float(final[1]) == pytest.approx(single["final_val_loss"], abs=2e-4)
    assert int(final[3].replace(",", "")) == single["final_val_windows"]
    assert -(-single["final_val_windows"] // 4) % 2 == 1              # an odd number of batches of 4: uneven
    assert json.loads((tmp_path / "a" / "config.json").read_text())["resolved"]["world_size"] == 2
    assert len((tmp_path / "a" / "sample.txt").read_text()) > 0       # every FSDP rank ran the sample's forwards


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
