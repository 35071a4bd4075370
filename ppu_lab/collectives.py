"""What MPI communication costs (notebook 03, ``benchmarks/collectives.py``).

Three ways to sum one vector of ``n`` floats per rank, so that every rank holds the sum:

- ``sum_by_allreduce(x, comm)``               one buffer-based ``Allreduce(SUM)`` (the better design)
- ``sum_by_scatter_allgather(parts, comm)``   the course's design: rank 0 holds all the data and
  ``Scatter``s one row to each rank; ``Allgather`` of the rows; every rank adds them up
- ``sum_by_pickled_allreduce(x, comm)``       lowercase ``allreduce``: the array is pickled

The latency/bandwidth (alpha-beta) model: sending ``m`` bytes costs ``alpha + beta * m``.
``pingpong`` measures it between ranks 0 and 1, ``fit_alpha_beta`` fits it, and
:class:`AlphaBeta` predicts the three sums above from it. ``time_collective`` times any
collective call the same way on every rank (the slowest rank counts).

Every function that takes ``comm`` is collective: all ranks of ``comm`` call it.
``comm=None`` means ``MPI.COMM_WORLD``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np

from ppu_lab.mpi import world

#: Gradient-sized messages (floats) for the benchmark; 28,938 is the CNN of notebook 06.
GRADIENT_SIZES = (8_192, 28_938, 65_536, 262_144, 1_048_576)


# --------------------------------------------------------------------------- the three sums


def sum_by_allreduce(x, comm=None, out=None) -> np.ndarray:
    """Sum of every rank's ``x`` (a contiguous array), on every rank, by one ``Allreduce``.

    ``out``: a preallocated result buffer like ``x`` (a training loop reuses one every step).
    """
    from mpi4py import MPI

    x = np.ascontiguousarray(x)
    out = np.empty_like(x) if out is None else out
    world(comm).Allreduce(x, out, op=MPI.SUM)
    return out


def sum_by_scatter_allgather(parts, comm=None, root: int = 0, rows=None, out=None) -> np.ndarray:
    """The course's design: ``parts`` (shape ``(p, n)``) lives on ``root``; every rank gets the row sum.

    ``root`` ``Scatter``s row ``r`` to rank ``r`` (in the lab: rank r's share of the minibatch;
    here the vector it contributes); ``Allgather`` collects all rows on every rank, which adds them
    up. ``parts`` is only read on ``root``; other ranks may pass ``None``.
    ``rows``: a preallocated ``(p, n)`` buffer on every rank (then no ``bcast`` of the size is
    needed, as in a training loop that knows its gradient size); ``out``: the result buffer.
    """
    from mpi4py import MPI

    comm = world(comm)
    p, rank = comm.Get_size(), comm.Get_rank()
    if rows is None:
        meta = None
        if rank == root:
            parts = np.ascontiguousarray(parts)
            if parts.ndim != 2 or parts.shape[0] != p:
                meta = ValueError(f"parts must have shape (number of ranks = {p}, n); got {parts.shape}")
            else:
                meta = (parts.shape[1], parts.dtype.str)
        meta = comm.bcast(meta, root=root)  # a small Python object: lowercase
        if isinstance(meta, Exception):
            raise meta
        rows = np.empty((p, meta[0]), dtype=meta[1])
    comm.Scatter(parts if rank == root else None, rows[rank], root=root)  # my row, in place
    comm.Allgather(MPI.IN_PLACE, rows)  # everyone's rows, on every rank
    return np.sum(rows, axis=0, out=out)


def sum_by_pickled_allreduce(x, comm=None) -> np.ndarray:
    """Sum of every rank's ``x`` by the lowercase ``allreduce``: pickled, reduced as Python objects."""
    from mpi4py import MPI

    return world(comm).allreduce(np.asarray(x), op=MPI.SUM)


# --------------------------------------------------------------------------- timing


def _stat(rounds, stat):
    if stat == "min":
        return min(rounds)
    if stat == "median":
        return statistics.median(rounds)
    raise ValueError(f"stat must be 'min' or 'median'; got {stat!r}")


