"""What tracing costs: the CNN's training step with tracing off against the code without the tracer, and
tracing on against off (``ppu_lab.timeline``, notebooks 04, 06, 08).

    python benchmarks/tracing.py                       # 2 ranks
    python benchmarks/tracing.py --ranks 1 2 4 8 16    # on a machine with 16 cores

Two comparisons per rank count p, each alternating its two sides so that a change in the machine's
load hits both (the machine is shared: only ratios measured side by side mean anything):

1. **off vs without**: ``train("cnn", ...)`` of this checkout (its step has the ``timer`` hook, off)
   against the same call in the checkout *before* the tracer existed (``--baseline``; default: the
   parent of the commit that added ``ppu_lab/timeline.py``, extracted with ``git archive`` and put
   first on ``PYTHONPATH``). The two run as separate ``mpiexec`` jobs, alternating, ``--repeats`` each.
2. **on vs off**: in one job, blocks of ``train(..., timer=Tracer(comm))`` alternate with blocks of
   ``train(...)``: the tracer's barrier before each Allreduce, its clock reads and span records.

Step time: median over a block's steps (the first ``--warmup`` dropped) of rank 0's wall time per step;
a ratio is the median of the per-block ratios, with their range. On a shared machine these ratios
scatter by more than the effects measured, so two direct measurements are printed too: the cost of one
``with no_timer(name):`` (the hook when off), times the three uses per step; and what tracing adds per
step (four recorded spans and one barrier when the ranks arrive together), each against the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ppu_lab.mpi import mpi_main

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- worker (under mpiexec)
def _steps(data, args, comm, timer=None):
    from ppu_lab.train import train

    kw = {} if timer is None else {"timer": timer}
    res = train("cnn", data, batch_size=args.batch, max_steps=args.steps, epochs=10**6, evaluate=False,
                progress=False, lr=0.01, comm=comm, **kw)
    return statistics.median(res.step_times["total"][args.warmup:])


def worker(args):
    import ppu_lab
    from ppu_lab.data import load_mnist
    from ppu_lab.mpi import world

    comm = world()
    x, y, xt, yt = load_mnist(args.data)
    data = (x[:args.batch * 8], y[:args.batch * 8], xt[:10], yt[:10])
    blocks = {"off": [], "on": []}
    for _ in range(args.blocks):
        blocks["off"].append(_steps(data, args, comm))
        if args.mode == "onoff":
            from ppu_lab.timeline import Tracer

            blocks["on"].append(_steps(data, args, comm, Tracer(comm)))
    parts = tracer_parts(comm) if args.mode == "onoff" else {}
    if comm.Get_rank() == 0:
        Path(args.out).write_text(json.dumps({"package": ppu_lab.__file__, **blocks, **parts}))


def tracer_parts(comm, n: int = 2000) -> dict:
    """What tracing adds to a step, measured directly: seconds per recorded span (two clock reads and an
    append) and per ``Barrier`` when the ranks arrive together (its latency; waiting is not a cost)."""
    from ppu_lab.timeline import Tracer

    tracer = Tracer(comm)
    t0 = time.perf_counter()
    for _ in range(n):
        with tracer("update"):
            pass
    span = (time.perf_counter() - t0) / n
    barriers = []
    for _ in range(200):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Barrier()
        barriers.append(time.perf_counter() - t0)
    return {"span": span, "barrier": statistics.median(barriers)}


# --------------------------------------------------------------------------- driver
def baseline_tree(rev: str | None, dest: Path) -> str:
    """Extract ``ppu_lab`` of ``rev`` (default: before the tracer) into ``dest``; return the revision."""
    from ppu_lab.procs import run

    if rev is None:
        added = run(["git", "log", "--diff-filter=A", "--format=%H", "--", "ppu_lab/timeline.py"], 60, cwd=ROOT)
        commits = added.stdout.split()
        if added.returncode != 0 or not commits:
            sys.exit("could not find the commit that added ppu_lab/timeline.py: pass --baseline REV")
        rev = commits[-1] + "^"
    archive = dest / "base.tar"
    made = run(["git", "archive", "-o", str(archive), rev, "ppu_lab"], 120, cwd=ROOT)
    if made.returncode != 0:
        sys.exit(f"git archive {rev} failed: {made.stderr}")
    run(["tar", "-xf", str(archive), "-C", str(dest)], 120)
    return rev


def job(p, args, mode: str, pythonpath: str | None):
    from ppu_lab.mpiexec import run_worker

    extra = [] if args.data is None else ["--data", args.data]
    env = {"PYTHONPATH": pythonpath + os.pathsep + os.environ.get("PYTHONPATH", "")} if pythonpath else None
    return run_worker(p, __file__, "--mode", mode, "--steps", args.steps, "--warmup", args.warmup, "--batch",
                      args.batch, "--blocks", args.blocks if mode == "onoff" else 1, *extra, timeout=args.timeout,
                      env=env, cwd=ROOT)


def hook_cost(repeat: int = 200_000) -> float:
    """Seconds per ``with no_timer(name): pass``: what the hook costs when tracing is off."""
    from ppu_lab.timing import no_timer

    t0 = time.perf_counter()
    for _ in range(repeat):
        with no_timer("compute"):
            pass
    return (time.perf_counter() - t0) / repeat


def ratio_line(name, num, den):
    ratios = sorted(a / b for a, b in zip(num, den))
    return (f"  {name}: median ratio {statistics.median(ratios):.4f} (range {ratios[0]:.4f}-{ratios[-1]:.4f}, "
            f"{len(ratios)} pairs); step {1e3 * statistics.median(den):.2f} ms -> {1e3 * statistics.median(num):.2f} ms")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2], help="rank counts (default: 2)")
    ap.add_argument("--steps", type=int, default=40, help="steps per block (default 40)")
    ap.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of a block (default 5)")
    ap.add_argument("--batch", type=int, default=100, help="global batch (default 100)")
    ap.add_argument("--repeats", type=int, default=4, help="alternating jobs per side for off vs without (default 4)")
    ap.add_argument("--blocks", type=int, default=6, help="alternating blocks per side for on vs off (default 6)")
    ap.add_argument("--baseline", default=None, help="git revision without the tracer (default: found)")
    ap.add_argument("--data", default=None, help="MNIST folder (default: $PPU_LAB_DATA or the cache)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per job (default 900)")
    ap.add_argument("--mode", default="off", help=argparse.SUPPRESS)
    # mpiexec.worker_options, written out: the baseline's workers import the package before the tracer
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return mpi_main(lambda: worker(args))
    if args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rev = baseline_tree(args.baseline, tmp)
        hook = hook_cost()
        print(f"tracing off costs {1e9 * hook:.0f} ns per timer(name) use, 3 uses per train() step")
        for p in args.ranks:
            print(f"running {p} rank(s) ...", file=sys.stderr, flush=True)
            now, before = [], []
            for r in range(args.repeats):
                order = [("now", None), ("before", str(tmp))][:: 1 if r % 2 == 0 else -1]
                for side, path in order:
                    res = job(p, args, "off", path)
                    (now if side == "now" else before).append(res["off"][0])
                    if side == "before" and not res["package"].startswith(str(tmp)):
                        sys.exit(f"the baseline run imported {res['package']}, not the extracted {rev}")
            onoff = job(p, args, "onoff", None)
            print(f"\n{p} rank(s), CNN, global batch {args.batch}, baseline {rev}")
            print(ratio_line("tracing off / code without the tracer", now, before))
            print(ratio_line("tracing on / tracing off", onoff["on"], onoff["off"]))
            print(f"  the hook when off: 3 x {1e9 * hook:.0f} ns = {3e2 * hook / statistics.median(now):.5f} % "
                  "of a step")
            added = 4 * onoff["span"] + (onoff["barrier"] if p > 1 else 0.0)    # compute, wait, comm, update
            print(f"  tracing on, measured directly: 4 spans x {1e6 * onoff['span']:.1f} us + one barrier "
                  f"{1e6 * onoff['barrier']:.1f} us = {1e6 * added:.1f} us = "
                  f"{1e2 * added / statistics.median(onoff['off']):.3f} % of a step")


if __name__ == "__main__":
    main()
