"""Checks of notebook 07's exercises: the step-time model that predicts measurements, and the steps of an epoch.

``predict_step_time(p, t_compute, t_serial, alpha, beta, gamma, nbytes)``: seconds per data-parallel SGD
step on ``p`` ranks (a power of 2), ``T(p) = t_compute / p + t_serial + T_comm(p)``, with ``T_comm`` one
Allreduce of ``nbytes`` bytes (reduce-scatter then allgather) in the alpha-beta-gamma model. The reference
is the lab's own model (``perfmodel.StepModel`` priced by ``costmodel.AlphaBeta``), which the student may
not call; a case holds the student's model against the step times measured in the lab's reference run
(``results/reference/perfmodel.json``) within a stated tolerance. The typical mistakes are named:
communication divided by p, the Allreduce's bytes counted once, the serial part forgotten or divided by p,
communication on one rank. ``against_your_runs`` puts the student's model beside the student's own
measurements (notebook 07's grid).
"""

from __future__ import annotations

import math

import numpy as np

from ppu_lab import costmodel, perfmodel, reference
from ppu_lab.costmodel import AlphaBeta
from ppu_lab.exercises.core import NotAttempted, Notebook, compare, student

BOOK = Notebook("07_results_and_conclusions")
check, require = BOOK.check, BOOK.require
BATCH = 1680                # rows of a synthetic global batch: divisible by every p of the cases
TOLERANCE = 0.25            # a prediction within 25% of a reference measurement counts as predicting it
MEASURED = ("ANN h=50", "CNN")   # the reference workloads whose measured steps the lab's model predicts well

step_ex = BOOK.exercise(
    "predict_step_time", points=3, time_limit=20,
    forbid=("allreduce", "design", "StepModel", "from_parts", "train_model", "step_model", "parts", "predicted"),
    hint="T(p) = t_compute / p + t_serial + T_comm(p). The Allreduce on p ranks (a power of 2) is a "
         "reduce-scatter then an allgather: log2(p) messages each, (p - 1)/p * nbytes bytes sent each, and "
         "the reduce-scatter adds (p - 1)/p * nbytes bytes. On one rank nothing is sent.")


def allreduce_terms(p, nbytes, alpha, beta, gamma, bytes_factor=2.0, messages_factor=2.0, gamma_factor=1.0):
    """The alpha, beta and gamma terms of the Allreduce written the student's way, with deliberate factors
    (to name a mistake): the right ones are 2 log2(p) messages, 2 (p-1)/p m bytes, (p-1)/p m reduced."""
    share = (p - 1) / p * nbytes
    return messages_factor * math.log2(p) * alpha + bytes_factor * share * beta + gamma_factor * share * gamma


def step_mistakes(p, tc, ts, alpha, beta, gamma, m) -> list:
    """(wrong T(p), what it means) for the typical mistakes of the model."""
    comm = allreduce_terms(p, m, alpha, beta, gamma)
    return [
        (tc / p + ts + comm / p, "the communication is divided by p: the ranks do not share the Allreduce, every "
                                 "rank takes part in all of it (it grows with p)"),
        ((tc + comm) / p + ts, "the communication is divided by p together with T_compute: every rank takes "
                               "part in the whole Allreduce"),
        (tc / p + ts + allreduce_terms(p, m, alpha, beta, gamma, bytes_factor=1), "the Allreduce's bytes are "
         "counted once: the reduce-scatter and then the allgather each send (p - 1)/p * nbytes, "
         "2 (p - 1)/p * nbytes in all"),
        (tc / p + ts + 2 * math.log2(p) * alpha + m * beta + (p - 1) / p * m * gamma, "the Allreduce sends "
         "nbytes once: the bandwidth term is 2 (p - 1)/p * nbytes * beta (reduce-scatter, then allgather)"),
        (tc / p + comm, "T_serial is missing: the update and the per-step overhead run on every rank, whatever p"),
        ((tc + ts) / p + comm, "T_serial is divided by p: no number of ranks shortens it (Amdahl's f)"),
        (tc + ts + comm, "T_compute is not divided by p: the ranks share the batch's rows"),
        (tc / p + ts + allreduce_terms(p, m, alpha, beta, gamma, messages_factor=1), "2 log2(p) messages: "
         "log2(p) steps in each of the two phases"),
        (tc / p + ts + allreduce_terms(p, m, alpha, beta, gamma, gamma_factor=0), "the additions are missing: "
         "the reduce-scatter adds (p - 1)/p * nbytes bytes, gamma seconds each"),
        (tc / p + ts + allreduce_terms(p, m, alpha, beta, gamma, gamma_factor=2), "only the reduce-scatter adds: "
         "gamma (p - 1)/p * nbytes, not twice that"),
    ]


