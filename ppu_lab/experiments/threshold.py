"""Conclusions (2) and (3) as numbers against the batch size: what more nodes bring at each batch, in
time (speedup of an epoch, communication share of a step) and in training (test accuracy), measured,
and the time predicted by the step model of ``ppu_lab.perfmodel`` (notebook 07's threshold figure).

    T(p) = T_compute/p + T_serial + T_comm(p)

``step_model`` takes T_compute (per row of the batch) and T_serial from the one-node runs' median step
times (``perfmodel.train_model``); T_comm(p) is the alpha-beta(gamma) model of ``ppu_lab.costmodel``
for the gradient's Allreduce, priced by notebook 03's fit of this machine (``network_here``).
"""

from __future__ import annotations

import math

import numpy as np

from ppu_lab.experiments.analysis import RunIndex
from ppu_lab.experiments.measures import FLOORS, accuracy_contrast, seed_effect

__all__ = ["benefits", "gradient_bytes", "step_model", "network_here", "predicted", "time_threshold"]


def gradient_bytes(label: str) -> int:
    """Bytes of the buffer one step's Allreduce moves: the gradient and one loss slot (``ppu_lab.train``)."""
    from ppu_lab.models import CNN_NUM_PARAMS, ann_num_params

    model, _, hidden = label.partition(":")
    return (CNN_NUM_PARAMS + 1) * 4 if model == "cnn" else (ann_num_params(int(hidden or 50)) + 1) * 8


def benefits(records, label: str, mode: str, p: int) -> list[dict]:
    """Per batch size: what ``p`` nodes bring over one, in ``mode``, with the noise of each number.

    Rows: ``batch_size``; ``speedup`` (of an epoch, mean over seeds) and ``speedup_noise`` (a factor:
    the speedup is within noise of s between s / noise and s * noise); ``share_1`` / ``share_p``
    (communication share of a step); ``gain`` and ``gain_noise`` (test accuracy on p nodes minus on 1,
    paired); ``step_speedup`` (of the median step).
    """
    R = RunIndex([r for r in records if r.get("label") == label])
    rows = []
    for b in R.batches(mode, p):
        one, many = R.get(mode, 1, b), R.get(mode, p, b)
        seeds = sorted(set(one) & set(many))
        s = seed_effect({k: math.log(one[k]["epoch_time"] / many[k]["epoch_time"]) for k in seeds}, FLOORS["time"])
        g = accuracy_contrast([(-1, one), (1, many)])
        rows.append({"batch_size": b, "speedup": math.exp(s["effect"]), "speedup_noise": math.exp(s["noise"]),
                     "step_speedup": float(np.mean([one[k]["median_step_time"] / many[k]["median_step_time"]
                                                    for k in seeds])),
                     "share_1": float(np.mean([one[k]["comm_fraction"] for k in seeds])),
                     "share_p": float(np.mean([many[k]["comm_fraction"] for k in seeds])),
                     "gain": g["effect"], "gain_noise": g["noise"], "seeds": len(seeds)})
    return rows


def step_model(records, label: str, mode: str = "global", batch: int = 100, design: str = "allreduce"):
    """The ``perfmodel.StepModel`` of ``label`` at ``batch`` (``perfmodel.train_model``): per-row and serial
    seconds fitted to the one-node runs' median step times (fixed learning rate; median over the seeds)."""
    from ppu_lab.perfmodel import train_model

    R = RunIndex([r for r in records if r.get("label") == label])
    steps = {b: float(np.median([r["median_step_time"] for r in R.get("global", 1, b).values()]))
             for b in R.batches("global", 1)}
    return train_model(steps, gradient_bytes(label), int(batch), design=design, batch_mode=mode)


def network_here():
    """The lab's machine's network for the step model: notebook 03's alpha-beta(gamma) fit of a ping-pong,
    two lines split at MPICH's protocol switch (``costmodel.Regimes``), as its reference run recorded it
    (``results/reference/pingpong.json``). A quiet machine's wires: the waiting for a rank that a busy
    machine descheduled is not in it. Notebook 03 measures and fits your machine's."""
    from ppu_lab import reference
    from ppu_lab.costmodel import AlphaBeta, Regimes

    fit = reference.load("pingpong")["notes"]
    if not isinstance(fit, dict) or not {"switch", "small", "large", "gamma"} <= set(fit):
        raise ValueError("results/reference/pingpong.json holds no alpha-beta fit: re-record it with "
                         "`python benchmarks/record_references.py --only 03`")
    return Regimes(fit["switch"], AlphaBeta(*fit["small"], fit["gamma"]), AlphaBeta(*fit["large"], fit["gamma"]))


def predicted(records, label: str, mode: str, p: int, batches, net) -> dict:
    """The step model's ``speedup`` (of an epoch: samples per second on p nodes over one) and ``share``
    (communication share of a step) on ``p`` nodes for each of ``batches``, in ``mode``."""
    base = step_model(records, label, mode)
    out = {"batch_size": [], "speedup": [], "share": []}
    for b in batches:
        m = base.with_batch(b)
        parts = m.parts(p, net)
        out["batch_size"].append(b)
        out["speedup"].append(float(m.speedup(p, net)))
        out["share"].append(float(parts["comm"] / parts["total"]))
    return {k: np.array(v) for k, v in out.items()}


def time_threshold(curve: dict) -> float | None:
    """The smallest batch at which the predicted speedup reaches 1 (more nodes start to pay), or None."""
    above = [b for b, s in zip(curve["batch_size"], curve["speedup"]) if s >= 1.0]
    return float(min(above)) if above else None
