"""Figures for the lab. Every helper takes ``ax=None`` and returns the Axes it drew on.

Each notebook draws through these helpers; no notebook writes its plotting code twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _ax(ax):
    import matplotlib.pyplot as plt

    return ax if ax is not None else plt.gca()


def _integer_ticks(ax):
    """Worker/rank counts are integers: tick exactly the counts that were measured."""
    data_lines = [ln for ln in ax.get_lines() if ln.get_transform() == ax.transData]  # not axhline
    ax.set_xticks(sorted({int(v) for line in data_lines for v in line.get_xdata()}))


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
    _integer_ticks(ax)
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
    _integer_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("parallel efficiency")
    top = max(float(np.nanmax(ln.get_ydata())) for ln in ax.get_lines())
    ax.set_ylim(0, max(1.1, 1.05 * top))  # superlinear points (cache effects, noise) stay visible
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
        # J - J* below rounding of J* (J reached J*) is drawn at that level, not at 1e-308.
        values = np.maximum(values - optimum, np.finfo(float).eps * max(abs(optimum), np.finfo(float).tiny))
        ax.set_yscale("log")
        ylabel = ylabel or "J(w) - J(w*)"
    ax.plot(xs, values, label=label, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or "J(w)")
    if label is not None:
        ax.legend()
    ax.grid(alpha=0.3)
    return ax


# --------------------------------------------------------------------------- MPI scaling (notebook 04)
def step_breakdown(workers: Sequence[float], compute: Sequence[float], comm: Sequence[float], ax=None,
                   label: str = "", offset: float = 0.0, width: float = 0.38, xlabel: str = "MPI ranks", **style):
    """Time per step (given in seconds, drawn in ms) as stacked bars: compute below, communication on top.

    Call once per design with different ``offset`` (e.g. -0.2 and +0.2) to set designs side by side.
    """
    ax = _ax(ax)
    x = np.asarray(workers, dtype=float) + offset
    compute_ms = 1e3 * np.asarray(compute, dtype=float)
    comm_ms = 1e3 * np.asarray(comm, dtype=float)
    prefix = f"{label}: " if label else ""
    bars = ax.bar(x, compute_ms, width, label=f"{prefix}compute", **style)
    ax.bar(x, comm_ms, width, bottom=compute_ms, label=f"{prefix}communication", hatch="//",
           color=bars.patches[0].get_facecolor() if bars.patches else None, alpha=0.45, **style)
    ax.set_xticks(np.asarray(workers, dtype=float))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time per step (ms)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return ax


def with_reference(x, yours, ref_x, ref_y, xlabel: str, ylabel: str, ax=None, label: str = "your run",
                   ref_label: str = "reference run", logx: bool = False, logy: bool = False, **style):
    """Your measurement beside the reference run's (``ppu_lab.reference``): the reference grey and dashed,
    yours in colour with markers (``sweep`` twice, on one Axes). Returns the Axes."""
    ax = sweep(ref_x, ref_y, xlabel, ylabel, ax=ax, label=ref_label, logx=logx, logy=logy, marker="s", ls="--",
               color="0.55", ms=4)
    return sweep(x, yours, xlabel, ylabel, ax=ax, label=label, logx=logx, logy=logy, **style)


def predicted_speedup(ranks, speedups: dict, ax=None, measured=None, xlabel: str = "MPI ranks", **style):
    """Predicted speedup curves (``{label: S(p)}`` over ``ranks``, log-log) with the ideal line, and the
    measured points ``{label: (ranks, S)}`` as markers; the peak of each curve is marked."""
    ax = _ax(ax)
    p = np.asarray(ranks, dtype=float)
    ax.plot(p, p, "k--", lw=1, label="ideal")
    for i, (label, s) in enumerate(speedups.items()):
        s = np.asarray(s, dtype=float)
        ax.plot(p, s, "-", color=f"C{i}", label=f"{label}, predicted", **style)
        k = int(np.argmax(s))
        ax.plot(p[k], s[k], "v", color=f"C{i}", ms=8)
    for i, (label, (mp, ms)) in enumerate((measured or {}).items()):
        ax.plot(mp, ms, "o", color=f"C{i}", mec="k", ms=7, label=f"{label}, measured")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("speedup T(1) / T(p)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return ax


def oversubscribed(cores: int, ax=None, label: str = "more ranks than cores"):
    """Shade the part of a ranks axis beyond ``cores``: timings there measure the scheduler, not the method."""
    ax = _ax(ax)
    lo, hi = ax.get_xlim()
    if hi > cores + 0.5:
        ax.axvspan(cores + 0.5, hi, color="0.9", zorder=0, label=label)
        ax.set_xlim(lo, hi)
        ax.legend()
    return ax


def sweep(x: Sequence[float], values: Sequence[float], xlabel: str, ylabel: str, ax=None,
          label: str | None = None, logx: bool = False, logy: bool = False, **style):
    """A measured quantity against a swept parameter (batch size, lambda, step h), markers and line."""
    ax = _ax(ax)
    style.setdefault("marker", "o")
    ax.plot(np.asarray(x, dtype=float), np.asarray(values, dtype=float), label=label, **style)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if label is not None:
        ax.legend()
    ax.grid(alpha=0.3)
    return ax


# --------------------------------------------------------------------------- the course's figures (notebook 07)
# Each reads saved experiment results: a path to a JSON-lines file of ``ppu_lab.experiments`` or
# its records (``load_results``). Repeated runs of one configuration are drawn as their median.
NODES = "number of nodes (MPI ranks)"
_METRICS = {"epoch_time": ("average time per iteration = one epoch (s)", 1.0),
            "median_step_time": ("median time per SGD step (ms)", 1e3),
            "final_accuracy": ("recognition accuracy on the test set (%)", 100.0)}


def _select(results, model=None, batch_mode=None):
    """(records of one model and batch mode, model, batch_mode); asks for a choice when ambiguous."""
    import os

    if isinstance(results, (str, os.PathLike)):
        from ppu_lab.experiments import load_results

        results = load_results(results)
    records = list(results)
    if not records:
        raise ValueError("results: no records to plot; run `python -m ppu_lab.experiments run` first")
    for name, value, field_ in (("model", model, "label"), ("batch_mode", batch_mode, "batch_mode")):
        values = sorted({r[field_] for r in records})
        if value is None and len(values) > 1:
            raise ValueError(f"{name}: the results hold several ({', '.join(values)}); pass {name}=... to choose one")
        value = values[0] if value is None else value
        if value not in values:
            raise ValueError(f"{name}={value!r} is not in the results, which hold {values}")
        records = [r for r in records if r[field_] == value]
        model, batch_mode = (value, batch_mode) if name == "model" else (model, value)
    return records, model, batch_mode


def results_series(results, x, y, group, model=None, batch_mode=None):
    """``{group value: (xs, ys)}``: ``y`` against ``x`` for each value of ``group``, sorted by x.

    The median is taken over repeated runs of one point. Used by the figures below; the tests
    compare the drawn lines with it.
    """
    records, _, _ = _select(results, model, batch_mode)
    points: dict = {}
    for r in records:
        points.setdefault(r[group], {}).setdefault(r[x], []).append(float(r[y]))
    return {g: (np.array(sorted(pts)), np.array([np.median(pts[k]) for k in sorted(pts)]))
            for g, pts in sorted(points.items())}


def _course_figure(results, ax, x, group, metric, model, batch_mode, xlabel, legend, **style):
    ax = _ax(ax)
    results, model, batch_mode = _select(results, model, batch_mode)
    ylabel, scale = _METRICS[metric]
    for g, (xs, ys) in results_series(results, x, metric, group, model, batch_mode).items():
        ax.plot(xs, ys * scale, "o-", label=legend.format(g), **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{model}, {batch_mode.replace('_', '-')} batch")
    if x == "ranks":
        _integer_ticks(ax)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def iteration_time_vs_nodes(results, ax=None, model=None, batch_mode=None, metric="epoch_time", **style):
    """The course's figure: average time per iteration (epoch) against the number of nodes, one line per batch size."""
    return _course_figure(results, ax, "ranks", "batch_size", metric, model, batch_mode, NODES, "batch {}", **style)


