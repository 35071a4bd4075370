"""Data-parallel SGD with MPI (notebook 04): the kernels of ``ppu_lab.ridge``, communication at the edge.

Generic primitives (also used by the MNIST models, notebooks 05-07):

- ``shard_bounds(n, size, rank)``  balanced contiguous split of ``n`` items over ``size`` ranks
- ``world(comm)``                  ``comm`` or ``MPI.COMM_WORLD``
- ``check_all(ok, message, comm)`` collective check: raise ``RankError`` on every rank if any failed
- ``allreduce_sum(buf, comm)``     in-place ``Allreduce(SUM)`` on a contiguous NumPy buffer
- ``mpi_main(fn)``                 for scripts under ``mpiexec``: an uncaught exception aborts the job
- ``abort_job(report, comm)``      write a report to stderr, then end the whole job (``Abort``)

Ridge SGD on p ranks, equal to ``ridge.sgd`` to rounding error: ``sgd_scatter_allgather``
(the course's design) and ``sgd_allreduce`` (no data movement, one Allreduce per step);
``time_steps``, ``first_ranks`` and ``amdahl_fit`` for the scaling study of notebook 04.

Every function that takes ``comm`` is collective: all ranks of ``comm`` must call it.
mpi4py is imported lazily, so ``shard_bounds`` works without MPI.
"""

from __future__ import annotations

import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ppu_lab import ridge
from ppu_lab.timing import Timer

# Seconds a failing rank waits, after writing its report, before it aborts the job.
ABORT_GRACE = 0.5


class RankError(RuntimeError):
    """Raised on every rank when one or more ranks failed a collective check.

    ``failures`` maps each failing rank to its message; ``size`` is the number of ranks.
    """

    def __init__(self, failures: dict[int, str], size: int | None = None):
        self.failures = dict(sorted(failures.items()))
        self.size = size
        by_message: dict[str, list[int]] = {}
        for r, m in self.failures.items():
            by_message.setdefault(m, []).append(r)
        lines = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {m}"
                          for m, rs in by_message.items())
        of = f" of {size}" if size is not None else ""
        super().__init__(f"{len(self.failures)}{of} rank(s) failed: {lines}")


