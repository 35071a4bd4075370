"""Reading results (notebook 07): select and group records, the course's table beside ours, the
course's four conclusions checked against the numbers, and plain-text tables."""

from __future__ import annotations

import math
import statistics

__all__ = ["select", "group_by", "epoch_rows", "course_table", "format_course_table", "check_conclusions",
           "format_conclusions", "format_table", "COURSE_ITERATION_TIMES"]

# The course's table: seconds per iteration (epoch) for batch sizes 50, 100, 150, 200.
COURSE_ITERATION_TIMES = {50: 9.18, 100: 11.95, 150: 12.99, 200: 11.69}


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
    """The course's batch-size table beside ours: seconds per iteration (epoch) for each batch size.

    ``relative`` columns divide by the batch-50 time, so that the shapes compare even though the
    machines and data sizes differ.
    """
    rows = []
    ours50 = _median_of(records, "epoch_time", label=label, ranks=ranks, batch_mode=batch_mode, batch_size=50)
    for b, course in COURSE_ITERATION_TIMES.items():
        ours = _median_of(records, "epoch_time", label=label, ranks=ranks, batch_mode=batch_mode, batch_size=b)
        rows.append({"batch_size": b, "course_s": course, "ours_s": ours,
                     "course_relative": course / COURSE_ITERATION_TIMES[50], "ours_relative": ours / ours50})
    return rows


def format_course_table(rows) -> str:
    lines = [f"{'batch':>5s}  {'course (s)':>10s}  {'ours (s)':>9s}  {'course / b50':>12s}  {'ours / b50':>10s}"]
    lines += [f"{r['batch_size']:5d}  {r['course_s']:10.2f}  {r['ours_s']:9.3f}  {r['course_relative']:12.2f}  "
              f"{r['ours_relative']:10.2f}" for r in rows]
    return "\n".join(lines)


def check_conclusions(records, label) -> list[dict]:
    """Each of the course's four conclusions against our records of one model.

    Returns one dict per conclusion: ``claim``, ``verdict`` (``"holds"``, ``"does not hold"``,
    ``"holds only with per-rank batch"``, ...) and ``evidence`` (the numbers behind it).
    Needs runs at 1 rank and at least one more rank count, in the batch modes present.
    """
    recs = select(records, label=label)
    if not recs:
        raise ValueError(f"label: no records of {label!r}; the results hold {sorted({r['label'] for r in records})}")
    modes = sorted({r["batch_mode"] for r in recs})
    pmax = max(r["ranks"] for r in recs)
    if pmax == 1:
        raise ValueError("check_conclusions needs runs on more than one rank")
    batches = sorted({r["batch_size"] for r in recs})
    out = []

    def ratios(field_, mode, a, b, over="batch_size"):
        """field at b / field at a (a, b rank counts), per batch size."""
        return {k: _median_of(recs, field_, batch_mode=mode, ranks=b, **{over: k}) /
                _median_of(recs, field_, batch_mode=mode, ranks=a, **{over: k}) for k in batches}

    # (1) more nodes -> less time per iteration
    ev, holds = [], {}
    for mode in modes:
        r = ratios("epoch_time", mode, 1, pmax)
        holds[mode] = sum(v < 1 for v in r.values()) > len(r) / 2
        ev.append(f"{mode}: T({pmax})/T(1) = " + ", ".join(f"{v:.2f}" for v in r.values()) + f" for batch {batches}")
    out.append({"claim": "(1) more nodes reduce the time per iteration",
                "verdict": _verdict(holds), "evidence": "; ".join(ev)})
    # (2) the batch size changes the time per iteration
    times = [_median_of(recs, "epoch_time", batch_mode=modes[0], ranks=1, batch_size=b) for b in batches]
    spread = (max(times) - min(times)) / min(times)
    monotone = all(x >= y for x, y in zip(times, times[1:])) or all(x <= y for x, y in zip(times, times[1:]))
    out.append({"claim": "(2) the batch size changes the time per iteration",
                "verdict": "holds" if spread > 0.1 else "does not hold (within 10%)",
                "evidence": "1 rank: " + ", ".join(f"{t:.3g} s" for t in times) + f" for batch {batches}: spread "
                            f"{100 * spread:.0f}%, {'monotone' if monotone else 'not monotone'} "
                            f"(course: 9.18, 11.95, 12.99, 11.69 s, spread 42%, not monotone)"})
    # (3) larger batch -> lower accuracy after a fixed number of epochs
    accs = [_median_of(recs, "final_accuracy", batch_mode=modes[0], ranks=1, batch_size=b) for b in batches]
    noise = _accuracy_noise(recs)
    change = accs[-1] - accs[0]
    out.append({"claim": "(3) accuracy decreases as the batch size grows (fixed epochs)",
                "verdict": ("holds" if change < -noise else "does not hold" if change > noise
                            else "not shown (within the test set's sampling noise)"),
                "evidence": "1 rank: accuracy " + ", ".join(f"{100 * a:.1f}%" for a in accs) + f" for batch {batches}"
                            f"; change {100 * change:+.2f} points against a noise level of {100 * noise:.2f}"})
    # (4) more nodes -> lower accuracy
    ev, holds = [], {}
    for mode in modes:
        diffs = {b: _median_of(recs, "final_accuracy", batch_mode=mode, ranks=pmax, batch_size=b) -
                 _median_of(recs, "final_accuracy", batch_mode=mode, ranks=1, batch_size=b) for b in batches}
        holds[mode] = sum(d < -noise for d in diffs.values()) > len(diffs) / 2
        ev.append(f"{mode}: accuracy({pmax}) - accuracy(1) = " +
                  ", ".join(f"{100 * d:+.2f}" for d in diffs.values()) + " points")
    ev.append(f"a drop counts when larger than the noise level, {100 * noise:.2f} points")
    out.append({"claim": "(4) more nodes reduce the accuracy", "verdict": _verdict(holds), "evidence": "; ".join(ev)})
    return out


def _accuracy_noise(recs) -> float:
    """Two standard errors of the difference of two test accuracies (binomial, n_test images each).

    A difference in accuracy smaller than this is what a different draw of test images alone
    could give, so it is no evidence for or against a claim.
    """
    acc = statistics.median(float(r["final_accuracy"]) for r in recs)
    n = min(int(r.get("n_test") or 0) for r in recs) or 1
    return 2 * math.sqrt(2 * max(acc * (1 - acc), 1e-4) / n)


def _verdict(holds: dict) -> str:
    if all(holds.values()):
        return "holds"
    if not any(holds.values()):
        return "does not hold"
    return "holds only with " + " and ".join(m.replace("_", "-") for m, h in holds.items() if h) + " batch"


def format_conclusions(checks) -> str:
    return "\n".join(f"{c['claim']}: {c['verdict'].upper()}\n    {c['evidence']}" for c in checks)


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