def _calibrate(call, comm, target: float = 1e-3, cap: int = 100) -> int:
    """How many calls fill about ``target`` seconds; agreed by all ranks (the slowest decides)."""
    from mpi4py import MPI

    comm.Barrier()
    t0 = time.perf_counter()
    call()
    dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    return int(max(1, min(cap, target // max(dt, 1e-9))))


def time_collective(fn, *args, comm=None, repeat: int = 5, number: int | None = None, warmup: int = 1,
                    stat: str = "min", **kwargs) -> float:
    """Seconds per call of the collective ``fn(*args, comm=comm, **kwargs)``, as seen by the slowest rank.

    ``repeat`` rounds of ``number`` calls, each round started by a ``Barrier``; a round's time is
    the maximum over ranks. Returns the best round (``stat="min"``: on a shared machine other
    work only ever adds time) or the median round; the same value on every rank.
    ``number=None`` picks it so that a round lasts about 1 ms (at most 100 calls): short rounds
    and many of them, so that some round escapes the other work on a shared machine.
    """
    from mpi4py import MPI

    if repeat < 1 or (number is not None and number < 1) or warmup < 0:
        raise ValueError("time_collective: repeat and number must be >= 1, warmup >= 0")
    comm = world(comm)
    for _ in range(warmup):
        fn(*args, comm=comm, **kwargs)
    if number is None:
        number = _calibrate(lambda: fn(*args, comm=comm, **kwargs), comm)
    rounds = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*args, comm=comm, **kwargs)
        dt = (time.perf_counter() - t0) / number
        rounds.append(comm.allreduce(dt, op=MPI.MAX))
    return _stat(rounds, stat)


def _roundtrip(comm, buf, k: int) -> None:
    """``k`` round trips of ``buf`` between ranks 0 and 1 (other ranks return at once)."""
    rank = comm.Get_rank()
    for _ in range(k):
        if rank == 0:
            comm.Send(buf, dest=1, tag=7)
            comm.Recv(buf, source=1, tag=7)
        elif rank == 1:
            comm.Recv(buf, source=0, tag=7)
            comm.Send(buf, dest=0, tag=7)


def pingpong(sizes=None, comm=None, repeat: int = 5, number: int | None = None,
             stat: str = "min") -> tuple[np.ndarray, np.ndarray]:
    """One-way time (seconds) of a message of each size (bytes) between ranks 0 and 1.

    Rank 0 ``Send``s, rank 1 ``Recv``s and sends it back; one-way time is half the round trip
    of ``number`` round trips (default: as many as fill about 2 ms, at most 50), best (``stat="min"``) or
    median of ``repeat`` rounds. Other ranks wait. Returns ``(nbytes, seconds)`` on every rank.
    """
    comm = world(comm)
    if comm.Get_size() < 2:
        raise ValueError("pingpong needs at least 2 ranks: start with `mpiexec -n 2` or MPICluster(n=2)")
    sizes = np.asarray([2**k for k in range(0, 23, 2)] if sizes is None else sizes, dtype=np.int64)
    if sizes.ndim != 1 or sizes.size < 2 or (sizes < 1).any():
        raise ValueError(f"sizes (message sizes in bytes) must be >= 2 positive integers; got {sizes}")
    times = np.zeros(sizes.size)
    for i, m in enumerate(sizes):
        buf = np.zeros(int(m), dtype=np.uint8)
        k = number or _calibrate(lambda buf=buf: _roundtrip(comm, buf, 1), comm, target=2e-3, cap=50)
        rounds = []
        for _ in range(repeat + 1):  # the first round is a warm-up
            comm.Barrier()
            t0 = time.perf_counter()
            _roundtrip(comm, buf, k)
            rounds.append((time.perf_counter() - t0) / (2 * k))
        times[i] = _stat(rounds[1:], stat)
    times = comm.bcast(times, root=0)  # rank 0's clock counts
    return sizes, times


# --------------------------------------------------------------------------- the alpha-beta model


@dataclass(frozen=True)
class AlphaBeta:
    """Time to send ``m`` bytes: ``alpha + beta * m`` (alpha: latency in s, beta: s per byte).

    Collective costs use the textbook algorithms (Thakur, Rabenseifner & Gropp 2005) for ``p``
    ranks, with ``L = ceil(log2 p)`` steps and arithmetic cost neglected:

    - Allreduce (reduce-scatter, then allgather):  ``2 L alpha + 2 (p-1)/p m beta``
    - Scatter of ``p`` rows of ``m`` bytes, then Allgather of the rows:  ``2 L alpha + 2 (p-1) m beta``
    - pickled allreduce: the same bytes as Allreduce; the model has no term for pickling
    """

    alpha: float
    beta: float

    @property
    def bandwidth(self) -> float:
        """Bytes per second, ``1 / beta``."""
        return 1.0 / self.beta

    def send(self, nbytes):
        return self.alpha + self.beta * np.asarray(nbytes, dtype=float)

    def allreduce(self, nbytes, p: int):
        if p < 2:
            return np.zeros_like(np.asarray(nbytes, dtype=float))
        steps = math.ceil(math.log2(p))
        return 2 * steps * self.alpha + 2 * (p - 1) / p * self.beta * np.asarray(nbytes, dtype=float)

    def scatter_allgather(self, nbytes, p: int):
        if p < 2:
            return np.zeros_like(np.asarray(nbytes, dtype=float))
        steps = math.ceil(math.log2(p))
        return 2 * steps * self.alpha + 2 * (p - 1) * self.beta * np.asarray(nbytes, dtype=float)

    def __str__(self) -> str:
        return f"alpha = {self.alpha * 1e6:.2f} us, beta = {self.beta * 1e9:.4f} ns/B ({self.bandwidth / 1e9:.2f} GB/s)"


def fit_alpha_beta(nbytes, seconds) -> AlphaBeta:
    """Least-squares fit of ``seconds = alpha + beta * nbytes`` in relative error; alpha, beta > 0.

    Relative error (each point weighted by ``1/seconds``) lets the small messages fix alpha and
    the large ones fix beta. If the unconstrained fit gives a non-positive parameter, it is
    refitted with that parameter at a small positive floor.
    """
    m = np.asarray(nbytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if m.shape != t.shape or m.ndim != 1 or m.size < 2:
        raise ValueError("nbytes and seconds must be 1-D arrays of the same length >= 2")
    if not (np.isfinite(t).all() and (t > 0).all() and (m > 0).all()):
        raise ValueError("nbytes and seconds must be positive and finite")
    if np.ptp(m) == 0:
        raise ValueError("nbytes must contain at least two different message sizes")
    w = 1.0 / t
    A = np.column_stack([np.ones_like(m), m]) * w[:, None]
    alpha, beta = np.linalg.lstsq(A, t * w, rcond=None)[0]
    if alpha <= 0:  # latency below resolution: keep a floor, refit beta
        alpha = 1e-3 * t.min()
        beta = float(np.sum(w * w * m * (t - alpha)) / np.sum(w * w * m * m))
    if beta <= 0:  # bandwidth beyond resolution: floor beta, refit alpha
        beta = 1e-3 * t.min() / m.max()
        alpha = float(np.sum(w * w * (t - beta * m)) / np.sum(w * w))
    return AlphaBeta(float(alpha), float(beta))


# --------------------------------------------------------------------------- the comparison


def compare_sums(sizes=GRADIENT_SIZES, comm=None, repeat: int = 5, number: int | None = None,
                 dtype=np.float32, pickled: bool = True, stat: str = "min") -> list[dict]:
    """Time the three sums for each message size (floats per rank); the same list on every rank.

    Each row: ``n`` (floats), ``nbytes``, ``ranks``, and seconds per call ``allreduce``,
    ``scatter_allgather``, ``pickled`` (NaN when ``pickled=False``). The results are checked
    against each other (a wrong sum raises ``AssertionError``).
    """
    comm = world(comm)
    p, rank = comm.Get_size(), comm.Get_rank()
    rows = []
    for n in sizes:
        n = int(n)
        rng = np.random.default_rng(rank)
        x = rng.random(n).astype(dtype)
        gathered = comm.gather(x, root=0)  # collective: every rank calls it
        parts = np.stack(gathered) if rank == 0 else None
        out, buf = np.empty_like(x), np.empty((p, n), dtype=dtype)  # reused, as in a training loop
        expect = sum_by_allreduce(x, comm)
        got = sum_by_scatter_allgather(parts, comm)
        tol = 1e-5 * p * max(1.0, float(np.abs(expect).max()))
        assert np.allclose(got, expect, rtol=1e-5, atol=tol), "Scatter+Allgather sum differs from Allreduce"
        row = {
            "n": n, "nbytes": n * np.dtype(dtype).itemsize, "ranks": p,
            "allreduce": time_collective(sum_by_allreduce, x, comm=comm, out=out, repeat=repeat, number=number,
                                         stat=stat),
            "scatter_allgather": time_collective(sum_by_scatter_allgather, parts, comm=comm, rows=buf, out=out,
                                                 repeat=repeat, number=number, stat=stat),
            "pickled": float("nan"),
        }
        if pickled:
            row["pickled"] = time_collective(sum_by_pickled_allreduce, x, comm=comm, repeat=repeat,
                                             number=number, stat=stat)
        rows.append(row)
    return rows


def format_table(rows, model: AlphaBeta | None = None) -> str:
    """The rows of :func:`compare_sums` as a text table, in microseconds, with the model beside each."""
    head = f"{'floats':>9} {'KiB':>7} {'p':>2} | {'Allreduce':>10} {'model':>7} | {'Scat+Allg':>10} {'model':>7} |" \
           f" {'pickled':>9} {'model':>7} | {'S+A/AR':>6} {'pick/AR':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        p, m = r["ranks"], r["nbytes"]
        pred = (model.allreduce(m, p), model.scatter_allgather(m, p), model.allreduce(m, p)) if model else (np.nan,) * 3
        us = [1e6 * r[k] for k in ("allreduce", "scatter_allgather", "pickled")]
        lines.append(
            f"{r['n']:>9,d} {m / 1024:>7.1f} {p:>2} | {us[0]:>10.1f} {1e6 * pred[0]:>7.1f} | {us[1]:>10.1f} "
            f"{1e6 * pred[1]:>7.1f} | {us[2]:>9.1f} {1e6 * pred[2]:>7.1f} | {us[1] / us[0]:>6.2f} {us[2] / us[0]:>7.2f}"
        )
    lines.append("times in microseconds per call (best round, slowest rank); model = alpha-beta prediction")
    return "\n".join(lines)


def compare_sums_over_ranks(sizes=GRADIENT_SIZES, ranks=(2,), comm=None, **kwargs) -> list[dict]:
    """:func:`compare_sums` on the first ``p`` ranks of ``comm`` for each ``p`` in ``ranks``.

    Collective over ``comm``; the rows of every ``p`` are returned on rank 0 (``None`` elsewhere).
    One set of engines serves every rank count (notebook 03).
    """
    from ppu_lab.mpi import first_ranks

    comm = world(comm)
    rows = []
    for p in ranks:
        with first_ranks(int(p), comm) as sub:
            if sub is not None:
                rows += compare_sums(sizes, comm=sub, **kwargs)
        comm.Barrier()
    return rows if comm.Get_rank() == 0 else None


def compare_bcast(sizes=(10, 1_000, 100_000), comm=None, repeat: int = 5) -> list[dict]:
    """Seconds per broadcast of a float64 array of each size: pickled ``bcast`` vs buffer ``Bcast``."""
    comm = world(comm)
    rows = []
    for n in sizes:
        x = np.arange(int(n), dtype=np.float64) if comm.Get_rank() == 0 else np.empty(int(n))

        def lower(comm, x=x):
            return comm.bcast(x if comm.Get_rank() == 0 else None, root=0)

        def upper(comm, x=x):
            comm.Bcast(x, root=0)
            return x

        assert np.array_equal(lower(comm), np.arange(int(n))) and np.array_equal(upper(comm), np.arange(int(n)))
        rows.append({"n": int(n), "nbytes": 8 * int(n),
                     "bcast": time_collective(lower, comm=comm, repeat=repeat),
                     "Bcast": time_collective(upper, comm=comm, repeat=repeat)})
    return rows
