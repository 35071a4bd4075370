"""How long a student waits: starting MPI engines, and recovering from a hung collective (notebook 03).

    python benchmarks/cluster_restart.py            # 2 engines, 5 restarts (about a minute)
    python benchmarks/cluster_restart.py -n 3 --repeat 3

Starts an MPICluster and times ``start()``; then, ``--repeat`` times, hangs the engines in a
mismatched collective (rank 0 in ``Bcast``, the others in ``Barrier``), lets ``cl.apply`` time out,
and times ``cl.restart()`` until the new engines answer. Prints every time and the medians, and the
ratio restart/start measured in the same run (timings on a shared machine are noisy; the ratio less so).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ppu_lab.cluster import ClusterTimeout, MPICluster  # noqa: E402


def mismatched():
    from mpi4py import MPI
    import numpy as np

    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 0:
        comm.Bcast(np.zeros(3), root=0)
    else:
        comm.Barrier()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2, help="engines (MPI ranks). Default: 2")
    ap.add_argument("--repeat", type=int, default=5, help="restarts to time. Default: 5")
    ap.add_argument("--starts", type=int, default=2, help="cluster starts to time. Default: 2")
    args = ap.parse_args(argv)
    starts, restarts = [], []
    for s in range(args.starts):
        t0 = time.perf_counter()
        cl = MPICluster(args.n).start()
        starts.append(time.perf_counter() - t0)
        try:
            for _ in range(args.repeat if s == 0 else 0):
                try:
                    cl.apply(mismatched, timeout=1)
                except ClusterTimeout:
                    pass
                t0 = time.perf_counter()
                cl.restart()
                assert cl.apply(lambda: 1) == [1] * args.n
                restarts.append(time.perf_counter() - t0)
        finally:
            cl.stop()
    print(f"start   (s): {' '.join(f'{t:.2f}' for t in starts)}   median {statistics.median(starts):.2f}")
    print(f"restart (s): {' '.join(f'{t:.2f}' for t in restarts)}   median {statistics.median(restarts):.2f}")
    print(f"restart / start (medians): {statistics.median(restarts) / statistics.median(starts):.2f}")


if __name__ == "__main__":
    main()
