"""The course's four conclusions, quoted, each tested by the experiment that can confirm or refute it
(notebook 07, section 5).

``check_conclusions(records, label)`` returns, for each conclusion in the course's order, rows of
``(mode, sense, verdict, evidence)``: the verdict of one reading of the claim in one batch mode,
``"holds"``, ``"does not hold"``, ``"within noise"`` or ``"not measured"``, judged by the lab's noise
rule (``ppu_lab.experiments.measures``). The readings (the slides leave them open; notebook 07 says
why the lab takes each):

1. at one node (where the two batch modes are the same run), the smallest against the largest batch:
   test accuracy and training loss after the same epochs at a fixed learning rate (the course's
   figure "recognition accuracy with different batch size"), the loss after the same number of
   *steps*, the accuracy with the learning rate scaled with the batch (Goyal et al. 2017), and the
   variance of the minibatch gradient (when measured, ``measures.gradient_noise``);
2. per batch mode, what more nodes bring at the largest batch *compared with* the smallest: in time,
   the speedup of an epoch (on the most nodes that have a core each); in training, the change of the
   test accuracy (on the most nodes measured). Predicted: smaller at the large batch;
3. per batch mode, at the smallest batch: more nodes shorten an epoch (time) or raise the accuracy
   (training), and the communication share of a step ("the overhead") grows;
4. per batch mode, the step-to-step roughness of the training loss (``measures.roughness``) on the
   most nodes against one node, over every batch size and seed: predicted smaller.

Runs on p nodes that trained exactly as on one node (``measures.same_training``: a global batch)
make a training or smoothness reading "does not hold": the nodes changed nothing.
"""

from __future__ import annotations

import math

import numpy as np

from ppu_lab.experiments.analysis import RunIndex
from ppu_lab.experiments.measures import FLOORS, accuracy_contrast, roughness, same_training, seed_effect

__all__ = ["COURSE_CONCLUSIONS", "VERDICTS", "check_conclusions", "format_conclusions", "verdict_table"]

#: The course's four conclusions, word for word from its slides, in its order.
COURSE_CONCLUSIONS = (
    "A larger batch size is good for the training of the model (related to convergence).",
    "When the batch size is large enough, increasing the number of parallel nodes has not had that many "
    "benefits.",
    "When the batch size is quite small, increasing the number of parallel nodes will do good to the training "
    "process to some degree. However, this will also increase the overhead of the system.",
    "Using more parallel nodes can smooth SGD algorithm.",
)
VERDICTS = ("holds", "does not hold", "within noise", "not measured")


def _verdict(c: dict, sign: int) -> str:
    """holds / does not hold / within noise for a comparison predicted to have the sign ``sign``."""
    if c.get("identical"):
        return "does not hold"
    effect = sign * c["effect"]
    return "holds" if effect > c["noise"] else "does not hold" if effect < -c["noise"] else "within noise"


def _row(mode, sense, c, sign, evidence) -> dict:
    if c is None:
        return {"mode": mode, "sense": sense, "verdict": "not measured", "evidence": evidence}
    return {"mode": mode, "sense": sense, "verdict": _verdict(c, sign), "evidence": evidence,
            "effect": c["effect"], "noise": c["noise"], "seeds": c.get("seeds")}


def _per_seed(a: dict, b: dict, fn) -> dict:
    """``{seed: fn(a[seed], b[seed])}`` over the seeds both have."""
    return {s: fn(a[s], b[s]) for s in sorted(set(a) & set(b))}


def _mean(runs: dict, field) -> float:
    return float(np.mean([float(r[field]) for r in runs.values()]))


def _pts(c) -> str:
    return f"{100 * c['effect']:+.2f} ± {100 * c['noise']:.2f} points"


def _times(c) -> str:
    return f"x{math.exp(c['effect']):.2f} (noise x{math.exp(-c['noise']):.2f}-{math.exp(c['noise']):.2f})"


