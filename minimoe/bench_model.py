"""Whole-model benchmark: training tokens/s, MFU and peak memory of the presets, and sampling speed.

    python -m minimoe.bench gpu                         # CUDA: GPT-2-class presets, bf16, compile off/on
    python -m minimoe.bench gpu --device=cpu            # tiny presets, a few steps: a smoke run
    python -m minimoe.bench gpu --models=gpt2-moe,gpt2-aoe:d_low=64 --compile=on --dispatch=grouped

A model is a preset (presets.py), optionally VARIANT@PRESET (variants.py, e.g. dense@gpt2-moe) and
':field=INT' overrides (gpt2-aoe:d_low=64; AoE's d_wide then follows Eq. 5). For each model x
torch.compile (off, on) x dispatch (grouped, loop; dense has none) it runs `warmup` training steps,
not timed (compilation, autotuning and the allocator's growth happen there), then times `steps`
steps of train.py's own train_step: forward + backward under autocast, grad clipping, AdamW (fused
on CUDA) and the expert-bias update of aux-loss-free variants, with the preset's optimizer settings
and random tokens already on the device (the data loader is not measured). CUDA is synchronized before each clock read.

    tokens/s     batch_size x seq_len x steps / seconds
    MFU          model.flops_per_token(seq_len) x tokens/s / the GPU's bf16 peak (hardware.py). The
                 FLOPs are active-parameter FLOPs: a token pays for K experts (AoE: plus all W_down)
    peak memory  torch.cuda.max_memory_allocated over the timed steps: weights, AdamW state,
                 gradients and activations (CUDA only)
    sampling     tokens/s of GPT.generate, batch 1, with and without the KV cache (eval, autocast), with
                 the first --dispatch that runs (a cached decode step takes dispatch.py's direct path either way)

Then AoE / MoE ratios of tokens/s and memory for each (compile, dispatch), next to the paper's
Table 4 (arXiv 2501.13074; its 732M models on its hardware, experts run one after another like our
loop dispatch): AoE keeps 96.8% of MoE's tokens/s at d_low 64, 93.3% at d_low 256, and uses 13-17%
more memory. Output: Markdown tables on stdout and in OUT_DIR/bench_model.md, every number in
OUT_DIR/bench_model.json.
"""

import argparse
from dataclasses import fields, replace
import gc
import itertools
import json
from pathlib import Path
import tempfile
import time

import torch

from .bench import OneLineParser, check_ints, pick_device
from .data import writing
from .files import atomic_write
from .shards import path_kind
from .dispatch import grouped_mm_available
from .hardware import keep_freed_memory, mfu, peak_flops
from .model import GPT, GPTConfig
from .presets import get_preset
from .runtime import Runtime
from .train import Run, TrainConfig, configure_optimizer, train_step
from .variants import VARIANTS, variant_config

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Table 4: K tokens/s per GPU and memory (GB); MoE 51.42 / 50.61. Keys: AoE's d_low.
PAPER_MOE = (51.42, 50.61)
PAPER_AOE = {64: (49.79, 59.39), 128: (49.42, 57.86), 256: (47.98, 57.32), 512: (46.07, 55.90)}


# --------------------------------------------------------------------------- models

def model_spec(spec: str) -> tuple[GPTConfig, TrainConfig]:
    """'PRESET', 'VARIANT@PRESET', either with ':field=INT' overrides -> (model config, train config)."""
    name, *overrides = spec.split(":")
    variant, _, preset_name = name.rpartition("@")
    preset = get_preset(preset_name)                      # ValueError naming the presets
    cfg = preset.model_config()
    if variant:
        cfg = variant_config(variant, cfg)                # ValueError naming the variants
    known = {f.name for f in fields(GPTConfig)}
    kw = {}
    for o in overrides:
        key, eq, value = o.partition("=")
        if not eq or key not in known or not value.isdigit():
            raise ValueError(f"model {spec!r}: override {o!r} must be GPTConfig_FIELD=INTEGER, "
                             f"e.g. gpt2-aoe:d_low=64")
        kw[key] = int(value)
    return replace(cfg, **kw), TrainConfig(**preset.train_defaults())


def default_models(device_type: str) -> list[str]:
    """GPT-2 class on a GPU (tiny on a CPU): dense, MoE, AoE at the preset's d_low and at Table 4's
    other quoted d_low (64), and any further variant of variants.py built on the MoE preset."""
    family, low = ("gpt2", 64) if device_type == "cuda" else ("tiny", 8)
    extra = [f"{v}@{family}-moe" for v in VARIANTS if v not in ("dense", "moe", "aoe")]
    return [f"{family}-dense", f"{family}-moe", f"{family}-aoe", f"{family}-aoe:d_low={low}", *extra]


