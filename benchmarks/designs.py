"""Every design of notebook 08 on the course's CNN (or ANN), against the synchronous Allreduce, in one run per rank count.

    python benchmarks/designs.py                      # 2 computing ranks (the default)
    python benchmarks/designs.py --ranks 1 2 4 8 16   # on a machine with 16 cores
    python benchmarks/designs.py --ranks 2 --steps 60 --target 0.85 --train 2000    # a quick look
    python benchmarks/designs.py --model ann --target 0.9    # the ANN (h = 50): communication weighs more

For each rank count p it starts ``mpiexec -n p+1`` itself: the synchronous designs run on p ranks,
the parameter servers on p + 1 (rank 0 serves, p workers compute), so that every design has p
computing ranks (the extra process sleeps while it waits). Every design trains from the same initial
weights on the same global minibatches (global batch ``--batch``), for ``--steps`` steps, evaluating
the test accuracy every ``--eval-every`` steps (the clock stops meanwhile). The list of designs runs
``--repeats`` times in rotated order, so that a change in the machine's load hits every design alike;
times and final accuracies are medians over the repeats (times to the target over the repeats that
reached it: an asynchronous run can fail where another succeeds).

Printed per rank count: ms per step (mean over the steps on rank 0, median over repeats), kB sent
per step by the busiest rank (as the cost model counts what the design sends), training seconds and steps to ``--target`` accuracy, the
final accuracy, and the cost model's ms per step on p ranks of this machine (alpha-beta fitted by a
ping-pong at the start) and on 64 ranks of a 10 Gb/s cluster (``perfmodel.cluster``), the computation
taken from the baseline's measured parts. Data: ``load_mnist()`` (``$PPU_LAB_DATA``; CI's 8,000-image
sample, the course's 60,000 otherwise); ``--train N`` takes the first N training images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ppu_lab.mpi import mpi_main
from ppu_lab.mpiexec import worker_options

ROOT = Path(__file__).resolve().parents[1]
SPECS = [("allreduce", {}), ("ps_sync", {}), ("ps_async", {}), ("ps_async", {"bound": 0}),
         ("local_sgd", {"period": 4}), ("local_sgd", {"period": 16}), ("topk", {"ratio": 0.01}),
         ("topk", {"ratio": 0.1}), ("float16", {}), ("overlap", {})]


# --------------------------------------------------------------------------- worker (under mpiexec)
def worker(args):
    from ppu_lab import designs
    from ppu_lab.collectives import pingpong
    from ppu_lab.config import limit_threads
    from ppu_lab.costmodel import fit_alpha_beta
    from ppu_lab.data import load_mnist
    from ppu_lab.designs.compare import compare, predictions, table
    from ppu_lab.mpi import first_ranks, world
    from ppu_lab.perfmodel import LATENCY_10G, cluster

    comm, p = world(), args.workers
    x, y, xt, yt = load_mnist(args.data)
    data = (x[:args.train], y[:args.train], xt[:args.test], yt[:args.test])
    specs = [s for s in SPECS if args.model == "cnn" or s[0] != "overlap"]   # the ANN has no backward hooks
    build = lambda: designs.make_objective(args.model, data, max_rows=args.batch)  # noqa: E731
    here = None
    with first_ranks(min(2, comm.Get_size()), comm) as sub:
        if sub is not None and sub.Get_size() == 2:
            here = fit_alpha_beta(*pingpong(comm=sub))
    here = comm.bcast(here, root=0)
    with limit_threads(1, import_torch=True):
        rounds = compare(specs, build, comm, workers=p, repeats=args.repeats, batch_size=args.batch,
                         steps=args.steps, eval_every=args.eval_every)
    if comm.Get_rank() == 0:
        theta = build().theta
        kw = dict(batch=args.batch, n_params=theta.size, itemsize=theta.itemsize)
        pred = {"here": predictions(specs, rounds[0], here, p, **kw) if here else {},
                "64 ranks, 10 Gb/s": predictions(specs, rounds[0], cluster(10, LATENCY_10G), 64, **kw)}
        rows = table(rounds, args.target)
        Path(args.out).write_text(json.dumps({"workers": p, "processes": comm.Get_size(), "rows": rows,
                                              "predicted": pred, "here": str(here)}))


# --------------------------------------------------------------------------- driver
def run(ranks, args):
    from ppu_lab.mpiexec import run_worker

    out = {}
    for p in ranks:
        print(f"running {p} computing rank(s) ({p + 1} processes) ...", file=sys.stderr, flush=True)
        extra = [] if args.data is None else ["--data", args.data]
        out[p] = run_worker(p + 1, __file__, "--workers", p, "--model", args.model, "--steps", args.steps, "--batch",
                            args.batch,
                            "--eval-every", args.eval_every, "--repeats", args.repeats, "--train", args.train,
                            "--test", args.test, "--target", args.target, *extra, timeout=args.timeout, cwd=ROOT)
    return out


def report(out, target) -> str:
    from ppu_lab.designs.compare import format_table

    lines = []
    for p, res in out.items():
        lines += ["", f"{p} computing rank(s), {res['processes']} processes (the parameter servers: rank 0 serves); "
                      f"this machine's ping-pong fit: {res['here']}",
                  format_table(res["rows"], target, {f"model {p} here": res["predicted"]["here"],
                                                     "model 64 @10 Gb/s": res["predicted"]["64 ranks, 10 Gb/s"]})]
    lines += ["", "ms/step: mean over steps (rank 0), median over repeats; kB/step: sent by the busiest rank, per step; "
                  f"t→, steps→: training time (evaluation excluded) and steps to {target:.0%} test accuracy, medians over the "
                  "repeats that reached it (k/n: only k of n did); "
                  "final: test accuracy after the last step; model columns: the cost model's ms per step."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2], help="computing rank counts (default: 2)")
    ap.add_argument("--model", choices=("cnn", "ann"), default="cnn", help="the course's CNN (default) or ANN (h = 50)")
    ap.add_argument("--steps", type=int, default=300, help="steps per design (default 300: 3.75 epochs of 8,000)")
    ap.add_argument("--batch", type=int, default=100, help="global batch (default 100, the course's)")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between evaluations (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the designs, rotated (default 3)")
    ap.add_argument("--target", type=float, default=0.95, help="target test accuracy (default 0.95)")
    ap.add_argument("--train", type=int, default=60_000, help="first N training images (default: all)")
    ap.add_argument("--test", type=int, default=2_000, help="first N test images (default 2,000)")
    ap.add_argument("--data", default=None, help="MNIST folder (default: $PPU_LAB_DATA or the cache)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per rank count (default 3600)")
    ap.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    worker_options(ap)
    args = ap.parse_args(argv)
    if args.worker:
        return mpi_main(lambda: worker(args))
    out = run(args.ranks, args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(report(out, args.target))


if __name__ == "__main__":
    main()
