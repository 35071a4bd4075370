"""Under mpiexec -n p: the three sums of ppu_lab.collectives equal the serial sum on every rank."""

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
        parts = everyone if rank == 0 else None
        np.testing.assert_allclose(C.sum_by_scatter_allgather(parts, comm), serial, **tol)
        rows, out = np.empty((p, n), dtype=dtype), np.empty(n, dtype=dtype)
        got = C.sum_by_scatter_allgather(parts, comm, rows=rows, out=out)
        assert got is out
        np.testing.assert_allclose(out, serial, **tol)
        np.testing.assert_allclose(C.sum_by_pickled_allreduce(mine, comm), serial, **tol)
        out = np.empty_like(mine)
        assert C.sum_by_allreduce(mine, comm, out=out) is out
    # root other than 0 (the last rank)
    everyone = np.arange(3 * p, dtype=np.float64).reshape(p, 3)
    got = C.sum_by_scatter_allgather(everyone if rank == p - 1 else None, comm, root=p - 1)
    np.testing.assert_array_equal(got, everyone.sum(axis=0))
    # a wrong shape on the root is a ValueError on every rank, not a hang
    try:
        C.sum_by_scatter_allgather(np.zeros((p + 1, 3)) if rank == 0 else None, comm)
    except ValueError as exc:
        assert "parts must have shape" in str(exc)
    else:
        raise AssertionError("no ValueError for parts of the wrong shape")
    rows = C.compare_sums([10, 1000], comm=comm, repeat=1, number=1)
    assert [r["n"] for r in rows] == [10, 1000] and all(r["ranks"] == p for r in rows)
    assert all(r[k] > 0 for r in rows for k in ("allreduce", "scatter_allgather", "pickled"))
    over = C.compare_sums_over_ranks([100], ranks=range(1, p + 1), comm=comm, repeat=1, number=1)
    if rank == 0:
        assert [r["ranks"] for r in over] == list(range(1, p + 1))
    else:
        assert over is None
    b = C.compare_bcast([5, 5000], comm=comm, repeat=1)  # checks the broadcast values itself
    assert [r["n"] for r in b] == [5, 5000] and all(r["bcast"] > 0 and r["Bcast"] > 0 for r in b)
    if rank == 0:
        print(f"OK sums on {p} ranks")


if __name__ == "__main__":
    mpi_main(main)
