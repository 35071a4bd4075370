"""Under mpiexec -n p (p >= 2): a ping-pong, its alpha-beta fit, and the same numbers on every rank."""

import numpy as np
from mpi4py import MPI

from ppu_lab import collectives as C
from ppu_lab.mpi import mpi_main


def main():
    comm = MPI.COMM_WORLD
    sizes, secs = C.pingpong(sizes=[8, 1024, 65_536, 1 << 20], comm=comm, repeat=5)
    assert (secs > 0).all() and np.isfinite(secs).all()
    # rank 0's numbers reach every rank
    allsecs = comm.allgather(secs)
    assert all(np.array_equal(s, allsecs[0]) for s in allsecs)
    model = C.fit_alpha_beta(sizes, secs)
    # A MiB takes longer than 8 bytes (best of 5 rounds: load on the machine cannot reverse that),
    # and the fitted line describes the largest message within a factor of 2.
    assert secs[-1] > secs[0], secs
    ratio = model.send(sizes[-1]) / secs[-1]
    assert 0.5 < ratio < 2, (ratio, sizes, secs, model)
    # MPI's own reduction: a positive number of seconds per byte, far below a microsecond per kilobyte
    gamma = C.measure_gamma(nbytes=1 << 16, repeat=5)
    assert 0 < gamma < 1e-9, gamma
    if comm.Get_rank() == 0:
        print(f"OK alpha={model.alpha:.3e} beta={model.beta:.3e} model/measured at 1 MiB={ratio:.2f}")


if __name__ == "__main__":
    mpi_main(main)
