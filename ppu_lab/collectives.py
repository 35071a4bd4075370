"""What MPI communication costs, measured (notebook 03, ``benchmarks/collectives.py``).

Two ways to add up one vector of ``n`` floats per rank so that every rank holds the sum, the two
gradient exchanges of notebook 04's designs, and the pickled call for contrast:

- ``sum_by_allreduce(x, comm)``           one buffer-based ``Allreduce(SUM)`` (the better design)
- ``sum_by_allgather(x, comm)``           the course's design: ``Allgather`` of every rank's vector,
  then every rank adds the ``p`` rows in rank order (the course's design also ``Scatterv``s the
  minibatch's rows from rank 0 before it: ``parallel.scatter_allgather_step``)
- ``sum_by_pickled_allreduce(x, comm)``   lowercase ``allreduce``: the array is pickled

``pingpong`` measures one message between ranks 0 and 1; ``costmodel.fit_alpha_beta`` fits
``alpha + beta * m`` to it and ``costmodel.fit_regimes`` finds the size where the MPI library switches protocol
(two lines instead of one); ``measure_gamma`` times the library's own reduction (``MPI_Reduce_local``);
``mpich_defaults`` reads MPICH's switch points (its CVARs, through ``mpivars``).
``compare_collectives`` times every collective the lab calls, and ``format_model_table`` sets each
beside the model of ``ppu_lab.costmodel`` with the ratio. ``time_collective`` times any collective
call the same way on every rank (the slowest rank counts).

Every function that takes ``comm`` is collective: all ranks of ``comm`` call it.
``comm=None`` means ``MPI.COMM_WORLD``.
"""

from __future__ import annotations

import os
import re
import statistics
import time

import numpy as np

from ppu_lab import costmodel
from ppu_lab.costmodel import AlphaBeta, Regimes, fit_alpha_beta, fit_regimes
from ppu_lab.mpi import world

__all__ = ["sum_by_allreduce", "sum_by_allgather", "sum_by_pickled_allreduce", "time_collective", "pingpong",
           "AlphaBeta", "Regimes", "fit_alpha_beta", "fit_regimes", "measure_gamma", "mpich_defaults",
           "protocol_switch", "compare_collectives", "compare_collectives_over_ranks", "format_model_table", "compare_bcast"]

#: Gradient-sized messages (floats) for the benchmark; 28,938 is the CNN of notebook 06.
GRADIENT_SIZES = (8_192, 28_938, 65_536, 262_144, 1_048_576)


# --------------------------------------------------------------------------- the sums


def sum_by_allreduce(x, comm=None, out=None) -> np.ndarray:
    """Sum of every rank's ``x`` (a contiguous array), on every rank, by one ``Allreduce``.

    ``out``: a preallocated result buffer like ``x`` (a training loop reuses one every step).
    """
    from mpi4py import MPI

    x = np.ascontiguousarray(x)
    out = np.empty_like(x) if out is None else out
    world(comm).Allreduce(x, out, op=MPI.SUM)
    return out


def sum_by_allgather(x, comm=None, gathered=None, out=None) -> np.ndarray:
    """The course's gradient exchange: ``Allgather`` of every rank's ``x``, then the sum of the ``p`` rows.

    Every rank puts ``x`` in its own row of ``gathered`` and calls ``Allgather`` in place (MPI then
    copies nothing locally), and adds the rows in rank order, so every rank gets the same bits.
    ``gathered``: a preallocated ``(p, n)`` buffer (a training loop reuses one every step); ``out``:
    the result buffer (may be ``x``). ``ppu_lab.train``'s course design calls this.
    """
    from mpi4py import MPI

    comm = world(comm)
    x = np.asarray(x)
    gathered = np.empty((comm.Get_size(),) + x.shape, dtype=x.dtype) if gathered is None else gathered
    gathered[comm.Get_rank()] = x                # my row
    comm.Allgather(MPI.IN_PLACE, gathered)       # everyone's rows, on every rank
    return np.sum(gathered, axis=0, out=out)


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


def time_collectives(calls: dict, comm=None, repeat: int = 5, number: int | None = None, warmup: int = 1,
                     stat: str = "min", separate: bool = True) -> dict:
    """Seconds per call of each collective ``calls[name]()``, as seen by the slowest rank; ``{name: s}``.

    ``repeat`` rounds of ``number`` calls each; the calls take turns round by round, so that a change
    in the machine's load hits all of them. A round's time is the maximum over ranks. ``separate``
    (default): a ``Barrier`` before every call and only the call timed, as in a training step, where
    computation separates the collectives; otherwise the calls of a round run back to back, and a
    root that returns before the others have received (a ``Bcast`` or ``Scatter`` root may) overlaps
    the next call: that measures throughput, not the time of one call. Returns the best round
    (``stat="min"``: on a shared machine other work only ever adds time) or the median round; the
    same values on every rank. ``number=None`` picks, per call, as many as fill about 1 ms (at most
    100): short rounds and many of them, so that some round escapes the other work on a shared machine.
    """
    from mpi4py import MPI

    if repeat < 1 or (number is not None and number < 1) or warmup < 0:
        raise ValueError("time_collectives: repeat and number must be >= 1, warmup >= 0")
    comm = world(comm)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    numbers = {k: number or _calibrate(fn, comm) for k, fn in calls.items()}
    rounds: dict = {k: [] for k in calls}
    for _ in range(repeat):
        for k, fn in calls.items():
            spent = 0.0
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(numbers[k]):
                if separate:
                    comm.Barrier()
                    t0 = time.perf_counter()
                fn()
                if separate:
                    spent += time.perf_counter() - t0
            spent = spent if separate else time.perf_counter() - t0
            rounds[k].append(comm.allreduce(spent / numbers[k], op=MPI.MAX))
    return {k: _stat(v, stat) for k, v in rounds.items()}