def world(comm=None):
    """``comm``, or ``MPI.COMM_WORLD`` when it is None."""
    if comm is not None:
        return comm
    from mpi4py import MPI

    return MPI.COMM_WORLD


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank`` in a balanced contiguous split of ``n`` rows over ``size`` ranks.

    The first ``n % size`` ranks get one row more; shard sizes differ by at most 1 and
    the shards cover ``0..n`` exactly once. When ``n < size`` the last ranks get empty
    shards; callers that need every rank to hold data check ``n >= size`` themselves.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n (number of items to split) must be an integer >= 0; got {n}")
    if int(size) != size or size < 1:
        raise ValueError(f"size (number of ranks) must be an integer >= 1; got {size}")
    if int(rank) != rank or not 0 <= rank < size:
        raise ValueError(f"rank must be an integer in [0, size={size}); got {rank}")
    base, extra = divmod(int(n), int(size))
    lo = int(rank) * base + min(int(rank), extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard_counts(n: int, size: int) -> np.ndarray:
    """Shard sizes of all ranks (``hi - lo`` of ``shard_bounds``), as an int array of length ``size``."""
    return np.array([hi - lo for lo, hi in (shard_bounds(n, size, r) for r in range(size))], dtype=int)


def check_all(ok: bool, message: str, comm=None) -> None:
    """Collective check: if any rank passes ``ok=False``, raise ``RankError`` on every rank.

    Costs one Allreduce of a flag when all is well; the messages are gathered only on failure.
    """
    from mpi4py import MPI

    comm = world(comm)
    flag = np.array([0 if ok else 1], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.SUM)
    if flag[0]:
        messages = comm.allgather(None if ok else str(message))  # small Python objects: lowercase
        raise RankError({r: m for r, m in enumerate(messages) if m is not None}, comm.Get_size())


def allreduce_sum(buf: np.ndarray, comm=None) -> None:
    """Sum ``buf`` over all ranks in place (buffer-based ``Allreduce``; ``buf`` must be contiguous)."""
    from mpi4py import MPI

    if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
        raise ValueError("allreduce_sum needs a C-contiguous numpy array: use np.ascontiguousarray(buf)")
    world(comm).Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def mpi_main(fn):
    """Run ``fn()`` in a script started by ``mpiexec``; return its result.

    An uncaught exception prints its traceback and ``rank r: <message>`` to stderr, then
    calls ``COMM_WORLD.Abort(1)`` so that no other rank waits forever in a collective.
    """
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - anything, SystemExit included, must end the job
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        comm = world()
        summary = f"rank {comm.Get_rank()}: {type(exc).__name__}: {exc}"
        abort_job(f"{summary}\n{traceback.format_exc()}{summary}", comm)


def abort_job(report: str, comm=None, code: int = 1):
    """Write ``report`` to stderr and end the whole MPI job (``Abort``), so that no rank hangs.

    One write, summary first: another rank's Abort may kill this process at any moment, and
    whatever part of the report got out must name the rank and the error. Then a short pause,
    because mpiexec drops output that a process wrote just before the job was torn down.
    """
    sys.stderr.write(report.rstrip("\n") + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    time.sleep(ABORT_GRACE)
    world(comm).Abort(code)


# =========================================================================== data-parallel ridge SGD
# The kernels (data_gradient, combine, sgd_step, minibatches) are ridge's, unchanged;
# only the wrappers below take a ``comm``.


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
    ``comm``: the collectives (and, for rank 0 of the scatter design, packing the rows it sends),
    including the time spent waiting for slower ranks.
    """

    ranks: int = 1
    design: str = ""
    compute: np.ndarray = field(default_factory=lambda: np.zeros(0))
    comm: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def step_times(self) -> dict:
        """Median seconds per step: ``{"compute": ..., "comm": ..., "total": ...}``."""
        if self.compute.size == 0:
            return {"compute": float("nan"), "comm": float("nan"), "total": float("nan")}
        return {"compute": float(np.median(self.compute)), "comm": float(np.median(self.comm)),
                "total": float(np.median(self.compute + self.comm))}


def _check_collectively(check, comm, error=RankInputError):
    """Run ``check()`` on every rank; if it raised anywhere, raise ``error`` on all ranks with the messages."""
    try:
        value, ok, message = check(), True, ""
    except Exception as exc:  # noqa: BLE001 - any failure must reach every rank, not hang them
        value, ok = None, False
        message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    _check_all(ok, message, comm, error)
    return value


def _check_all(ok, message, comm, error):
    try:
        check_all(ok, message, comm)
    except RankError as exc:
        raise error(exc.failures, exc.size) from None


def _setup(X, y, lam, lr, batch_size, epochs, seed, w0, lr_decay, comm, holds_data):
    """Validate on every rank, agree on the arguments; return ``(X, y, w0, n, d)`` (X, y None where unused).

    ``holds_data``: whether this rank's X and y are used (all ranks for Allreduce, rank 0 for Scatter).
    Raises ``RankInputError`` (a ValueError) on every rank when any rank's input is bad.
    """
    rank, size = comm.Get_rank(), comm.Get_size()

    def local():
        args = (float(lam), float(lr), int(batch_size), int(epochs), int(seed), float(lr_decay))
        if holds_data:
            Xc, yc = ridge.check_problem(X, y, lam)
            n, d = Xc.shape
            ridge.check_sgd_args(n, lr, batch_size, epochs, seed=seed, lr_decay=lr_decay)
            w = np.zeros(d) if w0 is None else ridge.check_problem(Xc, yc, lam, w0)[2].copy()
            # A cheap fingerprint: every rank must hold the same data for the designs to agree.
            key = (n, d, float(Xc.sum()), float(yc.sum()))
            return Xc, yc, w, key, args
        return None, None, None, None, args

    Xc, yc, w, key, args = _check_collectively(local, comm)
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

    _check_collectively(agree, comm)
    n, d = root[1][:2]
    return Xc, yc, root[2].copy(), n, d


def _first_failure(ok, message, comm, what):
    """After a non-finite global gradient, on every rank: name the ranks whose local part failed.

    An exception on some rank -> ``RankError``; only non-finite shard gradients ->
    ``NonFiniteGradientError``; all shards finite but their sum not -> ``ridge.DivergenceError``.
    """
    try:
        check_all(ok, message, comm)
    except RankError as exc:
        if all(m.startswith(_NOT_FINITE) for m in exc.failures.values()):
            raise NonFiniteGradientError(exc.failures, exc.size, what) from None
        raise
    raise ridge.DivergenceError(f"the summed gradient became non-finite at {what} although every rank's "
                                "shard gradient was finite: SGD is diverging, choose a smaller lr")


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


_NOT_FINITE = "the gradient of this rank's shard"


def _local_gradient(w, Xs, ys):
    """This rank's shard gradient, or (NaN, message) when it failed: the NaN then reaches every rank."""
    try:
        g = ridge.data_gradient(w, Xs, ys)                 # (d,)
        if np.all(np.isfinite(g)):
            return g, True, ""
        return g, False, f"{_NOT_FINITE} ({len(ys)} rows) is not finite"
    except Exception as exc:  # noqa: BLE001 - reported on every rank through the NaN
        return np.full(w.shape, np.nan), False, f"{type(exc).__name__}: {exc}"


def sgd_allreduce(X, y, lam, lr, batch_size, epochs, seed=0, comm=None, w0=None, *, lr_decay=0.0):
    """Data-parallel minibatch SGD, the better design: no data movement, one Allreduce per step.

    Every rank holds the whole data set (the same X, y), draws the same global minibatch
    from the shared ``seed`` (``ridge.minibatches``), takes its contiguous shard by
    ``shard_bounds`` and computes ``ridge.data_gradient`` on it; one in-place
    ``Allreduce(SUM)`` of the (d,) shard gradients gives the batch gradient on every rank,
    which applies the same ``ridge.combine`` and ``ridge.sgd_step``. Same seed, same
    weights as ``ridge.sgd`` to rounding error, for any number of ranks.

    Collective over ``comm`` (default COMM_WORLD). Bad input on any rank raises
    ``RankInputError`` (a ValueError naming the rank) on every rank; a failure inside a
    step turns that rank's gradient into NaN, which the Allreduce carries to all ranks,
    and every rank then raises ``RankError`` with the failing rank's message.
    Returns ``ParallelSGDResult`` (explained in notebook 04).
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
    timer = Timer()
    buf = np.empty(d)                                       # (d,) contiguous Allreduce buffer
    with np.errstate(over="ignore", invalid="ignore"):
        for epoch in range(1, epochs + 1):
            rate = ridge.learning_rate(lr, epoch, lr_decay)
            for step, idx in enumerate(ridge.minibatches(n, batch_size, seed, epoch)):
                with timer("compute"):
                    lo, hi = shard_bounds(len(idx), size, rank)
                    g, ok, message = _local_gradient(w, X[idx[lo:hi]], y[idx[lo:hi]])
                    buf[:] = g
                with timer("comm"):
                    allreduce_sum(buf, comm)
                with timer("update"):
                    if not np.all(np.isfinite(buf)):
                        _first_failure(ok, message, comm, f"epoch {epoch}, step {step}")
                    w = ridge.sgd_step(w, ridge.combine(w, buf, lam, n, len(idx)), rate)
            _epoch_end(w, J_part(w), J_ref, lr, lam, epoch, X, comm, history, start, batch_size)
    return _result(w, history, timer, size, "allreduce")


def sgd_scatter_allgather(X, y, lam, lr, batch_size, epochs, seed=0, comm=None, w0=None, *, lr_decay=0.0):
    """Data-parallel minibatch SGD, the course's design: rank 0 scatters each minibatch.

    Rank 0 holds the data (other ranks may pass ``X=None, y=None``; rank 0 keeps a packed copy
    ``[X | y]`` of shape (n, d+1) for the duration of the call), draws the minibatch
    (``ridge.minibatches``) and ``Scatterv``s its rows, packed as ``[X | y]``, in
    contiguous shards of sizes ``shard_counts(|B|, p)`` (uneven when p does not divide
    |B|). Each rank computes ``ridge.data_gradient`` of its shard; ``Allgather`` puts all
    p shard gradients in a (p, d) buffer on every rank; every rank sums them in rank order,
    applies ``ridge.combine`` and ``ridge.sgd_step``: the same update everywhere.

    Errors are handled as in ``sgd_allreduce``. Returns ``ParallelSGDResult`` (notebook 04).
    """
    from mpi4py import MPI

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
    timer = Timer()
    gathered = np.empty((size, d))                          # (p, d) shard gradients, rank order
    sizes = {}                                              # batch length -> (counts, displacements)
    with np.errstate(over="ignore", invalid="ignore"):
        for epoch in range(1, epochs + 1):
            # Only rank 0 needs the indices; every rank knows the batch lengths (B, ..., B, rest).
            batches = ridge.minibatches(n, batch_size, seed, epoch) if rank == 0 else \
                [range(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
            rate = ridge.learning_rate(lr, epoch, lr_decay)
            for step, idx in enumerate(batches):
                nb = len(idx)
                if nb not in sizes:
                    counts = shard_counts(nb, size) * (d + 1)
                    sizes[nb] = (counts, np.concatenate([[0], np.cumsum(counts)[:-1]]))
                counts, displs = sizes[nb]
                shard = np.empty((counts[rank] // (d + 1), d + 1))   # (rows, d+1)
                with timer("comm"):
                    send = [XY[idx], counts, displs, MPI.DOUBLE] if rank == 0 else None
                    comm.Scatterv(send, shard, root=0)
                with timer("compute"):
                    g, ok, message = _local_gradient(w, shard[:, :d], shard[:, d])
                with timer("comm"):
                    comm.Allgather(np.ascontiguousarray(g), gathered)
                with timer("update"):
                    total = gathered.sum(axis=0)            # same order, same result on every rank
                    if not np.all(np.isfinite(total)):
                        _first_failure(ok, message, comm, f"epoch {epoch}, step {step}")
                    w = ridge.sgd_step(w, ridge.combine(w, total, lam, n, nb), rate)
            _epoch_end(w, J_part(w), J_ref, lr, lam, epoch, X, comm, history, start, batch_size)
    return _result(w, history, timer, size, "scatter_allgather")


def _result(w, history, timer, size, design):
    steps = timer.count("update")
    comm_laps = np.asarray(timer.laps.get("comm", []), dtype=float)
    comm_per_step = comm_laps.reshape(steps, -1).sum(axis=1) if steps else np.zeros(0)
    compute = np.asarray(timer.laps.get("compute", []), dtype=float) + np.asarray(timer.laps.get("update", []))
    return ParallelSGDResult(w=w, history=history, ranks=size, design=design, compute=compute, comm=comm_per_step)


DESIGNS = {"scatter_allgather": sgd_scatter_allgather, "allreduce": sgd_allreduce}


# =========================================================================== scaling runs (notebook 04)
@contextmanager
def first_ranks(p: int, comm=None):
    """Context: a communicator of the first ``p`` ranks of ``comm`` (``None`` on the others).

    Collective over ``comm`` (``comm.Split``): one cluster of the largest size serves
    runs on 1, 2, ... ranks without restarting engines. The sub-communicator is freed on exit.
    """
    from mpi4py import MPI

    comm = world(comm)
    size = comm.Get_size()
    ok = isinstance(p, (int, np.integer)) and not isinstance(p, bool) and 1 <= p <= size
    check_all(ok, f"p (number of ranks to use) must be an integer in [1, {size}]; got {p!r}", comm)
    sub = comm.Split(0 if comm.Get_rank() < p else MPI.UNDEFINED, comm.Get_rank())
    try:
        yield None if sub == MPI.COMM_NULL else sub
    finally:
        if sub != MPI.COMM_NULL:
            sub.Free()


def time_steps(design: str, p: int, X, y, lam, lr, batch_size, epochs, seed=0, comm=None) -> dict | None:
    """Run ``DESIGNS[design]`` on the first ``p`` ranks of ``comm``; the others wait at the end.

    Collective over ``comm``. Returns, on the ranks that took part, a dict with ``design``,
    ``ranks``, the final ``w`` and this rank's median seconds per step ``compute``, ``comm``
    and ``total`` (see ``ParallelSGDResult.step_times``); ``None`` on the other ranks.
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


def sleeping_barrier(comm=None, poll: float = 1e-3) -> None:
    """A barrier that sleeps while it waits (``Ibarrier`` + ``Test``), unlike ``comm.Barrier``.

    MPI implementations wait by spinning: ranks idle in ``Barrier`` would use the cores that the
    working ranks need (on a laptop with fewer cores than engines, they halve the speed of a
    2-rank run).
    """
    request = world(comm).Ibarrier()
    while not request.Test():
        time.sleep(poll)


def amdahl_speedup(p, serial_fraction: float):
    """Amdahl's law: S(p) = 1 / (f + (1 - f) / p) for a serial fraction f."""
    p = np.asarray(p, dtype=float)
    return 1.0 / (serial_fraction + (1.0 - serial_fraction) / p)


def amdahl_fit(workers, times) -> float:
    """Serial fraction f of Amdahl's law fitted (least squares) to measured times T(p).

    T(p) / T(1) = f + (1 - f) / p is linear in f: with a = 1 - 1/p and b = T(p)/T(1) - 1/p,
    f = sum(a b) / sum(a a) over the runs with p > 1, clipped to [0, 1].
    """
    workers = np.asarray(workers, dtype=float)
    times = np.asarray(times, dtype=float)
    if workers.shape != times.shape or workers.ndim != 1:
        raise ValueError("workers and times must be 1-D sequences of the same length")
    if not np.any(workers == 1):
        raise ValueError("amdahl_fit needs the time on 1 worker (workers must contain 1)")
    if not np.any(workers > 1):
        raise ValueError("amdahl_fit needs at least one time on more than 1 worker")
    t1 = times[workers == 1].mean()
    a = 1.0 - 1.0 / workers[workers > 1]
    b = times[workers > 1] / t1 - 1.0 / workers[workers > 1]
    return float(np.clip(a @ b / (a @ a), 0.0, 1.0))
