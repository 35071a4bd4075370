"""The ridge objective of the course and serial minibatch SGD (notebook 01).

    J(w) = 1/2 * sum_i (y_i - w.x_i)^2 + lam/2 * ||w||^2        (a sum over samples)

Everything here is a pure function whose defaults are the serial case. The threaded
(``ppu_lab.threads``) and MPI (``ppu_lab.parallel``) versions reuse
``data_gradient``, ``combine``, ``sgd_step``, ``minibatches`` and ``learning_rate``
unchanged and differ only in how the shard gradients are computed and summed; that is
what makes "parallel equals serial" testable to rounding error.

A minibatch B of a data set of N samples gives the unbiased estimate

    g_B(w) = (N / |B|) * sum_{i in B} -(y_i - w.x_i) x_i + lam * w,    E[g_B] = grad J(w).

Stability: full-batch gradient descent on J is stable for lr < 2/L with
L = lambda_max(X^T X) + lam (``lipschitz``). A minibatch step multiplies the error by
I - lr * ((N/|B|) X_B^T X_B + lam I), whose largest eigenvalue is larger than L for small
batches, so small batches need smaller steps (``minibatch_lipschitz``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ppu_lab.checks import integer, real, start_weights

# J may grow this many times above its reference value before SGD is declared divergent.
DIVERGENCE_FACTOR = 1e6


class DivergenceError(ValueError):
    """SGD's objective became non-finite or grew without bound (learning rate too large)."""