def time_collective(fn, *args, comm=None, repeat: int = 5, number: int | None = None, warmup: int = 1,
                    stat: str = "min", separate: bool = True, **kwargs) -> float:
    """Seconds per call of the collective ``fn(*args, comm=comm, **kwargs)`` (see :func:`time_collectives`)."""
    comm = world(comm)
    call = {"fn": lambda: fn(*args, comm=comm, **kwargs)}
    return time_collectives(call, comm, repeat, number, warmup, stat, separate)["fn"]


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


# --------------------------------------------------------------------------- the model's terms, measured


def measure_gamma(nbytes: int = 1 << 20, dtype=np.float32, repeat: int = 20) -> float:
    """Seconds per byte that the MPI library's own ``SUM`` takes to reduce (``MPI_Reduce_local``), best of ``repeat``.

    Local: no communication, any rank can call it. The gamma of ``costmodel.AlphaBeta``.
    """
    from mpi4py import MPI

    n = max(1, int(nbytes) // np.dtype(dtype).itemsize)
    a, b = np.ones(n, dtype=dtype), np.ones(n, dtype=dtype)
    MPI.SUM.Reduce_local(a, b)  # warm-up: touch the pages
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        MPI.SUM.Reduce_local(a, b)
        best = min(best, time.perf_counter() - t0)
    return best / (n * np.dtype(dtype).itemsize)


#: MPICH's switch points that the lab's model and prose use (bytes), as ``mpivars`` prints them.
MPICH_CVARS = ("MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE", "MPIR_CVAR_BCAST_SHORT_MSG_SIZE", "MPIR_CVAR_BCAST_LONG_MSG_SIZE",
               "MPIR_CVAR_ALLGATHER_SHORT_MSG_SIZE", "MPIR_CVAR_ALLGATHER_LONG_MSG_SIZE",
               "MPIR_CVAR_CH4_IPC_CMA_P2P_THRESHOLD", "MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_CELL_SIZE")


def protocol_switch(cvars: dict | None = None) -> int | None:
    """MPICH's documented point-to-point switch on one machine (bytes from which a message is copied once,
    directly between the processes: ``MPIR_CVAR_CH4_IPC_CMA_P2P_THRESHOLD``); None for another MPI."""
    cvars = mpich_defaults() if cvars is None else cvars
    return cvars.get("MPIR_CVAR_CH4_IPC_CMA_P2P_THRESHOLD")


def mpich_defaults(timeout: float = 60) -> dict:
    """``{CVAR: bytes}`` for ``MPICH_CVARS`` as this MPICH sets them (its ``mpivars`` tool); ``{}`` elsewhere.

    ``mpivars`` ships with MPICH (beside its ``mpiexec``) and prints every control variable with its
    value, environment overrides included. Other MPIs (Open MPI: ``ompi_info --all``) return ``{}``.
    """
    import shutil
    from pathlib import Path

    from ppu_lab.mpiexec import find_mpiexec
    from ppu_lab.procs import run

    mpiexec = find_mpiexec()
    tool = Path(mpiexec).with_name("mpivars") if mpiexec else None
    tool = str(tool) if tool is not None and tool.exists() else shutil.which("mpivars")
    if tool is None:
        return {}
    # inside an MPI job the launcher's variables would make mpivars join the job: start it clean
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPI_LOCAL"))}
    try:
        out = run([tool], timeout, env=env).stdout
    except Exception:  # noqa: BLE001 - no table is an answer too: the caller says so
        return {}
    found = dict(re.findall(r"^\s*(MPIR_CVAR_\w+)\s*=\s*(-?\d+)\s", out, re.M))
    return {k: int(found[k]) for k in MPICH_CVARS if k in found}


# --------------------------------------------------------------------------- every collective, measured


def _calls(n: int, comm, dtype):
    """``{name: fn()}`` for every collective the lab calls, on ``n`` numbers per rank (buffers made once)."""
    from mpi4py import MPI

    from ppu_lab.mpi import mpi_dtype

    p, rank = comm.Get_size(), comm.Get_rank()
    x = np.random.default_rng(rank).random(n).astype(dtype)
    out, gathered, buf, acc = np.empty_like(x), np.empty((p, n), dtype=dtype), x.copy(), x.copy()
    rows = np.empty((p, n), dtype=dtype) if rank == 0 else None
    vspec = [rows, [n] * p, [n * r for r in range(p)], mpi_dtype(x)] if rank == 0 else None
    expect = sum_by_allreduce(x, comm, out=np.empty_like(x))
    got = sum_by_allgather(x, comm, gathered)
    assert np.allclose(got, expect, rtol=1e-5, atol=1e-5 * p), "Allgather + sum differs from Allreduce"
    return {
        "Send": lambda: _roundtrip(comm, buf, 1),  # a round trip: halved below
        "Bcast": lambda: comm.Bcast(buf, root=0),
        "Scatter": lambda: comm.Scatter(rows, buf, root=0),
        "Scatterv": lambda: comm.Scatterv(vspec, buf, root=0),
        "Allgather": lambda: comm.Allgather(MPI.IN_PLACE, gathered),        # in place, as the lab calls it
        "Allgather + sum": lambda: sum_by_allgather(x, comm, gathered, out),
        "Allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, acc, op=MPI.SUM),  # in place, as train and parallel
        "pickled allreduce": lambda: sum_by_pickled_allreduce(x, comm),
    }


def compare_collectives(sizes=GRADIENT_SIZES, comm=None, repeat: int = 5, number: int | None = None,
                        dtype=np.float32, stat: str = "min", only=None) -> list[dict]:
    """Time every collective the lab calls for ``n`` numbers per rank, each ``n`` in ``sizes``.

    Returns (on every rank) rows ``{collective, n, nbytes, ranks, seconds}``: ``n`` is what each rank
    sends, receives or contributes (Bcast: the buffer; Send: one way, half a round trip between ranks
    0 and 1). ``only``: a subset of the names. The calls take turns (``time_collectives``); the two
    sums are checked against each other (a wrong sum raises ``AssertionError``). Needs 2 ranks or more.
    """
    comm = world(comm)
    p = comm.Get_size()
    if p < 2:
        raise ValueError("compare_collectives needs at least 2 ranks: start with `mpiexec -n 2` or MPICluster(n=2)")
    rows = []
    for n in sizes:
        calls = _calls(int(n), comm, dtype)
        calls = {k: f for k, f in calls.items() if only is None or k in only}
        times = time_collectives(calls, comm, repeat=repeat, number=number, stat=stat)
        for name, t in times.items():
            rows.append({"collective": name, "n": int(n), "nbytes": int(n) * np.dtype(dtype).itemsize, "ranks": p,
                         "seconds": t / 2 if name == "Send" else t})
    return rows


def compare_collectives_over_ranks(sizes=GRADIENT_SIZES, ranks=(2,), comm=None, **kwargs) -> list[dict] | None:
    """:func:`compare_collectives` on the first ``p`` ranks of ``comm`` for each ``p`` in ``ranks``.

    Collective over ``comm``; the rows of every ``p`` are returned on rank 0 (``None`` elsewhere).
    One set of engines serves every rank count (notebook 03).
    """
    from ppu_lab.mpi import first_ranks

    comm = world(comm)
    rows = []
    for p in ranks:
        with first_ranks(int(p), comm) as sub:
            if sub is not None:
                rows += compare_collectives(sizes, comm=sub, **kwargs)
        comm.Barrier()
    return rows if comm.Get_rank() == 0 else None


def model_rows(rows, model) -> list[dict]:
    """Each measured row with the model's ``predicted`` seconds, MPICH's ``algorithm`` and the ``ratio``
    measured/predicted."""
    out = []
    for r in rows:
        m, p, name = r["nbytes"], r["ranks"], r["collective"]
        pred = float(model.time(costmodel.COLLECTIVES[name](m, p)))
        out.append({**r, "algorithm": costmodel.algorithm(name, m, p), "predicted": pred,
                    "ratio": r["seconds"] / pred if pred > 0 else float("nan")})
    return out


def format_model_table(rows, model, within: float = 1.5) -> str:
    """Measured against predicted, one line per collective and size, in microseconds, with the ratio."""
    rows = model_rows(rows, model)
    head = (f"{'collective':<18} {'algorithm modelled (MPICH)':<29} {'p':>2} {'floats':>9} {'KiB':>7} | {'measured':>9} "
            f"{'model':>8} | {'measured/model':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        flag = "" if 1 / within <= r["ratio"] <= within else "  <- outside"
        lines.append(f"{r['collective']:<18} {r['algorithm']:<29} {r['ranks']:>2} {r['n']:>9,d} "
                     f"{r['nbytes'] / 1024:>7.1f} | {1e6 * r['seconds']:>9.1f} {1e6 * r['predicted']:>8.1f} | "
                     f"{r['ratio']:>14.2f}{flag}")
    modelled = [r for r in rows if r["collective"] != "pickled allreduce"]  # the model has no pickling term
    inside = sum(1 / within <= r["ratio"] <= within for r in modelled)
    lines.append(f"times in microseconds per call (best round, slowest rank); model: {model}")
    lines.append(f"{inside} of {len(modelled)} within {within}x of the model (the pickled allreduce left out: "
                 "the model has no term for pickling)")
    return "\n".join(lines)


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
