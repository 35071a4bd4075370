"""Under mpiexec: both data-parallel designs give serial SGD's weights (float64, within 1e-10).

Usage: mpiexec -n P python tests/mpi/ridge_exact.py [N D BATCH EPOCHS]
Runs sgd_scatter_allgather and sgd_allreduce on the same problem and seed as ridge.sgd,
(with a 1/t step-size decay) asserts max |w_p - w_serial| <= 1e-10 on every rank, the same history of J, and that all
ranks end with the same weights. Prints one line per design on rank 0.
"""

import sys

import numpy as np

from ppu_lab import ridge
from ppu_lab.data import make_ridge_data
from ppu_lab.mpi import mpi_main, world
from ppu_lab.parallel import DESIGNS

TOL = 1e-10


def main():
    comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    n, d, batch, epochs = (int(a) for a in sys.argv[1:5]) if len(sys.argv) > 4 else (301, 7, 20, 3)
    X, y, _ = make_ridge_data(n, d, seed=1)                  # the same data on every rank
    lam, lr = 0.5, 0.2 / ridge.lipschitz(X, 0.5)
    serial = ridge.sgd(X, y, lam, lr, batch, epochs, seed=3, lr_decay=0.5)
    for name, sgd in DESIGNS.items():
        mine = (X, y) if name == "allreduce" or rank == 0 else (None, None)
        res = sgd(*mine, lam, lr, batch, epochs, seed=3, comm=comm, lr_decay=0.5)
        err = float(np.max(np.abs(res.w - serial.w)))
        assert err <= TOL, f"{name} on {size} ranks: max |w_p - w_serial| = {err:.3g} > {TOL}"
        J_err = np.max(np.abs(np.array(res.history["J"]) - serial.history["J"]) / serial.history["J"][0])
        assert res.history["epoch"] == serial.history["epoch"], res.history["epoch"]
        assert J_err <= TOL, f"{name}: history J differs from serial by {J_err:.3g} (relative)"
        spread = comm.allreduce(float(np.max(np.abs(res.w - comm.bcast(res.w, root=0)))), op=max)
        assert spread <= TOL, f"{name}: ranks disagree on w by {spread:.3g}"
        assert res.compute.size == res.comm.size == epochs * -(-n // batch)
        if rank == 0:
            t = res.step_times()
            print(f"{name} p={size} n={n} d={d} B={batch}: max|w_p - w_serial| = {err:.2e}, "
                  f"rank spread {spread:.1e}, step compute {t['compute'] * 1e6:.0f} us, comm {t['comm'] * 1e6:.0f} us")


if __name__ == "__main__":
    mpi_main(main)
