"""Method 1 (threads): parallel equals serial, bad input is refused, no thread outlives a call."""

from __future__ import annotations

import sys
import threading
import time
import traceback

import numpy as np
import pytest

from ppu_lab import ridge, threads
from ppu_lab.mpiexec import usable_cores
from ppu_lab.data import make_ridge_data


def _ours_alive():
    return [t.name for t in threading.enumerate() if t.name.startswith(threads.THREAD_PREFIX)]


@pytest.fixture
def problem():
    X, y, _ = make_ridge_data(203, 5, seed=1)      # 203 rows: batch 37 leaves a last batch of 18
    return X, y


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("fn", [threads.data_gradient_python, threads.data_gradient_matmul])
def test_gradient_variants_equal_ridge_data_gradient(fn):
    rng = np.random.default_rng(0)
    X, y, w = rng.standard_normal((57, 7)), rng.standard_normal(57), rng.standard_normal(7)
    np.testing.assert_allclose(fn(w, X, y), ridge.data_gradient(w, X, y), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(fn(w, X[:0], y[:0]), np.zeros(7))     # empty shard gives zeros


def test_matmul_variant_gives_the_same_bits_on_contiguous_shards():
    # notebook 02 compares @ with the np.dot of ridge.data_gradient: same numbers, different GIL behaviour
    rng = np.random.default_rng(1)
    X, y, w = rng.standard_normal((3001, 50)), rng.standard_normal(3001), rng.standard_normal(50)
    for rows in (slice(None), slice(1000, 2001), rng.permutation(3001)[:517]):
        np.testing.assert_array_equal(threads.data_gradient_matmul(w, X[rows], y[rows]),
                                      ridge.data_gradient(w, X[rows], y[rows]))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_threaded_gradient_equals_serial_for_uneven_shards(k):
    rng = np.random.default_rng(k)
    X, y, w = rng.standard_normal((50, 4)), rng.standard_normal(50), rng.standard_normal(4)
    rows = rng.permutation(50)[:23]                                      # 23 rows: uneven for k > 1
    with threads._executor(k) as pool:
        whole = threads.threaded_data_gradient(w, X, y, pool, k)
        batch = threads.threaded_data_gradient(w, X, y, pool, k, rows=rows)
    np.testing.assert_allclose(whole, ridge.data_gradient(w, X, y), rtol=0, atol=1e-12)
    np.testing.assert_allclose(batch, ridge.data_gradient(w, X[rows], y[rows]), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- synchronous SGD
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sgd_threads_equals_serial_sgd(problem, k):
    X, y = problem
    serial = ridge.sgd(X, y, lam=0.1, lr=1e-3, batch_size=37, epochs=6, seed=3)
    par = threads.sgd_threads(X, y, lam=0.1, lr=1e-3, batch_size=37, epochs=6, seed=3, n_threads=k)
    np.testing.assert_allclose(par.w, serial.w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(par.history["J"], serial.history["J"], rtol=1e-12)
    assert par.history["epoch"] == serial.history["epoch"]
    assert par.history["updates"][-1] == 6 * 6                        # ceil(203 / 37) = 6 steps per epoch
    assert np.linalg.norm(serial.w) > 0.1                              # it did move


def test_sgd_threads_with_pure_python_gradient_equals_serial(problem):
    X, y = problem
    serial = ridge.sgd(X, y, 0.1, 1e-3, 37, 3, seed=5, lr_decay=0.5)
    par = threads.sgd_threads(X, y, 0.1, 1e-3, 37, 3, seed=5, n_threads=2, lr_decay=0.5,
                              grad_fn=threads.data_gradient_python)
    np.testing.assert_allclose(par.w, serial.w, rtol=0, atol=1e-12)


def test_sgd_threads_reuses_one_executor_for_all_steps(problem):
    X, y = problem
    seen = set()

    def grad(w, Xs, ys):
        seen.add(threading.current_thread())                           # the Thread objects stay alive here
        return ridge.data_gradient(w, Xs, ys)

    threads.sgd_threads(X, y, 0.1, 1e-3, 10, 3, n_threads=3, grad_fn=grad)   # 63 steps x 3 shards
    assert 1 <= len(seen) <= 3
    assert all(t.name.startswith(threads.THREAD_PREFIX) for t in seen)
    assert not any(t.is_alive() for t in seen) and _ours_alive() == []


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("k, match", [(0, "n_threads.*>= 1"), (-2, "n_threads.*>= 1"), (2.5, "n_threads.*integer"),
                                      (True, "n_threads.*integer"), (38, "must not exceed the minibatch size")])
def test_bad_thread_counts_are_refused(problem, k, match):
    X, y = problem
    with pytest.raises(ValueError, match=match):
        threads.sgd_threads(X, y, 0.1, 1e-3, 37, 1, n_threads=k)


@pytest.mark.parametrize("fn", [None, 3, "data_gradient"])
def test_non_callable_gradient_is_refused(problem, fn):
    X, y = problem
    with pytest.raises(ValueError, match="grad_fn must be a callable"):
        threads.sgd_threads(X, y, 0.1, 1e-3, 37, 1, grad_fn=fn)
    with pytest.raises(ValueError, match="grad_fn must be a callable"):
        threads.hogwild(X, y, 0.1, 1e-3, 8, 1, grad_fn=fn)


def test_hogwild_bad_input(problem):
    X, y = problem
    with pytest.raises(ValueError, match="n_threads"):
        threads.hogwild(X, y, 0.1, 1e-3, 8, 1, n_threads=0)
    with pytest.raises(ValueError, match="rows each thread holds"):
        threads.hogwild(X, y, 0.1, 1e-3, 80, 1, n_threads=3)           # 203 // 3 = 67 rows per thread
    with pytest.raises(ValueError, match="snapshots"):
        threads.hogwild(X, y, 0.1, 1e-3, 8, 1, snapshots=0)


# --------------------------------------------------------------------------- errors in workers
def _failing_gradient(w, X, y):
    if threading.current_thread().name.startswith(threads.THREAD_PREFIX):
        raise RuntimeError("shard gradient failed in a worker thread")
    return ridge.data_gradient(w, X, y)


@pytest.mark.parametrize("run", [
    lambda X, y: threads.sgd_threads(X, y, 0.1, 1e-3, 37, 2, n_threads=3, grad_fn=_failing_gradient),
    lambda X, y: threads.hogwild(X, y, 0.1, 1e-3, 8, 2, n_threads=2, grad_fn=_failing_gradient),
    lambda X, y: threads.hogwild(X, y, 0.1, 1e-3, 8, 2, n_threads=2, lock=True, grad_fn=_failing_gradient),
], ids=["sync", "hogwild", "locked"])
def test_worker_exception_reaches_caller_with_traceback_and_no_thread_survives(problem, run):
    X, y = problem
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="failed in a worker thread") as info:
        run(X, y)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "_failing_gradient" in frames                               # the worker's frame is in the traceback
    assert _ours_alive() == [] and threading.active_count() == before


# --------------------------------------------------------------------------- Hogwild!
@pytest.fixture(scope="module")
def big():
    X, y, _ = make_ridge_data(4000, 10, seed=2)
    lam = 1.0
    J_star = ridge.objective(ridge.closed_form(X, y, lam), X, y, lam)
    return X, y, lam, 0.2 / ridge.lipschitz(X, lam), J_star


@pytest.mark.parametrize("lock", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_hogwild_converges_and_counts_every_update(big, lock, k):
    X, y, lam, lr, J_star = big
    res = threads.hogwild(X, y, lam, lr, batch_size=16, epochs=3, n_threads=k, lock=lock)
    shard_rows = [hi - lo for lo, hi in (threads.shard_bounds(4000, k, t) for t in range(k))]
    assert res.updates == 3 * sum(-(-r // 16) for r in shard_rows)
    h = res.history
    assert h["updates"][0] == 0 and h["updates"][-1] == res.updates and len(h["J"]) >= 50
    assert np.all(np.diff(h["time"]) >= 0) and np.all(np.diff(h["updates"]) >= 0)
    gap0, gap = h["J"][0] - J_star, h["J"][-1] - J_star
    assert gap < 1e-3 * gap0                                           # within 0.1 % of the way to J*
    assert res.throughput > 0 and _ours_alive() == []


def test_hogwild_one_thread_is_reproducible(big):
    X, y, lam, lr, _ = big
    a = threads.hogwild(X, y, lam, lr, 16, 2, n_threads=1, seed=4)
    b = threads.hogwild(X, y, lam, lr, 16, 2, n_threads=1, seed=4)
    np.testing.assert_array_equal(a.w, b.w)                           # no other thread, no race


def test_hogwild_reports_divergence(big):
    X, y, lam, lr, _ = big
    with pytest.raises(ridge.DivergenceError, match="lr"):
        threads.hogwild(X, y, lam, 50 * lr, 16, 3, n_threads=2)


# --------------------------------------------------------------------------- the GIL, measured
def test_gil_report_matches_the_interpreter():
    rep = threads.gil_report()
    expected = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    assert rep["gil_enabled"] == expected and rep["cpus"] == usable_cores()
    assert rep["python"] == sys.version.split()[0]


def _busy_python(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_gil_free_fraction_tells_a_gil_holder_from_a_gil_releaser():
    # 2 ms of bytecode is shorter than the 5 ms switch interval: the counter thread cannot run.
    held = threads.gil_free_fraction(_busy_python, 0.002, repeat=7)
    free = threads.gil_free_fraction(time.sleep, 0.004, repeat=7)   # sleeping releases the GIL
    assert held < 0.3 < free
    assert _ours_alive() == []


def test_time_threads_and_break_even_measure_every_setting():
    rng = np.random.default_rng(0)
    X, y, w = rng.standard_normal((400, 8)), rng.standard_normal(400), rng.standard_normal(8)
    t = threads.time_threads(ridge.data_gradient, w, X, y, threads=(1, 2, 4), repeat=2)
    assert t.shape == (3,) and np.all(np.isfinite(t))
    be = threads.break_even([64, 8, 512], d=4, n_threads=2, repeat=2)
    assert list(be.batch_sizes) == [8, 64, 512] and be.serial.shape == be.threaded.shape == (3,)
    assert np.all(np.isfinite(be.serial)) and np.all(np.isfinite(be.threaded))
    assert _ours_alive() == []
    with pytest.raises(ValueError, match="n_threads"):
        threads.time_threads(ridge.data_gradient, w, X, y, threads=(0,))


def test_break_even_is_the_size_from_which_threads_stay_faster():
    be = threads.BreakEven(np.array([10, 100, 1000, 10000]), serial=np.array([1.0, 2, 3, 4]),
                           threaded=np.array([2.0, 1, 4, 3]), n_threads=2)
    assert be.batch == 10000                                           # 100 was faster, but 1000 was not
    be.threaded = np.array([2.0, 3, 4, 5])
    assert be.batch is None
