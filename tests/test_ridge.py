"""ppu_lab.ridge: J exactly as written (a sum), its gradient, the closed form, and serial SGD."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from ppu_lab import ridge
from ppu_lab.data import make_ridge_data


@pytest.fixture
def problem():
    X, y, _ = make_ridge_data(60, 5, noise=0.3, seed=1)
    return X, y, 0.7


# --------------------------------------------------------------------------- J and its gradient
def test_objective_and_gradient_on_a_hand_computed_case():
    X = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = np.array([1.0, 2.0, 3.0])
    w = np.array([1.0, -1.0])
    # residuals y - Xw = (0, 4, 3): J = 1/2 (0 + 16 + 9) + 0.5/2 (1 + 1) = 13
    assert ridge.objective(w, X, y, 0.5) == 13.0
    # grad = -X^T r + lam w = -(3, 11) + (0.5, -0.5)
    np.testing.assert_array_equal(ridge.gradient(w, X, y, 0.5), [-2.5, -11.5])
    np.testing.assert_array_equal(ridge.data_gradient(w, X, y), [-3.0, -11.0])


def test_objective_is_a_sum_over_samples_not_a_mean(problem):
    X, y, lam = problem
    w = np.linspace(-1, 1, X.shape[1])
    data_term = ridge.objective(w, X, y, 0.0)
    X2, y2 = np.vstack([X, X]), np.concatenate([y, y])
    assert ridge.objective(w, X2, y2, 0.0) == pytest.approx(2 * data_term, rel=1e-14)
    assert ridge.objective(w, X2, y2, lam) == pytest.approx(2 * data_term + lam / 2 * w @ w, rel=1e-14)


def test_gradient_equals_central_finite_differences(problem):
    X, y, lam = problem
    w = np.random.default_rng(0).standard_normal(X.shape[1])
    h = 1e-5
    fd = np.array([(ridge.objective(w + h * e, X, y, lam) - ridge.objective(w - h * e, X, y, lam)) / (2 * h)
                   for e in np.eye(X.shape[1])])
    g = ridge.gradient(w, X, y, lam)
    np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-7 * np.abs(g).max())


def test_closed_form_solves_the_normal_equations_and_zeroes_the_gradient(problem):
    X, y, lam = problem
    w_star = ridge.closed_form(X, y, lam)
    d = X.shape[1]
    np.testing.assert_allclose((X.T @ X + lam * np.eye(d)) @ w_star, X.T @ y, rtol=1e-12, atol=1e-12)
    # an independent route: least squares on the augmented system [X; sqrt(lam) I] w = [y; 0]
    w_aug = np.linalg.lstsq(np.vstack([X, np.sqrt(lam) * np.eye(d)]), np.concatenate([y, np.zeros(d)]), rcond=None)[0]
    np.testing.assert_allclose(w_star, w_aug, rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(ridge.gradient(w_star, X, y, lam)) < 1e-10 * np.linalg.norm(X.T @ y)
    # and it is the minimum: any perturbation raises J
    J_star = ridge.objective(w_star, X, y, lam)
    for delta in np.random.default_rng(2).standard_normal((5, d)) * 1e-3:
        assert ridge.objective(w_star + delta, X, y, lam) > J_star


def test_closed_form_without_regularisation_on_rank_deficient_data():
    X = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])   # two identical columns
    y = np.array([1.0, 2.0, 3.0])
    w = ridge.closed_form(X, y, 0.0)
    np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-12)   # minimum-norm solution


# --------------------------------------------------------------------------- minibatches
def test_minibatches_cover_every_index_once_and_reshuffle_each_epoch():
    n, b = 23, 5
    epochs = [ridge.minibatches(n, b, seed=3, epoch=e) for e in range(4)]
    for batches in epochs:
        assert [len(idx) for idx in batches] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))
    orders = [np.concatenate(batches) for batches in epochs]
    assert all(not np.array_equal(orders[i], orders[j]) for i in range(4) for j in range(i))
    # deterministic for a seed, different for another seed
    np.testing.assert_array_equal(np.concatenate(ridge.minibatches(n, b, 3, 2)), orders[2])
    assert not np.array_equal(np.concatenate(ridge.minibatches(n, b, 4, 2)), orders[2])


def test_minibatch_gradient_averaged_over_one_epoch_is_the_full_gradient(problem):
    X, y, lam = problem                                   # 60 rows, batches of 12: 5 equal batches
    n = X.shape[0]
    w = np.random.default_rng(5).standard_normal(X.shape[1])
    batches = ridge.minibatches(n, 12, seed=0, epoch=1)
    g_B = [ridge.combine(w, ridge.data_gradient(w, X[i], y[i]), lam, n, len(i)) for i in batches]
    np.testing.assert_allclose(np.mean(g_B, axis=0), ridge.gradient(w, X, y, lam), rtol=1e-12, atol=1e-12)
    # without the N/|B| scale the estimate is |B|/N times too small in the data term: biased
    unscaled = np.mean([ridge.data_gradient(w, X[i], y[i]) + lam * w for i in batches], axis=0)
    assert not np.allclose(unscaled, ridge.gradient(w, X, y, lam), rtol=1e-2)


def test_minibatch_gradient_is_unbiased_monte_carlo(problem):
    X, y, lam = problem
    n, b, draws = X.shape[0], 7, 4000
    w = np.random.default_rng(6).standard_normal(X.shape[1])
    rng = np.random.default_rng(7)
    g = np.array([ridge.combine(w, ridge.data_gradient(w, X[i], y[i]), lam, n, b)
                  for i in (rng.choice(n, b, replace=False) for _ in range(draws))])
    stderr = g.std(axis=0, ddof=1) / np.sqrt(draws)
    assert np.all(np.abs(g.mean(axis=0) - ridge.gradient(w, X, y, lam)) < 5 * stderr)


# --------------------------------------------------------------------------- SGD
def test_sgd_is_the_loop_of_the_pure_kernels(problem):
    """What threads/MPI rely on: sgd == minibatches + data_gradient + combine + sgd_step."""
    X, y, lam = problem
    n = X.shape[0]
    lr = 0.3 / ridge.minibatch_lipschitz(X, lam, 8)
    res = ridge.sgd(X, y, lam, lr, 8, epochs=3, seed=11)
    w = np.zeros(X.shape[1])
    for epoch in (1, 2, 3):
        for idx in ridge.minibatches(n, 8, 11, epoch):
            w = ridge.sgd_step(w, ridge.combine(w, ridge.data_gradient(w, X[idx], y[idx]), lam, n, len(idx)), lr)
    np.testing.assert_array_equal(res.w, w)


def test_sgd_same_seed_same_result_other_seed_other_result(problem):
    X, y, lam = problem
    lr = 0.5 / ridge.minibatch_lipschitz(X, lam, 4)
    a = ridge.sgd(X, y, lam, lr, 4, epochs=5, seed=1)
    b = ridge.sgd(X, y, lam, lr, 4, epochs=5, seed=1)
    c = ridge.sgd(X, y, lam, lr, 4, epochs=5, seed=2)
    np.testing.assert_array_equal(a.w, b.w)
    assert a.history["J"] == b.history["J"]
    assert not np.array_equal(a.w, c.w)
    assert a.history["J"] != c.history["J"]


def test_sgd_history(problem):
    X, y, lam = problem
    res = ridge.sgd(X, y, lam, 1e-3, 10, epochs=4, seed=0)
    assert res.history["epoch"] == [0, 1, 2, 3, 4]
    assert res.history["J"][0] == ridge.objective(np.zeros(X.shape[1]), X, y, lam)
    assert res.history["J"][-1] == pytest.approx(ridge.objective(res.w, X, y, lam), rel=1e-12)
    assert res.history["J"][-1] < res.history["J"][0]
    assert res.history["time"][0] == 0.0 and np.all(np.diff(res.history["time"]) >= 0)
    w0 = np.ones(X.shape[1])
    np.testing.assert_array_equal(ridge.sgd(X, y, lam, 1e-3, 10, epochs=0, w0=w0).w, w0)


def test_sgd_reaches_the_closed_form():
    """Relative error ||w - w*|| / ||w*|| < 1e-3 on a well-conditioned problem, for several seeds."""
    X, y, _ = make_ridge_data(1000, 10, noise=0.1, seed=0)
    lam, b = 1.0, 10
    w_star = ridge.closed_form(X, y, lam)
    lr = 1.0 / ridge.minibatch_lipschitz(X, lam, b)      # half the per-step stable bound
    errors = [ridge.relative_error(ridge.sgd(X, y, lam, lr, b, epochs=50, seed=s, lr_decay=1.0).w, w_star)
              for s in range(3)]
    print(f"relative error after 50 epochs with lr_decay=1: {max(errors):.2e}")
    assert max(errors) < 1e-3
    # constant-step SGD stalls on a noise floor that the decay removes
    const = ridge.relative_error(ridge.sgd(X, y, lam, lr, b, epochs=50, seed=0).w, w_star)
    assert const > 10 * errors[0]


def test_learning_rate_schedule():
    assert ridge.learning_rate(0.1, 1) == 0.1 and ridge.learning_rate(0.1, 9) == 0.1
    assert ridge.learning_rate(0.1, 1, lr_decay=0.5) == 0.1
    assert ridge.learning_rate(0.1, 5, lr_decay=0.5) == pytest.approx(0.1 / 3)


# --------------------------------------------------------------------------- bad input
def _nan_at(a, index):
    a = a.copy()
    a[index] = np.nan
    return a


# (argument the message must start with, call on the 60 x 5 problem)
BAD_CALLS = {
    "lam < 0": ("lam", lambda X, y: ridge.sgd(X, y, -1.0, 1e-3, 4, 1)),
    "lam < 0 (objective)": ("lam", lambda X, y: ridge.objective(np.zeros(5), X, y, -0.1)),
    "lam nan": ("lam", lambda X, y: ridge.closed_form(X, y, float("nan"))),
    "lr = 0": ("lr", lambda X, y: ridge.sgd(X, y, 1.0, 0.0, 4, 1)),
    "lr < 0": ("lr", lambda X, y: ridge.sgd(X, y, 1.0, -1e-3, 4, 1)),
    "lr not a number": ("lr", lambda X, y: ridge.sgd(X, y, 1.0, "fast", 4, 1)),
    "batch 0": ("batch_size", lambda X, y: ridge.sgd(X, y, 1.0, 1e-3, 0, 1)),
    "batch > N": ("batch_size", lambda X, y: ridge.sgd(X, y, 1.0, 1e-3, len(y) + 1, 1)),
    "batch 2.5": ("batch_size", lambda X, y: ridge.sgd(X, y, 1.0, 1e-3, 2.5, 1)),
    "batch '8'": ("batch_size", lambda X, y: ridge.sgd(X, y, 1.0, 1e-3, "8", 1)),
    "batch 0 (minibatches)": ("batch_size", lambda X, y: ridge.minibatches(10, 0, 0, 1)),
    "epochs < 0": ("epochs", lambda X, y: ridge.sgd(X, y, 1.0, 1e-3, 4, -1)),
    "epochs 1.5": ("epochs", lambda X, y: ridge.sgd(X, y, 1.0, 1e-3, 4, 1.5)),
    "seed < 0": ("seed", lambda X, y: ridge.sgd(X, y, 1.0, 1e-3, 4, 1, seed=-3)),
    "lr_decay < 0": ("lr_decay", lambda X, y: ridge.sgd(X, y, 1.0, 1e-3, 4, 1, lr_decay=-1)),
    "y too short": ("y", lambda X, y: ridge.sgd(X, y[:-1], 1.0, 1e-3, 4, 1)),
    "y a column": ("y", lambda X, y: ridge.gradient(np.zeros(5), X, y[:, None], 1.0)),
    "X 1-D": ("X", lambda X, y: ridge.closed_form(X[0], y, 1.0)),
    "X nan": ("X", lambda X, y: ridge.sgd(_nan_at(X, (3, 1)), y, 1.0, 1e-3, 4, 1)),
    "y nan": ("y", lambda X, y: ridge.closed_form(X, _nan_at(y, 0), 1.0)),
    "y inf": ("y", lambda X, y: ridge.objective(np.zeros(5), X, y + np.inf, 1.0)),
    "w too short": ("w", lambda X, y: ridge.objective(np.zeros(4), X, y, 1.0)),
    "w a column": ("w", lambda X, y: ridge.gradient(np.zeros((5, 1)), X, y, 1.0)),
    "w0 wrong shape": ("w0", lambda X, y: ridge.sgd(X, y, 1.0, 1e-3, 4, 1, w0=np.zeros(6))),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_raises_value_error_naming_the_argument(problem, case):
    X, y, _ = problem
    name, call = BAD_CALLS[case]
    with pytest.raises(ValueError, match=rf"^{name}\b") as info:
        call(X, y)
    assert not isinstance(info.value, ridge.DivergenceError)


# --------------------------------------------------------------------------- divergence
def _bound(message, label):
    return float(re.search(rf"{re.escape(label)} = ([0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)", message).group(1))


@pytest.mark.parametrize("batch_size", [60, 6])
def test_divergence_names_lr_and_the_stable_bound_without_numpy_warnings(problem, batch_size):
    X, y, lam = problem
    L = float(np.linalg.eigvalsh(X.T @ X)[-1]) + lam
    lr = 50 / L
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # an overflow RuntimeWarning would fail here
        with pytest.raises(ridge.DivergenceError) as info:
            ridge.sgd(X, y, lam, lr, batch_size, epochs=200, seed=0)
    message = str(info.value)
    assert f"lr={lr:g}" in message
    assert _bound(message, "2/L") == pytest.approx(2 / L, rel=1e-3)
    assert "lambda_max(X^T X)" in message
    assert isinstance(info.value, ValueError)


def test_divergence_advice_is_stable(problem):
    """For batches of one the full-batch bound 2/L is far too large; the advised bound is stable."""
    X, y, lam = problem
    L = ridge.lipschitz(X, lam)
    with pytest.raises(ridge.DivergenceError) as info:
        ridge.sgd(X, y, lam, 0.5 * 2 / L, 1, epochs=50)     # half the full-batch bound still diverges
    advised = 2 / ridge.minibatch_lipschitz(X, lam, 1)
    assert _bound(str(info.value), f"choose lr < 2/{ridge.minibatch_lipschitz(X, lam, 1):.4g}") == \
        pytest.approx(advised, rel=1e-3)
    assert advised < 2 / L
    res = ridge.sgd(X, y, lam, 0.99 * advised, 1, epochs=50)   # no DivergenceError
    assert res.history["J"][-1] < res.history["J"][0]