def lab_time(p, tc, ts, net, m) -> float:
    """The reference: the lab's step model (``perfmodel.StepModel``) of a global batch, priced by ``net``."""
    return float(perfmodel.StepModel.from_parts(tc, ts, BATCH, grad_bytes=m).time(p, net))


def _judge(got, p, tc, ts, alpha, beta, gamma, m, what) -> str | None:
    ref = lab_time(p, tc, ts, AlphaBeta(alpha, beta, gamma), m)
    msg = compare(got, ref, what=what, rtol=1e-9, mistakes=step_mistakes(p, tc, ts, alpha, beta, gamma, m)
                  if p > 1 else [(tc, "T_serial is missing: the update and the per-step overhead run whatever p")])
    if msg and p == 1 and isinstance(got, (int, float, np.number)) and float(got) > ref:
        msg += ("; on one rank there is nothing to communicate: T_comm(1) = 0 (2 log2(1) messages, "
                "2 (1 - 1)/1 * nbytes bytes), so T(1) = t_compute + t_serial")
    return msg


def _step_case(p, tc, ts, alpha, beta, gamma, m):
    def run(fn):
        got = fn(p, tc, ts, alpha, beta, gamma, m)
        return _judge(got, p, tc, ts, alpha, beta, gamma, m, what=f"T({p})")

    return run


def regime(net, nbytes, p) -> AlphaBeta:
    """The ``AlphaBeta`` that prices an Allreduce of ``nbytes`` on ``p`` ranks: ``net`` itself, or for a
    ``costmodel.Regimes`` (notebook 03's two lines) the line of its largest message."""
    if not isinstance(net, costmodel.Regimes):
        return net
    return net.small if float(costmodel.allreduce(nbytes, p).largest) < net.switch else net.large


def _reference_case(fn):
    """The lab's reference run: the student's model, with the run's fitted parts and network, against the
    measured step times of the ANN and the CNN on 1 and 2 ranks."""
    fit = reference.load("perfmodel")["notes"]
    net = costmodel.Regimes(fit["switch"], AlphaBeta(*fit["small"], fit["gamma"]),
                            AlphaBeta(*fit["large"], fit["gamma"]))
    for workload in MEASURED:
        m = perfmodel.StepModel(**fit["models"][workload])
        tc, ts, nbytes = m.per_row * m.batch, m.serial, m.grad_bytes
        for p in (1, 2):
            ab = regime(net, nbytes, p)
            got = fn(p, tc, ts, ab.alpha, ab.beta, ab.gamma, nbytes)
            measured = reference.value("perfmodel", "measured", workload=workload, ranks=p)
            if compare(got, measured, rtol=TOLERANCE) is None:
                continue
            named = _judge(got, p, tc, ts, ab.alpha, ab.beta, ab.gamma, nbytes, what="it")
            if not isinstance(got, (int, float, np.number)):
                return named
            lab = lab_time(p, tc, ts, ab, nbytes)
            return (f"for the reference run's {workload} on {p} rank(s) your model predicts {1e3 * float(got):.3f} ms "
                    f"per step; the run measured {1e3 * measured:.3f} ms, more than {TOLERANCE:.0%} away (the lab's "
                    f"model: {1e3 * lab:.3f} ms)" + (f". {named[0].upper()}{named[1:]}" if named else ""))
    return None


step_ex.case("1 rank: nothing to communicate")(_step_case(1, 12e-3, 1.5e-3, 5e-6, 4e-10, 1e-10, 1_000_000))
step_ex.case("8 ranks, a 1 MB gradient, against the lab's step model")(
    _step_case(8, 12e-3, 1.5e-3, 5e-6, 4e-10, 1e-10, 1_000_000))
step_ex.case(f"the reference run's ANN and CNN on 1 and 2 ranks: within {TOLERANCE:.0%} of the measured step "
             "times (results/reference/perfmodel.json)")(_reference_case)
