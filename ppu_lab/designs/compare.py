"""All designs on one model, against the synchronous baseline, and the cost model's view of a cluster
(notebook 08, ``benchmarks/designs.py``).

``compare`` runs a list of designs one after the other from the same initial weights, each on as many
*computing* ranks (the parameter servers get one more rank, the server, when there is one); the
rounds can repeat in rotated order, so that a change in the machine's load hits every design alike.
``table`` turns the results into rows (time and bytes per step, time and steps to a target accuracy,
final accuracy), and ``predict`` adds the cost model's time per step for any rank count and network.

**The prediction.** ``design_cost(design, p, ...)`` counts one step's communication with the lab's
cost model (``ppu_lab.costmodel``: the collectives MPICH runs, on the critical path), and
``predict`` prices it on a network (``perfmodel.cluster``) and adds the computation of
``perfmodel.StepModel``: T(p) = per_row * ceil(B/p) + serial + T_comm(p). Per design:

- allreduce: one Allreduce of the gradient (and the loss);  local SGD: one of the parameters, 1/H per step;
- top-k: two Allgathers (k indices, k values) and the sum of p sparse vectors;  float16: Allreduce of m/2;
- overlap: the Allreduce minus what backward hides; backward is assumed to be ``BACKWARD_SHARE`` of
  the computation, all of it available for hiding (an upper bound on the gain);
- parameter server: W = p - 1 workers compute; the server receives W gradients and sends W weight
  vectors, one after the other (its link is the bottleneck), and adds them; asynchronous: workers
  and server work at the same time, so a step takes the longer of the two.

``tests/test_designs.py`` checks ``design_cost`` against what the designs counted while they ran.
"""

from __future__ import annotations

import math

import numpy as np

from ppu_lab import costmodel
from ppu_lab.costmodel import Cost
from ppu_lab.mpi import check_everywhere, on_first_ranks, world

#: Share of a step's computation that is backward (forward : backward is about 1 : 2 for a CNN).
BACKWARD_SHARE = 2 / 3


def scaled(cost: Cost, factor: float) -> Cost:
    """A cost paid ``factor`` times (e.g. 1/H per step for local SGD)."""
    return Cost(np.multiply(cost.messages, factor), np.multiply(cost.nbytes, factor),
                np.multiply(cost.reduced, factor), cost.largest)


def design_cost(design: str, p: int, n_params: int, itemsize: int = 4, **options) -> Cost:
    """One step's communication on the busiest rank's critical path, in the cost model's counts.

    ``n_params``: parameters (the gradient buffer has one more slot, the loss); ``itemsize``: bytes
    per number (4: float32 CNN, 8: float64 ANN and ridge). ``options`` as for ``designs.run``, and
    ``buckets`` for the overlapped Allreduce (``len(Overlapped.plan)``: 3 for the CNN by default).
    """
    grad, params = (n_params + 1) * itemsize, n_params * itemsize
    if design == "allreduce":
        return costmodel.allreduce(grad, p, itemsize)
    if design == "overlap":                       # one Allreduce per bucket: the bytes add up to one of the whole
        whole = costmodel.allreduce(grad, p, itemsize)
        return Cost(np.multiply(whole.messages, options.get("buckets", 1)), whole.nbytes, whole.reduced, whole.largest)
    if design == "local_sgd":
        return scaled(costmodel.allreduce(params, p, itemsize), 1 / options.get("period", 4))
    if design == "float16":
        return costmodel.allreduce(n_params * 2, p, 2)
    if design == "topk":
        k = max(1, min(n_params, round(options.get("ratio", 0.01) * n_params)))
        return costmodel.allgather(4 * k, p) + costmodel.allgather(itemsize * k, p) + \
            costmodel.reduce_local(itemsize * k, p)
    if design in ("ps_sync", "ps_async"):
        w = p - 1                                 # workers; the server receives and sends one vector each
        cost = scaled(costmodel.send(grad), w) + scaled(costmodel.send(params), w)
        return cost + costmodel.reduce_local(grad, w) if design == "ps_sync" else cost   # async: no sum
    raise ValueError(f"unknown design {design!r}")


def predict(design: str, p: int, net, *, per_row: float, serial: float, batch: int, n_params: int,
            itemsize: int = 4, batch_mode: str = "global", **options) -> dict:
    """Predicted seconds per step of ``design`` with ``p`` computing ranks on network ``net`` (``costmodel.AlphaBeta``).

    The parameter servers have one rank more, the server (p workers, p + 1 processes), as in ``compare``.
    ``per_row``, ``serial``: the computation, as ``perfmodel.StepModel`` (seconds per row of one
    rank's shard; seconds per step that no rank count shortens); ``batch``: the global batch, or
    each rank's with ``batch_mode="per_rank"``.
    Returns ``{"compute", "comm", "total"}``; ``comm`` is what the step waits for.
    """
    from ppu_lab.perfmodel import StepModel

    workers, ranks = p, p + 1 if design.startswith("ps_") else p
    parts = StepModel(per_row, serial, batch, batch_mode=batch_mode).parts(workers, net)
    compute = float(parts["compute"] + parts["serial"])
    comm = float(net.time(design_cost(design, ranks, n_params, itemsize, **options))) if ranks > 1 else 0.0
    if design == "overlap":
        comm = max(0.0, comm - BACKWARD_SHARE * float(parts["compute"]))
    if design == "ps_async":
        return {"compute": compute, "comm": comm, "total": max(compute, comm + workers * serial)}
    return {"compute": compute, "comm": comm, "total": compute + comm}


