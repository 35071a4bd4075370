"""Figures of notebook 07's test of the course's conclusions. Every helper takes ``ax`` (or ``axes``)
and returns what it drew on; ``prefix`` and ``style`` let a notebook draw a reference run beside the
student's own on the same axes (``prefix="reference: ", style={"ls": "--", "alpha": 0.6}``).
"""

from __future__ import annotations

import numpy as np

from ppu_lab.experiments import RunIndex, select
from ppu_lab.experiments import threshold as T


def _ax(ax):
    import matplotlib.pyplot as plt

    return ax if ax is not None else plt.gca()


def _finish(ax, xlabel, ylabel, title=None):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def loss_curves(records, ax=None, x="step", legend="batch {batch_size}", prefix="", **style):
    """The per-step training loss of each record against ``x``: ``"step"``, ``"epoch"`` (steps divided
    by the steps per epoch) or ``"samples"`` (images seen); one line per record, labelled by ``legend``
    (formatted with the record's fields)."""
    ax = _ax(ax)
    for r in records:
        loss = np.asarray(r["step_loss"], dtype=float)
        k = np.arange(1, loss.size + 1)
        xs = {"step": k, "epoch": k / r["steps_per_epoch"], "samples": k * r["global_batch"]}[x]
        ax.plot(xs, loss, label=prefix + legend.format(**r), **style)
    return _finish(ax, {"step": "SGD step", "epoch": "epoch (passes over the training set)",
                        "samples": "training images seen"}[x], "training loss of the step's batch (nats)")


def loss_by_nodes(records, label, mode, batch=50, seed=0, ax=None, x="epoch"):
    """The training loss of every node count at one batch size and seed, in ``mode``, drawn together:
    thick to thin and solid to dotted, so that identical curves (a global batch) stay visible."""
    ax = _ax(ax)
    R = RunIndex(select(records, label=label))
    for k, p in enumerate(R.nodes(mode)):
        run = R.get(mode, p, batch).get(seed)
        if run is not None:
            loss_curves([run], ax=ax, x=x, legend="{ranks} node(s)", lw=3 - 0.8 * min(k, 2), ls=("-", "--", ":")[k % 3])
    ax.set_title(f"{mode.replace('_', '-')} batch {batch}, seed {seed}")
    return ax


def roughness_vs_nodes(records, label, ax=None, prefix="", **style):
    """The step-to-step variance of the training loss (``measures.roughness``) on p nodes over that on
    one node, against p, for each batch mode (mean over batch sizes and seeds), with the 1/p of a
    global batch p times larger."""
    from ppu_lab.experiments import roughness

    ax = _ax(ax)
    R = RunIndex(select(records, label=label))
    for mode, marker in (("global", "o"), ("per_rank", "s")):
        nodes, ratios = R.nodes(mode), []
        for p in nodes:
            pairs = [(one, R.get(mode, p, b)[s]) for b in R.batches(mode, p) for s, one in R.get(mode, 1, b).items()
                     if s in R.get(mode, p, b)]
            ratios.append(np.mean([roughness(many["step_loss"]) / roughness(one["step_loss"]) for one, many in pairs]))
        ax.plot(nodes, ratios, marker=marker, label=f"{prefix}{mode.replace('_', '-')} batch", **{"ls": "-", **style})
    p = np.array(R.nodes("per_rank") or [1])
    ax.plot(p, 1 / p, "k:", label=None if "1 / nodes" in ax.get_legend_handles_labels()[1] else "1 / nodes")
    ax.set_xticks(sorted({p for m in R.modes for p in R.nodes(m)} | {int(t) for t in ax.get_xticks()}))
    return _finish(ax, "number of nodes (MPI ranks)", "loss roughness, p nodes / 1 node")


