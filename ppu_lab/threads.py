"""Method 1: parameter updates with threads, and what the GIL allows (notebook 02).

Three ways to use threads for SGD on the ridge objective of ``ppu_lab.ridge``:

- ``sgd_threads``   synchronous data parallelism: each minibatch is split into k shards,
                    k threads of one ``ThreadPoolExecutor`` compute ``data_gradient`` of
                    their shard, the shard sums are added and one update is applied. Same
                    seed, same weights as ``ridge.sgd`` (to rounding, ~1e-15).
- ``hogwild``       asynchronous SGD (Hogwild!, Niu et al. 2011): k threads each run SGD on
                    their own shard of the data and write into ONE shared NumPy vector,
                    without locks (``lock=False``) or with a lock around each update.
- ``time_threads``, ``break_even``: the GIL, measured. A pure-Python gradient
                    (``data_gradient_python``) holds the GIL and gains nothing from threads;
                    NumPy releases it inside its compiled kernels, so shards can overlap
                    (``np.dot`` in ``ridge.data_gradient`` does; ``data_gradient_matmul``,
                    the same maths with ``@``, holds it for part of the call).

Every threaded function reuses one executor per call and shuts it down (waiting for its
threads) before returning or raising; an exception in a worker reaches the caller with
the worker's frames in its traceback.
"""

from __future__ import annotations

import itertools
import os
import sys
import sysconfig
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from ppu_lab import ridge
from ppu_lab.checks import start_weights
from ppu_lab.config import limit_threads
from ppu_lab.mpi import shard_bounds
from ppu_lab.ridge import SGDResult, combine, data_gradient, minibatches, sgd_step
from ppu_lab.timing import Timer

THREAD_PREFIX = "ppu-lab-thread"          # name of every thread this module starts


# --------------------------------------------------------------------------- checks
def check_n_threads(n_threads, batch_size, what="the minibatch size"):
    """``n_threads`` as an int in [1, batch_size], or a ValueError saying what to do."""
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise ValueError(f"n_threads (k) must be an integer >= 1; got {n_threads!r}")
    if n_threads < 1:
        raise ValueError(f"n_threads (k) must be >= 1 (k = 1 is serial); got {n_threads}")
    if n_threads > batch_size:
        raise ValueError(f"n_threads (k={n_threads}) must not exceed {what} ({batch_size}): "
                         f"every thread needs at least one row; use k <= {batch_size} or a larger batch_size")
    return int(n_threads)


def check_grad_fn(grad_fn):
    """``grad_fn(w, X, y)`` must be callable and return the data gradient summed over the rows."""
    if not callable(grad_fn):
        raise ValueError(f"grad_fn must be a callable grad_fn(w, X, y) returning the summed data gradient "
                         f"(e.g. ppu_lab.ridge.data_gradient); got {type(grad_fn).__name__} {grad_fn!r}")
    return grad_fn


# --------------------------------------------------------------------------- gradients
def data_gradient_python(w, X, y):
    """``ridge.data_gradient`` written as a pure-Python loop: -sum_i (y_i - w.x_i) x_i.

    Every multiply-add is a Python bytecode, so the thread running it holds the GIL the
    whole time: two threads running it take turns, they never overlap.
    """
    ws = np.asarray(w, dtype=float).tolist()
    g = [0.0] * len(ws)
    for row, yi in zip(np.asarray(X, dtype=float).tolist(), np.asarray(y, dtype=float).tolist()):
        r = yi
        for xj, wj in zip(row, ws):
            r -= xj * wj
        for j, xj in enumerate(row):
            g[j] -= r * xj
    return np.array(g)


def data_gradient_matmul(w, X, y):
    """``ridge.data_gradient`` written with ``@`` instead of ``np.dot``: the same maths (bit for bit on contiguous arrays).

    Used only for the GIL lesson of notebook 02: on the NumPy of this lab (2.x) ``X.T @ r``
    holds the GIL for much of the call, while the ``np.dot`` of ``ridge.data_gradient``
    releases it (``gil_free_fraction``; see also numpy/numpy#11821), so threads running
    this variant overlap less.
    """
    return -(X.T @ (y - X @ w))                         # (d,)


