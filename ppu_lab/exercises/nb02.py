"""Checks of notebook 02's exercises: the sharded threaded gradient, and a pure-Python gradient (serial).

``sharded_mean_gradient(w, X, y, pool, k)``: the mean data gradient of the rows of X (what a
mean-loss framework calls the gradient), computed as k shards on a ThreadPoolExecutor, each task
returning its shard's mean (``shard_mean``, given in the notebook), combined weighted by shard size.
The check hands it a pool that counts the tasks, and compares with ``ridge.data_gradient / N``,
naming the mistakes: the plain average of the shard means (a bias when shards differ in size), their
sum, empty shards when there are more shards than rows, and work not given to the pool.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ppu_lab import ridge
from ppu_lab.data import make_ridge_data
from ppu_lab.exercises.core import Notebook, compare
from ppu_lab.mpi import shard_bounds

BOOK = Notebook("02_threads")
check, require = BOOK.check, BOOK.require


class CountingPool:
    """A ThreadPoolExecutor's ``submit`` and ``map``, counting the tasks and the threads that ran them."""

    def __init__(self, pool):
        self._pool, self.tasks, self.threads = pool, 0, set()

    def _counted(self, fn):
        def task(*args, **kwargs):
            self.threads.add(threading.get_ident())
            return fn(*args, **kwargs)
        return task

    def submit(self, fn, *args, **kwargs):
        self.tasks += 1
        return self._pool.submit(self._counted(fn), *args, **kwargs)

    def map(self, fn, *iterables, **kwargs):
        items = list(zip(*iterables))
        self.tasks += len(items)
        return self._pool.map(self._counted(fn), *zip(*items), **kwargs) if items else iter(())


def _shard_mean(w, X, y):
    return ridge.data_gradient(w, X, y) / len(y)


shard_ex = BOOK.exercise(
    "sharded_mean_gradient", points=2, time_limit=20, forbid=("data_gradient", "threaded_data_gradient"),
    hint="submit one task per shard (shard_bounds; never more shards than rows), then add the shard means "
         "weighted by their share of the rows, n_j / N: a plain average gives the rows of a small shard more weight.")


def _shard_case(n, d, k, seed):
    def run(fn):
        X, y, _ = make_ridge_data(n, d, noise=0.5, seed=seed)
        w = np.random.default_rng(seed).standard_normal(d)
        ref = ridge.data_gradient(w, X, y) / n
        shards = [shard_bounds(n, min(k, n), j) for j in range(min(k, n))]
        means = [_shard_mean(w, X[lo:hi], y[lo:hi]) for lo, hi in shards]
        with ThreadPoolExecutor(max_workers=2) as real:
            pool = CountingPool(real)
            with np.errstate(all="ignore"):
                got = fn(w, X, y, pool, k)
        if k > n and got is not None and not np.all(np.isfinite(np.asarray(got, dtype=float))):
            return (f"with {k} shards of {n} rows some shards are empty, and an empty shard's mean is NaN: "
                    "use at most N shards")
        msg = compare(got, ref, what="the gradient", rtol=1e-10, mistakes=[
            (np.mean(means, axis=0), "it is the plain average of the shard means: shards of different sizes must "
                                     "be weighted by their number of rows (n_j / N)"),
            (np.sum(means, axis=0), "it is the sum of the shard means: weight each by n_j / N"),
            (ridge.data_gradient(w, X, y), "it is the sum over the rows: the exercise asks for the mean")])
        if msg is None and pool.tasks != min(k, n):
            return (f"the gradient is right, but {pool.tasks} task(s) went to the pool for k = {k} shards of {n} rows: "
                    f"submit one task per shard ({min(k, n)})")
        return msg

    return run


shard_ex.case("1,000 rows in 4 shards")(_shard_case(1000, 6, 4, seed=1))
shard_ex.case("1,001 rows in 3 shards (334 + 334 + 333)")(_shard_case(1001, 5, 3, seed=2))
shard_ex.case("5 rows, 8 shards: more shards than rows", hidden=True)(_shard_case(5, 3, 8, seed=3))
shard_ex.case("10 rows, 1 shard", hidden=True)(_shard_case(10, 4, 1, seed=4))
shard_ex.case("7 rows in 2 shards: 4 + 3", hidden=True)(_shard_case(7, 2, 2, seed=5))


# --------------------------------------------------------------------------- exercise 2: pure Python
map_ex = BOOK.exercise(
    "gradient_python_map", points=1, time_limit=30, forbid=("data_gradient", "dot", "matmul"),
    hint="loop over the rows (X.tolist()); the residual r_i = y_i - sum(map(operator.mul, row, w)); "
         "the gradient adds -r_i x_i for every row.")


def _map_case(n, d, seed):
    def run(fn):
        X, y, _ = make_ridge_data(n, d, noise=0.5, seed=seed)
        w = np.random.default_rng(seed).standard_normal(d)
        ref = ridge.data_gradient(w, X, y)
        return compare(fn(w, X, y), ref, what="the gradient", rtol=1e-10,
                       mistakes=[(-ref, "the sign: d/dw 1/2 (y_i - w.x_i)^2 = -(y_i - w.x_i) x_i")])

    return run


map_ex.case("200 rows, 5 features")(_map_case(200, 5, seed=6))
map_ex.case("one row", hidden=True)(_map_case(1, 3, seed=7))