# --------------------------------------------------------------------------- checks
def check_problem(X, y, lam=None, w=None):
    """Validate shapes and values; return float arrays. Raises ValueError naming the argument."""
    try:
        X = np.asarray(X, dtype=float)
    except (TypeError, ValueError):
        raise ValueError("X must be a numeric 2-D array (n samples, d features)") from None
    try:
        y = np.asarray(y, dtype=float)
    except (TypeError, ValueError):
        raise ValueError("y must be a numeric 1-D array with one target per row of X") from None
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n samples, d features); got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        hint = " (use y.ravel() for a column vector)" if y.ndim == 2 and 1 in y.shape else ""
        raise ValueError(f"y must be 1-D with one entry per row of X ({X.shape[0]}); got shape {y.shape}{hint}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must have at least one sample and one feature; got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or inf: clean or impute the data first")
    if not np.all(np.isfinite(y)):
        raise ValueError("y contains NaN or inf: clean or impute the data first")
    if lam is not None:
        lam_f = real("lam (the L2 weight)", lam)
        if not (np.isfinite(lam_f) and lam_f >= 0):
            raise ValueError(f"lam (the L2 weight) must be finite and >= 0; got {lam}")
    if w is not None:
        try:
            w = np.asarray(w, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"w must be a numeric array of shape ({X.shape[1]},)") from None
        if w.shape != (X.shape[1],):
            raise ValueError(f"w must have shape ({X.shape[1]},) to match X's columns; got {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError("w contains NaN or inf: start from finite weights (e.g. zeros)")
        return X, y, w
    return X, y


def check_sgd_args(n, lr, batch_size, epochs, *, seed=None, lr_decay=None):
    """Validate SGD's hyper-parameters for ``n`` samples; raise ValueError naming the argument.

    Returns ``(batch_size, epochs)`` as Python ints (callers may ignore it).
    """
    lr_f = real("lr (learning rate)", lr)
    if not (np.isfinite(lr_f) and lr_f > 0):
        raise ValueError(f"lr (learning rate) must be finite and > 0; got {lr}")
    b = integer("batch_size", batch_size, 1, int(n), f" (the number of samples is {n})")
    e = integer("epochs", epochs, 0)
    if seed is not None:
        integer("seed", seed, 0)
    if lr_decay is not None:
        d = real("lr_decay", lr_decay)
        if not (np.isfinite(d) and d >= 0):
            raise ValueError(f"lr_decay must be finite and >= 0 (0 keeps lr constant); got {lr_decay}")
    return b, e


# --------------------------------------------------------------------------- kernels
def _objective(w, X, y, lam):
    r = y - X @ w                                       # (n,)
    return 0.5 * float(r @ r) + 0.5 * lam * float(w @ w)


def objective(w, X, y, lam):
    """J(w) = 1/2 ||y - Xw||^2 + lam/2 ||w||^2 (a sum over samples, not a mean)."""
    X, y, w = check_problem(X, y, lam, w)
    return _objective(w, X, y, float(lam))


def data_gradient(w, X, y):
    """Gradient of the data term only, summed over the given rows: -X^T (y - Xw).

    No checks: this is the hot kernel that serial, threaded and MPI code all call on
    their shards. An empty shard gives zeros. Written with ``np.dot`` rather than ``@``
    because in NumPy 2.x ``np.dot`` releases the GIL for the whole product while
    ``X.T @ r`` keeps it for much of the call, so threads can overlap (notebook 02 shows it).
    """
    return -np.dot(X.T, y - np.dot(X, w))               # (d,)


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
    """The minimiser w* = (X^T X + lam I)^{-1} X^T y, by a linear solve (not an inverse).

    With lam = 0 and a rank-deficient X the normal equations are singular: the
    minimum-norm least-squares solution is returned instead.
    """
    X, y = check_problem(X, y, lam)
    d = X.shape[1]
    A = X.T @ X + lam * np.eye(d)                       # (d, d)
    try:
        return np.linalg.solve(A, X.T @ y)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(X, y, rcond=None)[0]


def sgd_step(w, grad, lr):
    """One update w <- w - lr * grad (returns a new array)."""
    return w - lr * grad


def learning_rate(lr, epoch, lr_decay=0.0):
    """Step size used during ``epoch`` (1-based): ``lr / (1 + lr_decay * (epoch - 1))``.

    ``lr_decay=0`` (the default) keeps it constant. A 1/t decay removes the noise floor
    of constant-step SGD: the iterates then converge to w* itself.
    """
    return lr / (1.0 + lr_decay * (epoch - 1))


def relative_error(w, w_ref):
    """||w - w_ref|| / ||w_ref|| (the distance to the closed form used in tests and notebooks)."""
    w, w_ref = np.asarray(w, dtype=float), np.asarray(w_ref, dtype=float)
    return float(np.linalg.norm(w - w_ref) / np.linalg.norm(w_ref))


def _largest_eig_gram(A):
    """lambda_max(A^T A), from the smaller of the two Gram matrices."""
    G = A.T @ A if A.shape[0] >= A.shape[1] else A @ A.T
    return float(np.linalg.eigvalsh(G)[-1])


def lipschitz(X, lam):
    """L = lambda_max(X^T X) + lam: gradient descent on J is stable for lr < 2/L."""
    return _largest_eig_gram(np.asarray(X, dtype=float)) + float(lam)


def minibatch_lipschitz(X, lam, batch_size, seed=0, max_batches=256):
    """Largest curvature of one minibatch step: max_B (N/|B|) lambda_max(X_B^T X_B) + lam.

    Every step of SGD with ``lr < 2 / minibatch_lipschitz(...)`` is non-expansive; for
    ``batch_size = N`` this equals ``lipschitz(X, lam)``. Taken over the batches of one
    epoch (at most ``max_batches`` of them, so it is an estimate for very many batches).
    """
    X = np.asarray(X, dtype=float)
    n = X.shape[0]
    b = integer("batch_size", batch_size, 1, n, f" (the number of samples is {n})")
    if b == 1:                                          # lambda_max(x x^T) = ||x||^2
        return n * float(np.max(np.einsum("ij,ij->i", X, X))) + float(lam)
    batches = minibatches(n, b, seed, 0)[:max_batches]
    return max(n / len(idx) * _largest_eig_gram(X[idx]) for idx in batches) + float(lam)


def minibatches(n, batch_size, seed, epoch):
    """Index arrays of one epoch's minibatches: a fresh permutation from (seed, epoch).

    Every batch has ``batch_size`` rows except possibly the last, which holds the rest
    (no sample is dropped). Parallel code calls this with the same arguments on every
    worker and so draws the same global minibatches as serial SGD.
    """
    n = integer("n (number of samples)", n, 0)
    b = integer("batch_size", batch_size, 1)
    perm = np.random.default_rng([integer("seed", seed, 0), integer("epoch", epoch, 0)]).permutation(n)
    return [perm[i:i + b] for i in range(0, n, b)]


def check_divergence(J, J0, lr, X, lam, epoch, *, batch_size=None):
    """Raise DivergenceError when J is non-finite or has grown without bound.

    ``J0`` is the reference (the starting objective). The message names lr and gives the
    stable bound 2/L from lambda_max(X^T X); with ``batch_size`` it also gives the bound
    for steps on minibatches of that size.
    """
    if np.isfinite(J) and J <= DIVERGENCE_FACTOR * max(J0, 1e-300):
        return
    with np.errstate(all="ignore"):
        L = lipschitz(X, lam)
        msg = (f"SGD diverged at epoch {epoch} with lr={lr:g}: J(w) became {J:.3g} (reference {J0:.3g}). "
               f"For this data lambda_max(X^T X) + lam = L = {L:.4g}, so full-batch gradient steps are "
               f"stable only for lr < 2/L = {2 / L:.4g}")
        n = np.shape(X)[0]
        if batch_size is not None and int(batch_size) < n:
            LB = minibatch_lipschitz(X, lam, batch_size)
            msg += (f"; minibatch steps of size {int(batch_size)} (scaled by N/|B|) have curvature up to {LB:.4g}, "
                    f"so choose lr < 2/{LB:.4g} = {2 / LB:.4g}.")
        else:
            msg += f": choose a smaller lr, e.g. lr <= 1/L = {1 / L:.3g}."
    raise DivergenceError(msg)


# --------------------------------------------------------------------------- serial SGD
@dataclass
class SGDResult:
    w: np.ndarray
    history: dict = field(default_factory=dict)  # "epoch", "J", "time" (seconds since start)


def sgd(X, y, lam, lr, batch_size, epochs, seed=0, w0=None, *, lr_decay=0.0):
    """Serial minibatch SGD on J. Same seed, same result.

    Each epoch draws a fresh permutation from ``(seed, epoch)`` and steps with
    ``learning_rate(lr, epoch, lr_decay)`` (constant by default). Returns
    ``SGDResult(w, history)`` where ``history`` has, per epoch (epoch 0 is the start),
    the objective ``J`` and the elapsed ``time`` in seconds. Raises ``DivergenceError``
    (naming lr and a stable bound) when J becomes non-finite or grows without bound.
    """
    X, y = check_problem(X, y, lam)
    lam = float(lam)
    n, d = X.shape
    batch_size, epochs = check_sgd_args(n, lr, batch_size, epochs, seed=seed, lr_decay=lr_decay)
    w = start_weights(w0, d)                            # a copy: the caller's w0 is not touched
    J0 = _objective(w, X, y, lam)
    J_ref = max(J0, 0.5 * float(y @ y))                 # = J0 when starting from zeros
    history = {"epoch": [0], "J": [J0], "time": [0.0]}
    start = time.perf_counter()
    # Overflow while diverging is reported once, as a DivergenceError, not as numpy warnings.
    with np.errstate(over="ignore", invalid="ignore"):
        for epoch in range(1, epochs + 1):
            step = learning_rate(lr, epoch, lr_decay)
            for idx in minibatches(n, batch_size, seed, epoch):
                g = combine(w, data_gradient(w, X[idx], y[idx]), lam, n, len(idx))
                w = sgd_step(w, g, step)
            J = _objective(w, X, y, lam)
            history["epoch"].append(epoch)
            history["J"].append(J)
            history["time"].append(time.perf_counter() - start)
            check_divergence(J, J_ref, lr, X, lam, epoch, batch_size=batch_size)
    return SGDResult(w=w, history=history)