# --------------------------------------------------------------------------- (1)
def _conclusion1(R: RunIndex, gradient_variance) -> list[dict]:
    mode, bs = "1 node", R.batches("global", 1)
    if len(bs) < 2:
        return [_row(mode, "per epoch, fixed lr", None, 1, "needs one-node runs at two batch sizes or more")]
    lo, hi = bs[0], bs[-1]
    a, b = R.get("global", 1, lo), R.get("global", 1, hi)
    accs = ", ".join(f"{x}: {100 * _mean(R.get('global', 1, x), 'final_accuracy'):.1f}%" for x in bs)
    c = accuracy_contrast([(-1, a), (1, b)])
    rows = [_row(mode, "test accuracy after the last epoch, fixed lr", c, 1,
                 f"after {R.epochs} epochs, batch {accs}; {hi} vs {lo}: {_pts(c)} ({c['seeds']} seed(s), paired "
                 f"on the test images)")]
    c = seed_effect(_per_seed(a, b, lambda x, y: math.log(x["final_train_loss"] / y["final_train_loss"])),
                    FLOORS["loss"])
    losses = ", ".join(f"{x}: {_mean(R.get('global', 1, x), 'final_train_loss'):.3f}" for x in bs)
    rows.append(_row(mode, "training loss after the last epoch, fixed lr", c, 1,
                     f"mean loss of the last epoch, batch {losses}; {lo} / {hi}: {_times(c)}"))
    rows.append(_per_step_row(R, lo, hi))
    scaled = R.batches("global", 1, "linear")
    if len(scaled) >= 2:
        sa, sb = R.get("global", 1, scaled[0], "linear"), R.get("global", 1, scaled[-1], "linear")
        c = accuracy_contrast([(-1, sa), (1, sb)])
        accs = ", ".join(f"{x}: {100 * _mean(R.get('global', 1, x, 'linear'), 'final_accuracy'):.1f}%"
                         for x in scaled)
        rows.append(_row(mode, "test accuracy, lr scaled with the batch (Goyal et al.)", c, 1,
                         f"batch {accs}; {scaled[-1]} vs {scaled[0]}: {_pts(c)}"))
    if gradient_variance:
        rows.append(_variance_row(mode, gradient_variance))
    return rows


