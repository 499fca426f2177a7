"""Checkpoints: what ckpt.pt holds, the atomic save, the checked load, and the checks that make a resume safe.

ckpt.pt (written by rank 0 at every evaluation and when a signal stops the run) is a dict:
    model, optimizer, scaler      the state_dicts
    model_config, train_config    both configs (asdict), so a checkpoint rebuilds its own model
    sampler, rng                  BatchSampler's counter and the RNG states: a resume repeats the
                                  uninterrupted run exactly (on CPU, at the same thread count)
    iter, best_val_loss, loss_sum, aux_sum, steps_since_eval, train_time, tokens_run
                                  the loop's state (progress.LoopState.to_checkpoint)
    tokens_per_step, threads, tokenizer, corpus, data_fingerprint
                                  what a resume must match (check_resume)

load_checkpoint turns every way a file can be unusable (empty, truncated, foreign, a folder) into
one CheckpointError line naming the file; load_model rebuilds the trained GPT from one.
"""

from contextlib import contextmanager
from dataclasses import asdict
import hashlib
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data import Corpus
from .files import atomic_write, one_line
from .model import GPT, GPTConfig

# GPTConfig fields a resume may change: neither changes the parameters (dispatch is only the
# kernel choice; dropout only regularizes). Any other difference means a different model.
RESUMABLE_MODEL_FIELDS = ("dispatch", "dropout")
CHECKPOINT = "ckpt.pt"
# What each key of a checkpoint must hold: load_model needs the first two, a resume all of them.
CHECKPOINT_TYPES = {"model": dict, "model_config": dict, "optimizer": dict, "scaler": dict, "iter": int,
                    "train_config": dict, "sampler": dict, "best_val_loss": (int, float), "loss_sum": (int, float),
                    "aux_sum": (int, float), "steps_since_eval": int, "rng": dict, "tokens_per_step": int,
                    "train_time": (int, float), "tokens_run": int}
MODEL_KEYS = ("model", "model_config")
RESUME_KEYS = tuple(CHECKPOINT_TYPES)
FINGERPRINT_WHOLE_BYTES = 64 * 2**20   # memmapped token arrays above this are fingerprinted by samples


class CheckpointError(ValueError):
    """A ckpt.pt that cannot be used: unreadable, not a minimoe checkpoint, or not fit to load."""


def checkpoint_path(path) -> Path:
    """out_dir/ckpt.pt for a folder (or a name without suffix), else the path itself."""
    path = Path(path)
    if path.name != CHECKPOINT and (path.is_dir() or not path.suffix):
        path = path / CHECKPOINT
    return path


def no_checkpoint(path: Path) -> FileNotFoundError:
    found = sorted(str(p.parent) for p in path.parent.glob(f"*/{CHECKPOINT}"))
    more = f"; checkpoints found in {', '.join(found)}" if found else ""
    return FileNotFoundError(f"no checkpoint at {path}{more}; train first (--init_from=scratch) "
                             f"or point --out_dir at a folder that has {CHECKPOINT}")


def folder_named_checkpoint(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} is a directory, not a checkpoint file; move it away or use another --out_dir")


def save_checkpoint(path, state: dict) -> None:
    """torch.save through files.atomic_write: a crash never leaves a half-written ckpt.pt, and a
    failed write (a full disk) keeps the previous checkpoint and says so in one line."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:            # torch's zip writer reports a full disk as RuntimeError
        raise CheckpointError(f"could not write {path} ({one_line(e)}); the previous checkpoint is kept: "
                              f"free disk space or fix the folder, then continue with --init_from=resume") from None


def load_checkpoint(path, map_location="cpu", keys=MODEL_KEYS) -> dict:
    """Load out_dir/ckpt.pt (pass the folder or the file) and check that it is a minimoe checkpoint
    with `keys` (MODEL_KEYS to sample, RESUME_KEYS to resume). Anything else (an empty, truncated or
    foreign file, a folder named ckpt.pt) raises a one-line CheckpointError naming the file."""
    path = checkpoint_path(path)
    if path.is_dir():
        raise folder_named_checkpoint(path)
    if not path.is_file():
        raise no_checkpoint(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint; delete it, or train again "
                              f"with --overwrite=true")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:                  # permissions, a failing disk
        raise CheckpointError(f"{path} cannot be read ({one_line(e, 120)})") from None
    except Exception as e:                # truncated zip, random bytes, pickled objects
        raise CheckpointError(f"{path} is not a readable checkpoint ({one_line(e, 120)}); it is truncated, "
                              f"corrupt or not a minimoe {CHECKPOINT}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a minimoe checkpoint (a dict with "
                              f"{', '.join(keys)})")
    missing = [k for k in keys if k not in ckpt]
    if missing and "model_config" in ckpt:
        raise CheckpointError(f"{path} is an incomplete minimoe checkpoint: it lacks {', '.join(missing)}")
    if missing:
        raise CheckpointError(f"{path} is not a minimoe checkpoint: it lacks {', '.join(missing)} "
                              f"(its keys: {', '.join(map(str, list(ckpt)[:5]))}{', ...' if len(ckpt) > 5 else ''})")
    wrong = [f"{k} is a {type(ckpt[k]).__name__}" for k in keys if not isinstance(ckpt[k], CHECKPOINT_TYPES[k])]
    if wrong:
        raise CheckpointError(f"{path} is corrupt: {'; '.join(wrong)}")
    return ckpt


@contextmanager
def restoring(path, what: str):
    """Turn any failure while restoring `what` from a checkpoint into one CheckpointError line."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: its {what} cannot be restored ({one_line(e)}); the file is corrupt "
                              f"or from another version of minimoe") from None