def iteration_time_vs_batch(results, ax=None, model=None, batch_mode=None, metric="epoch_time", **style):
    """The course's figure: average time per iteration (epoch) against the batch size, one line per node count."""
    return _course_figure(results, ax, "batch_size", "ranks", metric, model, batch_mode, "batch size",
                          "{} node(s)", **style)


def accuracy_vs_batch(results, ax=None, model=None, batch_mode=None, **style):
    """The course's figure: recognition accuracy (%) against the batch size, one line per node count."""
    return _course_figure(results, ax, "batch_size", "ranks", "final_accuracy", model, batch_mode, "batch size",
                          "{} node(s)", **style)


def accuracy_vs_nodes(results, ax=None, model=None, batch_mode=None, **style):
    """The course's figure: recognition accuracy (%) against the number of nodes, one line per batch size."""
    return _course_figure(results, ax, "ranks", "batch_size", "final_accuracy", model, batch_mode, NODES,
                          "batch {}", **style)


def speedup_vs_nodes(results, ax=None, model=None, batch_mode=None, metric="epoch_time", **style):
    """Speedup T(1)/T(p) of the time per iteration against the nodes, one line per batch size, with the ideal."""
    return _scaling_vs_nodes(speedup, results, ax, model, batch_mode, metric, **style)


