"""Under mpiexec: a NaN on ONE rank, and an exploding learning rate, stop EVERY rank with a clear error.

Usage: mpiexec -n N python tests/mpi/train_divergence.py MNIST_ROOT

Each rank prints "rank r caught: <message>" for each case and exits 0; a rank that hangs in a
collective makes the launching test time out instead.
"""

import sys

import numpy as np

from ppu_lab.data import load_mnist
from ppu_lab.mpi import mpi_main, world
from ppu_lab.ridge import DivergenceError
from ppu_lab.train import train


def main():
    comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    x_tr, y_tr, x_te, y_te = load_mnist(sys.argv[1], download=False)
    x_tr, y_tr = x_tr[:600].copy(), y_tr[:600]
    cases = {}
    # 1. the last rank's copy of the data holds a NaN image: only that rank computes NaN
    x_bad = x_tr.copy()
    if rank == size - 1:
        x_bad[:] = np.nan
    cases["nan_one_rank"] = dict(model="ann", data=(x_bad, y_tr, x_te[:100], y_te[:100]), batch_size=60)
    # 2. a learning rate far too large, on all ranks
    cases["lr_too_large"] = dict(model="ann", data=(x_tr, y_tr, x_te[:100], y_te[:100]), batch_size=60, lr=1e4)
    for name, kw in cases.items():
        try:
            train(comm=comm, progress=False, epochs=2, **kw)
        except DivergenceError as exc:
            print(f"rank {rank} caught {name}: {exc}", flush=True)
        else:
            raise AssertionError(f"{name}: train() did not raise DivergenceError on rank {rank}")
    comm.Barrier()


if __name__ == "__main__":
    mpi_main(main)
