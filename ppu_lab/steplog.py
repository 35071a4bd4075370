"""The bookkeeping around a training loop, written once for ``train`` and ``ddp.train_ddp``.

``StepLog`` hands out the epochs and the global minibatches (from the shared seed, so every rank
draws the same ones), stops after ``max_steps`` steps, keeps the per-step times (compute,
communication, total), the progress bar (rank 0) and one history entry per epoch, and returns the
``TrainResult``. The training loop itself stays in view in the trainer::

    with StepLog(n, global_batch, epochs, max_steps, show=rank == 0) as log:
        for epoch in log.epochs():
            for idx in log.minibatches(epoch, seed):
                ...                                   # one SGD step on the batch idx
                log.step(len(idx), loss, total=..., compute=..., comm=...)
            log.end_epoch(test_accuracy)
    return log.result(params, config)
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ppu_lab.ridge import minibatches

# Mean cross-entropy per sample above which training is declared divergent (uniform guessing: log 10 = 2.3).
DIVERGENCE_LOSS = 100.0


def diverging(loss_sum: float, count: int) -> bool:
    """True when a summed loss over ``count`` samples is NaN/inf or its mean exceeds ``DIVERGENCE_LOSS``."""
    return not math.isfinite(loss_sum) or loss_sum / max(count, 1) > DIVERGENCE_LOSS


@dataclass
class TrainResult:
    """What ``train`` returns (identical ``params`` and ``history`` on every rank)."""

    params: np.ndarray
    history: list = field(default_factory=list)  # per epoch: epoch, train_loss, test_accuracy, epoch_time
    step_times: dict = field(default_factory=dict)  # "compute", "comm", "total": seconds per step
    config: dict = field(default_factory=dict)  # TrainConfig.describe(): settings used and the run's shape

    def summary(self) -> dict:
        """Medians per step, mean epoch time, final accuracy and the run's shape, as one flat dict."""
        med = {k: (statistics.median(v) if v else float("nan")) for k, v in self.step_times.items()}
        full = [h["epoch_time"] for h in self.history if h.get("complete", True)] or \
               [h["epoch_time"] for h in self.history]
        return {
            "median_step_time": med.get("total", float("nan")),
            "epoch_time": float(np.mean(full)) if full else float("nan"),
            "compute_time": med.get("compute", float("nan")),
            "comm_time": med.get("comm", float("nan")),
            "final_accuracy": self.history[-1]["test_accuracy"] if self.history else float("nan"),
            "steps": len(self.step_times.get("total", [])),
            "global_batch": self.config.get("global_batch"),
            "ranks": self.config.get("ranks", 1),
        }


class StepLog:
    """Epochs, minibatches, step count, per-step times, progress bar and history of one training run.

    ``show``: draw the progress bar and log each epoch (rank 0 with progress on). ``label`` starts
    each epoch's log line. Use it as a context manager, so that the bar is closed on errors too.
    """

    def __init__(self, n: int, global_batch: int, epochs: int, max_steps: int | None = None, *,
                 show: bool = True, desc: str = "", label: str = "epoch"):
        from tqdm import tqdm

        self.n, self.global_batch, self.n_epochs, self.label = n, global_batch, epochs, label
        self.steps_per_epoch = math.ceil(n / global_batch)
        self.total_steps = self.steps_per_epoch * epochs
        if max_steps is not None:
            self.total_steps = min(max_steps, self.total_steps)
        self.bar = tqdm(total=self.total_steps, disable=not show, desc=desc, unit="step", file=sys.stderr,
                        mininterval=0.5)
        self.show = show
        self.times = {"compute": [], "comm": [], "total": []}
        self.history: list = []
        self.steps = 0
        self.epoch, self.loss_sum, self.seen, self.epoch_time = 0, 0.0, 0, float("nan")

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    @property
    def done(self) -> bool:
        return self.steps >= self.total_steps

    def epochs(self):
        """Epoch numbers 1, 2, ... until ``epochs`` or the step limit is reached."""
        for epoch in range(1, self.n_epochs + 1):
            if self.done:
                return
            yield epoch

    def minibatches(self, epoch: int, seed: int):
        """The epoch's global minibatches (index arrays, ``ridge.minibatches``), up to the step limit.
        Starts the epoch's clock and loss sum; stops the clock after the last step."""
        self.epoch, self.loss_sum, self.seen = epoch, 0.0, 0
        start = time.perf_counter()
        for idx in minibatches(self.n, self.global_batch, seed, epoch):
            yield idx
            if self.done:
                break
        self.epoch_time = time.perf_counter() - start

    def step(self, batch: int, loss: float, *, total: float, compute: float = math.nan,
             comm: float = math.nan) -> None:
        """Count one step of ``batch`` samples with (summed) ``loss`` and its times in seconds."""
        self.times["compute"].append(compute)
        self.times["comm"].append(comm)
        self.times["total"].append(total)
        self.loss_sum += loss
        self.seen += batch
        self.steps += 1
        self.bar.update(1)

    def end_epoch(self, accuracy: float, loss_sum: float | None = None) -> dict:
        """Append the epoch's history entry (``loss_sum``: the epoch's loss over all ranks, when the
        trainer summed it itself) and log it on the progress bar; return the entry."""
        loss = (self.loss_sum if loss_sum is None else float(loss_sum)) / max(self.seen, 1)
        entry = {"epoch": self.epoch, "train_loss": loss, "test_accuracy": accuracy,
                 "epoch_time": self.epoch_time, "complete": self.seen == self.n}
        self.history.append(entry)
        if self.show:
            self.bar.write(f"{self.label} {self.epoch}: train loss {loss:.4f}, test accuracy {accuracy:.4f}, "
                           f"{self.epoch_time:.2f} s")
        return entry

    def result(self, params: np.ndarray, config: dict) -> TrainResult:
        return TrainResult(params=params, history=self.history, step_times=self.times, config=config)
