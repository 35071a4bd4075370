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
    assert model.alpha > 0 and model.beta > 0
    # (no assertion on the measured times themselves: on a loaded machine any one can be slow)
    assert model.send(1 << 20) > model.send(8) > 0
    if comm.Get_rank() == 0:
        print(f"OK alpha={model.alpha:.3e} beta={model.beta:.3e}")


if __name__ == "__main__":
    mpi_main(main)
