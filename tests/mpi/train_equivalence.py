"""Under mpiexec: train() on this many ranks; rank 0 saves the parameters of several runs.

Usage: mpiexec -n N python tests/mpi/train_equivalence.py MNIST_ROOT OUT.npz

Runs (names in OUT.npz): ANN and CNN with the Allreduce design (global batch), the ANN with the
Scatter+Allgather design, and the ANN with a per-rank batch, with their per-step losses and per-image
test results. Also asserts that every rank ends with bit-identical parameters, history and per-image results. tests/test_train.py compares the files with serial training.
"""

import sys

import numpy as np

from ppu_lab.data import load_mnist
from ppu_lab.mpi import mpi_main, world
from ppu_lab.train import train

# Small slices of the sample keep the test fast; see tests/test_train.py for the same settings.
RUNS = {
    "ann_allreduce": dict(model="ann", hidden=20, batch_size=100, epochs=2, n=1000),
    "ann_scatter": dict(model="ann", hidden=20, batch_size=100, epochs=2, n=1000, design="scatter_allgather"),
    "ann_per_rank": dict(model="ann", hidden=20, batch_size=50, batch_mode="per_rank", epochs=1, n=1000),
    "cnn_allreduce": dict(model="cnn", batch_size=64, epochs=1, n=640),
    "cnn_scatter": dict(model="cnn", batch_size=64, epochs=1, n=320, design="scatter_allgather"),
}


def main():
    comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    x_tr, y_tr, x_te, y_te = load_mnist(sys.argv[1], download=False)
    saved = {}
    for name, cfg in RUNS.items():
        cfg = dict(cfg)
        n = cfg.pop("n")
        res = train(data=(x_tr[:n], y_tr[:n], x_te[:300], y_te[:300]), comm=comm, progress=False, **cfg)
        # every rank must hold exactly the same parameters and accuracies
        allp = comm.gather(res.params, root=0)
        accs = comm.gather([h["test_accuracy"] for h in res.history], root=0)
        correct = comm.gather(res.test_correct, root=0)
        if rank == 0:
            assert all(np.array_equal(p, allp[0]) for p in allp), f"{name}: ranks differ"
            assert all(a == accs[0] for a in accs), f"{name}: accuracies differ across ranks {accs}"
            assert all(np.array_equal(c, correct[0]) for c in correct), f"{name}: per-image results differ"
            saved[name] = res.params
            saved[name + "_step_loss"] = np.array(res.step_loss)
            saved[name + "_correct"] = res.test_correct
            saved[name + "_acc"] = np.array(accs[0])
            saved[name + "_global_batch"] = np.array(res.summary()["global_batch"])
    if rank == 0:
        np.savez(sys.argv[2], **saved)
        print(f"train_equivalence ok on {size} ranks")


if __name__ == "__main__":
    mpi_main(main)