def load_model(path, device="cpu") -> tuple[GPT, dict]:
    """The trained GPT stored in a checkpoint (eval mode), and the checkpoint dict itself."""
    ckpt = load_checkpoint(path, map_location=device)
    with restoring(checkpoint_path(path), "model"):
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def data_fingerprint(corpus: Corpus) -> str:
    """A content hash of the train and val tokens, saved in every checkpoint so that a resume on
    other data is refused. In-memory arrays and files up to 64 MiB are hashed whole; larger
    memmapped shards by dtype, length and their first and last MiB, so it stays fast at any size."""
    h = hashlib.blake2b(digest_size=8)
    for split in (corpus.train, corpus.val):
        for part in getattr(split, "shards", [split]):                 # ShardedArray: each shard
            a = np.ascontiguousarray(part)
            h.update(f"{a.dtype.str}:{len(a)};".encode())
            if isinstance(part, np.memmap) and a.nbytes > FINGERPRINT_WHOLE_BYTES:
                n = 2**20 // a.itemsize
                h.update(a[:n].view(np.uint8))
                h.update(a[-n:].view(np.uint8))
            else:
                h.update(a.view(np.uint8))
    return h.hexdigest()


def check_resume(ckpt: dict, model_config: GPTConfig, cfg: TrainConfig, tokens_per_step: int, path,
                 fingerprint: str | None = None, notify=print) -> None:
    """A checkpoint continues only the run that wrote it: same model, data, seed and batch."""
    saved, now = ckpt["model_config"], asdict(model_config)
    keys = [*now, *(k for k in saved if k not in now)]          # a field this version lacks differs too
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in keys
            if saved.get(k) != now.get(k) and k not in RESUMABLE_MODEL_FIELDS]
    if diff:
        raise ValueError(f"cannot resume from {path}: it holds a different model ({'; '.join(diff)}). "
                         f"Use the checkpoint's settings, another --out_dir, or start over with "
                         f"--overwrite=true")
    t = ckpt["train_config"]
    diff = [f"{k}: checkpoint {t.get(k)!r}, now {getattr(cfg, k)!r}" for k in ("data", "seed", "batch_size")
            if t.get(k) != getattr(cfg, k)]
    if ckpt["tokens_per_step"] != tokens_per_step:
        diff.append(f"tokens per step: checkpoint {ckpt['tokens_per_step']}, now {tokens_per_step}")
    if diff:
        raise ValueError(f"cannot resume from {path}: the run differs ({'; '.join(diff)}). "
                         f"Resume with the same data, seed and batch settings, or start over with "
                         f"--overwrite=true")
    if fingerprint is None:
        return
    if ckpt.get("data_fingerprint") is None:
        notify(f"note: {path} has no data fingerprint (an older minimoe wrote it), so this resume cannot "
               f"check that --data={cfg.data} holds the tokens it was trained on")
    elif ckpt["data_fingerprint"] != fingerprint:
        raise ValueError(f"cannot resume from {path}: the data changed since it was written (checkpoint: "
                         f"{ckpt.get('corpus')!r} with fingerprint {ckpt['data_fingerprint']}; now "
                         f"--data={cfg.data}: {fingerprint}). Resume on the data it was trained on, or start "
                         f"over with --overwrite=true")


def describe_checkpoint(path: Path) -> str:
    """'iter N' of a checkpoint, read lazily (mmap: a GPT-2 checkpoint is not read whole)."""
    try:
        return f"iter {torch.load(path, map_location='cpu', weights_only=True, mmap=True)['iter']}"
    except Exception as e:
        return f"unreadable: {one_line(e, 80)}"
