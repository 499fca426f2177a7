"""The one training loop behind train_small.py and train_gpt.py (nanoGPT's train.py, as a library).

    from minimoe.model import GPTConfig
    from minimoe.train import TrainConfig, train
    result = train(GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_embd=128, n_head=4, ffn="aoe"),
                   TrainConfig(out_dir="out-demo", max_iters=200))
    result["val_loss"], result["model"]        # final metrics, and the trained GPT

The file reads top to bottom:
    1. optimizer and schedule   configure_optimizer (decay / no-decay groups), get_lr (warmup + cosine)
    2. evaluation               estimate_loss on fixed val batches, with routing statistics (Eq. 7, 8);
                                final_val_loss over the whole val split at the end (mean and its error)
    3. the loop                 train(): the `while`; train_step (accumulation, DDP no_sync, the expert
                                bias update), evaluate, save (FSDP: gathered to rank 0 first)
    4. what the loop runs on    Run (model, optimizer, samplers, log), build_run (a resume restores them
                                all), the files at the start, the result
What it calls lives next door, and none of it imports this file:
    config.py       TrainConfig: every knob of a run, with nanoGPT's names
    cli.py          `--field=value` for the fields of any dataclass (GPTConfig too)
    runtime.py      device, dtype, DDP or FSDP (torchrun), CPU threads, batch geometry; pre-flight checks; signals
    fsdp.py         FSDP2 sharding, activation checkpointing, checkpoints in one format for every mode
    progress.py     LoopState (all resumable loop state: steps, loss sums, best val, tokens) and its Clock
    checkpoint.py   atomic save, checked load (CheckpointError), the checks that make a resume safe
    outdir.py       the out_dir lock and overwrite policy; log.jsonl (RunLog), config.json, sample.txt
    files.py        the one atomic write, temp-file cleanup, log reader and run cache of the project

Batches come from data.BatchSampler, whose batch i is a pure function of (seed, i). Every
micro-step calls next() once, so micro-step m of optimizer step s on rank r reads global batch
(s*A + m)*W + r (A accumulation steps, W ranks): one process with A*W accumulation steps sees the
same batches at every optimizer step as W processes with A each. Resuming restores the sampler's
counter, the optimizer and the RNG, so on CPU a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations      # train_step etc. name Run, defined below them

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
import math
from pathlib import Path
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .balance import update_biases
from .checkpoint import (CHECKPOINT, RESUME_KEYS, check_resume, data_fingerprint, load_checkpoint, restoring,
                         save_checkpoint)
from .config import VAL_SEED, TrainConfig
from .data import BatchSampler, Corpus, bpb_factor, load_corpus
from .dispatch import routing_summary
from .files import atomic_write
from .fsdp import checkpoint_blocks, full_state_dicts, load_full_state_dicts, local, shard
from .hardware import mfu, peak_flops
from .model import GPT, GPTConfig
from .outdir import FINAL_VAL_FILE, RunLog, write_config, write_sample
from .progress import LoopState
from .runtime import Runtime, StopRequest, grad_accum_steps, preflight, setup

__all__ = ["TrainConfig", "TrainingDiverged", "configure_optimizer", "get_lr", "estimate_loss", "final_val_loss",
           "train", "train_step"]


# --------------------------------------------------------------------------- 1. optimizer and schedule

def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, attention, experts, router, W_down) and
    none on vectors (RMSNorm gains), as in nanoGPT. Fused kernel on CUDA.

    The two factors of a factorized W_g = W_down W_up (AoE, moe-lowrank) may step at their own multiple of the
    learning rate (w_down_lr_scale, w_up_lr_scale; a group with key "lr_scale" each): AdamW moves every factor
    by about lr per entry, so their product moves faster than one matrix would. At 1 (the default) there are
    just the two groups above."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scales = {"w_down": cfg.w_down_lr_scale, "w_up": cfg.w_up_lr_scale}
    scaled = lambda n: n.rsplit(".", 1)[-1] if scales.get(n.rsplit(".", 1)[-1], 1) != 1 else None  # noqa: E731
    params = [p for n, p in named if not scaled(n)]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups += [{"params": [p for n, p in named if scaled(n) == f], "weight_decay": cfg.weight_decay,
                "lr_scale": scales[f]} for f in scales if any(scaled(n) == f for n, _ in named)]
    params = [p for _, p in named]
    fused = params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `it`: linear warmup, then cosine down to min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)    # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# --------------------------------------------------------------------------- 2. evaluation

@torch.no_grad()
def estimate_loss(model: GPT, sampler: BatchSampler, eval_iters: int, rt: Runtime | None = None) -> dict:
    """Mean val cross-entropy over batches 0 .. eval_iters-1 of `sampler` (fixed: every model and
    run sees the same ones), and the routing statistics of each expert layer over those batches:
    load share per expert, Ent_load (Eq. 7) of that share, Ent_conf (Eq. 8) averaged over tokens,
    and its coefficient of variation. Under DDP the batches are split over ranks and summed (under
    FSDP with as many forwards on every rank: Runtime.share)."""
    rt = rt or Runtime(next(model.parameters()).device, torch.float32)
    was_training = model.training
    model.eval()
    layers = [i for i, _ in model.expert_layers()]
    E = model.config.n_experts
    acc = torch.zeros(2 + len(layers) * (E + 1), dtype=torch.float64)   # loss, batches, per layer: load, ent_conf
    for i, counted in rt.share(eval_iters):
        x, y = (t.to(rt.device) for t in sampler.batch(i))
        with rt.autocast():
            model(x, y)
        if not counted:
            continue                                  # FSDP's padding forward
        acc[0] += model.last_ce_loss.item()
        acc[1] += 1
        for j, s in enumerate(model.routing_stats()):
            base = 2 + j * (E + 1)
            acc[base:base + E] += torch.tensor(s["load"], dtype=torch.float64)
            acc[base + E] += s["ent_conf"]
    if rt.ddp:
        acc = acc.to(rt.device)
        dist.all_reduce(acc)
        acc = acc.cpu()
    model.train(was_training)
    n = acc[1].item()
    routing = []
    for j, layer in enumerate(layers):
        base = 2 + j * (E + 1)
        load = acc[base:base + E] / n                                    # (E,) share of token-slots
        routing.append({"layer": layer, **routing_summary(load, (acc[base + E] / n).item())})
    mean = lambda key: sum(r[key] for r in routing) / len(routing) if routing else None   # noqa: E731
    return {"val_loss": (acc[0] / n).item(), "ent_load": mean("ent_load"), "ent_conf": mean("ent_conf"),
            "routing": routing}


@torch.no_grad()
def final_val_loss(model: GPT, val, block_size: int, batch_size: int, max_tokens: int, rt: Runtime | None = None) -> dict:
    """The end-of-run loss, kept apart from the periodic evaluations (a few fixed random batches, whose own
    sampling error is shared by every run): non-overlapping windows of block_size + 1 tokens spread evenly over
    the whole val split (every window when it holds at most max_tokens), each window's mean cross-entropy one
    observation. Returns their mean (nats/token), its standard error (std of the window means / sqrt(windows):
    how far another val set of this size could land), and the counts. Under DDP the windows are split
    (Runtime.share: as many forwards on every rank under FSDP); on one
    process "window_losses" (float32 array, one per window, in val order) is returned too: two models scored on
    the same windows give a paired difference whose error is far below either loss's (study.py reads them)."""
    rt = rt or Runtime(next(model.parameters()).device, torch.float32)
    T = block_size
    total = (len(val) - 1) // T                                          # windows that fit
    n = min(total, max(1, max_tokens // T))
    starts = [(i * total // n) * T for i in range(n)]                     # evenly spread, no overlap
    was_training = model.training
    model.eval()
    acc = torch.zeros(3, dtype=torch.float64)                              # sum, sum of squares, windows
    windows = []
    for b, counted in rt.share(n, batch_size):
        rows = [torch.as_tensor(val[s:s + T + 1].astype("int64")) for s in starts[b:b + batch_size]]
        xy = torch.stack(rows).to(rt.device)                             # (B, T+1)
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()          # (B, T) each
        with rt.autocast():
            logits, _ = model(x, y)
        if not counted:
            continue                                                     # FSDP's padding forward
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")   # (B*T,)
        per_window = ce.view(len(rows), T).mean(dim=1).double().cpu()    # (B,)
        acc += torch.tensor([per_window.sum().item(), per_window.square().sum().item(), len(rows)], dtype=torch.float64)
        windows.append(per_window.float())
    if rt.ddp:
        acc = acc.to(rt.device)
        dist.all_reduce(acc)
        acc = acc.cpu()
    model.train(was_training)
    s, ss, k = acc.tolist()
    mean = s / k
    var = max(ss / k - mean * mean, 0.0) * k / max(k - 1, 1)
    out = {"final_val_loss": mean, "final_val_se": math.sqrt(var / k), "final_val_windows": int(k),
           "final_val_tokens": int(k) * T}
    if not rt.ddp:
        out["window_losses"] = torch.cat(windows).numpy()
    return out


# --------------------------------------------------------------------------- 3. the loop

class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def train(model_config: GPTConfig, cfg: TrainConfig, *, corpus: Corpus | None = None, callback=None) -> dict:
    """Train (or resume) a GPT and return the final metrics plus the trained model.

    corpus:   use this Corpus instead of load_corpus(cfg.data) (e.g. an in-memory one in a notebook);
              cfg.data is then only its label.
    callback: called as callback(iter, model) after every optimizer step.
    Returns {val_loss, val_bpb, best_val_loss, train_loss, params_total, params_active, tokens_per_sec,
    mfu, ent_load, ent_conf, routing, iters, tokens, wall_s, interrupted, out_dir, model, sample}:
    the last evaluation's numbers; tokens_per_sec counts all ranks' training tokens per second of
    training (evaluation excluded), mfu is per device. When a signal stopped the run, `interrupted`
    is the signal's name ("SIGINT"/"SIGTERM") and no sample is written.
    Raises, before step 0 and with one line that says what to do: ValueError (bad settings, an
    out_dir in use or holding a checkpoint a scratch run would replace, no room on disk or in
    memory, a resume of another run; CheckpointError: an unusable ckpt.pt), FileNotFoundError (no
    checkpoint to resume); during training TrainingDiverged (NaN/inf; the last good ckpt.pt is kept).
    """
    t_start = time.perf_counter()
    rt = setup(cfg)
    corpus = corpus if corpus is not None else load_corpus(cfg.data)
    check_corpus(model_config, cfg, corpus, rt)
    accum = grad_accum_steps(cfg, model_config.block_size, rt.world_size)
    with preflight(model_config, cfg, rt):                 # rank 0 holds the out_dir until the end
        run, state = build_run(model_config, cfg, rt, corpus, accum, t_start)
        start_files(run, state)
        interrupted = None
        with StopRequest(rt) as stop, tqdm(total=cfg.max_iters, initial=state.step, desc=model_config.ffn,
                                           unit="it", dynamic_ncols=True,
                                           disable=not (cfg.progress and rt.master)) as pbar:
            if not run.resumed:
                run.log.append(evaluate(run, state))       # the loss before training (ln vocab_size, about)
                save(run, state)
            elif state.step >= cfg.max_iters:
                tqdm.write(f"checkpoint is at iter {state.step} >= max_iters={cfg.max_iters}: nothing to train "
                           f"(raise --max_iters to continue)")
            state.clock.start()
            while state.step < cfg.max_iters:
                ce, aux = train_step(run, get_lr(state.step, cfg))
                state.loss_sum.add_(ce)
                state.aux_sum.add_(aux)
                state.step += 1
                state.steps_since_eval += 1
                state.tokens_run += run.tokens_per_step
                pbar.update(1)
                if callback is not None:
                    callback(state.step, run.model)
                is_eval = state.step % cfg.eval_interval == 0 or state.step == cfg.max_iters
                if state.step % cfg.log_interval == 0 or is_eval:
                    loss, tok_s = check_loss(run, state, ce), state.rate("log")
                    pbar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s or 0:.0f}")
                if stop.agreed():                          # a signal: all ranks stop at this step
                    interrupted = stop.name
                    state.clock.stop()
                    save(run, state)
                    if rt.master:
                        tqdm.write(f"stopped at iter {state.step}; checkpoint saved to {run.ckpt_path}; "
                                   f"continue with --init_from=resume")
                    break
                if is_eval:
                    state.clock.stop()                     # evaluation is not training time
                    run.log.append(evaluate(run, state))   # val loss and routing -> log.jsonl
                    save(run, state)                       # -> ckpt.pt
                    state.clock.start()
            state.clock.stop()
        result = results(run, state, interrupted)
    run.log.finish()
    return result


def train_step(run: Run, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over run.accum micro-batches (nanoGPT's inner loop). Returns the step's
    cross-entropy and aux loss, averaged over its micro-batches (detached, on the device)."""
    model, rt, optimizer, scaler = run.model, run.rt, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)                  # lr_scale: see configure_optimizer
    ce, aux = torch.zeros((), device=rt.device), torch.zeros((), device=rt.device)
    for micro in range(run.accum):
        x, y = next(run.train_batches)
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        # DDP all-reduces gradients in backward(); only the last micro-step needs to. (FSDP reduce-scatters
        # every micro-step: skipping it would keep the full unsharded gradients; see fsdp.py.)
        sync = run.fwd.no_sync() if rt.ddp and not rt.fsdp and micro < run.accum - 1 else nullcontext()
        with sync:
            with rt.autocast():
                _, loss = run.fwd(x, y)                   # cross-entropy + aux (Eq. 6)
            scaler.scale(loss / run.accum).backward()
        ce += model.last_ce_loss / run.accum
        aux += model.last_aux_loss / run.accum
    if run.cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    update_expert_bias(model, rt)        # aux-loss-free balancing: after the step, from this step's counts
    optimizer.zero_grad(set_to_none=True)
    return ce, aux


def update_expert_bias(model: GPT, rt: Runtime) -> None:
    """Aux-loss-free balancing (minimoe/balance.py, DeepSeek-V3 §2.1.2): call once after every optimizer
    step. Each expert layer with a bias counted its token-slots over this step's micro-steps; the counts of
    all layers are summed over the ranks in one all-reduce, each bias moves by rate * sign(mean - count),
    and the counts restart. A no-op for models without a bias (bias_update_rate=0)."""
    update_biases([ffn for _, ffn in model.expert_layers()], dist.all_reduce if rt.ddp else None)


def check_loss(run: Run, state: LoopState, ce: torch.Tensor) -> float:
    """The step's train loss, averaged over ranks (one .item(): a GPU sync); NaN/inf stops the run."""
    loss = ce.item()
    if run.rt.ddp:
        t = torch.tensor([loss / run.rt.world_size], dtype=torch.float64, device=run.rt.device)
        dist.all_reduce(t)
        loss = t.item()
    if not math.isfinite(loss):
        raise TrainingDiverged(f"train loss is {loss} at iter {state.step}; kept the last good checkpoint "
                               f"{run.ckpt_path}. Try a lower --learning_rate, --grad_clip=1 or --dtype=float32")
    return loss


def evaluate(run: Run, state: LoopState) -> dict:
    """The log row of this evaluation: val loss and routing statistics (estimate_loss), the train loss
    since the last one, speed. Starts the next train-loss average. All ranks call it (it all-reduces)."""
    cfg, rt = run.cfg, run.rt
    stats = estimate_loss(run.model, run.val_batches, cfg.eval_iters, rt)
    steps = state.steps_since_eval
    train_loss, train_aux = (s / steps if steps else None for s in state.mean_sums(rt))
    if not math.isfinite(stats["val_loss"]) or (train_loss is not None and not math.isfinite(train_loss)):
        raise TrainingDiverged(f"loss is {stats['val_loss']} (val) / {train_loss} (train) at iter {state.step}; "
                               f"kept the last good checkpoint {run.ckpt_path}. Try a lower --learning_rate")
    state.best_val = min(state.best_val, stats["val_loss"])
    bpb, tokens_per_sec = bpb_factor(run.corpus), state.rate("eval")
    row = {"iter": state.step, "tokens": state.step * run.tokens_per_step, "train_loss": train_loss,
           "train_aux": train_aux, "val_loss": stats["val_loss"], "val_bpb": stats["val_loss"] * bpb if bpb else None,
           "lr": get_lr(max(state.step - 1, 0), cfg), "tokens_per_sec": tokens_per_sec,
           "mfu": run.mfu(tokens_per_sec), "ent_load": stats["ent_load"], "ent_conf": stats["ent_conf"],
           "routing": stats["routing"], "wall_s": time.perf_counter() - state.t_start}
    state.loss_sum.zero_(), state.aux_sum.zero_()
    state.steps_since_eval = 0
    return row


def save(run: Run, state: LoopState) -> None:
    """All ranks call this (it all-reduces; under FSDP it also gathers the full state dicts to rank 0).
    Every rank checks that its weights (its shard under FSDP) are finite and the ranks agree, so all
    raise together; rank 0 writes ckpt.pt (atomically), in the same format in every mode."""
    rt, model = run.rt, run.model
    sums = state.mean_sums(rt)
    finite = torch.stack([torch.isfinite(local(p)).all() for p in model.parameters()]).all().item()
    if rt.any_rank(not finite):
        raise TrainingDiverged(f"weights became NaN/inf by iter {state.step}; kept the last good checkpoint "
                               f"{run.ckpt_path}. Try a lower --learning_rate or --grad_clip=1")
    model_state, optimizer_state = full_state_dicts(model, run.optimizer)
    if not rt.master:
        return
    save_checkpoint(run.ckpt_path, {
        "model": model_state, "optimizer": optimizer_state, "scaler": run.scaler.state_dict(),
        "model_config": asdict(run.model_config), "train_config": asdict(run.cfg),
        "sampler": run.train_batches.state_dict(), **state.to_checkpoint(sums),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None},
        "tokens_per_step": run.tokens_per_step, "threads": torch.get_num_threads(),
        "tokenizer": run.corpus.meta.get("tokenizer", "byte"), "corpus": run.corpus.name,
        "data_fingerprint": run.fingerprint})


# --------------------------------------------------------------------------- 4. what the loop runs on

@dataclass
class Run:
    """What build_run() puts together: the model and what trains, evaluates, logs and saves it."""
    model_config: GPTConfig
    cfg: TrainConfig
    rt: Runtime
    corpus: Corpus
    model: GPT                         # the model (sharded in place under FSDP): evaluation, checkpoints, samples
    fwd: torch.nn.Module               # what a training step calls: the model, compiled and/or in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler       # loss scaling for float16; a no-op otherwise
    train_batches: BatchSampler
    val_batches: BatchSampler
    accum: int                         # micro-steps per optimizer step
    tokens_per_step: int               # all ranks, all micro-steps
    fingerprint: str                   # data_fingerprint(corpus), saved in every checkpoint
    resumed: bool
    log: RunLog                        # every evaluation's row (log.jsonl, wandb, the console)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def mfu(self, tokens_per_sec: float | None) -> float | None:
        """Model FLOPs utilization per device at `tokens_per_sec` (all ranks); None without a known peak."""
        per_device = tokens_per_sec / self.rt.world_size if tokens_per_sec else None
        return mfu(self.model.flops_per_token(self.model_config.block_size), per_device,
                   self.cfg.peak_flops or peak_flops(self.rt.device))


def check_corpus(model_config: GPTConfig, cfg: TrainConfig, corpus: Corpus, rt: Runtime) -> None:
    """Before step 0: the model's vocabulary covers the corpus, and sample.txt will be decodable."""
    if cfg.sample_tokens and rt.master:
        corpus.check_decoder()             # a missing tiktoken fails before step 0, not at sample.txt
    if model_config.vocab_size < corpus.vocab_size:
        raise ValueError(f"GPTConfig.vocab_size={model_config.vocab_size} is invalid: corpus {corpus.name!r} "
                         f"has {corpus.vocab_size} token ids; use --vocab_size={corpus.vocab_size} or more")


def build_run(model_config: GPTConfig, cfg: TrainConfig, rt: Runtime, corpus: Corpus, accum: int,
              t_start: float) -> tuple[Run, LoopState]:
    """Model, optimizer, scaler, samplers and the loop state; with --init_from=resume all of them
    continue from ckpt.pt, once check_resume agrees it is this run's (model, data, seed, batch).
    The checkpoint may come from any mode (one process, DDP, FSDP): all save the same full state."""
    tokens_per_step = cfg.batch_size * model_config.block_size * rt.world_size * accum
    fingerprint = data_fingerprint(corpus)
    path, ckpt = Path(cfg.out_dir) / CHECKPOINT, None
    if cfg.init_from == "resume":
        # FSDP: read to the CPU (each rank keeps only its shard, not a full copy on its GPU)
        ckpt = load_checkpoint(path, map_location="cpu" if rt.fsdp else rt.device, keys=RESUME_KEYS)
        check_resume(ckpt, model_config, cfg, tokens_per_step, path, fingerprint,
                     notify=tqdm.write if rt.master else lambda s: None)
        if rt.device.type == "cpu" and not cfg.threads and ckpt.get("threads"):
            torch.set_num_threads(ckpt["threads"])   # same thread count -> bit-identical CPU math

    torch.manual_seed(cfg.seed)                       # the same init on every rank
    model = GPT(model_config).to(rt.device)
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    if rt.fsdp:                                       # every rank keeps 1/N of each tensor (fsdp.py)
        if cfg.compile:
            for block in model.blocks:                # per Block, as torchtitan: the FSDP hooks stay outside
                block.compile()
        shard(model, rt.dtype if rt.device.type == "cuda" else None)
    optimizer = configure_optimizer(model, cfg)       # after shard(): it holds the sharded parameters
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    train_batches = BatchSampler(corpus.train, cfg.batch_size, model_config.block_size, seed=cfg.seed,
                                 rank=rt.rank, world_size=rt.world_size)
    val_batches = BatchSampler(corpus.val, cfg.batch_size, model_config.block_size, seed=VAL_SEED)
    state = LoopState.from_checkpoint(ckpt, rt.device, t_start)
    if ckpt is None:
        torch.manual_seed(cfg.seed + rt.rank)         # dropout masks differ across ranks
    else:
        with restoring(path, "training state"):
            load_full_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            train_batches.load_state_dict(ckpt["sampler"])
            if rt.world_size == 1:
                torch.set_rng_state(ckpt["rng"]["torch"])
                if rt.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                    torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
            else:
                torch.manual_seed(cfg.seed + 1000 * rt.rank + state.step)
    fwd = torch.compile(model) if cfg.compile and not rt.fsdp else model
    if rt.ddp and not rt.fsdp:                        # gradients as views of DDP's buckets: no second copy
        fwd = DDP(fwd, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                  gradient_as_bucket_view=True)
    run = Run(model_config, cfg, rt, corpus, model, fwd, optimizer, scaler, train_batches, val_batches, accum,
              tokens_per_step, fingerprint, resumed=ckpt is not None,
              log=RunLog(cfg.out_dir, rt.master, model_config.ffn))
    return run, state


def start_files(run: Run, state: LoopState) -> None:
    """Rank 0: log.jsonl (kept up to the checkpoint's iteration on resume), config.json, the size line, wandb."""
    cfg, rt, mc, model = run.cfg, run.rt, run.model_config, run.model
    if not rt.master:
        return
    run.log.start(state.step if run.resumed else None)
    write_config(run.out_dir, model, cfg, rt, run.corpus, run.accum, run.tokens_per_step)
    tqdm.write(f"{mc.ffn}: {model.num_params() / 1e6:.2f}M parameters ({model.num_active_params() / 1e6:.2f}M "
               f"active per token), {run.tokens_per_step} tokens/step = {cfg.batch_size} x {mc.block_size} x "
               f"{rt.world_size} rank(s) x {run.accum} micro-step(s); {rt.device}, "
               f"{str(rt.dtype).removeprefix('torch.')}, {torch.get_num_threads()} CPU thread(s)")
    if cfg.wandb:
        run.log.start_wandb(cfg.wandb_project, run.out_dir.name, {"model": asdict(mc), "train": asdict(cfg)})


def results(run: Run, state: LoopState, interrupted: str | None) -> dict:
    """train()'s return value (see there); rank 0 also writes sample.txt unless a signal stopped the run
    (under FSDP every rank generates it with rank 0: each forward needs them all)."""
    cfg, rt, model = run.cfg, run.rt, run.model
    last = run.log.rows[-1] if run.log.rows else {}
    train_time = state.clock.read()
    tokens_per_sec = state.tokens_run / train_time if train_time else last.get("tokens_per_sec")
    result = {k: last.get(k) for k in ("val_loss", "val_bpb", "train_loss", "ent_load", "ent_conf", "routing")}
    result.update(best_val_loss=state.best_val, params_total=model.num_params(),
                  params_active=model.num_active_params(), tokens_per_sec=tokens_per_sec,
                  mfu=run.mfu(tokens_per_sec) if train_time else last.get("mfu"),
                  iters=state.step, tokens=state.step * run.tokens_per_step,
                  wall_s=time.perf_counter() - state.t_start, interrupted=interrupted, out_dir=str(run.out_dir),
                  model=model)
    if cfg.final_eval_tokens and not interrupted:                       # every rank: the windows are split
        result.update(final_val_loss(model, run.corpus.val, run.model_config.block_size, cfg.batch_size,
                                     cfg.final_eval_tokens, rt))
        if "window_losses" in result:                                    # one process: keep them for pairing
            window_losses = result.pop("window_losses")
            atomic_write(run.out_dir / FINAL_VAL_FILE, lambda f: np.save(f, window_losses))
        if rt.master:
            tqdm.write(f"{run.model_config.ffn} final val {result['final_val_loss']:.4f} ± "
                       f"{result['final_val_se']:.4f} nats (standard error over {result['final_val_windows']:,} "
                       f"windows, {result['final_val_tokens']:,} of {len(run.corpus.val):,} val tokens)")
    if (rt.master or rt.fsdp) and not interrupted and cfg.sample_tokens:
        sample = write_sample(model, run.corpus, cfg, rt, run.out_dir / "sample.txt" if rt.master else None)
        if rt.master:
            result["sample"] = sample
    return result
