"""Data for the lab: MNIST (notebooks 05-07) and synthetic ridge problems (notebook 01)."""

from __future__ import annotations

import numpy as np


def make_ridge_data(n, d, noise=0.1, seed=0):
    """A synthetic regression problem y = X w_true + noise with a known ``w_true``.

    Rows of X are standard normal (well conditioned for n >> d). Returns ``(X, y, w_true)``.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n (number of samples) must be an integer >= 1; got {n}")
    if int(d) != d or d < 1:
        raise ValueError(f"d (number of features) must be an integer >= 1; got {d}")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise (standard deviation) must be finite and >= 0; got {noise}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((int(n), int(d)))
    w_true = rng.standard_normal(int(d))
    y = X @ w_true + noise * rng.standard_normal(int(n))
    return X, y, w_true
