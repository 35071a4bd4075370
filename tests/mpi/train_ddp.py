"""Under mpiexec: DistributedDataParallel (gloo) trains the same CNN, batch and step as ppu_lab's train().

Usage: mpiexec -n N python tests/mpi/train_ddp.py MNIST_ROOT

Prints "ddp max relative difference X" on rank 0; tests/test_train.py checks X against CNN_RTOL.
Also asserts that neither trainer moved NumPy's or torch's global random generators on any rank.
"""

import sys

import numpy as np
import torch

from ppu_lab.data import load_mnist
from ppu_lab.ddp import init_from_mpi, shutdown, train_ddp
from ppu_lab.mpi import mpi_main, world
from ppu_lab.train import train


def main():
    comm = world()
    x_tr, y_tr, x_te, y_te = load_mnist(sys.argv[1], download=False)
    data = (x_tr[:640], y_tr[:640], x_te[:300], y_te[:300])
    rank, size = init_from_mpi(comm)
    assert (rank, size) == (comm.Get_rank(), comm.Get_size())
    np.random.seed(100 + rank)  # each rank its own global streams: training must not depend on them
    torch.manual_seed(200 + rank)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    ours = train("cnn", data, batch_size=64, comm=comm, progress=False)
    theirs = train_ddp(data, batch_size=64, comm=comm, progress=False)
    shutdown()
    assert np.array_equal(np.random.get_state()[1], np_state), f"rank {rank}: np.random moved"
    assert torch.equal(torch.get_rng_state(), torch_state), f"rank {rank}: torch's generator moved"
    diff = np.abs(ours.params - theirs.params).max() / np.abs(ours.params).max()
    same = comm.allgather(theirs.params)
    if rank == 0:
        assert all(np.array_equal(p, same[0]) for p in same), "DDP ranks differ"
        print(f"ddp max relative difference {diff:.3e}")
        print(f"accuracy ppu_lab {ours.history[-1]['test_accuracy']:.4f} DDP {theirs.history[-1]['test_accuracy']:.4f}")


if __name__ == "__main__":
    mpi_main(main)