def efficiency_vs_nodes(results, ax=None, model=None, batch_mode=None, metric="epoch_time", **style):
    """Parallel efficiency T(1)/(p T(p)) against the nodes, one line per batch size, with the ideal 1."""
    return _scaling_vs_nodes(efficiency, results, ax, model, batch_mode, metric, **style)


def _scaling_vs_nodes(draw, results, ax, model, batch_mode, metric, **style):
    """One ``draw`` (speedup or efficiency) line per batch size, from saved results."""
    ax = _ax(ax)
    results, model, batch_mode = _select(results, model, batch_mode)
    for b, (ranks, times) in results_series(results, "ranks", metric, "batch_size", model, batch_mode).items():
        draw(ranks, times, ax=ax, label=f"batch {b}", xlabel=NODES, **style)
    _node_axis(ax, model, batch_mode)
    return ax


def _node_axis(ax, model, batch_mode):
    _integer_ticks(ax)
    ax.set_title(f"{model}, {batch_mode.replace('_', '-')} batch")


def course_figures(results, model=None, batch_mode=None, axes=None):
    """The course's four figures side by side (2 x 2): time per iteration vs nodes and vs batch size,
    accuracy vs batch size and vs nodes. Returns the 2 x 2 array of Axes."""
    import matplotlib.pyplot as plt

    results, model, batch_mode = _select(results, model, batch_mode)
    if axes is None:
        _, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    axes = np.asarray(axes)
    for fn, ax in zip((iteration_time_vs_nodes, iteration_time_vs_batch, accuracy_vs_batch, accuracy_vs_nodes),
                      axes.flat):
        fn(results, ax=ax, model=model, batch_mode=batch_mode)
    return axes