# --------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    torch._dynamo.reset()                    # drop compiled graphs (and their recompile counters)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_training(cfg: GPTConfig, tcfg: TrainConfig, device, dtype, compile: bool, batch_size: int,
                  seq_len: int, steps: int, warmup: int) -> dict:
    """Tokens/s, MFU and peak memory of `steps` timed training steps after `warmup` untimed ones."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = configure_optimizer(model, tcfg)                  # decay groups; fused AdamW on CUDA
    fwd = torch.compile(model) if compile else model        # as train.py: default (dynamic) shapes
    x, y = torch.randint(0, cfg.vocab_size, (2, batch_size, seq_len), device=device)   # (B, T) each
    # train.py's own step (accumulation, clipping, AdamW, the expert-bias update) on one fixed batch;
    # no corpus, evaluation, log or checkpoint: those are not timed
    run = Run(cfg, tcfg, Runtime(device, dtype), corpus=None, model=model, fwd=fwd, optimizer=opt,
              scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
              train_batches=itertools.repeat((x, y)), val_batches=None, accum=1,
              tokens_per_step=batch_size * seq_len, fingerprint="", resumed=False, log=None)

    def step():
        ce, aux = train_step(run, tcfg.learning_rate)
        return ce + aux

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"training loss is {loss.item()} after {warmup + steps} steps")
    tok_s = batch_size * seq_len * steps / seconds
    flops = model.flops_per_token(seq_len)
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, opt, fwd, run
    return dict(tokens_per_sec=tok_s, mfu=mfu(flops, tok_s, peak_flops(device)), peak_mem_bytes=mem,
                flops_per_token=flops, ms_per_step=seconds / steps * 1e3, loss=loss.item())


def time_sampling(cfg: GPTConfig, device, dtype, prompt_len: int, new_tokens: int) -> dict:
    """Generated tokens/s (batch 1, greedy) with and without the KV cache; the tokens must agree."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    out, row = {}, dict(prompt=prompt_len, new_tokens=new_tokens)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for use_cache in (True, False):
            model.generate(idx, 2, temperature=0, use_cache=use_cache)       # warmup
            sync(device)
            t0 = time.perf_counter()
            out[use_cache] = model.generate(idx, new_tokens, temperature=0, use_cache=use_cache)
            sync(device)
            row["cache" if use_cache else "no_cache"] = new_tokens / (time.perf_counter() - t0)
    # bf16 rounding may differ between one-token and whole-context matmuls: count, do not assert
    row["same_tokens"] = bool(torch.equal(out[True], out[False]))
    row["speedup"] = row["cache"] / row["no_cache"]
    del model
    return row


# --------------------------------------------------------------------------- tables

