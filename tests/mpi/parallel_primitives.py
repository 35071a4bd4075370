"""Under mpiexec: check_all raises RankError on every rank, allreduce_sum sums in place.

Usage: mpiexec -n N python tests/mpi/parallel_primitives.py
"""

import numpy as np

from ppu_lab.mpi import RankError, allreduce_sum, check_all, mpi_main, shard_bounds, world


def main():
    comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()

    buf = np.full(5, float(rank + 1))
    allreduce_sum(buf, comm)
    assert np.all(buf == size * (size + 1) / 2), buf

    check_all(True, "unused", comm)  # all ok: no exception
    try:
        check_all(rank != size - 1, f"bad input on rank {rank}", comm)
    except RankError as exc:
        assert exc.failures == {size - 1: f"bad input on rank {size - 1}"}, exc.failures
        assert f"rank {size - 1}: bad input" in str(exc), str(exc)
    else:
        raise AssertionError("check_all did not raise on every rank")

    lo, hi = shard_bounds(10, size, rank)
    n = np.array([hi - lo], dtype=np.int64)
    allreduce_sum(n, comm)
    assert n[0] == 10
    if rank == 0:
        print(f"primitives ok on {size} ranks")


if __name__ == "__main__":
    mpi_main(main)