# --------------------------------------------------------------------------- synchronous
def _executor(n_threads):
    return ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix=THREAD_PREFIX)


def _shard_gradient(grad_fn, w, X, y, rows):
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported once, by the caller
        return grad_fn(w, X[rows], y[rows])             # gathers its own shard: the copy runs in parallel too


def _gather(futures):
    """Results in submission order, once ALL futures are done; the first exception is re-raised."""
    wait(futures)
    return [f.result() for f in futures]


def threaded_data_gradient(w, X, y, executor, n_shards, grad_fn=data_gradient, rows=None):
    """Sum of ``grad_fn`` over ``n_shards`` shards of ``rows`` (default: all rows), one task per shard.

    ``rows`` is an index array (a minibatch) or None. Shards are contiguous pieces whose
    sizes differ by at most one; the shard sums are added in shard order, so the result
    is deterministic for a given ``n_shards``. Equals ``grad_fn(w, X[rows], y[rows])`` to
    rounding.
    """
    n = X.shape[0] if rows is None else len(rows)
    k = min(int(n_shards), n) or 1
    parts = []
    for r in range(k):
        lo, hi = shard_bounds(n, k, r)
        parts.append(slice(lo, hi) if rows is None else rows[lo:hi])
    grads = _gather([executor.submit(_shard_gradient, grad_fn, w, X, y, p) for p in parts])
    total = np.array(grads[0], dtype=float)             # (d,)
    for g in grads[1:]:
        total += g
    return total


def sgd_threads(X, y, lam, lr, batch_size, epochs, seed=0, n_threads=2, w0=None, *,
                lr_decay=0.0, grad_fn=data_gradient):
    """Minibatch SGD whose gradient is computed by ``n_threads`` threads (synchronous).

    Draws the same minibatches as ``ridge.sgd`` (``minibatches(n, batch_size, seed, epoch)``);
    each is split into ``n_threads`` shards (uneven when the batch does not divide), the
    threads of ONE executor (for the whole call) compute ``grad_fn`` of their shard, the
    sums are added, ``combine`` scales by N/|B| and adds lam*w, and ``sgd_step`` applies one
    update. For the same seed the weights equal ``ridge.sgd``'s to rounding error.

    Returns ``SGDResult(w, history)``; ``history`` has per epoch ``epoch``, ``J``, ``time``
    (seconds) and ``updates`` (steps so far). Raises ``ValueError`` for bad arguments
    (n_threads < 1 or > batch_size, non-callable grad_fn, ...) and ``ridge.DivergenceError``.
    """
    X, y = ridge.check_problem(X, y, lam)
    lam = float(lam)
    n, d = X.shape
    batch_size, epochs = ridge.check_sgd_args(n, lr, batch_size, epochs, seed=seed, lr_decay=lr_decay)
    k = check_n_threads(n_threads, batch_size)
    check_grad_fn(grad_fn)
    w = start_weights(w0, d)
    J0 = ridge.objective(w, X, y, lam)
    J_ref = max(J0, 0.5 * float(y @ y))                 # as ridge.sgd
    history = {"epoch": [0], "J": [J0], "time": [0.0], "updates": [0]}
    updates = 0
    start = time.perf_counter()
    with _executor(k) as pool, np.errstate(over="ignore", invalid="ignore"):
        try:
            for epoch in range(1, epochs + 1):
                step = ridge.learning_rate(lr, epoch, lr_decay)
                for idx in minibatches(n, batch_size, seed, epoch):
                    g = combine(w, threaded_data_gradient(w, X, y, pool, k, grad_fn, rows=idx), lam, n, len(idx))
                    w = sgd_step(w, g, step)
                    updates += 1
                J = ridge.objective(w, X, y, lam)
                for key, value in (("epoch", epoch), ("J", J), ("time", time.perf_counter() - start),
                                   ("updates", updates)):
                    history[key].append(value)
                ridge.check_divergence(J, J_ref, lr, X, lam, epoch, batch_size=batch_size)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return SGDResult(w=w, history=history)