def _ranks(design: str, workers: int, comm) -> int:
    """Ranks a design runs on: ``workers``, and one more (the server) for a parameter server if there is one."""
    return min(workers + 1, comm.Get_size()) if design.startswith("ps_") else workers


def compare(specs, build, comm=None, *, workers: int | None = None, repeats: int = 1, **run_kw) -> list:
    """Run each ``(design, options)`` of ``specs`` on objectives from ``build()``; collective over ``comm``.

    ``workers``: the computing ranks (default: all of ``comm``); the synchronous designs run on the
    first ``workers`` ranks, the parameter servers on ``workers + 1`` when ``comm`` has them (the
    extra rank is the server), else on ``workers``. ``repeats`` > 1 runs the list again in rotated
    order. ``run_kw``: ``batch_size``, ``steps``, ``eval_every``, ``seed`` of ``designs.run``.
    Returns, on every rank of ``comm``, one list of ``DesignResult`` per repeat, in the order of ``specs``.
    """
    from ppu_lab.designs import run

    comm = world(comm)
    workers = comm.Get_size() if workers is None else int(workers)
    rounds = []
    for r in range(repeats):
        results = [None] * len(specs)
        for i in [(i + r) % len(specs) for i in range(len(specs))]:
            design, options = specs[i]
            results[i] = on_first_ranks(_ranks(design, workers, comm), comm, lambda sub: run(
                design, check_everywhere(build, sub), sub, **run_kw, **options))
        rounds.append(results)
    return rounds


def traced(design: str, build, comm=None, *, workers: int | None = None, straggle: dict | None = None,
           **run_kw):
    """``(DesignResult, Timeline)`` of one run of ``design`` with a ``timeline.Tracer`` on every rank.

    Ranks as in ``compare``; ``straggle``: ``{rank: seconds}`` to sleep per compute span (a planted
    straggler). Collective over ``comm``; both results on every rank.
    """
    from ppu_lab.designs import run
    from ppu_lab.timeline import Tracer

    comm = world(comm)
    workers = comm.Get_size() if workers is None else int(workers)

    def go(sub):
        obj = check_everywhere(build, sub)
        tracer = Tracer(sub, straggle=(straggle or {}).get(sub.Get_rank(), 0.0))
        return run(design, obj, sub, timer=tracer, **run_kw), tracer.gather()

    return on_first_ranks(_ranks(design, workers, comm), comm, go)


def table(rounds, target: float) -> list[dict]:
    """One row per design: medians over the repeats of ms per step (each a mean over the steps) and of
    the final score; kB per step as counted by the design while it ran; the time and steps to
    ``target``, medians over the repeats that reached it, and ``reached``: how many did (of ``repeats``)."""
    rows = []
    for i, first in enumerate(rounds[0]):
        runs = [rnd[i] for rnd in rounds]
        times = [r.time_to(target) for r in runs]
        hit = [k for k, t in enumerate(times) if not math.isnan(t)]
        rows.append({**first.summary(target),
                     "ms_per_step": float(np.median([r.summary()["ms_per_step"] for r in runs])),
                     "time_to_target": float(np.median([times[k] for k in hit])) if hit else float("nan"),
                     "steps_to_target": float(np.median([runs[k].steps_to(target) for k in hit])) if hit else float("nan"),
                     "reached": len(hit), "repeats": len(runs),
                     "final_score": float(np.median([r.history["score"][-1] for r in runs]))})
    return rows


def format_table(rows, target: float, predicted: dict | None = None) -> str:
    """The comparison as text; ``predicted``: ``{column title: {design: ms per step}}``, one column each."""
    predicted = predicted or {}
    head = (f"{'design':<40} {'ranks':>5} {'ms/step':>8} {'kB/step':>8} {'t→' + format(target, '.0%'):>10} "
            f"{'steps→':>7} {'final':>6}") + "".join(f" {title[:20]:>20}" for title in predicted)
    lines = [head, "-" * len(head)]
    for r in rows:
        t = "never" if math.isnan(r["time_to_target"]) else f"{r['time_to_target']:.1f} s"
        if 0 < r.get("reached", 1) < r.get("repeats", 1):
            t = f"{t} {r['reached']}/{r['repeats']}"      # only some repeats reached the target
        s = "-" if math.isnan(r["steps_to_target"]) else f"{r['steps_to_target']:.0f}"
        lines.append(f"{r['design']:<40} {r['ranks']:>5} {r['ms_per_step']:>8.2f} {r['kB_per_step']:>8.1f} {t:>10} "
                     f"{s:>7} {r['final_score']:>6.3f}"
                     + "".join(f" {col.get(r['design'], float('nan')):>20.2f}" for col in predicted.values()))
    return "\n".join(lines)


def step_model(baseline, batch: int) -> dict:
    """``per_row`` and ``serial`` of ``predict`` from the baseline's measured parts (rank 0): compute
    seconds per row of its shard, and the update's seconds per step."""
    shard = math.ceil(batch / baseline.ranks)
    return {"per_row": baseline.extra["parts"]["compute"] / shard, "serial": baseline.extra["parts"]["update"],
            "batch": batch}


def predictions(specs, results, net, p: int, *, batch: int, n_params: int, itemsize: int = 4) -> dict:
    """``{design label: predicted ms per step}`` on ``p`` ranks of ``net`` for the runs of ``compare``
    (``results``: one round), the computation taken from the Allreduce baseline among them."""
    base = next(r for (d, _), r in zip(specs, results) if d == "allreduce")
    kw = {**step_model(base, batch), "n_params": n_params, "itemsize": itemsize}
    return {r.design: 1e3 * predict(d, p, net, **kw, **opts, buckets=r.extra.get("buckets", 1))["total"]
            for (d, opts), r in zip(specs, results)}
