"""The loop around a design's step: global minibatches, evaluation, the training clock, bytes sent.

Every synchronous design (``sync``, ``compress``, ``overlap``) is an object whose call
``design(idx, step)`` performs one SGD step on the global minibatch ``idx`` (each rank takes its
shard) and counts the bytes it sends in ``design.traffic``; ``run_synchronous`` drives it. The
parameter servers (``paramserver``) have their own loops and return the same ``DesignResult``.

The training clock stops while the test accuracy is evaluated, so "time to target accuracy" is
training time only; evaluation happens every ``eval_every`` steps and after the last one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ppu_lab.mpi import shard_bounds
from ppu_lab.ridge import DivergenceError, minibatches
from ppu_lab.timing import no_timer


class Traffic:
    """This rank's communication, counted with the cost model's formulas (``ppu_lab.costmodel``):
    ``cost`` (messages, bytes and bytes reduced on this rank's critical path) and ``sent`` (bytes
    this rank sends). A collective's count is the same on every rank; a parameter server's server
    counts every message it receives and sends, one after the other.
    """

    def __init__(self):
        from ppu_lab.costmodel import Cost

        self.cost, self.sent = Cost(), 0.0

    def collective(self, cost) -> None:
        """A collective (``costmodel.allreduce(m, p)``, ...): its bytes are what each rank sends."""
        self.cost, self.sent = self.cost + cost, self.sent + float(cost.nbytes)

    def send(self, nbytes: float) -> None:
        from ppu_lab.costmodel import send

        self.cost, self.sent = self.cost + send(nbytes), self.sent + float(nbytes)

    def receive(self, nbytes: float) -> None:
        from ppu_lab.costmodel import send

        self.cost = self.cost + send(nbytes)


class Design:
    """Base of the synchronous designs: ``design(idx, step)`` is one SGD step on the global minibatch
    ``idx``; ``timer`` is the step functions' ``timer(name)`` hook; ``traffic`` counts the bytes sent."""

    def __init__(self, obj, comm, timer=no_timer):
        self.obj, self.comm, self.timer, self.traffic = obj, comm, timer, Traffic()

    def my_rows(self, idx):
        """This rank's shard of the global minibatch (``shard_bounds``)."""
        lo, hi = shard_bounds(len(idx), self.comm.Get_size(), self.comm.Get_rank())
        return idx[lo:hi]

    def synced(self, step: int) -> bool:
        """Whether every rank holds the same parameters after ``step`` (then they may be evaluated)."""
        return True

    def finish(self) -> None:
        """Bring the ranks' parameters together after the last step (local SGD averages)."""


@dataclass
class DesignResult:
    """What one run of a design gives, the same on every rank (rank 0's times, the busiest rank's bytes).

    ``history``: ``step`` (global steps done, each a global batch of samples), ``seconds`` (training
    time so far, evaluation excluded), ``score`` (test accuracy; J(w) for the ridge problem).
    ``step_times``: seconds of each global step on rank 0. ``bytes_per_step``: bytes sent per step by
    the busiest rank. ``extra``: design-specific measurements (e.g. the parameter server's staleness).
    """

    design: str
    ranks: int
    params: np.ndarray
    history: dict = field(default_factory=lambda: {"step": [], "seconds": [], "score": []})
    step_times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bytes_per_step: float = 0.0
    extra: dict = field(default_factory=dict)
    cost_per_step: object = None    # costmodel.Cost of one step on the busiest rank's critical path

    def time_to(self, target: float, higher: bool = True) -> float:
        """Training seconds until the score first reached ``target`` (NaN if never)."""
        for t, s in zip(self.history["seconds"], self.history["score"]):
            if (s >= target) if higher else (s <= target):
                return float(t)
        return float("nan")

    def steps_to(self, target: float, higher: bool = True) -> float:
        for n, s in zip(self.history["step"], self.history["score"]):
            if (s >= target) if higher else (s <= target):
                return float(n)
        return float("nan")

    def summary(self, target: float | None = None) -> dict:
        """One row of the comparison table. ``ms_per_step`` is the *mean* (training time / steps): a
        median would hide the steps where local SGD averages or a server catches up."""
        row = {"design": self.design, "ranks": self.ranks,
               "ms_per_step": 1e3 * float(np.mean(self.step_times)) if self.step_times.size else float("nan"),
               "kB_per_step": self.bytes_per_step / 1e3,
               "final_score": self.history["score"][-1] if self.history["score"] else float("nan"),
               "seconds": self.history["seconds"][-1] if self.history["seconds"] else float("nan")}
        if target is not None:
            row["time_to_target"] = self.time_to(target)
            row["steps_to_target"] = self.steps_to(target)
        return row


