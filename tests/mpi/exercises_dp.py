"""Under mpiexec: notebook 04's check of the course's data-parallel step on planted steps.

Usage: mpiexec -n P python tests/mpi/exercises_dp.py
On every p = 1 .. P: a correct step passes (serial SGD's weights to 1e-10 on every rank); Scatterv counts
that drop the remainder, a step without N/|B| and one that averages the shard gradients are named; on
3 ranks or more, adding the gathered rows in a rank-dependent order is caught as ranks that disagree.
Prints one line per p on rank 0.
"""

import numpy as np
from mpi4py import MPI

from ppu_lab import ridge
from ppu_lab.exercises.nb04 import dp_report, dp_verdict
from ppu_lab.mpi import mpi_main, shard_counts, shard_displs, world

CASE = (205, 5, 20, 2, 41)           # n, d, batch, epochs, seed: batches of 20 rows, the last one 5


def step(w, XY, idx, nb, lam, n, lr, comm, drop=False, scale=True, mean=False, rolled=False):
    """A planted submission: the course's step, with one mistake switched on."""
    p, rank, d = comm.Get_size(), comm.Get_rank(), w.size
    counts = (np.full(p, nb // p) if drop else shard_counts(nb, p)) * (d + 1)
    shard = np.empty((counts[rank] // (d + 1), d + 1))
    comm.Scatterv([XY[idx], counts, shard_displs(counts), MPI.DOUBLE] if rank == 0 else None, shard, root=0)
    gathered = np.empty((p, d))
    gathered[rank] = ridge.data_gradient(w, shard[:, :d], shard[:, d])
    comm.Allgather(MPI.IN_PLACE, gathered)
    total = (np.roll(gathered, -rank, axis=0) if rolled else gathered).sum(axis=0) / (p if mean else 1)
    return ridge.sgd_step(w, ridge.combine(w, total, lam, n, nb) if scale else total + lam * w, lr)


def verdict(p, **mistake):
    reps = world().gather(dp_report(lambda *a: step(*a, **mistake), p, *CASE), root=0)
    return None if world().Get_rank() else dp_verdict(reps, p, *CASE) or "passed"


def main():
    comm = world()
    for p in range(1, comm.Get_size() + 1):
        v = verdict(p)
        assert v in (None, "passed"), f"p={p}: the correct step fails: {v}"
        drop = verdict(p, drop=True)
        assert drop is None or (p == 1 and drop == "passed") or "drop the remainder" in drop, drop
        for mistake, says in [("scale", "not scaled by N/|B|"), ("mean", "averages the p shard gradients")]:
            v = verdict(p, **{mistake: mistake == "mean"})
            assert v is None or (p == 1 and mistake == "mean") or says in v, (mistake, v)
        rolled = verdict(p, rolled=True)
        assert rolled is None or (p < 3 and rolled == "passed") or "ranks disagree" in rolled, rolled
        if comm.Get_rank() == 0:
            print(f"p={p}: step passes; dropped remainder, no N/|B|, mean caught; rank-dependent order: {rolled}",
                  flush=True)


if __name__ == "__main__":
    mpi_main(main)
