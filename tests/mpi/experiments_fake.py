"""Under mpiexec: ppu_lab.experiments.run_grid with a fake, collective train function.

Usage: mpiexec -n N python tests/mpi/experiments_fake.py OUT [--ranks 1,2] [--batch-sizes 50,100]
       [--hang-on K] [--fail-size P --fail-rank R] [--abort-after S]

The fake train takes what ppu_lab.train.train takes (data, a TrainConfig, comm), checks that it runs
on a communicator of exactly ``ranks`` processes, does an Allreduce on it (so it is collective like
the real one) and returns a real TrainResult whose numbers are a known function of the
configuration. ``--hang-on K`` makes the K-th run (1-based, counted by this process) sleep for a
long time, so that a test can kill the job mid-grid.
``--fail-size P --fail-rank R`` makes rank R raise in every run on P ranks, while the other ranks
wait in a collective that it never joins.
"""

import argparse
import time

import numpy as np
from mpi4py import MPI

from ppu_lab.experiments import expand_grid, run_grid
from ppu_lab.mpi import mpi_main
from ppu_lab.train import TrainResult

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--ranks", default="1,2")
ap.add_argument("--batch-sizes", default="50,100")
ap.add_argument("--models", default="ann:10,cnn")
ap.add_argument("--hang-on", type=int, default=0)
ap.add_argument("--fail-size", type=int, default=0)
ap.add_argument("--fail-rank", type=int, default=0)
ap.add_argument("--abort-after", type=float, default=60.0)
args = ap.parse_args()
calls = [0]


def fake_accuracy(model, hidden, batch_size, ranks):
    return 0.9 - batch_size / 1000 - 0.01 * ranks + (0.05 if model == "cnn" else hidden / 1000)


def fake_train(data=None, config=None, *, comm=None, progress=True):
    """What run_grid calls in place of ppu_lab.train.train: the same signature and result type."""
    calls[0] += 1
    p = comm.Get_size()
    if calls[0] == args.hang_on:
        time.sleep(600)
    if p == args.fail_size and comm.Get_rank() == args.fail_rank:
        raise FloatingPointError(f"injected failure on rank {comm.Get_rank()}")
    total = np.array([1.0])
    comm.Allreduce(MPI.IN_PLACE, total)  # collective on the sub-communicator
    assert total[0] == p, "fake train ran on a communicator of the wrong size"
    hidden = config.hidden if config.model == "ann" else 0
    acc = fake_accuracy(config.model, hidden, config.batch_size, p)
    step = 1e-3 * config.batch_size / p
    hist = [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "test_accuracy": acc, "epoch_time": 10 * step,
             "complete": True} for e in range(config.epochs)]
    times = {"compute": [0.8 * step] * 10, "comm": [0.2 * step] * 10, "total": [step] * 10}
    return TrainResult(params=np.zeros(3), history=hist, step_times=times,
                       config=config.describe(p, len(data[1]), len(data[3])))


def main():
    grid = expand_grid(args.models.split(","), [int(r) for r in args.ranks.split(",")],
                       [int(b) for b in args.batch_sizes.split(",")], epochs=2)
    data = (np.zeros((400, 28, 28), np.float32), np.zeros(400, np.int64),
            np.zeros((100, 28, 28), np.float32), np.zeros(100, np.int64))
    run_grid(grid, args.out, data=data, train_fn=fake_train, abort_after=args.abort_after)


if __name__ == "__main__":
    mpi_main(main)