def global_batches(n: int, batch_size: int, seed: int):
    """The global minibatches of epoch 1, 2, ... without end (``ridge.minibatches``: the same on every rank)."""
    epoch = 1
    while True:
        yield from minibatches(n, batch_size, seed, epoch)
        epoch += 1


class History:
    """The training clock (paused while evaluating) and the evaluation history of one run."""

    def __init__(self):
        self.seconds, self.steps_done = 0.0, 0
        self.history = {"step": [], "seconds": [], "score": []}

    def evaluate(self, score_fn, theta) -> float:
        """Record ``score_fn()`` at the current step; stop with ``DivergenceError`` on non-finite parameters
        (call it where every rank holds the same parameters, so that all of them raise together)."""
        if not np.all(np.isfinite(theta)):
            raise DivergenceError(f"training diverged before step {self.steps_done}: non-finite parameters; "
                                  "lower lr and retrain")
        score = float(score_fn())
        for key, value in (("step", self.steps_done), ("seconds", self.seconds), ("score", score)):
            self.history[key].append(value)
        return score


def run_synchronous(design, obj, comm, *, batch_size: int, steps: int, seed: int = 0, eval_every: int = 10,
                    name: str = "") -> DesignResult:
    """Run ``steps`` steps of a synchronous ``design`` on global minibatches of ``batch_size``; collective.

    Evaluation (``obj.evaluate(comm)``: each rank scores a shard of the test set) every ``eval_every``
    steps, or at the first step after that where ``design.synced(step)`` (all ranks hold the same
    parameters), and after the last step (``design.finish()`` first brings them together).
    """
    log, times, due = History(), [], False
    batches = global_batches(obj.n, batch_size, seed)
    for step in range(steps):
        idx = next(batches)
        t0 = time.perf_counter()
        design(idx, step)
        times.append(time.perf_counter() - t0)
        log.seconds += times[-1]
        log.steps_done = step + 1
        due = due or (step + 1) % eval_every == 0
        if due and step + 1 < steps and design.synced(step):   # local SGD: at the next model average
            log.evaluate(lambda: obj.evaluate(comm), obj.theta)
            due = False
    t0 = time.perf_counter()
    design.finish()
    log.seconds += time.perf_counter() - t0
    log.evaluate(lambda: obj.evaluate(comm), obj.theta)
    sent, cost = busiest(design.traffic, comm, steps)
    return DesignResult(name or type(design).__name__, comm.Get_size(), np.array(obj.theta, copy=True),
                        log.history, comm.bcast(np.array(times), root=0), sent, cost_per_step=cost)


def busiest(traffic: Traffic, comm, steps: int):
    """``(bytes sent per step, Cost per step)`` of the rank that sends the most; the same on every rank."""
    from ppu_lab.costmodel import Cost

    counts = comm.allgather((traffic.sent, [float(np.sum(v)) for v in (traffic.cost.messages, traffic.cost.nbytes,
                                                                       traffic.cost.reduced)],
                             float(np.max(traffic.cost.largest))))    # small Python objects: lowercase
    sent, (messages, nbytes, reduced), largest = max(counts, key=lambda c: (c[0], c[1][1]))
    k = max(steps, 1)
    return sent / k, Cost(messages / k, nbytes / k, reduced / k, largest)