# --------------------------------------------------------------------------- MNIST (notebooks 05-06)
def digits(images, labels=None, ax=None, ncols: int = 10, predicted=None):
    """MNIST images (n, 28, 28) tiled in one picture, ``ncols`` per row; labels (and predictions) below."""
    ax = _ax(ax)
    images = np.asarray(images, dtype=float)
    n = len(images)
    nrows = -(-n // ncols)
    pitch = 30 if labels is None else 40  # room for the label under each image
    tiles = np.ones((nrows * pitch, ncols * 30))
    for k, img in enumerate(images):
        r, c = divmod(k, ncols)
        tiles[r * pitch + 1:r * pitch + 29, c * 30 + 1:c * 30 + 29] = 1.0 - img  # dark ink on white
    ax.imshow(tiles, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if labels is not None:
        text = [str(int(v)) for v in labels]
        if predicted is not None:
            text = [f"{t}/{int(p)}" for t, p in zip(text, predicted)]
        for k, t in enumerate(text):
            r, c = divmod(k, ncols)
            ax.text(c * 30 + 15, r * pitch + 34, t, ha="center", va="center", fontsize=8, color="tab:blue")
        ax.set_xlabel("label" if predicted is None else "label / predicted")
    return ax


# --------------------------------------------------------------------------- MPI collectives (notebook 03)
_COLLECTIVES = {
    # name: (before, after); each a list over ranks of the block labels that rank holds
    "Bcast": (lambda p: [["A"]] + [[] for _ in range(p - 1)], lambda p: [["A"] for _ in range(p)]),
    "Scatter": (lambda p: [[f"A{r}" for r in range(p)]] + [[] for _ in range(p - 1)],
                lambda p: [[f"A{r}"] for r in range(p)]),
    "Gather": (lambda p: [[f"A{r}"] for r in range(p)],
               lambda p: [[f"A{r}" for r in range(p)]] + [[] for _ in range(p - 1)]),
    "Allgather": (lambda p: [[f"A{r}"] for r in range(p)], lambda p: [[f"A{r}" for r in range(p)] for _ in range(p)]),
    "Reduce": (lambda p: [[f"A{r}"] for r in range(p)], lambda p: [["ΣA"]] + [[] for _ in range(p - 1)]),
    "Allreduce": (lambda p: [[f"A{r}"] for r in range(p)], lambda p: [["ΣA"] for _ in range(p)]),
}


def collective_diagram(name: str, ranks: int = 4, ax=None):
    """Who holds which block before and after an MPI collective (Bcast, Scatter, Gather, Allgather,
    Reduce, Allreduce): one row per rank, rank 0 on top; ``A_r`` is rank r's block, ``ΣA`` their sum."""
    from matplotlib.patches import Rectangle

    if name not in _COLLECTIVES:
        raise ValueError(f"name must be one of {list(_COLLECTIVES)}; got {name!r}")
    ax = _ax(ax)
    before, after = (f(int(ranks)) for f in _COLLECTIVES[name])
    colors = {f"A{r}": f"C{r % 10}" for r in range(int(ranks))} | {"A": "C0", "ΣA": "C7"}
    for x0, state, title in ((0.0, before, "before"), (ranks + 3.0, after, "after")):
        ax.text(x0 + ranks / 2, -0.8, title, ha="center", fontsize=10)
        for r, blocks in enumerate(state):
            ax.add_patch(Rectangle((x0, r), ranks, 0.8, fill=False, ec="0.6", lw=0.8))
            for j, label in enumerate(blocks):
                ax.add_patch(Rectangle((x0 + j, r + 0.05), 0.95, 0.7, color=colors[label], alpha=0.7))
                ax.text(x0 + j + 0.47, r + 0.42, label, ha="center", va="center", fontsize=9)
    for r in range(int(ranks)):
        ax.text(-0.2, r + 0.4, f"rank {r}", ha="right", va="center", fontsize=9)
    ax.annotate("", xy=(ranks + 2.7, ranks / 2), xytext=(ranks + 0.3, ranks / 2),
                arrowprops=dict(arrowstyle="->", lw=1.5))
    ax.text(ranks + 1.5, ranks / 2 - 0.35, name, ha="center", fontsize=9, weight="bold")
    ax.set_xlim(-1.6, 2 * ranks + 3.2)
    ax.set_ylim(ranks + 0.2, -1.3)
    ax.set_axis_off()
    return ax


def pingpong_fit(nbytes: Sequence[float], seconds: Sequence[float], model=None, ax=None, regimes=None,
                 reference=None, **style):
    """Measured one-way message time (µs) vs message size (bytes), log-log, with the alpha-beta line,
    the two lines of ``regimes`` (``collectives.fit_regimes``) and the reference run's ping-pong
    (records with ``nbytes`` and ``seconds``, grey)."""
    ax = _ax(ax)
    m = np.asarray(nbytes, dtype=float)
    if reference:
        ax.loglog([r["nbytes"] for r in reference], [1e6 * r["seconds"] for r in reference], "s--", color="0.55",
                  ms=4, label="reference run")
    ax.loglog(m, 1e6 * np.asarray(seconds, dtype=float), "o", label="ping-pong (measured)", **style)
    grid = np.geomspace(m.min(), m.max(), 200)
    if model is not None:
        ax.loglog(grid, 1e6 * model.send(grid), "-", label=f"α + β·m: {model}")
    if regimes is not None:
        ax.loglog(grid, 1e6 * regimes.send(grid), ":", lw=2, label=f"two lines, switch at {regimes.switch:,.0f} B")
        ax.axvline(regimes.switch, color="0.5", lw=0.8)
    ax.set_xlabel("message size m (bytes)")
    ax.set_ylabel("one-way time (µs)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return ax


def collective_costs(rows, model=None, ax=None, collectives=("Allreduce", "Allgather + sum", "pickled allreduce"),
                     reference=None):
    """Time per call (µs) vs message size (bytes) of ``collectives.compare_collectives``'s rows, one line per
    collective and rank count, with the cost model's prediction (``model.time(costmodel.COLLECTIVES[name](m, p))``)
    dashed and the reference run's rows (``reference``, 2 ranks) grey."""
    from ppu_lab import costmodel

    ax = _ax(ax)
    for name in collectives if reference else ():
        ref = sorted((r for r in reference if r["collective"] == name and r["ranks"] == 2), key=lambda r: r["nbytes"])
        ax.loglog([r["nbytes"] for r in ref], [1e6 * r["seconds"] for r in ref], "s:", color="0.6", ms=3,
                  label=f"{name}, reference run" if ref else None)
    for p in sorted({r["ranks"] for r in rows}):
        for i, name in enumerate(collectives):
            sel = sorted((r for r in rows if r["ranks"] == p and r["collective"] == name), key=lambda r: r["nbytes"])
            if not sel:
                continue
            m = np.array([r["nbytes"] for r in sel], dtype=float)
            (line,) = ax.loglog(m, [1e6 * r["seconds"] for r in sel], "o-", color=f"C{i}", alpha=0.5 + 0.5 / p,
                                label=f"{name}, p={p}")
            if model is not None:
                ax.loglog(m, 1e6 * np.array([model.time(costmodel.COLLECTIVES[name](v, p)) for v in m]), "--",
                          color=line.get_color(), alpha=line.get_alpha(), label=f"{name} model, p={p}")
    ax.set_xlabel("message size per rank (bytes)")
    ax.set_ylabel("time per call (µs)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return ax
