"""Data-parallel SGD with MPI (notebook 04): the kernels of ``ppu_lab.ridge``, communication at the edge.

Generic primitives (also used by the MNIST models, notebooks 05-07):

- ``shard_bounds(n, size, rank)``  balanced contiguous split of ``n`` items over ``size`` ranks
- ``world(comm)``                  ``comm`` or ``MPI.COMM_WORLD``
- ``check_all(ok, message, comm)`` collective check: raise ``RankError`` on every rank if any failed
- ``allreduce_sum(buf, comm)``     in-place ``Allreduce(SUM)`` on a contiguous NumPy buffer
- ``mpi_main(fn)``                 for scripts under ``mpiexec``: an uncaught exception aborts the job

Every function that takes ``comm`` is collective: all ranks of ``comm`` must call it.
mpi4py is imported lazily, so ``shard_bounds`` works without MPI.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np


class RankError(RuntimeError):
    """Raised on every rank when one or more ranks failed a collective check.

    ``failures`` maps each failing rank to its message.
    """

    def __init__(self, failures: dict[int, str]):
        self.failures = dict(sorted(failures.items()))
        lines = "; ".join(f"rank {r}: {m}" for r, m in self.failures.items())
        super().__init__(f"{len(self.failures)} rank(s) failed: {lines}")


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
        raise RankError({r: m for r, m in enumerate(messages) if m is not None})


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
        traceback.print_exc()
        print(f"rank {comm.Get_rank()}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        comm.Abort(1)
