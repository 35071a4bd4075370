"""Under mpiexec -n p: the three sums of ppu_lab.collectives equal the serial sum on every rank; every
collective of the lab is timed."""

import numpy as np
from mpi4py import MPI

from ppu_lab import collectives as C
from ppu_lab.mpi import mpi_main


def main():
    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    for n, dtype in [(1, np.float64), (7, np.float64), (1000, np.float32), (28_938, np.float32)]:
        # every rank can build every rank's vector: the serial answer is known everywhere
        everyone = np.stack([np.random.default_rng(100 + r).standard_normal(n).astype(dtype) for r in range(p)])
        serial = everyone.astype(np.float64).sum(axis=0)
        tol = dict(rtol=1e-5, atol=1e-5 * p) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
        mine = everyone[rank].copy()
        np.testing.assert_allclose(C.sum_by_allreduce(mine, comm), serial, **tol)
        np.testing.assert_array_equal(mine, everyone[rank])  # input untouched
        got = C.sum_by_allgather(mine, comm)
        np.testing.assert_allclose(got, serial, **tol)
        np.testing.assert_array_equal(mine, everyone[rank])  # input untouched
        rows, out = np.empty((p, n), dtype=dtype), np.empty(n, dtype=dtype)
        assert C.sum_by_allgather(mine, comm, gathered=rows, out=out) is out
        np.testing.assert_allclose(out, serial, **tol)
        np.testing.assert_array_equal(rows, everyone)  # every rank's row, on every rank
        inplace = mine.copy()
        C.sum_by_allgather(inplace, comm, gathered=rows, out=inplace)  # out may be x (train does this)
        np.testing.assert_allclose(inplace, serial, **tol)
        np.testing.assert_allclose(C.sum_by_pickled_allreduce(mine, comm), serial, **tol)
        out = np.empty_like(mine)
        assert C.sum_by_allreduce(mine, comm, out=out) is out
    if p >= 2:
        rows = C.compare_collectives([10, 1000], comm=comm, repeat=1, number=1)
        names = list(C.costmodel.COLLECTIVES)
        assert [(r["n"], r["collective"]) for r in rows] == [(n, k) for n in (10, 1000) for k in names]
        assert all(r["ranks"] == p and r["seconds"] > 0 for r in rows)
        over = C.compare_collectives_over_ranks([100], ranks=range(2, p + 1), comm=comm, repeat=1, number=1,
                                                only=["Allreduce"])
        if rank == 0:
            assert [r["ranks"] for r in over] == list(range(2, p + 1))
        else:
            assert over is None
    else:
        try:
            C.compare_collectives([10], comm=comm)
        except ValueError as exc:
            assert "at least 2 ranks" in str(exc)
        else:
            raise AssertionError("no ValueError on 1 rank")
    b = C.compare_bcast([5, 5000], comm=comm, repeat=1)  # checks the broadcast values itself
    assert [r["n"] for r in b] == [5, 5000] and all(r["bcast"] > 0 and r["Bcast"] > 0 for r in b)
    if rank == 0:
        print(f"OK sums on {p} ranks")


if __name__ == "__main__":
    mpi_main(main)
