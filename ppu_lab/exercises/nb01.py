"""Checks of notebook 01's exercises: the unbiased minibatch gradient and the SGD loop (serial).

References are the lab's own kernels (``ppu_lab.ridge``), never the notebook's solution cell; the
known mistakes are computed from the same kernels so that the feedback can name them.
"""

from __future__ import annotations

import numpy as np

from ppu_lab import ridge
from ppu_lab.data import make_ridge_data
from ppu_lab.exercises.core import Notebook, compare

BOOK = Notebook("01_serial_sgd_ridge")
check, require = BOOK.check, BOOK.require

# --------------------------------------------------------------------------- exercise 1
grad_ex = BOOK.exercise(
    "minibatch_gradient", points=2, time_limit=20, forbid=("combine", "data_gradient", "gradient"),
    hint="J is a sum over all N rows of X: the batch's sum estimates it only once scaled (section 4). "
         "The penalty is not a sum over samples. |B| is the number of indices in idx.")


def _gradient_case(n, d, batch, lam, seed, as_list=False):
    X, y, _ = make_ridge_data(n, d, noise=0.5, seed=seed)
    rng = np.random.default_rng(seed + 100)
    w = rng.standard_normal(d)
    idx = rng.choice(n, batch, replace=False) if batch < n else np.arange(n)

    def run(fn):
        G = ridge.data_gradient(w, X[idx], y[idx])                       # the batch's data-term sum
        s = n / len(idx)
        got = fn(w, X, y, lam, list(idx) if as_list else idx)
        return compare(got, ridge.combine(w, G, lam, n, len(idx)), what="g_B", mistakes=[
            (G + lam * w, "it is the batch's sum without the factor N/|B|; a sum over |B| of the N rows "
                          "must be scaled by N/|B| to estimate the sum over all N (section 4)"),
            (G / len(idx) + lam * w, "it divides by |B| (a mean) but does not multiply by N: J is a sum "
                                     "over all N samples, not a mean"),
            (s * G + n * lam * w, "lam * w is added once per sample (and then scaled): the penalty "
                                  "lam/2 ||w||^2 is not a sum over samples, add lam * w once"),
            (G + len(idx) * lam * w, "lam * w is added once per sample of the batch: add it once"),
            (s * (G + lam * w), "the penalty's gradient lam * w is scaled by N/|B| too: only the data "
                                "term is a sum over samples"),
            (-s * G + lam * w, "the sign of the data term: d/dw 1/2 (y_i - w.x_i)^2 = -(y_i - w.x_i) x_i"),
            (ridge.gradient(w, X, y, lam), "it is the full gradient over all N rows: use only the rows idx"),
        ])

    return run


grad_ex.case("a batch of 50 of 1,000 rows, lam = 1")(_gradient_case(1000, 8, 50, 1.0, seed=11))
grad_ex.case("all 300 rows as the batch: the full gradient of J")(_gradient_case(300, 5, 300, 2.0, seed=12))
grad_ex.case("a batch of one row", hidden=True)(_gradient_case(200, 4, 1, 0.5, seed=13))
grad_ex.case("lam = 0, idx given as a list", hidden=True)(_gradient_case(500, 6, 37, 0.0, seed=14, as_list=True))


# --------------------------------------------------------------------------- exercise 2
sgd_ex = BOOK.exercise(
    "sgd_decay", points=2, time_limit=30, forbid=("sgd",),
    hint="epochs are numbered from 1, and each epoch draws its own minibatches from (seed, epoch); every "
         "sample is used once per epoch, and the last batch may be shorter than batch_size.")


def _sgd_variant(X, y, lam, lr, b, epochs, seed, decay, *, rate_epoch=0, batch_epoch=None,
                 drop_last=False, scale_b=False):
    """SGD with one deliberate deviation from ``ridge.sgd`` (to name the student's mistake)."""
    n, w = len(y), np.zeros(X.shape[1])
    for t in range(1, epochs + 1):
        step = lr / (1 + decay * (t - 1 + rate_epoch))
        for idx in ridge.minibatches(n, b, seed, t if batch_epoch is None else batch_epoch):
            if not (drop_last and len(idx) < b):
                w = w - step * ridge.combine(w, ridge.data_gradient(w, X[idx], y[idx]), lam, n,
                                             b if scale_b else len(idx))
    return w


def _sgd_case(n, d, b, epochs, decay, seed, lam=1.0):
    X, y, _ = make_ridge_data(n, d, noise=0.5, seed=seed)
    lr = 0.5 / ridge.minibatch_lipschitz(X, lam, b)

    def run(fn):
        ref = ridge.sgd(X, y, lam, lr, b, epochs, seed=seed, lr_decay=decay).w
        args = (X, y, lam, lr, b, epochs, seed, decay)
        return compare(fn(X, y, lam, lr, b, epochs, seed=seed, decay=decay), ref, what="w", rtol=1e-10, mistakes=[
            (_sgd_variant(*args, rate_epoch=1), "the step of epoch t must be lr / (1 + decay (t - 1)): "
                                                "the first epoch steps with lr itself"),
            (_sgd_variant(*args, batch_epoch=1), "every epoch uses the same minibatches: draw them with "
                                                 "ridge.minibatches(N, batch_size, seed, t) for epoch t"),
            (_sgd_variant(*args, drop_last=True), "the last, shorter batch is skipped: every sample is "
                                                  "used once per epoch"),
            (_sgd_variant(*args, scale_b=True), "the last, shorter batch is scaled by N/batch_size: "
                                                "use N/len(idx), its real size"),
            (_sgd_variant(X, y, lam, lr, b, epochs, seed, 0.0), "the step does not decay"),
        ])

    return run


sgd_ex.case("3 epochs, batch 10 of 300 rows, decay 4")(_sgd_case(300, 5, 10, 3, 4.0, seed=21))
sgd_ex.case("4 epochs, batch 64 of 1,000 rows (the last batch is shorter), decay 1")(
    _sgd_case(1000, 6, 64, 4, 1.0, seed=22))
sgd_ex.case("no decay, another seed", hidden=True)(_sgd_case(400, 3, 25, 2, 0.0, seed=23))
sgd_ex.case("0 epochs: the starting point w = 0", hidden=True)(_sgd_case(100, 4, 10, 0, 1.0, seed=24))
