"""What the course's conclusions are judged by (notebook 07): differences with their noise, the
roughness of a loss curve, and the variance of the minibatch gradient.

Noise, the lab's rule. A difference between configurations counts only when it is larger than its
*noise*, the half-width of a 95% interval, never smaller than a fixed floor (``FLOORS``). It has two
parts, added as variances:

- the **seeds**: the configurations are run with the same seeds (initial weights and minibatch order),
  and the spread of the per-seed difference over the seeds, divided by sqrt(seeds), is its standard
  error; with so few seeds that spread is itself uncertain, so it is multiplied by Student's t
  quantile (4.3 for 3 seeds, 12.7 for 2) rather than by 2 (needs two seeds or more);
- the **test images** (accuracies only): both runs are scored on the *same* test images, so the
  error of their difference comes from the images on which they *disagree* (McNemar): for one pair of
  runs with b images right only in the first and c only in the second, of n, the difference is
  (c - b) / n with standard error sqrt(b + c - (c - b)^2 / n) / n. With several seeds the per-image
  differences are averaged over the seeds first, and the error is doubled. Two runs that agree on
  every image differ by exactly 0 with error 0, where an unpaired binomial error (two standard errors
  of about 1.6 points for two runs at 93% on 2,000 images) would call far smaller, real differences
  noise, and identical runs different.

Records must keep ``test_correct`` (per-image correctness, ``results.correct_vector``); records
without it are judged on the seeds' spread alone.
"""

from __future__ import annotations

import math

import numpy as np

from ppu_lab.experiments.results import correct_vector

__all__ = ["FLOORS", "t975", "seed_effect", "accuracy_contrast", "roughness", "same_training", "gradient_noise"]

#: Differences never counted however well the seeds agree: times 5% (the resolution of a median on a
#: shared machine), losses and loss roughness 2%, the communication share 1 point, accuracy 0.
FLOORS = {"time": math.log(1.05), "loss": math.log(1.02), "share": 0.01, "accuracy": 0.0,
          "roughness": math.log(1.02), "variance": math.log(1.02)}


# Student's t, 97.5% quantile, by degrees of freedom (seeds - 1); 2.0 beyond the table.
_T975 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t975(dof: int) -> float:
    """Student's t quantile that a 95% interval of a mean of ``dof + 1`` values uses."""
    return _T975.get(int(dof), 2.0)


def seed_effect(values: dict, floor: float = 0.0) -> dict:
    """The mean of per-seed values ``{seed: value}`` and its noise (the 95% half-width over the seeds,
    ``t975(seeds - 1)`` standard errors, at least ``floor``; only ``floor`` with one seed)."""
    v = np.array([values[s] for s in sorted(values)], dtype=float)
    if v.size == 0:
        raise ValueError("no seed has every run this comparison needs")
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    noise = max(t975(v.size - 1) * se, floor) if v.size > 1 else floor
    return {"effect": float(v.mean()), "se_seeds": se, "noise": noise, "seeds": int(v.size),
            "per_seed": v.tolist()}


def accuracy_contrast(terms, floor: float = FLOORS["accuracy"]) -> dict:
    """sum_k w_k * accuracy_k, for ``terms`` = [(w_k, {seed: record}), ...] scored on the same images.

    Pairs the runs by seed (the seeds every term has) and by test image. Returns ``effect`` (a
    fraction), ``se_images`` (paired, McNemar-style), ``se_seeds``, ``noise`` (2 combined standard
    errors, the seeds' part with Student's t, at least ``floor``), ``seeds``, ``per_seed`` and
    ``disagreements`` (images on which the
    runs of a seed do not all agree, summed over the seeds).
    """
    seeds = sorted(set.intersection(*(set(runs) for _, runs in terms)))
    if not seeds:
        raise ValueError("no seed has every run this comparison needs")
    per_seed = {s: sum(w * float(runs[s]["final_accuracy"]) for w, runs in terms) for s in seeds}
    out = seed_effect(per_seed)
    vectors = [[correct_vector(runs[s]) for w, runs in terms] for s in seeds]
    if any(v is None for vs in vectors for v in vs):
        out["se_images"], out["disagreements"] = float("nan"), None
        half = t975(len(seeds) - 1) * out["se_seeds"]
    else:
        per_image = np.array([sum(w * v.astype(float) for (w, _), v in zip(terms, vs)) for vs in vectors])
        d = per_image.mean(axis=0)  # (n_test,): the contrast on each image, averaged over the seeds
        out["se_images"] = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
        out["disagreements"] = int(sum((np.any(vs, axis=0) & ~np.all(vs, axis=0)).sum() for vs in vectors))
        seeds_half = t975(len(seeds) - 1) * out["se_seeds"] if len(seeds) > 1 else 0.0
        half = math.sqrt((2 * out["se_images"]) ** 2 + seeds_half ** 2)
    out["noise"] = max(half, floor) if math.isfinite(half) else floor
    return out