def _per_step_row(R, lo, hi) -> dict:
    """The loss after the same number of steps: the mean step loss over the second half of the steps
    the large batch made, for both batch sizes."""
    a, b = R.get("global", 1, lo), R.get("global", 1, hi)
    if not all(r.get("step_loss") for r in (*a.values(), *b.values())):
        return _row("1 node", "training loss per step, fixed lr", None, 1, "the records hold no per-step loss")
    k = min(len(r["step_loss"]) for r in b.values())

    def late(r):
        return float(np.mean(r["step_loss"][k // 2:k]))

    c = seed_effect(_per_seed(a, b, lambda x, y: math.log(late(x) / late(y))), FLOORS["loss"])
    return _row("1 node", "training loss per step, fixed lr", c, 1,
                f"mean loss of steps {k // 2 + 1}-{k}: batch {lo} {np.mean([late(r) for r in a.values()]):.3f}, "
                f"batch {hi} {np.mean([late(r) for r in b.values()]):.3f}; {lo} / {hi}: {_times(c)}")


def _variance_row(mode, rows) -> dict:
    lo, hi = rows[0], rows[-1]
    se = math.sqrt((lo["se"] / lo["variance"]) ** 2 + (hi["se"] / hi["variance"]) ** 2)
    c = {"effect": math.log(lo["variance"] / hi["variance"]), "noise": max(2 * se, FLOORS["variance"]), "seeds": 1}
    return _row(mode, "variance of the minibatch gradient", c, 1,
                f"E|g_B - g|^2 at batch {lo['batch_size']}: {lo['variance']:.3g}, at {hi['batch_size']}: "
                f"{hi['variance']:.3g} (sampling theory: {hi['expected']:.3g}); {hi['batch_size']} is "
                f"{math.exp(c['effect']):.1f}x less noisy ({lo['draws']} draws each)")


# --------------------------------------------------------------------------- (2), (3): nodes x batch
def _speedups(R, mode, p, b) -> dict:
    return _per_seed(R.get(mode, 1, b), R.get(mode, p, b), lambda one, many: one["epoch_time"] / many["epoch_time"])


def _gain(R, mode, p, b) -> list:
    return [(-1, R.get(mode, 1, b)), (1, R.get(mode, p, b))]


def _identical(R, mode, p, batches) -> bool:
    pairs = [(R.get(mode, 1, b), R.get(mode, p, b)) for b in batches]
    return all(set(one) & set(many) and all(same_training(one[s], many[s]) for s in set(one) & set(many))
               for one, many in pairs)


def _speedup_text(R, mode, p, bs) -> str:
    per_epoch = ", ".join(f"{b}: {np.mean(list(_speedups(R, mode, p, b).values())):.2f}" for b in bs)
    return f"speedup of an epoch on {p} nodes, batch {per_epoch}"


def _gain_text(R, mode, p, bs) -> str:
    gains = ", ".join(f"{b}: {100 * accuracy_contrast(_gain(R, mode, p, b))['effect']:+.2f}" for b in bs)
    ratio = {b: _mean(R.get(mode, p, b), "final_train_loss") / _mean(R.get(mode, 1, b), "final_train_loss") for b in bs}
    losses = ", ".join(f"{b}: x{r:.2f}" for b, r in ratio.items())
    return (f"accuracy on {p} nodes minus on 1, batch {gains} points; training loss of the last epoch on {p} "
            f"nodes / on 1, batch {losses}")


def _conclusion2(R: RunIndex) -> list[dict]:
    rows = []
    for mode in R.modes:
        pt, pa = R.time_nodes(mode), max(R.nodes(mode))
        if pt is None or len(R.batches(mode, pt)) < 2:
            rows.append(_row(mode, "time", None, -1, f"needs runs on 2..{R.cores} nodes at two batch sizes"))
        else:
            bs = R.batches(mode, pt)
            lo, hi = _speedups(R, mode, pt, bs[0]), _speedups(R, mode, pt, bs[-1])
            c = seed_effect(_per_seed(lo, hi, lambda x, y: math.log(y / x)), FLOORS["time"])
            rows.append(_row(mode, "time", c, -1, f"{_speedup_text(R, mode, pt, bs)}; at {bs[-1]} vs {bs[0]}: "
                                                  f"{_times(c)}"))
        bs = R.batches(mode, pa)
        if len(bs) < 2:
            rows.append(_row(mode, "training", None, -1, "needs runs at two batch sizes on more than one node"))
            continue
        c = accuracy_contrast(_gain(R, mode, pa, bs[-1]) + [(-w, runs) for w, runs in _gain(R, mode, pa, bs[0])])
        c["identical"] = _identical(R, mode, pa, (bs[0], bs[-1]))
        note = "; identical runs: the nodes change nothing in training" if c["identical"] else ""
        rows.append(_row(mode, "training", c, -1, f"{_gain_text(R, mode, pa, bs)}; gain at {bs[-1]} minus gain at "
                                                  f"{bs[0]}: {_pts(c)}{note}"))
    return rows


def _conclusion3(R: RunIndex) -> list[dict]:
    rows = []
    for mode in R.modes:
        pt, pa = R.time_nodes(mode), max(R.nodes(mode))
        bs = R.batches(mode, pt) if pt else []
        if not bs:
            rows.append(_row(mode, "time", None, 1, f"needs runs on 2..{R.cores} nodes"))
            rows.append(_row(mode, "overhead", None, 1, f"needs runs on 2..{R.cores} nodes"))
        else:
            c = seed_effect({s: math.log(v) for s, v in _speedups(R, mode, pt, bs[0]).items()}, FLOORS["time"])
            rows.append(_row(mode, "time", c, 1, f"{_speedup_text(R, mode, pt, bs)}; at {bs[0]}: {_times(c)}"))
            rows.append(_overhead_row(R, mode, pt, bs))
        bs = R.batches(mode, pa)
        if not bs:
            rows.append(_row(mode, "training", None, 1, "needs runs on 1 node and on more nodes at one batch size"))
            continue
        c = accuracy_contrast(_gain(R, mode, pa, bs[0]))
        c["identical"] = _identical(R, mode, pa, bs[:1])
        note = "; identical runs: the nodes change nothing in training" if c["identical"] else ""
        rows.append(_row(mode, "training", c, 1, f"{_gain_text(R, mode, pa, bs)}; at {bs[0]}: {_pts(c)}{note}"))
    return rows


def _overhead_row(R, mode, p, bs) -> dict:
    def share(q, b):
        return _mean(R.get(mode, q, b), "comm_fraction")

    c = seed_effect(_per_seed(R.get(mode, 1, bs[0]), R.get(mode, p, bs[0]),
                              lambda one, many: many["comm_fraction"] - one["comm_fraction"]), FLOORS["share"])
    shares = ", ".join(f"{b}: {100 * share(1, b):.0f}% -> {100 * share(p, b):.0f}%" for b in bs)
    return _row(mode, "overhead", c, 1, f"communication share of a step, 1 -> {p} nodes, batch {shares}; "
                                        f"at {bs[0]}: {_pts(c)}")


# --------------------------------------------------------------------------- (4)
def _conclusion4(R: RunIndex) -> list[dict]:
    rows = []
    for mode in R.modes:
        p = max(R.nodes(mode))
        bs = [b for b in R.batches(mode, p)
              if all(r.get("step_loss") for r in (*R.get(mode, 1, b).values(), *R.get(mode, p, b).values()))]
        if not bs:
            rows.append(_row(mode, "loss roughness", None, 1, "the records hold no per-step loss"))
            continue
        per_batch = {b: _per_seed(R.get(mode, 1, b), R.get(mode, p, b),
                                  lambda one, many: math.log(roughness(one["step_loss"]) /
                                                             roughness(many["step_loss"]))) for b in bs}
        seeds = set.intersection(*(set(v) for v in per_batch.values()))
        c = seed_effect({s: float(np.mean([per_batch[b][s] for b in bs])) for s in seeds}, FLOORS["roughness"])
        c["identical"] = _identical(R, mode, p, bs)
        ratios = ", ".join(f"{b}: {np.exp(-np.mean(list(v.values()))):.2f}" for b, v in per_batch.items())
        note = "; identical curves: every node count takes the same steps" if c["identical"] else ""
        rows.append(_row(mode, "loss roughness", c, 1,
                         f"step-to-step variance of the training loss on {p} nodes / on 1, batch {ratios}; "
                         f"overall {_times({'effect': -c['effect'], 'noise': c['noise']})}{note}"))
    return rows


# --------------------------------------------------------------------------- the four, together
def check_conclusions(records, label, gradient_variance=None) -> list[dict]:
    """The course's four conclusions against the records of one model (``label``, e.g. ``"ann:50"``).

    ``gradient_variance``: rows of ``measures.gradient_noise`` (optional, for conclusion 1). Returns one
    dict per conclusion: ``number``, ``claim`` (the course's words), ``verdict`` (one line over the rows)
    and ``rows`` (``mode``, ``sense``, ``verdict``, ``evidence``, ``effect``, ``noise``).
    """
    recs = [r for r in records if r.get("label") == label]
    if not recs:
        labels = sorted({r.get("label") for r in records})
        raise ValueError(f"label: no records of {label!r}; the results hold {labels}")
    R = RunIndex(recs)
    if not R.modes:
        raise ValueError("check_conclusions needs runs on more than one node (ranks > 1)")
    parts = [_conclusion1(R, gradient_variance), _conclusion2(R), _conclusion3(R), _conclusion4(R)]
    return [{"number": k + 1, "claim": COURSE_CONCLUSIONS[k], "rows": rows, "verdict": _summary(rows)}
            for k, rows in enumerate(parts)]


def _summary(rows) -> str:
    return "; ".join(f"{r['sense']} ({r['mode'].replace('_', '-')}{'' if r['mode'] == '1 node' else ' batch'}): "
                     f"{r['verdict']}" for r in rows)


def verdict_table(checks) -> dict:
    """``{"(number) mode / sense": verdict}``: the verdicts alone, e.g. to compare with a reference run."""
    return {f"({c['number']}) {r['mode']} / {r['sense']}": r["verdict"] for c in checks for r in c["rows"]}


def format_conclusions(checks) -> str:
    """Each conclusion quoted, then one line per reading: verdict and evidence."""
    lines = []
    for c in checks:
        lines.append(f"({c['number']}) \"{c['claim']}\"")
        for r in c["rows"]:
            where = r["mode"].replace("_", "-") + ("" if r["mode"] == "1 node" else " batch")
            lines.append(f"    [{where}, {r['sense']}] {r['verdict'].upper()}: {r['evidence']}")
    return "\n".join(lines)