step_ex.case("2 ranks, no gamma", hidden=True)(_step_case(2, 3e-3, 2e-4, 2e-6, 1e-9, 0.0, 400_000))
step_ex.case("16 ranks, a latency-bound 4 KB gradient", hidden=True)(
    _step_case(16, 1e-3, 1e-4, 2e-5, 2e-10, 7e-11, 4096))
_ETHERNET = perfmodel.cluster(10, perfmodel.LATENCY_10G, 7.5e-11)
step_ex.case("4 ranks, the CNN's 115,756 bytes on 10 Gb/s Ethernet", hidden=True)(
    _step_case(4, 24.6e-3, 0.0, _ETHERNET.alpha, _ETHERNET.beta, _ETHERNET.gamma, 115_756))


# --------------------------------------------------------------------------- exercise 2: steps per epoch
steps_ex = BOOK.exercise(
    "steps_per_epoch", points=1, time_limit=20,
    hint="a step takes one global batch: batch_size rows with a 'global' batch, ranks * batch_size with a "
         "'per_rank' one; the last, smaller batch is a step too (round up).")


def _steps_mistakes(n, b, p, mode):
    gb = b * p if mode == "per_rank" else b
    out = [(n // gb, "the last, smaller batch is a step too: round n_train / global batch up")]
    if mode == "per_rank" and p > 1:
        out.append((-(-n // b), "with a per-rank batch every step takes ranks * batch_size rows"))
    if mode == "global" and p > 1:
        out.append((-(-n // (b * p)), "with a global batch the ranks share batch_size rows: a step still takes "
                                      "batch_size rows, whatever the ranks"))
    return out


def _steps_case(runs):
    def run(fn):
        for n, b, p, mode, expect in runs() if callable(runs) else runs:
            got = fn(n, b, p, mode)
            msg = compare(got, expect, what=f"steps_per_epoch({n}, {b}, {p}, {mode!r})", rtol=0,
                          mistakes=_steps_mistakes(n, b, p, mode))
            if msg:
                return msg
        return None

    return run


def _reference_runs():
    """(n_train, batch_size, ranks, batch_mode, steps_per_epoch) of every run of the reference grid."""
    return sorted({(r["n_train"], r["batch_size"], r["ranks"], r["batch_mode"], r["steps_per_epoch"])
                   for r in reference.records("07_conclusions")})


steps_ex.case("every run of the reference grid (results/reference/07_conclusions.json)")(_steps_case(_reference_runs))
steps_ex.case("1,001 samples: batches that do not divide them, fewer samples than one step", hidden=True)(
    _steps_case([(1001, 100, 1, "global", 11), (1001, 100, 4, "global", 11), (1001, 100, 4, "per_rank", 3),
                 (1001, 7, 11, "per_rank", 13), (50, 100, 2, "per_rank", 1), (1000, 100, 2, "per_rank", 5)]))


# --------------------------------------------------------------------------- the student's own runs
def against_your_runs(fn, records, label: str, p: int = 2) -> str:
    """The student's ``predict_step_time`` beside the student's own measured steps: global batch, ``p``
    nodes, each batch size of the grid; T_compute and T_serial fitted to the one-node runs
    (``threshold.step_model``), the network notebook 03's fit of the lab's machine (``threshold.network_here``)."""
    from ppu_lab.experiments import threshold
    from ppu_lab.experiments.analysis import RunIndex

    model, net, nbytes = threshold.step_model(records, label), threshold.network_here(), threshold.gradient_bytes(label)
    index = RunIndex([r for r in records if r.get("label") == label])
    ab = regime(net, nbytes, p)
    lines = [f"{'batch':>5} {f'T({p}) predicted ms':>19} {'measured ms':>12} {'measured/predicted':>19}"]
    for b in index.batches("global", p):
        measured = float(np.median([r["median_step_time"] for r in index.get("global", p, b).values()]))
        try:
            pred = float(student(fn)(p, model.per_row * b, model.serial, ab.alpha, ab.beta, ab.gamma, nbytes))
        except NotAttempted:
            return "predict_step_time is not written yet: fill it in above, then run this cell again."
        lines.append(f"{b:>5} {1e3 * pred:>19.3f} {1e3 * measured:>12.3f} {measured / pred:>19.2f}")
    return "\n".join(lines)