def roughness(step_loss, skip: float = 1 / 3) -> float:
    """How much a loss curve jumps from step to step: half the variance of the differences
    L[t+1] - L[t] over the steps after the first ``skip`` fraction (the steep start). Taking the
    variance removes the mean slope of the curve; for independent noise of variance s^2 around a slowly
    changing mean it estimates s^2, and the noise of a minibatch's loss falls as 1 / (global batch)."""
    loss = np.asarray(step_loss, dtype=float)
    loss = loss[int(skip * loss.size):]
    if loss.size < 3:
        raise ValueError(f"roughness needs at least 3 steps after the first {skip:.0%}; got {loss.size}")
    return float(np.var(np.diff(loss)) / 2)


def same_training(a: dict, b: dict, rtol: float = 1e-6) -> bool:
    """True when two runs trained identically: equal per-step losses (to ``rtol``) and the same test
    images right. With a global batch, p ranks and one rank compute the same SGD (float64: to rounding)."""
    la, lb = np.asarray(a.get("step_loss") or [], float), np.asarray(b.get("step_loss") or [], float)
    ca, cb = correct_vector(a), correct_vector(b)
    if la.size == 0 or la.shape != lb.shape or ca is None or cb is None:
        return False
    return bool(np.allclose(la, lb, rtol=rtol, atol=0.0) and np.array_equal(ca, cb))


def gradient_noise(model, data, batch_sizes, *, params=None, draws: int = 20, seed: int = 0, hidden: int = 50):
    """The variance of the minibatch gradient against the batch size, at fixed parameters.

    For each B draws ``draws`` minibatches of B training images (without replacement, as SGD does) and
    measures E||g_B - g||^2, where g_B is the mean gradient of the cross-entropy over the minibatch and
    g its mean over the whole training set (the L2 term is the same in both and cancels). Sampling
    theory says var(B) = s^2 (N - B) / (B (N - 1)): ``expected`` scales the smallest batch's value by it.
    ``params`` None: the initial weights of ``seed``. Returns one row per batch size.
    """
    from ppu_lab.models import build_model

    m = build_model(model, hidden=hidden, seed=seed)
    if params is not None:
        m.theta[:] = params
    x, y = m.prepare(data[0]), np.ascontiguousarray(data[1], dtype=np.int64)
    n = len(y)

    def mean_grad(idx):
        m.loss_grad(x[idx], y[idx])
        return np.array(m.grad_view, dtype=np.float64) / len(idx)

    full = sum(mean_grad(c) * len(c) for c in np.array_split(np.arange(n), max(1, n // 1000))) / n
    rng = np.random.default_rng(seed)
    rows = []
    for b in sorted(batch_sizes):
        sq = np.array([np.sum((mean_grad(rng.choice(n, b, replace=False)) - full) ** 2) for _ in range(draws)])
        rows.append({"batch_size": int(b), "variance": float(sq.mean()), "se": float(sq.std(ddof=1) / math.sqrt(draws)),
                     "relative": float(sq.mean() / np.sum(full ** 2)), "draws": draws, "n_train": n})
    b0, v0 = rows[0]["batch_size"], rows[0]["variance"]
    for r in rows:
        r["expected"] = v0 * (b0 / r["batch_size"]) * (n - r["batch_size"]) / (n - b0)
    return rows
