"""Under mpiexec: time_steps on the first p ranks (comm.Split) for p = 1..P equals serial SGD.

Usage: mpiexec -n P python tests/mpi/parallel_scaling.py [N D BATCH EPOCHS]
Rank 0 prints one line per (design, p) with max |w_p - w_serial| and the median step times.
"""

import sys

import numpy as np

from ppu_lab import ridge
from ppu_lab.data import make_ridge_data
from ppu_lab.mpi import mpi_main, world
from ppu_lab.parallel import DESIGNS, time_steps


def main():
    comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    n, d, batch, epochs = (int(a) for a in sys.argv[1:5]) if len(sys.argv) > 4 else (400, 6, 31, 2)
    X, y, _ = make_ridge_data(n, d, seed=2)
    lam, lr = 0.1, 0.5 / ridge.lipschitz(X, 0.1)
    serial = ridge.sgd(X, y, lam, lr, batch, epochs, seed=5)
    for design in DESIGNS:
        for p in range(1, size + 1):
            out = time_steps(design, p, X, y, lam, lr, batch, epochs, seed=5, comm=comm)
            assert (out is None) == (rank >= p), (rank, p, out)
            if out is None:
                continue
            err = float(np.max(np.abs(out["w"] - serial.w)))
            assert err <= 1e-10, f"{design} on the first {p} ranks: max |w_p - w_serial| = {err:.3g}"
            assert 0 < out["update"] < out["compute"] and 0 < out["comm"] and out["total"] > 0, out
            if rank == 0:
                print(f"{design} p={p}: max|w_p - w_serial| = {err:.1e}, step compute "
                      f"{out['compute'] * 1e6:.0f} us, comm {out['comm'] * 1e6:.0f} us")


if __name__ == "__main__":
    mpi_main(main)
