"""The step-time model's prediction against the lab's own measurement, p = 1, 2, 3 (notebooks 04, 06, 07).

    mpiexec -n 3 python benchmarks/perfmodel.py             # about 1 minute on 2 quiet cores
    mpiexec -n 3 python benchmarks/perfmodel.py --quick     # fewer steps (PPU_LAB_QUICK=1 too)
    mpiexec -n 3 python benchmarks/perfmodel.py --save-reference   # also write results/reference/perfmodel.json

Not a test: it prints tables. In one MPI job of P ranks (the first p ranks run, the others sleep):

1. this machine's network model: a ping-pong between ranks 0 and 1 (two regimes, ``collectives.fit_regimes``)
   and gamma (``collectives.measure_gamma``);
2. for each workload, the 1-rank run builds its ``perfmodel.StepModel`` *before* any run on more ranks:
   the ridge designs of notebook 04 (``parallel.time_steps``: its timers split the step) and the
   course's ANN (h = 50) and CNN (``train``, design allreduce, global batch 100: the line through
   1-rank steps at batch 100 and 25 splits a step into work per row and a fixed part);
3. the runs on p = 2 .. P ranks, and the predicted against the measured time per step, with the ratio;
4. the predicted speedups of the ANN and CNN up to 1,024 ranks on this machine's network model and on
   a 10 Gb/s and a 100 Gb/s cluster (``perfmodel.networks``).

Data are random (MNIST-shaped for the ANN and CNN): a step's time does not depend on the values.
Ranks beyond the cores share them (oversubscribed): the model assumes a core per rank.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from ppu_lab import collectives, perfmodel  # noqa: E402
from ppu_lab.config import limit_threads, quick_mode  # noqa: E402
from ppu_lab.mpi import first_ranks, mpi_main, sleeping_barrier  # noqa: E402

REFERENCE = "perfmodel"
RIDGE = dict(n=40_000, d=200, batch=2_000, lam=1.0)  # notebook 04's problem (full mode)
BATCH, SMALL_BATCH = 100, 25                          # the course's batch; the second point of the line
EXTRAPOLATE = (2, 8, 64, 256, 1024)


def network(comm, repeat):
    nbytes, secs = collectives.pingpong(sizes=[2**k for k in range(0, 23)], comm=comm, repeat=repeat)
    found = (collectives.measure_gamma(), collectives.protocol_switch()) if comm.Get_rank() == 0 else None
    gamma, switch = comm.bcast(found, root=0)
    return collectives.fit_regimes(nbytes, secs, gamma, switch=switch)


def ridge_runs(comm, epochs):
    """{design: {p: time_steps dict}} for p = 1 .. size (rank 0's medians)."""
    from ppu_lab import parallel, ridge
    from ppu_lab.data import make_ridge_data

    X, y, _ = make_ridge_data(RIDGE["n"], RIDGE["d"], seed=0)
    lr = 0.5 / ridge.minibatch_lipschitz(X, RIDGE["lam"], RIDGE["batch"])
    runs = {}
    with limit_threads(1):
        for design in parallel.DESIGNS:
            runs[design] = {}
            for p in range(1, comm.Get_size() + 1):
                out = parallel.time_steps(design, p, X, y, RIDGE["lam"], lr, RIDGE["batch"], epochs, comm=comm)
                runs[design][p] = comm.bcast(out, root=0)
    return runs


def train_step(model, batch, p, steps, comm):
    """Median seconds per step of ``train`` on the first p ranks (global batch); the same on every rank."""
    from ppu_lab.train import train

    rng = np.random.default_rng(0)
    n = batch * steps
    data = (rng.random((n, 28, 28), dtype=np.float32), rng.integers(0, 10, n), None, None)
    data = (data[0], data[1], data[0][:10], data[1][:10])
    out = None
    with first_ranks(p, comm) as sub:
        if sub is not None:
            res = train(model, data, batch_size=batch, epochs=1, max_steps=steps, evaluate=False, progress=False,
                        comm=sub)
            out = float(np.median(res.step_times["total"][2:]))  # the first steps warm the caches
    sleeping_barrier(comm)
    return comm.bcast(out, root=0)


def grad_bytes(model):
    from ppu_lab.models import build_model

    m = build_model(model, hidden=50)
    return m.grad.size * m.grad.itemsize  # the gradient and the loss slot: one Allreduce buffer


def measure(comm, quick):
    size = comm.Get_size()
    net = network(comm, repeat=7 if quick else 25)
    steps = 12 if quick else 40
    models, measured = {}, {}
    for design, runs in ridge_runs(comm, epochs=1 if quick else 2).items():
        name = f"ridge {design}"
        models[name] = perfmodel.ridge_model(runs[1], RIDGE["batch"], RIDGE["d"])
        measured[name] = {p: r["total"] for p, r in runs.items()}
    for model in ("ann", "cnn"):
        name = {"ann": "ANN h=50", "cnn": "CNN"}[model]
        one = {b: train_step(model, b, 1, steps, comm) for b in (BATCH, SMALL_BATCH)}
        models[name] = perfmodel.train_model(one, grad_bytes(model), BATCH)  # built before any p > 1 run
        measured[name] = {1: one[BATCH], **{p: train_step(model, BATCH, p, steps, comm) for p in range(2, size + 1)}}
    return net, models, measured


def records(net, models, measured):
    rows = []
    for name, model in models.items():
        for r in perfmodel.compare(model, net, measured[name]):
            parts = {k: float(v) for k, v in model.parts(r["ranks"], net).items()}
            rows.append({"workload": name, **r, **{f"predicted_{k}": v for k, v in parts.items() if k != "total"}})
    return rows


def report(net, models, measured, cores) -> str:
    out = [f"# network model of this machine (ping-pong, two regimes): {net}"]
    for name, model in models.items():
        title = (f"{name}: per row {1e6 * model.per_row:.2f} us, serial {1e3 * model.serial:.3f} ms, "
                 f"gradient {model.grad_bytes / 1024:.1f} KiB, batch {model.batch}")
        out += ["", perfmodel.format_compare(perfmodel.compare(model, net, measured[name]), title, cores)]
    nets = perfmodel.networks(net)
    nn = {k: m for k, m in models.items() if not k.startswith("ridge")}
    for label, batch, mode in (("global batch 1,024", 1024, "global"), ("per-rank batch 100", BATCH, "per_rank")):
        table = perfmodel.speedup_table({f"{k}, {label}": m.with_batch(batch, mode) for k, m in nn.items()},
                                        nets, EXTRAPOLATE)
        out += ["", f"predicted speedup (samples per second over 1 rank), {label}:",
                perfmodel.format_speedups(table, EXTRAPOLATE)]
    out.append(f"# assumed latencies: 10 Gb/s Ethernet {1e6 * perfmodel.LATENCY_10G:.1f} us, 100 Gb/s InfiniBand "
               f"{1e6 * perfmodel.LATENCY_100G:.1f} us; line rate as bandwidth; gamma of this machine")
    return "\n".join(out)


def main(argv=None):
    from mpi4py import MPI

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds (also PPU_LAB_QUICK=1)")
    ap.add_argument("--save-reference", action="store_true", help=f"write results/reference/{REFERENCE}.json")
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        raise SystemExit("run with at least 2 ranks: mpiexec -n 3 python benchmarks/perfmodel.py")
    net, models, measured = measure(comm, args.quick or quick_mode())
    if comm.Get_rank() == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(report(net, models, measured, cores), flush=True)
        if args.save_reference:
            from ppu_lab import reference

            notes = {"switch": net.switch, "small": [net.small.alpha, net.small.beta],
                     "large": [net.large.alpha, net.large.beta], "gamma": net.gamma,
                     "models": {k: vars(m) for k, m in models.items()}}
            command = f"mpiexec -n {comm.Get_size()} python benchmarks/perfmodel.py " + " ".join(argv)
            path = reference.save(REFERENCE, records(net, models, measured), notes=notes, command=command)
            print(f"# saved {path}")
    return models, measured


if __name__ == "__main__":
    mpi_main(main)
