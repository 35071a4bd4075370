"""Method 2 on the ridge objective (notebook 04): data-parallel minibatch SGD over MPI.

Two designs, each one short step function whose collectives you can read, and a thin wrapper
(``sgd_*``) that validates the input on every rank, loops over the epochs and turns a failure on
one rank into an error on all of them:

- ``scatter_allgather_step`` / ``sgd_scatter_allgather``: the course's design. Rank 0 holds the data,
  ``Scatterv``s each minibatch's rows, every rank computes the gradient of its shard, ``Allgather``
  puts all shard gradients on every rank, which adds them up.
- ``allreduce_step`` / ``sgd_allreduce``: no data movement. Every rank holds the data and draws the
  same minibatch from the shared seed; one ``Allreduce`` of the shard gradients per step.

Both reuse ``ppu_lab.ridge``'s kernels (``data_gradient``, ``combine``, ``sgd_step``,
``minibatches``) unchanged, and give ``ridge.sgd``'s weights to rounding error on any number of
ranks. The generic MPI helpers (``shard_bounds``, ``check_all``, ...) are in ``ppu_lab.mpi``.
``time_steps`` runs a design on the first p ranks for the scaling study of notebook 04, whose
prediction is ``perfmodel.StepModel``.

Every function that takes ``comm`` is collective: all ranks of ``comm`` must call it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ppu_lab import ridge
from ppu_lab.checks import start_weights
from ppu_lab.mpi import (RankError, allreduce_sum, check_all, check_everywhere, first_ranks, shard_bounds,
                         shard_counts, shard_displs, sleeping_barrier, world)
from ppu_lab.timing import Timer, no_timer


class RankInputError(RankError, ValueError):
    """Bad input found on one or more ranks, raised on every rank (catch it as ValueError)."""


class NonFiniteGradientError(RankError, ridge.DivergenceError):
    """Some ranks' shard gradients became NaN or inf during training, raised on every rank.

    Usually SGD diverging (lr too large); it is also a ``ridge.DivergenceError``.
    """

    def __init__(self, failures: dict[int, str], size: int | None = None, where: str = ""):
        super().__init__(failures, size)
        self.args = (f"{self.args[0]} (at {where}). Either SGD is diverging: choose a smaller lr "
                     "(ridge.lipschitz gives the stable bound); or these ranks' data hold values so large "
                     "that the gradient overflows",)


@dataclass
class ParallelSGDResult(ridge.SGDResult):
    """``ridge.SGDResult`` plus this rank's per-step timings (seconds, one entry per step).

    ``compute``: local gradient, sum of the shard gradients and the update;
    ``update``: the part of ``compute`` that every rank does in full (the sum and the update: the
    serial part of ``perfmodel.StepModel``);
    ``comm``: the collectives (and, for rank 0 of the scatter design, packing the rows it sends),
    including the time spent waiting for slower ranks.
    """

    ranks: int = 1
    design: str = ""
    compute: np.ndarray = field(default_factory=lambda: np.zeros(0))
    comm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    update: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def step_times(self) -> dict:
        """Median seconds per step: ``{"compute": ..., "update": ..., "comm": ..., "total": ...}``."""
        if self.compute.size == 0:
            return dict.fromkeys(("compute", "update", "comm", "total"), float("nan"))
        return {"compute": float(np.median(self.compute)), "update": float(np.median(self.update)),
                "comm": float(np.median(self.comm)), "total": float(np.median(self.compute + self.comm))}


# =========================================================================== the two steps
def allreduce_step(w, X, y, idx, lam, n, lr, comm, buf, shard_gradient=ridge.data_gradient, timer=no_timer):
    """One SGD step of the Allreduce design; returns the new weights, the same on every rank.

    Every rank knows the minibatch ``idx`` (drawn from the shared seed) and holds X, y.
    ``buf``: a preallocated (d,) float64 buffer for the Allreduce.
    """
    from mpi4py import MPI

    with timer("compute"):
        lo, hi = shard_bounds(len(idx), comm.Get_size(), comm.Get_rank())
        buf[:] = shard_gradient(w, X[idx[lo:hi]], y[idx[lo:hi]])      # (d,) sum over my shard
    with timer("comm"):
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)                  # (d,) sum over the batch
    with timer("update"):
        return ridge.sgd_step(w, ridge.combine(w, buf, lam, n, len(idx)), lr)


def scatter_allgather_step(w, XY, idx, nb, lam, n, lr, comm, gathered, shard_gradient=ridge.data_gradient,
                           timer=no_timer):
    """One SGD step of the course's design; returns the new weights, the same on every rank.

    Rank 0 holds ``XY = [X | y]`` (n, d+1) and the minibatch ``idx``; the others pass None for both
    and know only the batch length ``nb``. ``gathered``: a preallocated (p, d) buffer.
    """
    from mpi4py import MPI

    p, rank, d = comm.Get_size(), comm.Get_rank(), w.size
    counts = shard_counts(nb, p) * (d + 1)                             # numbers per rank
    shard = np.empty((counts[rank] // (d + 1), d + 1))                 # my rows of [X | y]
    with timer("comm"):
        rows = [XY[idx], counts, shard_displs(counts), MPI.DOUBLE] if rank == 0 else None
        comm.Scatterv(rows, shard, root=0)                             # rank r gets shard r
    with timer("compute"):
        gathered[rank] = shard_gradient(w, shard[:, :d], shard[:, d])  # (d,) sum over my shard, in my row
    with timer("comm"):
        comm.Allgather(MPI.IN_PLACE, gathered)                         # (p, d) every shard's sum
    with timer("update"):
        total = gathered.sum(axis=0)                                   # same order: same sum everywhere
        return ridge.sgd_step(w, ridge.combine(w, total, lam, n, nb), lr)


# =========================================================================== the wrappers
class _Guard:
    """This rank's shard gradient, turned into NaN when it fails: the collective carries the NaN to
    every rank, so all of them stop in the same step (``fail``) instead of some waiting forever."""

    NOT_FINITE = "the gradient of this rank's shard"

    def __init__(self):
        self.ok, self.message = True, ""

    def __call__(self, w, X, y):
        try:
            g = ridge.data_gradient(w, X, y)                           # (d,)
            if not np.all(np.isfinite(g)):
                self.ok, self.message = False, f"{self.NOT_FINITE} ({len(y)} rows) is not finite"
            return g
        except Exception as exc:  # noqa: BLE001 - reported on every rank through the NaN
            self.ok, self.message = False, f"{type(exc).__name__}: {exc}"
            return np.full(w.shape, np.nan)

    def fail(self, comm, where):
        """On every rank, after non-finite weights: name the ranks whose shard failed, and raise.

        An exception on some rank -> ``RankError``; only non-finite shard gradients ->
        ``NonFiniteGradientError``; all shards finite but the update not -> ``ridge.DivergenceError``.
        """
        try:
            check_all(self.ok, self.message, comm)
        except RankError as exc:
            if all(m.startswith(self.NOT_FINITE) for m in exc.failures.values()):
                raise NonFiniteGradientError(exc.failures, exc.size, where) from None
            raise
        raise ridge.DivergenceError(f"the update became non-finite at {where} although every rank's shard "
                                    "gradient was finite: SGD is diverging: choose a smaller lr")


def _setup(X, y, lam, lr, batch_size, epochs, seed, w0, lr_decay, comm, holds_data):
    """Validate on every rank, agree on the arguments; return ``(X, y, w0, n, d)`` (X, y None where unused).

    ``holds_data``: whether this rank's X and y are used (all ranks for Allreduce, rank 0 for Scatter).
    Raises ``RankInputError`` (a ValueError) on every rank when any rank's input is bad.
    """
    size = comm.Get_size()

    def local():
        args = (float(lam), float(lr), int(batch_size), int(epochs), int(seed), float(lr_decay))
        if holds_data:
            Xc, yc = ridge.check_problem(X, y, lam)
            n, d = Xc.shape
            ridge.check_sgd_args(n, lr, batch_size, epochs, seed=seed, lr_decay=lr_decay)
            w = start_weights(w0, d)
            # A cheap fingerprint: every rank must hold the same data for the designs to agree.
            key = (n, d, float(Xc.sum()), float(yc.sum()))
            return Xc, yc, w, key, args
        return None, None, None, None, args

    Xc, yc, w, key, args = check_everywhere(local, comm, RankInputError)
    root = comm.bcast((args, key, None if w is None else w), root=0)  # small Python objects

    def agree():
        names = ("lam", "lr", "batch_size", "epochs", "seed", "lr_decay")
        for name, mine, theirs in zip(names, args, root[0]):
            if mine != theirs:
                raise ValueError(f"{name}={mine} differs from rank 0's {name}={theirs}: "
                                 "pass the same arguments on every rank")
        if holds_data and key != root[1]:
            raise ValueError(f"X, y differ from rank 0's (n, d, sum X, sum y) = {root[1]}, here {key}: "
                             "every rank must hold the same data set (same file or same seed)")
        if holds_data and not np.array_equal(w, root[2]):
            raise ValueError("w0 differs from rank 0's: pass the same starting weights on every rank")
        if int(batch_size) < size:
            raise ValueError(f"batch_size={batch_size} is smaller than the number of ranks ({size}): "
                             f"every rank needs at least one row of each minibatch; use batch_size >= {size} "
                             "or fewer ranks")

    check_everywhere(agree, comm, RankInputError)
    n, d = root[1][:2]
    return Xc, yc, root[2].copy(), n, d


def _epoch_end(w, J_part, J_ref, lr, lam, epoch, X, comm, history, start, batch_size):
    """Objective after an epoch (J_part: this rank's share of 1/2 ||y - Xw||^2), divergence check on all ranks."""
    buf = np.array([J_part])
    allreduce_sum(buf, comm)
    J = float(buf[0]) + 0.5 * lam * float(w @ w)
    history["epoch"].append(epoch)
    history["J"].append(J)
    history["time"].append(time.perf_counter() - start)
    if np.isfinite(J) and J <= ridge.DIVERGENCE_FACTOR * max(J_ref, 1e-300):
        return J
    message = None
    if comm.Get_rank() == 0:  # only rank 0 surely holds X to explain the step-size bound
        try:
            ridge.check_divergence(J, J_ref, lr, X, lam, epoch, batch_size=batch_size)
        except ridge.DivergenceError as exc:
            message = str(exc)
    raise ridge.DivergenceError(comm.bcast(message, root=0) or f"SGD diverged at epoch {epoch}: J(w) = {J:.3g}")


def sgd_allreduce(X, y, lam, lr, batch_size, epochs, seed=0, comm=None, w0=None, *, lr_decay=0.0, timer=None):
    """Data-parallel minibatch SGD, the better design: no data movement, one Allreduce per step.

    Every rank holds the whole data set (the same X, y), draws the same global minibatch from the
    shared ``seed`` (``ridge.minibatches``) and runs ``allreduce_step``. Same seed, same weights as
    ``ridge.sgd`` to rounding error, for any number of ranks.

    Collective over ``comm`` (default COMM_WORLD). Bad input on any rank raises ``RankInputError``
    (a ValueError naming the rank) on every rank; a failure inside a step turns that rank's
    gradient into NaN, which the Allreduce carries to all ranks, and every rank then raises
    ``RankError`` with the failing rank's message. Returns ``ParallelSGDResult`` (notebook 04).
    ``timer``: the ``Timer`` that times the steps (default a new one); a ``timeline.Tracer`` records
    every rank's spans as well.
    """
    comm = world(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    X, y, w, n, d = _setup(X, y, lam, lr, batch_size, epochs, seed, w0, lr_decay, comm, holds_data=True)
    lam, batch_size, epochs = float(lam), int(batch_size), int(epochs)
    lo_j, hi_j = shard_bounds(n, size, rank)               # this rank's rows of the objective
    J_part = lambda w: 0.5 * float(np.sum((y[lo_j:hi_j] - X[lo_j:hi_j] @ w) ** 2))  # noqa: E731
    history = {"epoch": [], "J": [], "time": []}
    start = time.perf_counter()
    J0 = _epoch_end(w, J_part(w), np.inf, lr, lam, 0, X, comm, history, start, batch_size)
    J_ref = max(J0, 0.5 * float(y @ y))
    timer = Timer() if timer is None else timer
    guard, buf = _Guard(), np.empty(d)                     # buf: the (d,) Allreduce buffer
    with np.errstate(over="ignore", invalid="ignore"):
        for epoch in range(1, epochs + 1):
            rate = ridge.learning_rate(lr, epoch, lr_decay)
            for step, idx in enumerate(ridge.minibatches(n, batch_size, seed, epoch)):
                w = allreduce_step(w, X, y, idx, lam, n, rate, comm, buf, guard, timer)
                if not np.all(np.isfinite(w)):             # the same w on every rank: all stop here
                    guard.fail(comm, f"epoch {epoch}, step {step}")
            _epoch_end(w, J_part(w), J_ref, lr, lam, epoch, X, comm, history, start, batch_size)
    return _result(w, history, timer, size, "allreduce")


def sgd_scatter_allgather(X, y, lam, lr, batch_size, epochs, seed=0, comm=None, w0=None, *, lr_decay=0.0,
                          timer=None):
    """Data-parallel minibatch SGD, the course's design: rank 0 scatters each minibatch.

    Rank 0 holds the data (other ranks may pass ``X=None, y=None``; rank 0 keeps a packed copy
    ``[X | y]`` of shape (n, d+1) for the duration of the call) and draws the minibatches
    (``ridge.minibatches``); every step is ``scatter_allgather_step``: ``Scatterv`` of the rows in
    shards of ``shard_counts(|B|, p)`` (uneven when p does not divide |B|), the shard gradients,
    ``Allgather``, and the same sum and update on every rank.

    Errors and ``timer`` are handled as in ``sgd_allreduce``. Returns ``ParallelSGDResult`` (notebook 04).
    """
    comm = world(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    X, y, w, n, d = _setup(X, y, lam, lr, batch_size, epochs, seed, w0, lr_decay, comm, holds_data=rank == 0)
    lam, batch_size, epochs = float(lam), int(batch_size), int(epochs)
    XY = np.ascontiguousarray(np.column_stack([X, y])) if rank == 0 else None   # (n, d+1) on rank 0
    J_part = (lambda w: 0.5 * float(np.sum((y - X @ w) ** 2))) if rank == 0 else (lambda w: 0.0)  # noqa: E731
    history = {"epoch": [], "J": [], "time": []}
    start = time.perf_counter()
    J0 = _epoch_end(w, J_part(w), np.inf, lr, lam, 0, X, comm, history, start, batch_size)
    J_ref = comm.bcast(max(J0, 0.5 * float(y @ y)) if rank == 0 else None, root=0)
    timer = Timer() if timer is None else timer
    guard, gathered = _Guard(), np.empty((size, d))        # gathered: (p, d) shard gradients
    with np.errstate(over="ignore", invalid="ignore"):
        for epoch in range(1, epochs + 1):
            rate = ridge.learning_rate(lr, epoch, lr_decay)
            # Only rank 0 needs the indices; every rank knows the batch lengths (B, ..., B, rest).
            lengths = [min(batch_size, n - lo) for lo in range(0, n, batch_size)]
            batches = ridge.minibatches(n, batch_size, seed, epoch) if rank == 0 else [None] * len(lengths)
            for step, (idx, nb) in enumerate(zip(batches, lengths)):
                w = scatter_allgather_step(w, XY, idx, nb, lam, n, rate, comm, gathered, guard, timer)
                if not np.all(np.isfinite(w)):             # the same w on every rank: all stop here
                    guard.fail(comm, f"epoch {epoch}, step {step}")
            _epoch_end(w, J_part(w), J_ref, lr, lam, epoch, X, comm, history, start, batch_size)
    return _result(w, history, timer, size, "scatter_allgather")


def _result(w, history, timer, size, design):
    steps = timer.count("update")
    comm_laps = np.asarray(timer.laps.get("comm", []), dtype=float)
    comm_per_step = comm_laps.reshape(steps, -1).sum(axis=1) if steps else np.zeros(0)
    update = np.asarray(timer.laps.get("update", []), dtype=float)
    compute = np.asarray(timer.laps.get("compute", []), dtype=float) + update
    return ParallelSGDResult(w=w, history=history, ranks=size, design=design, compute=compute, comm=comm_per_step,
                             update=update)


DESIGNS = {"scatter_allgather": sgd_scatter_allgather, "allreduce": sgd_allreduce}


# =========================================================================== scaling runs (notebook 04)
def time_steps(design: str, p: int, X, y, lam, lr, batch_size, epochs, seed=0, comm=None) -> dict | None:
    """Run ``DESIGNS[design]`` on the first ``p`` ranks of ``comm``; the others wait at the end.

    Collective over ``comm``. Returns, on the ranks that took part, a dict with ``design``,
    ``ranks``, the final ``w`` and this rank's median seconds per step ``compute``, ``update``,
    ``comm`` and ``total`` (see ``ParallelSGDResult.step_times``); ``None`` on the other ranks.
    """
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {list(DESIGNS)}; got {design!r}")
    comm = world(comm)
    out = None
    with first_ranks(p, comm) as sub:
        if sub is not None:
            res = DESIGNS[design](X, y, lam, lr, batch_size, epochs, seed=seed, comm=sub)
            out = {"design": design, "ranks": p, "w": res.w, **res.step_times()}
    sleeping_barrier(comm)  # the idle ranks wait here, without taking a core from the busy ones
    return out
