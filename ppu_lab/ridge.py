"""The ridge objective of the course and serial minibatch SGD (notebook 01).

    J(w) = 1/2 * sum_i (y_i - w.x_i)^2 + lam/2 * ||w||^2        (a sum over samples)

Everything here is a pure function whose defaults are the serial case. The threaded
(``ppu_lab.threads``) and MPI (``ppu_lab.parallel``) versions reuse
``data_gradient``, ``combine`` and ``sgd_step`` unchanged and differ only in how the
shard gradients are computed and summed; that is what makes "parallel equals serial"
testable to rounding error.

A minibatch B of a data set of N samples gives the unbiased estimate

    g_B(w) = (N / |B|) * sum_{i in B} -(y_i - w.x_i) x_i + lam * w,    E[g_B] = grad J(w).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

# J may grow this many times above its starting value before SGD is declared divergent.
DIVERGENCE_FACTOR = 1e6


class DivergenceError(ValueError):
    """SGD's objective became non-finite or grew without bound (learning rate too large)."""


# --------------------------------------------------------------------------- checks
def check_problem(X, y, lam=None, w=None):
    """Validate shapes and values; return float arrays. Raises ValueError naming the argument."""
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n samples, d features); got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be 1-D with one entry per row of X ({X.shape[0]}); got shape {y.shape}")
    if X.shape[0] == 0:
        raise ValueError("X has no rows: need at least one sample")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or inf: clean or impute the data first")
    if not np.all(np.isfinite(y)):
        raise ValueError("y contains NaN or inf: clean or impute the data first")
    if lam is not None and not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam (the L2 weight) must be finite and >= 0; got {lam}")
    if w is not None:
        w = np.asarray(w, dtype=float)
        if w.shape != (X.shape[1],):
            raise ValueError(f"w must have shape ({X.shape[1]},) to match X's columns; got {w.shape}")
        return X, y, w
    return X, y


# --------------------------------------------------------------------------- kernels
def objective(w, X, y, lam):
    """J(w) = 1/2 ||y - Xw||^2 + lam/2 ||w||^2."""
    X, y, w = check_problem(X, y, lam, w)
    r = y - X @ w
    return 0.5 * float(r @ r) + 0.5 * lam * float(w @ w)


def data_gradient(w, X, y):
    """Gradient of the data term only, summed over the given rows: -X^T (y - Xw).

    No checks: this is the hot kernel that serial, threaded and MPI code all call on
    their shards. An empty shard gives zeros.
    """
    return -(X.T @ (y - X @ w))


def combine(w, data_grad_sum, lam, n_total, n_batch):
    """Minibatch gradient from the summed data gradient of a batch of ``n_batch`` rows.

    Scales the data term by N/|B| (unbiased) and adds the L2 term once.
    """
    return (n_total / n_batch) * data_grad_sum + lam * w


def gradient(w, X, y, lam):
    """grad J(w) = -X^T (y - Xw) + lam w (the full gradient, no scaling)."""
    X, y, w = check_problem(X, y, lam, w)
    return data_gradient(w, X, y) + lam * w


def closed_form(X, y, lam):
    """The minimiser w* = (X^T X + lam I)^{-1} X^T y, by a linear solve (not an inverse)."""
    X, y = check_problem(X, y, lam)
    d = X.shape[1]
    return np.linalg.solve(X.T @ X + lam * np.eye(d), X.T @ y)


def sgd_step(w, grad, lr):
    """One update w <- w - lr * grad (returns a new array)."""
    return w - lr * grad


def lipschitz(X, lam):
    """L = lambda_max(X^T X) + lam: gradient descent on J is stable for lr < 2/L."""
    X = np.asarray(X, dtype=float)
    return float(np.linalg.eigvalsh(X.T @ X)[-1]) + lam


def minibatches(n, batch_size, seed, epoch):
    """Index arrays of one epoch's minibatches: a fresh permutation from (seed, epoch).

    Every batch has ``batch_size`` rows except possibly the last, which holds the rest
    (no sample is dropped). Parallel code calls this with the same arguments on every
    worker and so draws the same global minibatches as serial SGD.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def check_sgd_args(n, lr, batch_size, epochs):
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr (learning rate) must be > 0; got {lr}")
    if int(batch_size) != batch_size or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an integer between 1 and the number of samples ({n}); got {batch_size}")
    if int(epochs) != epochs or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0; got {epochs}")


def check_divergence(J, J0, lr, X, lam, epoch):
    """Raise DivergenceError when J is non-finite or has grown without bound."""
    if np.isfinite(J) and J <= DIVERGENCE_FACTOR * max(J0, 1e-300):
        return
    L = lipschitz(X, lam)
    raise DivergenceError(
        f"SGD diverged at epoch {epoch} with lr={lr:g}: J(w) became {J:.3g} (started at {J0:.3g}). "
        f"For this data lambda_max(X^T X) + lam = {L:.4g}, so full-batch steps are stable only for "
        f"lr < 2/L = {2 / L:.3g}; minibatch noise needs a smaller step: try lr <= {1 / L:.3g}."
    )


# --------------------------------------------------------------------------- serial SGD
@dataclass
class SGDResult:
    w: np.ndarray
    history: dict = field(default_factory=dict)  # "epoch", "J", "time" (seconds since start)


def sgd(X, y, lam, lr, batch_size, epochs, seed=0, w0=None):
    """Serial minibatch SGD on J. Same seed, same result.

    Returns ``SGDResult(w, history)`` where ``history`` has, per epoch (epoch 0 is the
    start), the objective ``J`` and the elapsed ``time`` in seconds.
    """
    X, y = check_problem(X, y, lam)
    n, d = X.shape
    check_sgd_args(n, lr, batch_size, epochs)
    w = np.zeros(d) if w0 is None else check_problem(X, y, lam, w0)[2].copy()
    J0 = objective(w, X, y, lam)
    history = {"epoch": [0], "J": [J0], "time": [0.0]}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for idx in minibatches(n, batch_size, seed, epoch):
            g = combine(w, data_gradient(w, X[idx], y[idx]), lam, n, len(idx))
            w = sgd_step(w, g, lr)
        J = objective(w, X, y, lam)
        history["epoch"].append(epoch)
        history["J"].append(J)
        history["time"].append(time.perf_counter() - start)
        check_divergence(J, J0, lr, X, lam, epoch)
    return SGDResult(w=w, history=history)