# --------------------------------------------------------------------------- asynchronous
@dataclass
class AsyncResult(SGDResult):
    """``SGDResult`` of ``hogwild``: ``history`` has ``time``, ``updates``, ``J`` per snapshot."""

    updates: int = 0
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        """Updates applied per second (all threads together)."""
        return self.updates / self.seconds if self.seconds > 0 else float("nan")


def _objectives(W, X, y, lam):
    """J(w) for every row of W (m, d) at once."""
    R = y[:, None] - X @ W.T                            # (n, m)
    return 0.5 * np.einsum("ij,ij->j", R, R) + 0.5 * lam * np.einsum("ij,ij->i", W, W)


def hogwild(X, y, lam, lr, batch_size, epochs, n_threads=2, lock=False, seed=0, w0=None, *,
            grad_fn=data_gradient, snapshots=100):
    """Asynchronous SGD: ``n_threads`` threads update ONE shared weight vector (Hogwild!).

    The rows are shuffled once (``seed``) and split into ``n_threads`` shards; thread t
    runs ``epochs`` epochs of minibatch SGD on its shard. With ``lock=False`` a thread
    reads the shared ``w`` while others may be writing it and updates it in place
    (``w -= lr * g``) with no lock: gradients can be stale and, when NumPy releases the
    GIL inside the update, an element update can be lost. With ``lock=True`` reading a
    copy of ``w`` and writing the update each happen under one ``threading.Lock`` (stale
    gradients remain, lost updates do not). Either way the ORDER of the updates is decided
    by the OS scheduler and the GIL, so results differ from run to run.

    About ``snapshots`` times during the run (every total/snapshots updates, counted over
    all threads) the thread that made the update copies ``w``; J of the copies is computed
    afterwards, outside the timed run. Returns ``AsyncResult(w, history, updates, seconds)``
    with ``history`` lists ``time`` (s), ``updates`` (all threads) and ``J``.
    """
    X, y, lam, k, batch_size, epochs = _check_hogwild(X, y, lam, lr, batch_size, epochs, n_threads, seed,
                                                      grad_fn, snapshots)
    n, d = X.shape
    w = start_weights(w0, d)                                 # THE shared vector
    perm = np.random.default_rng(seed).permutation(n)
    shards = [perm[slice(*shard_bounds(n, k, t))] for t in range(k)]
    guard = threading.Lock() if lock else nullcontext()
    stop = threading.Event()
    counts = [0] * k                                     # thread t writes only counts[t]
    total = epochs * sum(-(-len(s) // batch_size) for s in shards)
    every = max(1, total // int(snapshots))
    ticket = itertools.count(1)                          # next() is atomic: numbers the updates
    snaps = [(0.0, 0, w.copy())]                         # (seconds, updates, w); list.append is atomic

    def worker(t):
        Xt, yt = X[shards[t]], y[shards[t]]             # (n_t, d), (n_t,)
        with np.errstate(over="ignore", invalid="ignore"):
            run(t, Xt, yt)

    def run(t, Xt, yt):
        for epoch in range(1, epochs + 1):
            for idx in minibatches(len(yt), batch_size, seed * 10_007 + t, epoch):
                if stop.is_set():
                    return
                with guard:
                    w_read = w.copy() if lock else w     # lock-free: read the live vector
                g = combine(w_read, grad_fn(w_read, Xt[idx], yt[idx]), lam, n, len(idx))
                with guard:
                    np.subtract(w, lr * g, out=w)        # in place on the shared vector
                counts[t] += 1
                u = next(ticket)
                if u % every == 0 or u == total:
                    snaps.append((time.perf_counter() - start, u, w.copy()))

    J0 = float(_objectives(w[None, :], X, y, lam)[0])
    start = time.perf_counter()
    seconds = _run_threads(worker, k, stop)
    history = _history(snaps, X, y, lam)
    ridge.check_divergence(history["J"][-1], max(J0, 0.5 * float(y @ y)), lr, X, lam, epochs,
                           batch_size=batch_size)
    return AsyncResult(w=w, history=history, updates=sum(counts), seconds=seconds)


def _check_hogwild(X, y, lam, lr, batch_size, epochs, n_threads, seed, grad_fn, snapshots):
    """hogwild's arguments checked: ``(X, y, lam, threads, batch_size, epochs)``."""
    X, y = ridge.check_problem(X, y, lam)
    n = len(y)
    k = check_n_threads(n_threads, n, what="the number of samples")
    batch_size, epochs = ridge.check_sgd_args(n, lr, batch_size, epochs, seed=seed)
    if batch_size > n // k:
        raise ValueError(f"batch_size ({batch_size}) must not exceed the rows each thread holds "
                         f"(n // n_threads = {n // k}): use fewer threads or a smaller batch_size")
    check_grad_fn(grad_fn)
    if isinstance(snapshots, bool) or not isinstance(snapshots, (int, np.integer)) or snapshots < 1:
        raise ValueError(f"snapshots (how many copies of w to record) must be an integer >= 1; got {snapshots!r}")
    return X, y, float(lam), k, batch_size, epochs


def _run_threads(worker, k, stop) -> float:
    """``worker(t)`` for t < k on k threads; the seconds until all finished. When one fails, ``stop`` is
    set so the others end, and its error is raised (with its traceback)."""
    pool, futures = _executor(k), []
    start = time.perf_counter()
    try:
        futures = [pool.submit(worker, t) for t in range(k)]
        wait(futures, return_when=FIRST_EXCEPTION)       # all done, or one failed: stop the others
        seconds = time.perf_counter() - start
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    for f in futures:                                    # all finished or cancelled by now
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()
    return seconds


def _history(snaps, X, y, lam) -> dict:
    """J of the recorded copies of w, computed after the timed run, in update order."""
    snaps = sorted(snaps, key=lambda s: s[1])
    with np.errstate(over="ignore", invalid="ignore"):
        J = _objectives(np.array([s[2] for s in snaps]), X, y, lam)
    return {"time": [s[0] for s in snaps], "updates": [s[1] for s in snaps], "J": [float(v) for v in J]}


# --------------------------------------------------------------------------- the GIL, measured
def gil_report() -> dict:
    """What decides whether Python threads can run bytecode in parallel here."""
    from threadpoolctl import threadpool_info

    is_enabled = getattr(sys, "_is_gil_enabled", None)   # Python >= 3.13
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {
        "python": sys.version.split()[0],
        "free_threaded_build": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
        "gil_enabled": True if is_enabled is None else bool(is_enabled()),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "blas": ", ".join(blas) or "none found",
    }


def gil_free_fraction(fn, *args, repeat=5, blas_threads=1):
    """How much a pure-Python thread can run while ``fn(*args)`` runs: the GIL, measured directly.

    A helper thread counts in a Python loop. The count's rate during a call of ``fn`` is divided
    by its rate while the caller sleeps for as long (median of ``repeat`` calls). About 1: ``fn``
    left the GIL free (compiled code that releases it); about 0: ``fn`` held it throughout; about
    0.5 for long pure-Python calls, because the two threads then take turns every
    ``sys.getswitchinterval()`` seconds (a call shorter than that can reach 0).
    """
    check_grad_fn(fn)
    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    spinner = threading.Thread(target=spin, name=f"{THREAD_PREFIX}-spinner")
    ratios = []
    with limit_threads(blas_threads):
        spinner.start()
        try:
            for _ in range(repeat):
                c0, t0 = count[0], time.perf_counter()
                fn(*args)
                c1, t1 = count[0], time.perf_counter()
                time.sleep(t1 - t0)
                c2, t2 = count[0], time.perf_counter()
                free = (c2 - c1) / (t2 - t1)
                ratios.append((c1 - c0) / (t1 - t0) / free if free > 0 else float("nan"))
        finally:
            stop.set()
            spinner.join()
    valid = [r for r in ratios if np.isfinite(r)]       # nan: the call was too short to measure
    return float(np.median(valid)) if valid else float("nan")


def time_threads(grad_fn, w, X, y, threads=(1, 2, 4), repeat=5, blas_threads=1):
    """Seconds per data gradient of all rows of (X, y) computed by k threads, for each k in ``threads``.

    Every k runs through its own executor (created once), so k = 1 pays the same hand-off
    cost as k > 1. The rounds are interleaved (k = 1, 2, 4, 1, 2, 4, ...) so a change in
    the machine's load hits every k alike; the median per k is returned, shape (len(threads),).
    ``blas_threads=1`` pins BLAS to one thread per worker; None leaves BLAS's own threads on.
    """
    check_grad_fn(grad_fn)
    threads = [check_n_threads(k, X.shape[0]) for k in threads]
    timer = Timer()
    pools = {k: _executor(k) for k in set(threads)}
    try:
        with limit_threads(blas_threads):
            for k in threads:                                # warm-up: start the threads, touch the data
                threaded_data_gradient(w, X, y, pools[k], k, grad_fn)
            for _ in range(repeat):
                for k in threads:
                    with timer(str(k)):
                        threaded_data_gradient(w, X, y, pools[k], k, grad_fn)
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
    return np.array([timer.median(str(k)) for k in threads])


@dataclass
class BreakEven:
    batch_sizes: np.ndarray      # (m,) rows per step
    serial: np.ndarray           # (m,) seconds per gradient, plain call in the calling thread
    threaded: np.ndarray         # (m,) seconds per gradient, n_threads threads of one executor
    n_threads: int

    @property
    def batch(self):
        """Smallest measured batch from which threads are faster at it and every larger size (None: never)."""
        faster = self.threaded < self.serial
        for i in range(len(faster)):
            if faster[i:].all():
                return int(self.batch_sizes[i])
        return None


def break_even(batch_sizes, d=50, n_threads=2, repeat=7, blas_threads=1, grad_fn=data_gradient, seed=0):
    """Time one gradient step at each batch size: serial call vs ``n_threads`` threads.

    Below the break-even size the cost of handing shards to threads and collecting them
    (tens of microseconds) exceeds the work saved. Returns a ``BreakEven``.
    """
    check_grad_fn(grad_fn)
    sizes = np.array(sorted(int(b) for b in batch_sizes))
    if len(sizes) == 0 or sizes[0] < n_threads:
        raise ValueError(f"batch_sizes must be non-empty and each >= n_threads ({n_threads}); got {batch_sizes}")
    rng = np.random.default_rng(seed)
    X_all, y_all, w = rng.standard_normal((sizes[-1], d)), rng.standard_normal(sizes[-1]), rng.standard_normal(d)
    serial, threaded = [], []
    timer = Timer()
    with _executor(n_threads) as pool, limit_threads(blas_threads):
        for b in sizes:
            X, y = X_all[:b], y_all[:b]                     # views: no copy
            grad_fn(w, X, y), threaded_data_gradient(w, X, y, pool, n_threads, grad_fn)
            for _ in range(repeat):
                with timer(f"s{b}"):
                    grad_fn(w, X, y)
                with timer(f"t{b}"):
                    threaded_data_gradient(w, X, y, pool, n_threads, grad_fn)
            serial.append(timer.median(f"s{b}"))
            threaded.append(timer.median(f"t{b}"))
    return BreakEven(sizes, np.array(serial), np.array(threaded), int(n_threads))
