"""Figures for the lab. Every helper takes ``ax=None`` and returns the Axes it drew on.

Each notebook draws through these helpers; no notebook writes its plotting code twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _ax(ax):
    import matplotlib.pyplot as plt

    return ax if ax is not None else plt.gca()


def speedup(workers: Sequence[float], times: Sequence[float], ax=None, label: str = "measured",
            xlabel: str = "workers", ideal: bool = True, **style):
    """Speedup T(1)/T(p) against p, with the ideal line p (drawn once per Axes)."""
    ax = _ax(ax)
    workers = np.asarray(workers, dtype=float)
    times = np.asarray(times, dtype=float)
    base = times[np.argmin(workers)]
    ax.plot(workers, base / times, "o-", label=label, **style)
    if ideal and not getattr(ax, "_ppu_ideal_drawn", False):
        ax.plot(workers, workers / workers.min(), "k--", lw=1, label="ideal")
        ax._ppu_ideal_drawn = True
    ax.set_xlabel(xlabel)
    ax.set_ylabel("speedup T(1) / T(p)")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def efficiency(workers: Sequence[float], times: Sequence[float], ax=None, label: str = "measured",
               xlabel: str = "workers", **style):
    """Parallel efficiency T(1) / (p T(p)) against p, with the ideal line 1."""
    ax = _ax(ax)
    workers = np.asarray(workers, dtype=float)
    times = np.asarray(times, dtype=float)
    base = times[np.argmin(workers)] * workers.min()
    ax.plot(workers, base / (workers * times), "o-", label=label, **style)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("parallel efficiency")
    ax.set_ylim(0, 1.1)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def convergence(history: Sequence[float], optimum: float | None = None, ax=None, label: str | None = None,
                xlabel: str = "epoch", ylabel: str | None = None, x: Sequence[float] | None = None, **style):
    """Objective (or J - J* when ``optimum`` is given, on a log scale) against epochs or time."""
    ax = _ax(ax)
    values = np.asarray(history, dtype=float)
    xs = np.arange(len(values)) if x is None else np.asarray(x, dtype=float)
    if optimum is not None:
        values = np.maximum(values - optimum, np.finfo(float).tiny)
        ax.set_yscale("log")
        ylabel = ylabel or "J(w) - J(w*)"
    ax.plot(xs, values, label=label, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or "J(w)")
    if label is not None:
        ax.legend()
    ax.grid(alpha=0.3)
    return ax
