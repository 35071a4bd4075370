"""Reading results (notebook 07): select and group records, the course's table beside ours and
plain-text tables. The course's four conclusions are checked in ``conclusions``."""

from __future__ import annotations

import statistics

__all__ = ["select", "group_by", "epoch_rows", "course_table", "format_course_table", "format_table",
           "COURSE_ITERATION_TIMES", "RunIndex", "MODES", "one_node_in_both_modes"]

MODES = ("global", "per_rank")

# The course's table, as on its slides: "Average Time (s)" of "each iteration" for batch sizes 50-200
# (how many nodes, and what an iteration is, the slides do not say; notebook 07 discusses both).
COURSE_ITERATION_TIMES = {50: 9.1768, 100: 11.94646, 150: 12.99369, 200: 11.68846}


def select(records, **where) -> list[dict]:
    """The records whose fields equal ``where`` (e.g. ``label="cnn", batch_mode="global"``)."""
    return [r for r in records if all(r.get(k) == v for k, v in where.items())]


def group_by(records, *fields) -> dict:
    """``{(value of each field, ...): [records]}``, e.g. ``group_by(records, "batch_mode", "ranks")``."""
    groups: dict = {}
    for r in records:
        groups.setdefault(tuple(r.get(f) for f in fields), []).append(r)
    return groups


def _median_of(records, field_, **where):
    values = [float(r[field_]) for r in select(records, **where)]
    return statistics.median(values) if values else float("nan")


def course_table(records, label, ranks=1, batch_mode="global") -> list[dict]:
    """The course's batch-size table beside ours, our "iteration" read both ways: one SGD step
    (``median_step_time``) and one epoch (``epoch_time``), medians over repeated runs (seeds).

    The ``/ b50`` columns divide by the batch-50 time, so that the shapes compare even though the
    machines and data sizes differ.
    """
    rows, records = [], [r for r in records if r.get("lr_scaling", "none") == "none"]  # the fixed lr only
    base = {f: _median_of(records, f, label=label, ranks=ranks, batch_mode=batch_mode, batch_size=50)
            for f in ("epoch_time", "median_step_time")}
    for b, course in COURSE_ITERATION_TIMES.items():
        ours = {f: _median_of(records, f, label=label, ranks=ranks, batch_mode=batch_mode, batch_size=b)
                for f in base}
        rows.append({"batch_size": b, "course_s": course, "course_relative": course / COURSE_ITERATION_TIMES[50],
                     "epoch_s": ours["epoch_time"], "epoch_relative": ours["epoch_time"] / base["epoch_time"],
                     "step_s": ours["median_step_time"],
                     "step_relative": ours["median_step_time"] / base["median_step_time"]})
    return rows


def format_course_table(rows) -> str:
    lines = [f"{'batch':>5s}  {'course (s)':>10s}  {'/ b50':>5s}  |  {'ours: epoch (s)':>15s}  {'/ b50':>5s}  |  "
             f"{'ours: step (ms)':>15s}  {'/ b50':>5s}"]
    lines += [f"{r['batch_size']:5d}  {r['course_s']:10.7g}  {r['course_relative']:5.2f}  |  {r['epoch_s']:15.3f}  "
              f"{r['epoch_relative']:5.2f}  |  {1e3 * r['step_s']:15.2f}  {r['step_relative']:5.2f}" for r in rows]
    return "\n".join(lines)


class RunIndex:
    """The records of one model, indexed by (batch mode, nodes, batch size, lr scaling) -> {seed: record}.

    At one node the two batch modes are the same run: a one-node record is filed under both. ``cores``:
    the fewest usable cores of the machines the records ran on (timings beyond it are oversubscribed).
    """

    def __init__(self, records):
        self.index: dict = {}
        for r in records:  # at one node the two batch modes are the same run: filed under both
            modes = MODES if r["ranks"] == 1 else (r["batch_mode"],)
            for m in modes:
                key = (m, r["ranks"], r["batch_size"], r.get("lr_scaling", "none"))
                self.index.setdefault(key, {})[r["seed"]] = r
        self.modes = [m for m in MODES if any(k[0] == m and k[1] > 1 for k in self.index)]
        cores = [r["machine"].get("cores_available") or r["machine"].get("cores") for r in records
                 if isinstance(r.get("machine"), dict)]
        self.cores = min((c for c in cores if c), default=1)
        self.epochs = max(r["epochs"] for r in records)

    def get(self, mode, p, b, scaling="none") -> dict:
        return self.index.get((mode, p, b, scaling), {})

    def nodes(self, mode) -> list[int]:
        return sorted({k[1] for k in self.index if k[0] == mode})

    def batches(self, mode, p, scaling="none") -> list[int]:
        """Batch sizes run on 1 node and on ``p`` nodes (fixed learning rate unless ``scaling``)."""
        return sorted({k[2] for k in self.index if k[:2] == (mode, p) and k[3] == scaling} &
                      {k[2] for k in self.index if k[:2] == (mode, 1) and k[3] == scaling})

    def time_nodes(self, mode):
        """The most nodes (> 1) with one core each; None when no such run was made."""
        return max((p for p in self.nodes(mode) if 1 < p <= self.cores), default=None)


def one_node_in_both_modes(records) -> list[dict]:
    """``records`` plus, for each run on one node, a copy filed under the other batch mode: on one node
    the two modes are the same run, made once (``plans``), and a figure per mode needs its point."""
    other = {"global": "per_rank", "per_rank": "global"}
    copies = [{**r, "batch_mode": other[r["batch_mode"]]} for r in records if r["ranks"] == 1]
    return list(records) + copies


def epoch_rows(records) -> list[dict]:
    """One flat row per (run, epoch): the configuration fields plus that epoch's values (tidy)."""
    keep = ("label", "model", "hidden", "ranks", "batch_size", "batch_mode", "global_batch", "key")
    return [{**{k: r.get(k) for k in keep}, **h} for r in records for h in r.get("history", [])]


def format_table(records) -> str:
    """A plain-text table of records: one line per run."""
    head = (f"{'model':7s} {'ranks':>5s} {'batch':>5s} {'mode':8s} {'s/epoch':>9s} {'ms/step':>8s} "
            f"{'comm%':>6s} {'acc':>6s}")
    lines = [head]
    for r in sorted(records, key=lambda r: (r["label"], r["batch_mode"], r["ranks"], r["batch_size"])):
        lines.append(f"{r['label']:7s} {r['ranks']:5d} {r['batch_size']:5d} {r['batch_mode']:8s} "
                     f"{r['epoch_time']:9.3f} {1e3 * r['median_step_time']:8.2f} "
                     f"{100 * r['comm_fraction']:6.1f} {r['final_accuracy']:6.3f}")
    return "\n".join(lines)
