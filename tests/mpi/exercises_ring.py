"""Under mpiexec: notebook 03's ring check (``nb03.ring_report`` / ``ring_verdict``) on planted rings.

Usage: mpiexec -n P python tests/mpi/exercises_ring.py
For every p = 1 .. P (the first p ranks) and lengths divisible by p, not divisible, and shorter than
p: a correct ring passes; a ring that skips its last step, one that sends the whole vector, and one
that calls a collective are each caught with their message.
Prints one line per p on rank 0.
"""

import numpy as np

from ppu_lab.exercises.nb03 import ring_report, ring_verdict
from ppu_lab.mpi import mpi_main, shard_bounds, world


def ring(x, comm, skip_last=False):
    """A planted submission: the ring of notebook 03, optionally one step short in each phase."""
    p, r = comm.Get_size(), comm.Get_rank()
    chunks = [slice(*shard_bounds(len(x), p, c)) for c in range(p)]
    out, steps = np.array(x, dtype=float), p - 1 - (1 if skip_last and p > 1 else 0)
    for phase in ("reduce-scatter", "allgather"):
        for s in range(steps):
            shift = 0 if phase == "reduce-scatter" else 1
            send, recv = chunks[(r + shift - s) % p], chunks[(r + shift - s - 1) % p]
            buf = np.empty(recv.stop - recv.start)
            comm.Sendrecv(out[send], dest=(r + 1) % p, recvbuf=buf, source=(r - 1) % p)
            out[recv] = out[recv] + buf if phase == "reduce-scatter" else buf
    return out


def whole_vector(x, comm):
    """Passes the whole vector around the ring p - 1 times: right sum, (p - 1) m bytes."""
    p, r, out, cur = comm.Get_size(), comm.Get_rank(), np.array(x, dtype=float), np.array(x, dtype=float)
    for _ in range(p - 1):
        buf = np.empty_like(cur)
        comm.Sendrecv(cur, dest=(r + 1) % p, recvbuf=buf, source=(r - 1) % p)
        out, cur = out + buf, buf
    return out


def uses_allreduce(x, comm):
    from mpi4py import MPI

    out = np.empty_like(x)
    comm.Allreduce(x, out, op=MPI.SUM)
    return out


def verdict(fn, p, n, seed=7):
    comm = world()
    try:
        rep = ("ok", ring_report(fn, p, n, seed))
    except Exception as exc:  # noqa: BLE001 - a refused collective: reported by rank
        rep = ("raised", f"{type(exc).__name__}: {exc}")
    reps = comm.gather(rep, root=0)
    if comm.Get_rank() != 0:
        return None
    raised = [v for s, v in reps if s == "raised"]
    return raised[0] if raised else ring_verdict([v for _, v in reps], p, n) or "passed"


def main():
    comm = world()
    for p in range(1, comm.Get_size() + 1):
        for n in sorted({3 * p, 2 * p + 1, max(p - 1, 1), 1}):
            v = verdict(ring, p, n)
            assert v in (None, "passed"), f"p={p} n={n}: the correct ring fails: {v}"
            short = verdict(lambda x, c: ring(x, c, skip_last=True), p, n)
            assert p == 1 and short in (None, "passed") or short is None or (
                f"{p - 1} steps in each of its two phases" in short and "wrong sum" in short), short
            big = verdict(whole_vector, p, n)
            assert big is None or (big == "passed" if p <= 2 else n <= 2 or "not the whole vector" in big
                                   or "different bits" in big), big
            coll = verdict(uses_allreduce, p, n)
            assert coll is None or "comm.Allreduce is not allowed" in coll, coll
        if comm.Get_rank() == 0:
            print(f"p={p}: ring passes; skipped last step, whole vector, Allreduce caught", flush=True)


if __name__ == "__main__":
    mpi_main(main)