def accuracy_vs_batch(records, label, ax=None, scaling="none", prefix="", **style):
    """Test accuracy (%) after the run against the batch size, one node: mean over seeds, with each seed
    as a dot; ``scaling``: ``"none"`` (fixed learning rate) or ``"linear"`` (scaled with the batch)."""
    ax = _ax(ax)
    R = RunIndex(select(records, label=label))
    bs = sorted(k[2] for k in R.index if k[:2] == ("global", 1) and k[3] == scaling)
    accs = [[100 * r["final_accuracy"] for r in R.get("global", 1, b, scaling).values()] for b in bs]
    name = "fixed lr" if scaling == "none" else "lr scaled with the batch"
    line, = ax.plot(bs, [np.mean(a) for a in accs], marker="o", label=f"{prefix}{name}", **{"ls": "-", **style})
    for b, a in zip(bs, accs):
        ax.plot([b] * len(a), a, ".", color=line.get_color(), alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    return _finish(ax, "batch size (one node)", "test accuracy (%)")


def gradient_variance(rows, ax=None, prefix="", **style):
    """E|g_B - g|^2 against the batch size (log-log), with sampling theory's 1/B line."""
    ax = _ax(ax)
    b = np.array([r["batch_size"] for r in rows])
    v = np.array([r["variance"] for r in rows])
    se = np.array([r["se"] for r in rows])
    ax.errorbar(b, v, yerr=2 * se, marker="o", capsize=3, label=f"{prefix}measured (±2 se)", **{"ls": "-", **style})
    if not prefix:
        ax.plot(b, [r["expected"] for r in rows], "k:", label="sampling theory (N - B) / (B (N - 1))")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(b, [str(x) for x in b])
    return _finish(ax, "batch size B", "variance of the minibatch gradient")


def threshold(records, label, p=2, axes=None, net=None, prefix="", model=True, **style):
    """Conclusions (2) and (3) in one figure, against the batch size: (a) speedup of an epoch on ``p``
    nodes, measured (±noise) and predicted by the step model; (b) communication share of a step;
    (c) test accuracy on ``p`` nodes minus on one (±noise), for both batch modes. Returns the 3 Axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    net = net if net is not None or not model else T.network_here()
    for mode, marker in (("global", "o"), ("per_rank", "s")):
        rows = T.benefits(records, label, mode, p)
        if not rows:
            continue
        b = np.array([r["batch_size"] for r in rows])
        name = f"{prefix}{mode.replace('_', '-')} batch"
        s, f = np.array([r["speedup"] for r in rows]), np.array([r["speedup_noise"] for r in rows])
        style = {"ls": "none", **style}
        line = axes[0].errorbar(b, s, yerr=[s - s / f, s * f - s], marker=marker, capsize=3, label=name, **style)
        color = line[0].get_color()
        axes[1].plot(b, [100 * r["share_p"] for r in rows], marker=marker, label=name, color=color, **style)
        axes[2].errorbar(b, [100 * r["gain"] for r in rows], yerr=[100 * r["gain_noise"] for r in rows], marker=marker,
                         capsize=3, label=name, color=color, **style)
        if model:
            _model_lines(records, label, mode, p, net, b, axes, line[0].get_color(), name)
    _threshold_axes(axes, p, sorted({r["batch_size"] for r in select(records, label=label) if r["ranks"] == p}))
    return axes


def _model_lines(records, label, mode, p, net, measured, axes, color, name):
    grid = np.unique(np.geomspace(max(p, measured.min() / 4), measured.max() * 2, 40).round().astype(int))
    curve = T.predicted(records, label, mode, p, grid, net)
    axes[0].plot(curve["batch_size"], curve["speedup"], "-", color=color, lw=1, label=f"{name}: step model")
    axes[1].plot(curve["batch_size"], 100 * curve["share"], "-", color=color, lw=1, label=f"{name}: step model")
    b = T.time_threshold(curve)
    if b is not None:
        axes[0].axvline(b, color=color, ls=":", lw=1)
        axes[0].annotate(f"pays from batch ~{b:.0f}", (b, 1.0), textcoords="offset points", xytext=(4, -12),
                         fontsize=8, color=color)


def _threshold_axes(axes, p, batches):
    drawn = [y for ln in axes[0].get_lines() if ln.get_marker() not in ("_", "|")  # not the noise bars' caps
             for y in np.ravel(ln.get_ydata()) if np.isfinite(y)]
    axes[0].set_ylim(0, max(2.5, 1.3 * max(drawn, default=1.0)))  # noise bars beyond are cut: they are wide
    axes[0].axhline(1.0, color="k", lw=0.8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
    _finish(axes[0], "batch size (per node with a per-rank batch)", f"speedup of an epoch, {p} nodes vs 1",
            "time: what more nodes bring")
    _finish(axes[1], "batch size (per node with a per-rank batch)", f"communication share of a step (%), {p} nodes",
            'the "overhead"')
    axes[2].axhline(0.0, color="k", lw=0.8)
    _finish(axes[2], "batch size (per node with a per-rank batch)", f"test accuracy, {p} nodes minus 1 (points)",
            "training: what more nodes bring")
