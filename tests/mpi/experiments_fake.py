"""Under mpiexec: ppu_lab.experiments.run_grid with a fake, collective train function.

Usage: mpiexec -n N python tests/mpi/experiments_fake.py OUT [--ranks 1,2] [--batch-sizes 50,100]
       [--hang-on K] [--fail-size P --fail-rank R] [--abort-after S]

The fake train checks that it runs on a communicator of exactly ``ranks`` processes, does an
Allreduce on it (so it is collective like the real one) and returns a result whose numbers are
a known function of the configuration. ``--hang-on K`` makes the K-th run (1-based, counted by
this process) sleep for a long time, so that a test can kill the job mid-grid.
``--fail-size P --fail-rank R`` makes rank R raise in every run on P ranks, while the other ranks
wait in a collective that it never joins.
"""

import argparse
import time
from types import SimpleNamespace

import numpy as np
from mpi4py import MPI

from ppu_lab.experiments import expand_grid, run_grid
from ppu_lab.mpi import mpi_main

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


def fake_train(model, data, *, hidden=50, lam=5.0, lr=0.1, batch_size=100, batch_mode="global", epochs=1,
               design="allreduce", seed=0, comm=None, progress=True, max_steps=None):
    calls[0] += 1
    p = comm.Get_size()
    if calls[0] == args.hang_on:
        time.sleep(600)
    if p == args.fail_size and comm.Get_rank() == args.fail_rank:
        raise FloatingPointError(f"injected failure on rank {comm.Get_rank()}")
    total = np.array([1.0])
    comm.Allreduce(MPI.IN_PLACE, total)  # collective on the sub-communicator
    assert total[0] == p, "fake train ran on a communicator of the wrong size"
    hidden = hidden if model == "ann" else 0
    acc = fake_accuracy(model, hidden, batch_size, p)
    step = 1e-3 * batch_size / p
    hist = [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "test_accuracy": acc, "epoch_time": 10 * step}
            for e in range(epochs)]
    times = {"compute": [0.8 * step] * 10, "comm": [0.2 * step] * 10, "total": [step] * 10}
    summary = {"median_step_time": step, "epoch_time": 10 * step, "compute_time": 8 * step,
               "comm_time": 2 * step, "final_accuracy": acc, "steps": 10, "global_batch": batch_size, "ranks": p}
    return SimpleNamespace(history=hist, step_times=times, summary=lambda: summary)


def main():
    grid = expand_grid(args.models.split(","), [int(r) for r in args.ranks.split(",")],
                       [int(b) for b in args.batch_sizes.split(",")], epochs=2)
    data = (np.zeros((400, 28, 28), np.float32), np.zeros(400, np.int64),
            np.zeros((100, 28, 28), np.float32), np.zeros(100, np.int64))
    run_grid(grid, args.out, data=data, train_fn=fake_train, abort_after=args.abort_after)


if __name__ == "__main__":
    mpi_main(main)