def ratios(rows: list[dict]) -> list[dict]:
    """Each AoE row over the first MoE model's row with the same compile and dispatch."""
    ok = [r for r in rows if "error" not in r]
    moe = next((r["model"] for r in ok if r["ffn"] == "moe"), None)
    out = []
    for r in ok:
        ref = next((m for m in ok if m["model"] == moe and (m["compile"], m["dispatch"]) ==
                    (r["compile"], r["dispatch"])), None)
        if r["ffn"] != "aoe" or ref is None:
            continue
        paper = PAPER_AOE.get(r["d_low"])
        mem = r["peak_mem_bytes"] / ref["peak_mem_bytes"] if r["peak_mem_bytes"] and ref["peak_mem_bytes"] else None
        out.append(dict(model=r["model"], moe=moe, d_low=r["d_low"], compile=r["compile"], dispatch=r["dispatch"],
                        throughput=r["tokens_per_sec"] / ref["tokens_per_sec"], memory=mem,
                        paper_throughput=paper[0] / PAPER_MOE[0] if paper else None,
                        paper_memory=paper[1] / PAPER_MOE[1] if paper else None))
    return out


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(meta: dict, rows: list[dict], ratio_rows: list[dict], samples: list[dict]) -> str:
    def on(r):
        return "on" if r["compile"] else "off"
    train = []
    for r in rows:
        cells = [r["model"], r["ffn"], f"{r['params'] / 1e6:.1f}M", f"{r['active'] / 1e6:.1f}M",
                 f"{r['flops_per_token'] / 1e9:.3g}", f"{r['batch_size']} x {r['seq_len']}", on(r), r["dispatch"]]
        if "error" in r:
            train.append(cells + [f"failed: {r['error']}", "", "", ""])
            continue
        mem = r["peak_mem_bytes"] / 2**30 if r["peak_mem_bytes"] else None
        train.append(cells + [f"{r['ms_per_step']:.1f}", f"{r['tokens_per_sec']:,.0f}", _f(r["mfu"], ".1%"),
                              _f(mem, ".2f")])
    ratio = [[r["model"], r["moe"], str(r["d_low"]), on(r), r["dispatch"], f"{r['throughput']:.3f}",
              _f(r["paper_throughput"], ".3f"), _f(r["memory"], ".3f"), _f(r["paper_memory"], ".3f")]
             for r in ratio_rows]
    sampling = [[s["model"], s["dispatch"], str(s["prompt"]), str(s["new_tokens"]), f"{s['no_cache']:,.1f}",
                 f"{s['cache']:,.1f}", f"{s['speedup']:.2f}x", "yes" if s["same_tokens"] else "no"] for s in samples]
    lines = [f"# minimoe.bench gpu: {meta['device_name']}, torch {meta['torch']}, {meta['dtype']}"
             f"{' autocast' if meta['dtype'] != 'fp32' else ''}, "
             f"{meta['steps']} timed training steps after {meta['warmup']} warmup", "",
             *md_table(["model", "ffn", "params", "active", "GFLOPs/tok", "B x T", "compile", "dispatch", "ms/step",
                        "tokens/s", "MFU", "peak mem GB"], train)]
    if ratio:
        lines += ["", "AoE / MoE (same compile and dispatch) next to the paper's Table 4 (its 732M models)", "",
                  *md_table(["AoE model", "vs", "d_low", "compile", "dispatch", "tokens/s ratio", "paper",
                             "memory ratio", "paper"], ratio)]
    if sampling:
        lines += ["", "Sampling (GPT.generate, batch 1, greedy, eager)", "",
                  *md_table(["model", "dispatch", "prompt", "new tokens", "no cache tok/s", "KV cache tok/s",
                             "speedup", "same tokens"], sampling)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line

def main(argv=None) -> dict:
    p = OneLineParser(prog="python -m minimoe.bench gpu", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if there is a GPU, else the CPU), cpu, cuda, cuda:N")
    p.add_argument("--models", default=None, help="comma-separated model specs (default: see above)")
    p.add_argument("--compile", default="both", choices=["off", "on", "both"],
                   help="torch.compile off, on, or both (on a CPU each compile takes tens of seconds)")
    p.add_argument("--dispatch", default="grouped,loop", help="comma-separated: grouped, loop")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype")
    p.add_argument("--batch_size", type=int, default=None, help="default: the preset's")
    p.add_argument("--seq_len", type=int, default=None, help="default: the model's block_size")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on CUDA, 1 on CPU)")
    p.add_argument("--sample_tokens", type=int, default=None, help="tokens generated (default: 256 on CUDA, 48 on CPU; 0: no sampling)")
    p.add_argument("--sample_prompt", type=int, default=16, help="prompt tokens for sampling")
    p.add_argument("--out_dir", default="out-bench")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = p.parse_args(argv)
    # everything that can be checked is checked here, before any timing: one line, exit 2
    check_ints(p, a, dict(threads=(0, 4096), steps=(1, 10**6), warmup=(0, 10**6), sample_tokens=(0, 10**6),
                          sample_prompt=(1, 10**6), batch_size=(1, 2**20), seq_len=(1, 2**20)))
    try:
        device = pick_device(a.device)
    except ValueError as e:
        p.error(str(e))
    cuda = device.type == "cuda"
    steps = a.steps if a.steps is not None else (20 if cuda else 3)
    warmup = a.warmup if a.warmup is not None else (5 if cuda else 1)
    sample_tokens = a.sample_tokens if a.sample_tokens is not None else (256 if cuda else 48)
    dispatches = a.dispatch.split(",")
    if not dispatches or not set(dispatches) <= {"grouped", "loop"}:
        p.error(f"--dispatch={a.dispatch!r}: allowed values are grouped, loop (comma-separated)")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[a.compile]
    dtype = DTYPES[a.dtype]
    specs = a.models.split(",") if a.models else default_models(device.type)
    try:
        models = [(s, *model_spec(s)) for s in specs]
    except ValueError as e:
        p.error(str(e))
    for spec, cfg, _ in models:
        if a.seq_len and a.seq_len > cfg.block_size:
            p.error(f"--seq_len={a.seq_len} exceeds {spec}'s block_size={cfg.block_size}")
        if sample_tokens and a.sample_prompt + sample_tokens > cfg.block_size:
            p.error(f"--sample_prompt + --sample_tokens = {a.sample_prompt + sample_tokens} exceeds {spec}'s "
                    f"block_size={cfg.block_size} (past it generation re-runs the window with or without cache)")
    out = check_out_dir(p, a.out_dir)                       # last: it makes the folder
    grouped_ok = grouped_mm_available(device.type, dtype)
    if a.threads:
        torch.set_num_threads(a.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True        # as runtime.setup: fp32 matmuls on tensor cores
    else:
        keep_freed_memory()                                 # as train.py on CPU (hardware.py)

    rows, samples = [], []
    for spec, cfg, tcfg in models:
        B, T = a.batch_size or tcfg.batch_size, a.seq_len or cfg.block_size
        info = dict(model=spec, ffn=cfg.ffn, d_low=cfg.low_dim if cfg.ffn == "aoe" else None,
                    batch_size=B, seq_len=T)
        for compile in compiles:
            for dispatch in (dispatches if cfg.ffn != "dense" else ["-"]):
                row = dict(info, compile=compile, dispatch=dispatch)
                with torch.device("meta"):
                    m = GPT(cfg)
                row.update(params=m.num_params(), active=m.num_active_params(), flops_per_token=m.flops_per_token(T))
                if dispatch == "grouped" and not grouped_ok:
                    row["error"] = f"torch._grouped_mm does not run on {device.type} in {a.dtype}"
                else:
                    run_cfg = replace(cfg, dispatch=dispatch if dispatch != "-" else "auto")
                    try:
                        row.update(time_training(run_cfg, tcfg, device, dtype, compile, B, T, steps, warmup))
                    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:   # OOM, a compile failure: say so, go on
                        row["error"] = str(e).strip().splitlines()[0][:160]
                    free_memory(device)
                rows.append(row)
                print(f"{spec} compile={'on' if compile else 'off'} dispatch={dispatch}: "
                      + (row["error"] if "error" in row else f"{row['tokens_per_sec']:,.0f} tokens/s"), flush=True)
        if sample_tokens:
            runs = [d for d in dispatches if d != "grouped" or grouped_ok] or ["auto"]
            dispatch = runs[0] if cfg.ffn != "dense" else "-"
            sample_cfg = replace(cfg, dispatch=dispatch if dispatch != "-" else "auto")
            samples.append(dict(model=spec, dispatch=dispatch,
                                **time_sampling(sample_cfg, device, dtype, a.sample_prompt, sample_tokens)))
            free_memory(device)

    meta = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if cuda else "CPU",
                torch=torch.__version__, dtype=a.dtype, steps=steps, warmup=warmup, threads=torch.get_num_threads(),
                peak_flops=peak_flops(device))
    ratio_rows = ratios(rows)
    text = markdown(meta, rows, ratio_rows, samples)
    print(text)
    result = dict(meta=meta, train=rows, ratios=ratio_rows, sampling=samples)
    try:                          # checked before timing; a disk that fills meanwhile is still one line
        with writing(out, "the tables are printed above; free some space or choose another --out_dir"):
            atomic_write(out / "bench_model.md", [(text + "\n").encode()])
            atomic_write(out / "bench_model.json", [json.dumps(result, indent=1).encode()])
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    return result


OUT_FILES = ("bench_model.md", "bench_model.json")


def check_out_dir(p, out_dir: str) -> Path:
    """--out_dir (~ expanded) as a folder this process can write bench_model.md/.json into, made now,
    before any timing: a file, a FIFO, an unwritable folder or such a name already taken is p.error."""
    out = Path(out_dir).expanduser()
    kind = "a file" if out.is_file() else path_kind(out)
    if kind and kind != "missing":
        p.error(f"--out_dir={out_dir} is {kind}, not a folder; choose another --out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):               # can this process create files here?
            pass
    except OSError as e:
        p.error(f"--out_dir={out_dir} is not a writable folder ({e.strerror or e}); choose another --out_dir")
    for name in OUT_FILES:
        kind = "a folder" if (out / name).is_dir() else path_kind(out / name)
        if kind and kind != "missing":
            p.error(f"{out / name} is {kind}, where the results go; remove it or choose another --out_dir")
    return out
