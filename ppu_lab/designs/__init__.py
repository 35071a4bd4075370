"""What came after Scatter + Allgather: the designs of notebook 08, each once, each against the baseline.

- ``sync.AllreduceSGD``           the baseline: synchronous data parallelism, one Allreduce per step (04-06)
- ``paramserver``                 a parameter server over MPI, synchronous and asynchronous with bounded
                                  staleness (the MPI counterpart of notebook 02's Hogwild!)
- ``sync.LocalSGD``               local SGD: model averaging every H steps (H = 1 is synchronous SGD)
- ``compress.TopK``, ``Float16``  gradient compression: top-k with error feedback; float16 transfer
- ``overlap.Overlapped``          bucketed ``Iallreduce`` started from backward hooks (what DDP does inside)
- ``compare``                     all of them on one model: time per step, bytes, time to a target accuracy,
                                  the cost model's prediction for a cluster
- ``figures``                     the figures of notebook 08 (each takes and returns a matplotlib Axes)

Every design runs on an *objective* (``objective.RidgeObjective``, ``objective.ModelObjective``: the
ridge problem, the ANN, the CNN) whose kernels do not communicate; the designs hold the
communication, and ``run`` runs one by name::

    obj = make_objective("cnn", data, max_rows=100)
    res = run("local_sgd", obj, comm, batch_size=100, steps=200, period=4)
    res.time_to(0.95), res.bytes_per_step, res.step_times

Every function that takes ``comm`` is collective: all ranks of ``comm`` call it.
"""

from __future__ import annotations

from ppu_lab.designs.objective import ModelObjective, RidgeObjective, make_objective
from ppu_lab.designs.runner import DesignResult, run_synchronous
from ppu_lab.timing import Timer, no_timer

#: name -> (label, what it is); the options each takes are those of its class or function.
DESIGNS = {
    "allreduce": "Allreduce (baseline)",
    "ps_sync": "parameter server, synchronous",
    "ps_async": "parameter server, asynchronous",
    "local_sgd": "local SGD",
    "topk": "top-k + error feedback",
    "float16": "float16 transfer",
    "overlap": "overlapped Allreduce",
}


def label(design: str, **options) -> str:
    """A short name for a design with its options, e.g. ``local SGD, H=4``."""
    short = {"period": "H", "ratio": "k/m", "bound": "bound", "bucket_bytes": "bucket"}
    extra = ", ".join(f"{short.get(k, k)}={v}" for k, v in options.items())
    return DESIGNS[design] + (f", {extra}" if extra else "")


def run(design: str, obj, comm, *, batch_size: int, steps: int, seed: int = 0, eval_every: int = 10,
        timer=no_timer, **options) -> DesignResult:
    """Run ``steps`` steps of ``design`` (a key of ``DESIGNS``) on ``obj``; collective over ``comm``.

    ``options``: ``period`` (local_sgd), ``ratio`` (topk), ``bound`` and ``timeout`` (ps_async),
    ``bucket_bytes`` (overlap). The parameter servers use rank 0 as the server.
    """
    from ppu_lab.designs import compress, overlap, paramserver, sync

    if design not in DESIGNS:
        raise ValueError(f"design must be one of {list(DESIGNS)}; got {design!r}")
    timer = Timer() if timer is no_timer else timer      # the parts of a step, for the cost model
    kw = dict(batch_size=batch_size, steps=steps, seed=seed, eval_every=eval_every, timer=timer)
    if design == "ps_sync":
        res = paramserver.sync_parameter_server(obj, comm, **kw, **options)
    elif design == "ps_async":
        res = paramserver.async_parameter_server(obj, comm, **kw, **options)
    else:
        cls = {"allreduce": sync.AllreduceSGD, "local_sgd": sync.LocalSGD, "topk": compress.TopK,
               "float16": compress.Float16, "overlap": overlap.Overlapped}[design]
        step = cls(obj, comm, timer=timer, **options)
        try:
            res = run_synchronous(step, obj, comm, batch_size=batch_size, steps=steps, seed=seed,
                                  eval_every=eval_every)
        finally:
            getattr(step, "close", lambda: None)()
    res.design = label(design, **{k: v for k, v in options.items() if k != "timeout"})
    parts = {name: sum(laps) / max(steps, 1) for name, laps in timer.laps.items()}
    res.extra["parts"] = comm.bcast(parts, root=0)      # rank 0's seconds per step by span name
    res.extra["buckets"] = len(step.plan) if design == "overlap" else 1
    return res


__all__ = ["DESIGNS", "DesignResult", "ModelObjective", "RidgeObjective", "label", "make_objective", "run",
           "run_synchronous"]
