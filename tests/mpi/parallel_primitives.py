"""Under mpiexec: check_all and check_everywhere raise on every rank, allreduce_sum sums in place.

Usage: mpiexec -n N python tests/mpi/parallel_primitives.py
"""

import numpy as np

from ppu_lab.mpi import RankError, allreduce_sum, check_all, check_everywhere, mpi_main, shard_bounds, world


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

    check_everywhere_raises_the_right_error(comm, rank, size)
    lo, hi = shard_bounds(10, size, rank)
    n = np.array([hi - lo], dtype=np.int64)
    allreduce_sum(n, comm)
    assert n[0] == 10
    if rank == 0:
        print(f"primitives ok on {size} ranks")


class InputError(RankError, ValueError):
    pass


def raises(fn, comm, **kw):
    """The exception check_everywhere raised here (it must raise on every rank)."""
    try:
        check_everywhere(fn, comm, **kw)
    except RankError as exc:
        return exc
    raise AssertionError("check_everywhere did not raise on this rank")


def check_everywhere_raises_the_right_error(comm, rank, size):
    last = size - 1

    def bad_value():
        if rank == last:
            raise ValueError("batch too small")

    def crash():
        if rank == last:
            raise OSError("disk gone")

    assert check_everywhere(lambda: rank * 10, comm) == rank * 10
    assert check_everywhere(lambda: rank + 5, comm, only_root=True) == 5  # rank 0's value, everywhere
    exc = raises(bad_value, comm, input_error=InputError)  # only bad input: the input error
    assert type(exc) is InputError and exc.failures == {last: "batch too small"}, (type(exc), exc.failures)
    exc = raises(crash, comm, input_error=InputError)  # anything else: the general error, typed
    assert type(exc) is RankError and exc.failures == {last: "OSError: disk gone"}, (type(exc), exc.failures)
    exc = raises(lambda: 1 / 0, comm, input_error=InputError, only_root=True)  # rank 0 alone ran it
    assert type(exc) is RankError and list(exc.failures) == [0], exc.failures


if __name__ == "__main__":
    mpi_main(main)
