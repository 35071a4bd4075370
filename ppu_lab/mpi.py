"""Generic MPI helpers, written once and used by every MPI design of the lab (notebooks 03-08).

- ``world(comm)``                    ``comm`` or ``MPI.COMM_WORLD``
- ``shard_bounds(n, size, rank)``    balanced contiguous split of ``n`` items over ``size`` ranks;
  ``shard_counts``, ``shard_displs`` the same for all ranks at once (for ``Scatterv``/``Gatherv``)
- ``check_all(ok, message, comm)``   collective check: raise ``RankError`` on every rank if any failed;
  ``check_everywhere(fn, comm)`` runs ``fn`` on every rank and raises its error on all of them
- ``allreduce_sum(buf, comm)``       in-place ``Allreduce(SUM)`` on a contiguous NumPy buffer
- ``sleeping_barrier(comm, timeout)`` a barrier that sleeps instead of spinning, with a deadline
- ``first_ranks(p, comm)``           context: a communicator of the first ``p`` ranks
- ``mpi_dtype(array)``               the MPI datatype of a NumPy array (``mpi4py.util.dtlib``)
- ``mpi_main(fn)``, ``abort_job``    for scripts under ``mpiexec``: an uncaught exception on one rank
  reports and ends the whole job instead of leaving the other ranks waiting

Every function that takes ``comm`` is collective: all ranks of ``comm`` must call it. mpi4py is
imported lazily, so ``shard_bounds`` and friends work without MPI.
"""

from __future__ import annotations

import sys
import time
import traceback
from contextlib import contextmanager

import numpy as np

from ppu_lab.checks import integer

# Seconds a failing rank waits, after writing its report, before it aborts the job.
ABORT_GRACE = 0.5
# Default deadline of ``sleeping_barrier`` (seconds): a rank waiting longer is stuck, not slow.
BARRIER_TIMEOUT = 3600.0


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


# --------------------------------------------------------------------------- shards
def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """Items ``[lo, hi)`` of rank ``rank`` in a balanced contiguous split of ``n`` items over ``size`` ranks.

    The first ``n % size`` ranks get one item more; shard sizes differ by at most 1 and the
    shards cover ``0..n`` exactly once. When ``n < size`` the last ranks get empty shards;
    callers that need every rank to hold data check ``n >= size`` themselves.
    """
    n = integer("n (number of items to split)", n, 0)
    size = integer("size (number of ranks)", size, 1)
    rank = integer("rank", rank, 0, size - 1)
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard_counts(n: int, size: int) -> np.ndarray:
    """Shard sizes of all ranks (``hi - lo`` of ``shard_bounds``), an int array of length ``size``."""
    n = integer("n (number of items to split)", n, 0)
    size = integer("size (number of ranks)", size, 1)
    base, extra = divmod(n, size)
    return np.array([base + (1 if r < extra else 0) for r in range(size)], dtype=int)


def shard_displs(counts) -> np.ndarray:
    """Where each shard starts, from the shard sizes: ``[0, c0, c0 + c1, ...]`` (for ``Scatterv``)."""
    counts = np.asarray(counts, dtype=int)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)


# --------------------------------------------------------------------------- checks on every rank
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


def check_everywhere(fn, comm=None, error=RankError, *, only_root: bool = False, input_error=None):
    """Run ``fn()`` on every rank (on rank 0 alone with ``only_root``); if it raised anywhere, raise
    ``error(failures, size)`` on every rank, with each failing rank's message. Returns ``fn()``'s
    value (rank 0's, broadcast, with ``only_root``).

    A ValueError's message is passed on as it is; other exceptions are prefixed with their type.
    ``input_error``: raised instead of ``error`` when every failure was a ValueError (bad input), so
    that a caller can tell its user's mistake from a crash (the experiments' command line does).
    """
    comm = world(comm)
    value, ok, message, bad_input = None, True, "", True
    if comm.Get_rank() == 0 or not only_root:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - any failure must reach every rank, not hang them
            ok, bad_input = False, isinstance(exc, ValueError)
            message = str(exc) if bad_input else f"{type(exc).__name__}: {exc}"
    try:
        check_all(ok, message, comm)
    except RankError as exc:
        inputs_only = all(comm.allgather(bad_input))  # every rank is here: collective
        raise (input_error if input_error is not None and inputs_only else error)(exc.failures, exc.size) from None
    return comm.bcast(value, root=0) if only_root else value


def allreduce_sum(buf: np.ndarray, comm=None) -> None:
    """Sum ``buf`` over all ranks in place (buffer-based ``Allreduce``; ``buf`` must be contiguous)."""
    from mpi4py import MPI

    if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
        raise ValueError("allreduce_sum needs a C-contiguous numpy array: use np.ascontiguousarray(buf)")
    world(comm).Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def mpi_dtype(a):
    """The MPI datatype of a NumPy array or dtype (``mpi4py.util.dtlib``), for ``[buf, counts, displs, type]``."""
    from mpi4py.util import dtlib

    return dtlib.from_numpy_dtype(a.dtype if hasattr(a, "dtype") else np.dtype(a))


# --------------------------------------------------------------------------- waiting
def sleeping_barrier(comm=None, timeout: float | None = BARRIER_TIMEOUT, poll: float = 0.02) -> None:
    """A barrier that sleeps while it waits (``Ibarrier`` + ``Test``), unlike ``comm.Barrier``.

    MPI implementations wait by spinning: ranks idle in ``Barrier`` would use the cores that the
    working ranks need (on a laptop with fewer cores than ranks they halve the speed of a 2-rank
    run). It tests every 0.1 ms at first, then less and less often, at least every ``poll`` seconds.

    Raises ``TimeoutError`` on this rank when the other ranks have not all arrived within
    ``timeout`` seconds (``None``: wait as long as it takes). Which ranks are late the caller
    learns from its own logs; the message says what to do.
    """
    comm = world(comm)
    request = comm.Ibarrier()
    deadline = None if timeout is None else time.monotonic() + float(timeout)
    delay = min(1e-4, poll)
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {comm.Get_rank()} waited {timeout:.0f} s at a barrier for the other "
                f"{comm.Get_size() - 1} rank(s): one of them is stuck or far slower. Look at the other "
                "ranks' output; pass a larger timeout= if their work really takes that long.")
        time.sleep(delay)
        delay = min(delay * 2, poll)


@contextmanager
def first_ranks(p: int, comm=None):
    """Context: a communicator of the first ``p`` ranks of ``comm`` (``None`` on the others).

    Collective over ``comm`` (``comm.Split``): one cluster of the largest size serves runs on
    1, 2, ... ranks without restarting engines. The sub-communicator is freed on exit.
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


# --------------------------------------------------------------------------- ending a job
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
