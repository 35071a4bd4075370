"""Under mpiexec: per-rank timelines of the ridge designs and of train(); rank 0 checks them.

Usage: mpiexec -n N python tests/mpi/timeline_trace.py MNIST_ROOT OUT_DIR

Checks on rank 0 (an AssertionError ends the job through mpi_main):
- one row per rank, every span inside one step, no two spans of a rank overlapping;
- a planted straggler (the last rank sleeps STRAGGLE s per step) shows as waiting on every other rank;
- clocks shifted by 1000 s per rank are put back on rank 0's clock (offsets found within 1 ms, and no
  rank leaves a barrier before the last rank entered it);
- train(..., timer=tracer) gives the same parameters as without it, and one step per minibatch;
- the Chrome trace has one process per rank and complete ("X") events only.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from ppu_lab import parallel
from ppu_lab.data import load_mnist, make_ridge_data
from ppu_lab.mpi import mpi_main, world
from ppu_lab.timeline import Tracer
from ppu_lab.train import train

STRAGGLE = 0.02  # seconds per step: far above the step itself (~0.1 ms), so the test is robust on a busy machine


def ridge_run(comm, **tracer_kw):
    X, y, _ = make_ridge_data(400, 10, seed=0)
    tracer = Tracer(comm, **tracer_kw)
    res = parallel.sgd_allreduce(X, y, 1.0, 1e-4, 40, 2, comm=comm, timer=tracer)
    return res, tracer.gather()


def check_rows(tl, size, steps):
    assert tl.size == size and sorted(set(tl.rank.tolist())) == list(range(size)), tl.rank
    assert all(len(idx) > 0 for idx in tl.rows().values())
    assert tl.overlaps() == [], tl.overlaps()[:5]
    assert sorted(set(tl.step.tolist())) == list(range(steps)), sorted(set(tl.step.tolist()))
    expect = {"compute", "comm", "update"} | ({"wait"} if size > 1 else set())
    assert set(tl.names) == expect, tl.names


def main():
    comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    out = Path(sys.argv[2])

    plain, tl = ridge_run(comm)
    straggled, tl_s = ridge_run(comm, straggle=STRAGGLE if rank == size - 1 else 0.0)
    assert np.array_equal(plain.w, straggled.w)              # tracing and sleeping change no number
    # A clock every process of this machine shares (CLOCK_MONOTONIC), shifted by 1000 s per rank: the
    # estimated offsets must undo the shift. (Not MPI.Wtime: Open MPI counts it from each process's own
    # start, so its ranks' clocks differ by more than the shift, which the estimate rightly includes.)
    shifted, tl_c = ridge_run(comm, clock=lambda: time.monotonic() + 1000.0 * rank)

    data = load_mnist(sys.argv[1], download=False)
    small = (data[0][:400], data[1][:400], data[2][:100], data[3][:100])
    ref = train("cnn", small, batch_size=60, epochs=1, comm=comm, progress=False)
    tracer = Tracer(comm)
    traced = train("cnn", small, batch_size=60, epochs=1, comm=comm, progress=False, timer=tracer)
    tl_t = tracer.gather()
    assert np.array_equal(ref.params, traced.params)

    if rank == 0:
        for t in (tl, tl_s, tl_c):
            check_rows(t, size, 20)                          # 400 rows / batch 40 x 2 epochs
        check_rows(tl_t, size, 7)                            # ceil(400 / 60)
        wait = tl_s.per_step()["wait"] if size > 1 else np.zeros(1)
        for r in range(size - 1):                            # everyone but the straggler waits for it
            assert wait[r] > 0.7 * STRAGGLE, (r, wait)
        if size > 1:
            assert wait[-1] < 0.5 * STRAGGLE, wait           # the straggler itself waits much less
            assert tl_s.per_step()["compute"][-1] > STRAGGLE
        assert np.allclose(tl_c.offsets, -1000.0 * np.arange(size), atol=1e-3), tl_c.offsets
        if size > 1:  # no rank leaves a barrier before the last one entered it: true on one clock only
            entered = [tl_c.start[(tl_c.rank == r) & (tl_c.name == "wait")] for r in range(size)]
            left = [tl_c.end[(tl_c.rank == r) & (tl_c.name == "wait")] for r in range(size)]
            early = np.max(entered, axis=0) - np.min(left, axis=0)   # > 0: someone left before all came
            assert np.all(early < 1e-3), early
        trace = tl_s.to_chrome(out / "trace.json")
        loaded = json.loads((out / "trace.json").read_text())
        assert loaded == trace
        spans = [e for e in loaded["traceEvents"] if e["ph"] != "M"]
        assert {e["ph"] for e in spans} == {"X"} and len(spans) == len(tl_s.start)
        assert sorted({e["pid"] for e in spans}) == list(range(size))
        print(f"timeline ok on {size} ranks; straggler wait per step {np.round(1e3 * wait, 2)} ms")


if __name__ == "__main__":
    mpi_main(main)
