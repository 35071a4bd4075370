"""Where each rank's time goes: per-rank, per-step timelines of a parallel run (notebooks 04, 06, 08).

A ``Tracer`` is a ``timing.Timer`` that also keeps every interval as a *span* (rank, step, name,
start, end). It plugs into the ``timer(name)`` hook that the step functions already have
(``ppu_lab.parallel``, ``ppu_lab.designs``) and into ``ppu_lab.train.train(..., timer=tracer)``::

    tracer = Tracer(comm)
    res = parallel.sgd_allreduce(X, y, lam, lr, B, epochs, comm=comm, timer=tracer)
    tl = tracer.gather()                 # on rank 0: every rank's spans on rank 0's clock
    tl.gantt(); tl.to_chrome("run.json") # a Gantt chart; a trace that https://ui.perfetto.dev opens

**Waiting, measured.** Inside a collective a rank cannot tell transfer time from waiting for a late
rank: ``Allreduce`` returns when its part is done, whoever was late. So in tracing mode the tracer
runs a ``Barrier`` *before* every span named in ``wait_before`` (default: ``"comm"``) and records
it as a ``"wait"`` span: a rank that arrives early waits there for the last one, and the collective
that follows starts on all ranks together and measures the transfer alone. The price is one extra
barrier per collective (about 2 log2(p) message latencies: microseconds on one machine, tens of
microseconds across nodes), and the barrier removes the little slack a collective has by itself
(a rank that finishes its part of an Allreduce early can leave early): so trace to *see*, and time
without the tracer. Tracing off (the default ``Timer``, or ``timing.no_timer``) adds nothing.

**Clocks.** Spans are taken with ``MPI.Wtime``. Each rank's clock may have its own zero (on a
cluster, certainly; ``MPI.WTIME_IS_GLOBAL`` says whether the library promises otherwise), so
``gather`` first estimates every rank's offset from rank 0 (``clock_offsets``: ping-pong with
rank 0, the offset of the round trip with the smallest delay, error at most half that delay) and
shifts the spans onto rank 0's clock.

**A planted straggler.** ``Tracer(comm, straggle=0.004)`` on one rank makes every ``"compute"``
span of that rank 4 ms longer (it sleeps): the other ranks then show 4 ms of ``"wait"`` per step.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ppu_lab.mpi import world
from ppu_lab.timing import Timer

#: Span names drawn in fixed colours (others get the next colours of the cycle).
COLORS = {"compute": "tab:blue", "update": "tab:cyan", "comm": "tab:orange", "wait": "tab:red"}


class Tracer(Timer):
    """A ``Timer`` that also records spans on the MPI clock, for ``gather``; collective over ``comm``.

    comm: the communicator of the traced collectives (the one passed to the step function).
    wait_before: span names preceded, in tracing mode, by a timed ``Barrier`` (the ``"wait"`` span).
    step_end: the span names that end a step (the step functions end with ``"update"``; a parameter
        server's workers with ``"pull"``).
    straggle: seconds this rank sleeps at the end of each ``"compute"`` span (a planted straggler).
    clock: seconds as a float (default ``MPI.Wtime``); tests pass a shifted clock.

    Its ``laps`` are those of a ``Timer``, with ``"wait"`` split out of ``"comm"``.
    """

    def __init__(self, comm=None, *, wait_before=("comm",), step_end=("update", "pull"), straggle: float = 0.0,
                 clock=None):
        super().__init__()
        from mpi4py import MPI

        self.comm = world(comm)
        self.wait_before, self.straggle = tuple(wait_before), float(straggle)
        self.step_end = (step_end,) if isinstance(step_end, str) else tuple(step_end)
        self.clock = clock or MPI.Wtime
        self.names: list[str] = []
        self.spans: list[tuple[int, int, float, float]] = []  # (step, name code, start, end), local clock
        self.step = 0

    def _record(self, name: str, start: float, end: float) -> None:
        if name not in self.names:
            self.names.append(name)
        self.spans.append((self.step, self.names.index(name), start, end))
        self.laps.setdefault(name, []).append(end - start)

    @contextmanager
    def __call__(self, name: str = "total"):
        clock = self.clock
        if name in self.wait_before and self.comm.Get_size() > 1:
            t0 = clock()
            self.comm.Barrier()                       # the early ranks wait here for the last one
            self._record("wait", t0, clock())
        start = clock()
        try:
            yield self
        finally:
            if self.straggle and name == "compute":
                time.sleep(self.straggle)
            self._record(name, start, clock())
            if name in self.step_end:
                self.step += 1

    def gather(self, root: int = 0) -> Timeline | None:
        """Every rank's spans on rank ``root``'s clock, as a ``Timeline`` on ``root`` (None elsewhere).

        Collective over the tracer's ``comm``. The spans travel as one (n, 4) float64 array per rank
        (``Gatherv``); the span names as small Python lists (``gather``).
        """
        from mpi4py import MPI

        comm = self.comm
        offset = clock_offsets(comm, clock=self.clock, root=root)
        mine = np.array(self.spans, dtype=float).reshape(-1, 4)          # (n, 4): step, code, start, end
        mine[:, 2:] += offset
        counts = np.array(comm.allgather(mine.size), dtype=int)
        names = comm.gather(self.names, root=root)
        offsets = comm.gather(offset, root=root)
        out = np.empty((counts.sum() // 4, 4)) if comm.Get_rank() == root else None
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        comm.Gatherv(mine, [out, counts, displs, MPI.DOUBLE] if comm.Get_rank() == root else None, root=root)
        if comm.Get_rank() != root:
            return None
        ranks = np.repeat(np.arange(comm.Get_size()), counts // 4)
        labels = [names[r][int(c)] for r, c in zip(ranks, out[:, 1])]
        t0 = out[:, 2].min() if len(out) else 0.0
        return Timeline(rank=ranks, step=out[:, 0].astype(int), name=np.array(labels, dtype=object),
                        start=out[:, 2] - t0, end=out[:, 3] - t0, offsets=np.array(offsets), size=comm.Get_size())


def clock_offsets(comm=None, rounds: int = 20, clock=None, root: int = 0) -> float:
    """This rank's clock offset from rank ``root``'s: add it to a local time to get ``root``'s time.

    For each rank r in turn, ``rounds`` ping-pongs with ``root``: r notes t1, sends, ``root`` answers
    with its time t_root, r notes t2. If the two messages take equally long, t_root happened at
    (t1 + t2) / 2 on r's clock, so offset = t_root - (t1 + t2) / 2, wrong by at most (t2 - t1) / 2;
    the round with the smallest t2 - t1 is kept. Collective over ``comm``; 0.0 on ``root``.
    """
    from mpi4py import MPI

    comm = world(comm)
    clock = clock or MPI.Wtime
    rank, buf = comm.Get_rank(), np.zeros(1)
    best = (np.inf, 0.0)                             # (round trip, offset)
    for r in range(comm.Get_size()):
        if r == root:
            continue
        for _ in range(rounds):
            if rank == root:
                comm.Recv(buf, source=r, tag=11)
                buf[0] = clock()
                comm.Send(buf, dest=r, tag=12)
            elif rank == r:
                t1 = clock()
                comm.Send(buf, dest=root, tag=11)
                comm.Recv(buf, source=root, tag=12)
                t2 = clock()
                best = min(best, (t2 - t1, float(buf[0]) - (t1 + t2) / 2))
    return 0.0 if rank == root else best[1]


@dataclass
class Timeline:
    """Spans of all ranks on one clock (seconds from the first span): one entry per span.

    ``rank``, ``step``, ``name``, ``start``, ``end`` are arrays of equal length; ``offsets`` the
    estimated clock offset of each rank from rank 0 (seconds); ``size`` the number of ranks.
    """

    rank: np.ndarray
    step: np.ndarray
    name: np.ndarray
    start: np.ndarray
    end: np.ndarray
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1))
    size: int = 1

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(self.name.tolist()))

    def rows(self) -> dict[int, np.ndarray]:
        """Span indices of each rank, sorted by start time: one row of the Gantt chart per rank."""
        return {r: np.flatnonzero(self.rank == r)[np.argsort(self.start[self.rank == r], kind="stable")]
                for r in range(self.size)}

    def overlaps(self, tolerance: float = 1e-9) -> list[tuple[int, int, int]]:
        """``(rank, i, j)`` for each span j that starts before span i of the same rank has ended."""
        bad = []
        for r, idx in self.rows().items():
            for i, j in zip(idx, idx[1:]):
                if self.start[j] < self.end[i] - tolerance:
                    bad.append((r, int(i), int(j)))
        return bad

    def per_step(self, steps=None) -> dict[str, np.ndarray]:
        """Mean seconds per step of each span name, per rank: ``{name: array of shape (size,)}``.

        ``steps``: the steps to average over (e.g. ``range(2, 20)`` to drop warm-up); default all.
        """
        keep = np.ones(len(self.step), bool) if steps is None else np.isin(self.step, list(steps))
        n_steps = max(len(np.unique(self.step[keep])), 1)
        dur = self.end - self.start
        return {nm: np.array([dur[keep & (self.rank == r) & (self.name == nm)].sum() / n_steps
                              for r in range(self.size)]) for nm in self.names}

    def window(self, first: int, last: int, rank: int = 0) -> Timeline:
        """Every rank's spans while ``rank`` ran its steps ``first`` .. ``last`` (inclusive), re-zeroed there.

        A time window, so that ranks whose steps are counted differently (a parameter server's
        server and workers) are cut at the same moment.
        """
        mine = (self.rank == rank) & (self.step >= first) & (self.step <= last)
        if not mine.any():
            raise ValueError(f"rank {rank} has no spans in steps {first}..{last} (it has steps "
                             f"{self.step[self.rank == rank].min(initial=0)}..{self.step[self.rank == rank].max(initial=0)})")
        t0, t1 = self.start[mine].min(), self.end[mine].max()
        keep = (self.end > t0) & (self.start < t1)
        return Timeline(self.rank[keep], self.step[keep], self.name[keep], self.start[keep] - t0,
                        self.end[keep] - t0, self.offsets, self.size)

    def to_chrome(self, path=None) -> dict:
        """The spans as Chrome trace JSON (``traceEvents``, complete events ``ph: "X"``, microseconds):
        one process and one thread per rank, named ``rank r``. Written to ``path`` if given; open it
        at https://ui.perfetto.dev or chrome://tracing."""
        events = [{"name": "process_name", "ph": "M", "pid": r, "tid": r, "args": {"name": f"rank {r}"}}
                  for r in range(self.size)]
        events += [{"name": "thread_name", "ph": "M", "pid": r, "tid": r, "args": {"name": f"rank {r}"}}
                   for r in range(self.size)]
        for i in np.argsort(self.start, kind="stable"):
            events.append({"name": str(self.name[i]), "cat": str(self.name[i]), "ph": "X",
                           "ts": round(1e6 * float(self.start[i]), 3), "dur": round(1e6 * float(self.end[i] - self.start[i]), 3),
                           "pid": int(self.rank[i]), "tid": int(self.rank[i]), "args": {"step": int(self.step[i])}})
        trace = {"traceEvents": events, "displayTimeUnit": "ms",
                 "otherData": {"clock_offsets_s": [float(o) for o in self.offsets]}}
        if path is not None:
            with open(path, "w") as fh:
                json.dump(trace, fh)
        return trace

    def gantt(self, ax=None, title: str | None = None):
        """Gantt chart: one row per rank (rank 0 on top), time in ms along x, one colour per span name."""
        import matplotlib.pyplot as plt

        ax = ax if ax is not None else plt.gca()
        extra = iter(f"C{k}" for k in range(4, 10))
        colors = {nm: COLORS.get(nm) or next(extra, "0.5") for nm in self.names}
        for nm in self.names:
            label = nm
            for r in range(self.size):
                sel = (self.name == nm) & (self.rank == r)
                if sel.any():
                    bars = [(1e3 * s, 1e3 * (e - s)) for s, e in zip(self.start[sel], self.end[sel])]
                    ax.broken_barh(bars, (r - 0.4, 0.8), facecolors=colors[nm], label=label)
                    label = None                       # one legend entry per name
        ax.set_yticks(range(self.size), [f"rank {r}" for r in range(self.size)])
        ax.set_ylim(self.size - 0.5, -0.5)
        ax.set_xlabel("time (ms, rank 0's clock)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        if title:
            ax.set_title(title)
        return ax
