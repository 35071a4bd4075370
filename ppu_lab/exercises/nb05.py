"""Checks of notebook 05's exercises: backpropagation by hand, and the test accuracy on the MPI engines.

The backpropagation checks compare with ``torch.autograd`` (``models.ann_autograd``) and with central
finite differences of the summed cross-entropy (``models.central_difference``), on random networks;
the forward quantities (A, delta_2) are computed here from the lab's forward pass. The accuracy check
runs the student's ``%%px`` function on every engine and compares with a serial count.
"""

from __future__ import annotations

import numpy as np

from ppu_lab import models
from ppu_lab.exercises.core import Notebook, compare, on_engines

BOOK = Notebook("05_ann_mnist")
check, require = BOOK.check, BOOK.require


def _network(h, batch, seed):
    """theta, X, y, and the forward quantities A (B, h), delta_2 (B, 10) of a random sigmoid ANN."""
    rng = np.random.default_rng(seed)
    theta = models.ann_init(h, seed) + 0.1 * rng.standard_normal(models.ann_num_params(h))
    X, y = rng.random((batch, models.N_IN)), rng.integers(0, models.N_OUT, batch)
    W1, b1, W2, b2 = models.ann_unpack(theta, h)
    A = models.ACTIVATIONS["sigmoid"][0](X @ W1.T + b1)                  # (B, h)
    P = np.exp(models.ann_forward(theta, X, h))
    d2 = P / P.sum(axis=1, keepdims=True)
    d2[np.arange(batch), y] -= 1.0                                       # (B, 10)
    return theta, X, y, A, d2


def _pair(got, names):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return None, f"return the pair ({', '.join(names)}); got {type(got).__name__}"
    return got, None


# --------------------------------------------------------------------------- exercise 1: output layer
out_ex = BOOK.exercise(
    "output_layer_grads", points=1, time_limit=20,
    hint="a parameter's gradient has the parameter's shape (W2 is (10, h)), and the loss is a sum over the "
         "batch, so is its gradient (section 3).")


def _output_case(h, batch, seed):
    def run(fn):
        theta, X, y, A, d2 = _network(h, batch, seed)
        _, _, gW2, gb2 = models.ann_unpack(models.ann_autograd(theta, X, y, h, lam=0.0), h)
        got, msg = _pair(fn(d2, A), ("dW2", "db2"))
        return msg or compare(got[0], gW2, what="dW2", mistakes=[
            (A.T @ d2, "it is the transpose: W2 and its gradient have shape (10, h)"),
        ]) or compare(got[1], gb2, what="db2", mistakes=[
            (d2.mean(axis=0), "it is the mean over the batch: the loss is a sum, so is its gradient"),
        ])

    return run


out_ex.case("h = 7, a batch of 5 images, against torch.autograd")(_output_case(7, 5, seed=51))
out_ex.case("h = 10 (W2 is square), a batch of 8", hidden=True)(_output_case(10, 8, seed=52))


# --------------------------------------------------------------------------- exercise 2: hidden layer
hidden_ex = BOOK.exercise(
    "hidden_layer_grads", points=3, time_limit=30,
    hint="go back one layer at a time (section 3): through W2 (write the shapes down), then through the "
         "sigmoid (its derivative written with A), then to W1 and b1; each gradient has its parameter's shape.")


def _hidden_variants(d2, W2, A, X):
    """Typical wrong answers and what each one means."""
    d1 = (d2 @ W2) * A * (1 - A)
    sA = 1 / (1 + np.exp(-A))
    out = [((d2 @ W2).T @ X, "sigma'(Z1) is missing: the error passes through the sigmoid on its way back"),
           ((((d2 @ W2) * sA * (1 - sA)).T @ X), "sigma' is applied to A = sigma(Z1), i.e. sigma twice: "
                                                 "sigma'(Z1) = A (1 - A) uses A itself"),
           (X.T @ d1, "it is the transpose: W1 and its gradient have shape (h, 784)")]
    if W2.shape[0] == W2.shape[1]:
        out.append((((d2 @ W2.T) * A * (1 - A)).T @ X, "delta_2 goes back through W2 (10 x h), not its "
                                                       "transpose: (B, 10) @ (10, h) gives (B, h)"))
    return out


def _hidden_case(h, batch, seed, reference):
    def run(fn):
        theta, X, y, A, d2 = _network(h, batch, seed)
        W1, b1, W2, b2 = models.ann_unpack(theta, h)
        got, msg = _pair(fn(d2, W2.copy(), A, X), ("dW1", "db1"))
        if msg:
            return msg
        if reference == "finite differences":
            rng = np.random.default_rng(seed)
            coords = rng.choice(W1.size + h, size=12, replace=False)    # W1 and b1 come first in theta
            fd = np.array([models.central_difference(theta, i, X, y, h, lam=0.0) for i in coords])
            try:
                mine = np.concatenate([np.asarray(got[0], float).ravel(), np.asarray(got[1], float).ravel()])[coords]
            except (IndexError, ValueError):
                mine = None
            return compare(mine, fd, what="your dW1, db1 at 12 coordinates", rtol=1e-5,
                           atol=1e-7 * float(np.abs(fd).max()))
        gW1, gb1, _, _ = models.ann_unpack(models.ann_autograd(theta, X, y, h, lam=0.0), h)
        d1 = (d2 @ W2) * A * (1 - A)
        return compare(got[0], gW1, what="dW1", mistakes=_hidden_variants(d2, W2, A, X)) or \
            compare(got[1], gb1, what="db1", mistakes=[(d1.mean(axis=0), "it is the mean over the batch: "
                                                                         "the loss is a sum, so is its gradient")])

    return run


hidden_ex.case("h = 10, a batch of 6, against torch.autograd")(_hidden_case(10, 6, 53, "autograd"))
hidden_ex.case("h = 7, a batch of 5, against finite differences of the loss")(
    _hidden_case(7, 5, 54, "finite differences"))
hidden_ex.case("h = 3, one image, against torch.autograd", hidden=True)(_hidden_case(3, 1, 55, "autograd"))


# --------------------------------------------------------------------------- exercise 3: on the engines
acc_ex = BOOK.exercise(
    "parallel_accuracy", points=2, time_limit=30, engines=True, needs=("cl",), by_name=True,
    hint="every rank must hold the count of the whole test set (one buffer-based collective that every rank "
         "calls) before dividing by the size of the whole set.")


def _accuracy_case(n, seed):
    def run(name, cl):
        rng = np.random.default_rng(seed)
        m = models.AnnModel(50, seed=seed)
        m.theta[:] += 0.3 * rng.standard_normal(m.theta.size)
        x, y = rng.random((n, 28, 28)), rng.integers(0, 10, n)
        right = m.predict(m.prepare(x)) == y
        got = on_engines(cl, name, m.theta.copy(), x, y, comm_arg=True)
        expect = float(right.mean())
        if all(g is not None and np.isclose(float(g), expect) for g in got):
            return None
        if len(got) > 1 and np.isclose(float(got[0] or 0), expect):
            return (f"rank 0 returns {expect:.4f} but the other ranks return {got[1:]}: every rank must "
                    "hold the total (Allreduce, not Reduce)")
        return (f"the ranks return {got}; the accuracy of the whole set of {n} images is {expect:.4f}. "
                "Does every rank add the counts of all ranks before dividing by the size of the whole set?")

    return run


acc_ex.case("37 random images (not divisible by the ranks), a random network")(_accuracy_case(37, 56))
acc_ex.case("5 images", hidden=True)(_accuracy_case(5, 57))
