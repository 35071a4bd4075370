"""The figures of notebook 08. Every helper takes ``ax=None`` and returns the Axes it drew on."""

from __future__ import annotations

import numpy as np


def _ax(ax):
    import matplotlib.pyplot as plt

    return ax if ax is not None else plt.gca()


def accuracy_curves(results, ax=None, x: str = "seconds", target: float | None = None, ylabel="test accuracy"):
    """Score against training time (``x="seconds"``, evaluation excluded) or global steps (``x="step"``),
    one line per ``DesignResult``; the target as a dashed line."""
    ax = _ax(ax)
    for k, res in enumerate(results):
        ax.plot(res.history[x], res.history["score"], marker="o" if len(res.history[x]) < 30 else None, ms=3,
                label=res.design, color=f"C{k % 10}", ls="-" if k < 10 else "--")
    if target is not None:
        ax.axhline(target, color="k", ls=":", lw=1, label=f"target {target:g}")
    ax.set_xlabel("training time (s, evaluation excluded)" if x == "seconds" else "global steps (batches of |B| samples)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return ax


def bars(rows, key: str, ax=None, ylabel: str | None = None, log: bool = False, scale: float = 1.0):
    """One horizontal bar per design (``rows`` of ``compare.table``) of the column ``key``; NaN shown as 'never'."""
    ax = _ax(ax)
    names = [r["design"] for r in rows]
    values = np.array([r[key] for r in rows], dtype=float) * scale
    y = np.arange(len(rows))
    ax.barh(y, np.nan_to_num(values, nan=0.0), color=[f"C{k % 10}" for k in range(len(rows))])
    for yi, v in zip(y, values):
        if np.isnan(v):
            ax.text(0, yi, " never", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(ylabel or key)
    ax.grid(alpha=0.3, axis="x")
    return ax


def tradeoff(rows, ax=None, score: str = "final_score", ylabel: str = "final test accuracy",
             test_size: int | None = None):
    """Bytes sent per step (log scale) against the final score: what compression saves and what it costs.

    ``test_size``: the number of test images; then a band of two standard errors of an accuracy measured
    on that many images is drawn around the first row's (the baseline's): differences inside it are noise.
    """
    ax = _ax(ax)
    if test_size:
        a = rows[0][score]
        half = 2 * np.sqrt(a * (1 - a) / test_size)
        ax.axhspan(a - half, a + half, color="0.9", zorder=0, label=f"baseline ± 2 standard errors ({test_size} images)")
        ax.legend(fontsize=7, loc="lower left")
    for k, r in enumerate(rows):
        ax.scatter(r["kB_per_step"], r[score], color=f"C{k % 10}", s=40, zorder=3)
        ax.annotate(r["design"], (r["kB_per_step"], r[score]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("kB sent per step by the busiest rank (log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    return ax


def staleness(results, ax=None):
    """How stale the asynchronous server's gradients were: share of updates per staleness, one set of bars per run."""
    ax = _ax(ax)
    width = 0.8 / max(len(results), 1)
    for k, res in enumerate(results):
        s = np.asarray(res.extra["staleness"], dtype=int)
        counts = np.bincount(s) / max(len(s), 1)
        ax.bar(np.arange(len(counts)) + k * width, counts, width, label=f"{res.design} (mean {s.mean():.2f})")
    ax.set_xlabel("staleness: updates applied between sending the weights and applying the gradient")
    ax.set_ylabel("share of updates")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return ax


def measured_and_predicted(rows, predictions: dict, ax=None):
    """Grouped bars per design: ms per step measured here and predicted (``predictions``: {label: {design: ms}})."""
    ax = _ax(ax)
    names = [r["design"] for r in rows]
    series = {"measured here": [r["ms_per_step"] for r in rows]}
    series.update({label: [pred.get(n, np.nan) for n in names] for label, pred in predictions.items()})
    width = 0.8 / len(series)
    y = np.arange(len(names))
    for k, (label, values) in enumerate(series.items()):
        ax.barh(y + k * width, values, width, label=label, color=f"C{k}", hatch="" if k == 0 else "//", alpha=0.8)
    ax.set_yticks(y + 0.4 - width / 2, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time per step (ms)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    return ax
