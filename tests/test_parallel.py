"""ppu_lab.parallel: shard splitting (no MPI), collective checks and data-parallel ridge SGD under mpiexec."""

from __future__ import annotations


import numpy as np
import pytest

from ppu_lab import ridge
from ppu_lab.mpi import RankError, shard_bounds, shard_counts
from ppu_lab.parallel import NonFiniteGradientError, ParallelSGDResult, RankInputError


# --------------------------------------------------------------------------- shard_bounds, no MPI
@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 11, 100, 101])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_shard_bounds_cover_all_rows_once_and_balanced(n, size):
    bounds = [shard_bounds(n, size, r) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (lo, hi), (lo2, _) in zip(bounds, bounds[1:]):
        assert hi == lo2  # contiguous, no gap, no overlap
    sizes = [hi - lo for lo, hi in bounds]
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the extra rows go to the first ranks
    assert list(shard_counts(n, size)) == sizes


def test_shard_bounds_uneven_example():
    assert [shard_bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]


def test_shard_bounds_more_ranks_than_rows_gives_empty_shards():
    assert [shard_bounds(2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]


@pytest.mark.parametrize("args, word", [((-1, 2, 0), "n"), ((5, 0, 0), "size"), ((5, 2, 2), "rank"),
                                        ((5.5, 2, 0), "n")])
def test_shard_bounds_bad_input_names_argument(args, word):
    with pytest.raises(ValueError, match=word):
        shard_bounds(*args)


def test_rank_error_message_names_ranks():
    err = RankError({2: "NaN in X", 0: "bad lr"})
    assert list(err.failures) == [0, 2]
    assert "rank 0: bad lr" in str(err) and "rank 2: NaN in X" in str(err)


def test_rank_errors_are_also_the_errors_serial_code_raises():
    """Bad input is a ValueError and a non-finite gradient a DivergenceError, as in ridge.sgd."""
    assert isinstance(RankInputError({1: "X contains NaN"}, 3), ValueError)
    err = NonFiniteGradientError({1: "not finite"}, 2, "epoch 1, step 4")
    assert isinstance(err, ridge.DivergenceError) and isinstance(err, RankError)
    assert "1 of 2 rank(s) failed: rank 1: not finite (at epoch 1, step 4)" in str(err)
    assert "smaller lr" in str(err)


def test_step_times_are_medians_per_step():
    res = ParallelSGDResult(w=np.zeros(2), compute=np.array([1.0, 3.0, 2.0]), comm=np.array([0.5, 0.1, 0.2]),
                            update=np.array([0.1, 0.3, 0.2]))
    assert isinstance(res, ridge.SGDResult)
    assert res.step_times() == {"compute": 2.0, "update": 0.2, "comm": 0.2, "total": 2.2}


# --------------------------------------------------------------------------- primitives under mpiexec
@pytest.mark.parametrize("n", [1, 2, 3])
def test_check_all_and_allreduce_sum(mpirun, n):
    proc = mpirun(n, "parallel_primitives.py", timeout=60)
    assert f"primitives ok on {n} ranks" in proc.stdout


def test_mpi_main_aborts_job_when_one_rank_raises(mpirun):
    proc = mpirun(3, "parallel_abort.py", 1, timeout=20, check=False)  # a hang would fail at the timeout
    assert proc.returncode != 0
    assert "rank 1: RuntimeError: injected failure before the barrier" in proc.stderr


# --------------------------------------------------------------------------- ridge SGD under mpiexec
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_both_designs_equal_serial_sgd(mpirun, n):
    """p ranks, global batch 20 (not divisible by 3; last batch of 1 row leaves ranks empty): serial's weights."""
    proc = mpirun(n, "ridge_exact.py", 301, 7, 20, 3, timeout=90)
    for design in ("scatter_allgather", "allreduce"):
        assert f"{design} p={n} n=301 d=7 B=20: max|w_p - w_serial|" in proc.stdout, proc.stdout


@pytest.mark.parametrize("n", [2, 3])
def test_both_designs_equal_serial_sgd_odd_batch(mpirun, n):
    """Batch 7 over 2 or 3 ranks: shards of 4+3 or 3+2+2 rows, weighted by the global batch size."""
    proc = mpirun(n, "ridge_exact.py", 150, 5, 7, 2, timeout=90)
    assert proc.stdout.count("max|w_p - w_serial|") == 2, proc.stdout


@pytest.mark.parametrize("mode, n", [("small_batch", 2), ("small_batch", 3), ("nan_data", 3), ("bad_arg", 2),
                                     ("nan_step", 2), ("nan_step", 3), ("raise_step", 3),
                                     ("diverge", 2), ("overflow", 3)])
def test_failure_on_one_rank_raises_on_every_rank(mpirun, mode, n):
    """Bad input or a failing step on one rank, or divergence: every rank raises the same error, within seconds.

    The script asserts the exception type and message on every rank (diverge: ridge.sgd's message).
    """
    proc = mpirun(n, "ridge_errors.py", mode, timeout=30)  # a rank left waiting would fail at the timeout
    assert proc.stdout.count("caught ") == 2, proc.stdout


@pytest.mark.parametrize("mode, n, text", [
    ("small_batch", 3, "batch_size=1 is smaller than the number of ranks (3)"),
    ("raise_step", 3, "rank 1: RuntimeError: injected failure in the shard gradient"),
    ("nan_step", 2, "rank 1: the gradient of this rank's shard"),
])
def test_uncaught_failure_ends_the_job_with_its_message(mpirun, mode, n, text):
    proc = mpirun(n, "ridge_errors.py", mode, "uncaught", timeout=20, check=False)
    assert proc.returncode != 0
    assert text in proc.stderr, proc.stderr


@pytest.mark.parametrize("n", [2, 3])
def test_time_steps_on_first_ranks_equals_serial(mpirun, n):
    """One job of n ranks runs both designs on its first 1..n ranks (comm.Split): serial's weights each time."""
    proc = mpirun(n, "parallel_scaling.py", timeout=90)
    assert proc.stdout.count("max|w_p - w_serial|") == 2 * n, proc.stdout
