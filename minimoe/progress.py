"""How far a run is and how fast it goes: what a resume restores besides the model, optimizer and sampler.

    Clock        training seconds: runs during steps, stopped while evaluating and saving
    LoopState    optimizer steps done, the train-loss sums since the last evaluation, the best val
                 loss, the tokens trained, the clock; to_checkpoint / from_checkpoint are the loop's
                 part of ckpt.pt (checkpoint.py lists every key)
"""

from dataclasses import dataclass, field
import math
import time

import torch
import torch.distributed as dist


class Clock:
    """Seconds spent training: runs during steps, stopped while evaluating and saving."""

    def __init__(self, device: torch.device, elapsed: float = 0.0):
        self.device, self.elapsed, self.started = device, elapsed, None

    def start(self):
        self.started = time.perf_counter()

    def stop(self):
        if self.started is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)               # count the queued GPU work too
            self.elapsed += time.perf_counter() - self.started
            self.started = None

    def read(self) -> float:
        return self.elapsed + (time.perf_counter() - self.started if self.started is not None else 0.0)


@dataclass
class LoopState:
    """How far the run is: what a resume restores besides the model, optimizer and sampler."""
    clock: Clock                       # training seconds over the whole run (evaluation excluded)
    loss_sum: torch.Tensor             # train CE summed since the last evaluation (on the device: no sync)
    aux_sum: torch.Tensor              # aux loss (Eq. 6) summed likewise
    step: int = 0                      # optimizer steps done (ckpt.pt and log.jsonl call it "iter")
    best_val: float = math.inf
    steps_since_eval: int = 0
    tokens_run: int = 0                # training tokens of all ranks over the whole run
    t_start: float = field(default_factory=time.perf_counter)   # when train() began (wall_s)
    marks: dict = field(init=False)    # rate(): (seconds, tokens) at the last call, per name

    def __post_init__(self):
        start = (self.clock.elapsed, self.tokens_run)
        self.marks = {"log": start, "eval": start}

    @classmethod
    def from_checkpoint(cls, ckpt: dict | None, device: torch.device, t_start: float) -> "LoopState":
        """The state a checkpoint saved (to_checkpoint), or that of a fresh run for ckpt=None."""
        ckpt = ckpt or {"loss_sum": 0.0, "aux_sum": 0.0, "iter": 0, "best_val_loss": math.inf,
                        "steps_since_eval": 0, "train_time": 0.0, "tokens_run": 0}
        sums = [torch.zeros((), device=device).fill_(ckpt[k]) for k in ("loss_sum", "aux_sum")]
        return cls(Clock(device, ckpt["train_time"]), *sums, ckpt["iter"], ckpt["best_val_loss"],
                   ckpt["steps_since_eval"], ckpt["tokens_run"], t_start)

    def to_checkpoint(self, sums: list[float]) -> dict:
        """The loop's part of ckpt.pt; `sums` are mean_sums() (the same on every rank)."""
        return {"iter": self.step, "best_val_loss": self.best_val, "loss_sum": sums[0], "aux_sum": sums[1],
                "steps_since_eval": self.steps_since_eval, "train_time": self.clock.read(),
                "tokens_run": self.tokens_run}

    def mean_sums(self, rt) -> list[float]:
        """[loss_sum, aux_sum] averaged over ranks (each rank's batches differ). All ranks call it."""
        sums = torch.stack([self.loss_sum, self.aux_sum]).float()
        if rt.ddp:
            dist.all_reduce(sums)
            sums /= rt.world_size
        return sums.tolist()

    def rate(self, name: str) -> float | None:
        """Training tokens per second since the last rate(name) (or since train() began)."""
        (t0, n0), (t, n) = self.marks[name], (self.clock.read(), self.tokens_run)
        self.marks[name] = (t, n)
        return (n - n0) / (t - t0) if n > n0 and t > t0 else None
