"""The CNN's data-parallel training step: ppu_lab vs PyTorch DistributedDataParallel (gloo), vs ranks.

One command runs the whole grid (it starts ``mpiexec -n p`` itself for each rank count) and prints a
table (not a timed test; notebook 06 explains the numbers):

    python benchmarks/dp_step.py                 # ranks 1, 2, 4, ... up to the cores of this machine
    python benchmarks/dp_step.py --ranks 1 2 4 8 16 --steps 40

For each rank count p and two batch settings -- per-rank batch 64 (weak scaling: global batch 64 p)
and global batch 512 (strong scaling: 512 / p per rank) -- it times, alternating in the same job:

- ``ppu_lab``: ``ppu_lab.train.train("cnn", ...)`` itself (one flat preallocated gradient buffer, the
  parameters' ``.grad`` are views into it, one Allreduce per step, one vector update);
- ``minimal``: the same SGD written as a bare loop (no checks, timers per phase, history, progress bar):
  the floor for ppu_lab. To be a fair floor it does the work ppu_lab must do and nothing else: it draws
  this rank's shard of a fresh random global minibatch every step (the same permutation as ppu_lab's,
  gathered with ``np.take`` into buffers allocated once), puts the summed loss in the Allreduce buffer's
  last slot, and applies the L2 decay (lam = 5) with the step (lr = 0.01 on J/N, as ppu_lab and DDP
  here). An earlier version reused one pre-gathered contiguous batch, read no loss and had no decay: it
  skipped the gather (~0.03-0.3 ms a step, more with a cold cache) and one pass over the parameters.
- ``DDP``: ``ppu_lab.ddp.train_ddp`` (DistributedDataParallel over gloo, bucketed all-reduce overlapped
  with backward, ``torch.optim.SGD``).

Step time = median over steps of rank 0's wall time per step (a synchronous step ends for every rank
at the same Allreduce). Data are random 28x28 images: the step's cost does not depend on the pixels.
Weak-scaling efficiency = T(1) / T(p) at per-rank batch 64; strong-scaling speedup = T(1) / T(p) at
global batch 512. One thread per rank (see ``ppu_lab.train.train``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("per_rank", 64), ("global", 512)]
LR, LAM = 0.01, 5.0  # side_by_side's lr and train's default lam: minimal runs the same SGD


# --------------------------------------------------------------------------- worker (under mpiexec)
def _data(global_batch, steps_per_epoch=8, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)  # the same on every rank
    n = global_batch * steps_per_epoch
    x = rng.random((n, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n)
    return x, y, x[:10], y[:10]


def _minimal_steps(data, global_batch, steps, comm, lr=LR, lam=LAM):
    """The leanest flat-buffer Allreduce step of the same SGD as ppu_lab's: what ppu_lab must match.

    Same work per step as ``train``, nothing more: this rank's shard of the step's random global
    minibatch (``minibatches``, the same permutation as ppu_lab's) gathered into buffers allocated
    once, forward, summed loss, backward into the flat gradient buffer whose last slot carries the
    loss, one Allreduce, then the L2 decay and the step on the flat parameter vector.
    """
    import numpy as np
    import torch
    from mpi4py import MPI

    from ppu_lab.models import make_cnn
    from ppu_lab.mpi import shard_bounds
    from ppu_lab.ridge import minibatches

    net = make_cnn(seed=0)  # ppu_lab's initial weights (CnnModel(seed=0))
    params = list(net.parameters())
    n_params = sum(p.numel() for p in params)
    flat = torch.zeros(n_params)
    grad = torch.zeros(n_params + 1)  # gradient sum, then the loss sum
    o = 0
    for p in params:
        k = p.numel()
        flat[o:o + k].copy_(p.data.reshape(-1))
        p.data, p.grad = flat[o:o + k].view_as(p), grad[o:o + k].view_as(p)
        o += k
    g, gsum = grad.numpy(), grad[:-1]
    x_all = np.ascontiguousarray(data[0], dtype=np.float32).reshape(-1, 1, 28, 28)
    y_all = np.ascontiguousarray(data[1], dtype=np.int64)
    n = len(y_all)
    decay = 1.0 - lr * lam / n * torch.cat([torch.full((p.numel(),), float(p.dim() > 1)) for p in params])
    ce = torch.nn.CrossEntropyLoss(reduction="sum")
    rank, size = comm.Get_rank(), comm.Get_size()
    cap = -(-global_batch // size)
    xb, yb = np.empty((cap, 1, 28, 28), dtype=np.float32), np.empty(cap, dtype=np.int64)
    xt, yt = torch.from_numpy(xb), torch.from_numpy(yb)
    times, epoch = [], 0
    while len(times) < steps:
        epoch += 1
        for idx in minibatches(n, global_batch, 0, epoch):
            t0 = time.perf_counter()
            lo, hi = shard_bounds(len(idx), size, rank)
            k = hi - lo
            np.take(x_all, idx[lo:hi], axis=0, out=xb[:k], mode="clip")
            np.take(y_all, idx[lo:hi], out=yb[:k], mode="clip")
            grad.zero_()
            loss = ce(net(xt[:k]), yt[:k])
            loss.backward()
            g[-1] = loss.item()
            comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
            flat.mul_(decay).add_(gsum, alpha=-lr / len(idx))
            times.append(time.perf_counter() - t0)
            if len(times) == steps:
                break
    return times


def worker(args):
    from ppu_lab.config import limit_threads
    from ppu_lab.mpi import world

    with limit_threads(1, import_torch=True):  # one core per rank, as train() does
        _time_configs(args, world())


def _time_configs(args, comm):
    from ppu_lab.ddp import side_by_side

    size = comm.Get_size()
    results = {}
    for mode, batch in CONFIGS:
        global_batch = batch * size if mode == "per_rank" else batch
        data = _data(global_batch)
        minimal = {"minimal": lambda c: _minimal_steps(data, global_batch, args.steps, c)}
        results[f"{mode}_{batch}"] = side_by_side(data, batch_size=batch, batch_mode=mode, steps=args.steps,
                                                  lr=LR, warmup=args.warmup, repeats=args.repeats, comm=comm,
                                                  extra=minimal)
    if comm.Get_rank() == 0:
        Path(args.out).write_text(json.dumps({"ranks": size, "results": results}))


# --------------------------------------------------------------------------- driver
def default_ranks():
    from ppu_lab.mpiexec import usable_cores

    cores = usable_cores()
    ranks, p = [], 1
    while p <= cores:
        ranks.append(p)
        p *= 2
    return ranks


def run_grid(ranks, steps, repeats, warmup, timeout):
    from ppu_lab.mpiexec import mpiexec_command
    from ppu_lab.procs import run

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in ranks:
            out = Path(tmp) / f"p{p}.json"
            job = mpiexec_command(p, sys.executable, __file__, "--worker", "--out", out, "--steps", steps,
                                  "--repeats", repeats, "--warmup", warmup)
            print(f"running {p} rank(s) ...", file=sys.stderr, flush=True)
            try:
                proc = run(job.cmd, timeout, cwd=ROOT, env=job.environ())
            except subprocess.TimeoutExpired as exc:
                sys.exit(f"{' '.join(job.cmd)} did not finish in {timeout:g} s (stopped; raise --timeout):\n"
                         f"{exc.output}\n{exc.stderr}")
            if proc.returncode != 0 or not out.exists():
                sys.exit(f"{' '.join(job.cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            rows[p] = json.loads(out.read_text())["results"]
    return rows


def table(rows) -> str:
    ps = sorted(rows)
    p1 = ps[0]
    lines = ["CNN data-parallel step, median ms per step (rank 0); one thread per rank"]
    tables = [("per_rank_64", "per-rank batch 64 (weak scaling: global batch 64 p)", "eff"),
              ("global_512", "global batch 512 (strong scaling: 512 / p per rank)", "S")]
    for key, title, ratio in tables:  # both ratios are T(1) / T(p): efficiency (weak) or speedup (strong)
        base = rows[p1][key]
        lines += ["", title, f"{'ranks':>5} {'ppu_lab':>9} {'minimal':>9} {'DDP':>9} {'DDP/ppu':>8} "
                             f"{ratio + ' ppu':>8} {ratio + ' min':>8} {ratio + ' DDP':>8}"]
        for p in ps:
            r = rows[p][key]
            lines.append(f"{p:>5} {1e3 * r['ppu_lab']:>9.2f} {1e3 * r['minimal']:>9.2f} {1e3 * r['DDP']:>9.2f} "
                         f"{r['DDP'] / r['ppu_lab']:>8.2f} {base['ppu_lab'] / r['ppu_lab']:>8.2f} "
                         f"{base['minimal'] / r['minimal']:>8.2f} {base['DDP'] / r['DDP']:>8.2f}")
    lines.append("")
    lines.append("DDP/ppu > 1: ppu_lab's step is faster (DDP/ppu = ppu_lab's throughput relative to DDP). "
                 "eff = T(1)/T(p); S = T(1)/T(p).")
    slower = [(p, k) for p in ps for k in rows[p] if rows[p][k]["ppu_lab"] > rows[p][k]["DDP"]]
    lines.append("ppu_lab at least as fast as DDP at every rank count: "
                 + ("yes" if not slower else f"NO at {slower}"))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=None,
                    help="rank counts to run (default: 1, 2, 4, ... up to the cores available)")
    ap.add_argument("--steps", type=int, default=30, help="steps per timed block (default 30)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="blocks per implementation, alternating ppu_lab/minimal/DDP (default 2)")
    ap.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each block (default 5)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per rank count (default 900)")
    ap.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    ap.add_argument("--save-reference", action="store_true", help="write results/reference/dp_step.json (notebook 06)")
    from ppu_lab.mpiexec import worker_options

    worker_options(ap)
    args = ap.parse_args(argv)
    if args.worker:
        from ppu_lab.mpi import mpi_main

        return mpi_main(lambda: worker(args))
    if args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup")
    rows = run_grid(args.ranks or default_ranks(), args.steps, args.repeats, args.warmup, args.timeout)
    if args.json:
        Path(args.json).write_text(json.dumps({str(p): r for p, r in rows.items()}, indent=1))
    print(table(rows))
    if args.save_reference:
        from ppu_lab import reference

        records = [{"ranks": p, "config": key, **times} for p, r in sorted(rows.items()) for key, times in r.items()]
        command = "python benchmarks/dp_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print(f"saved {reference.save('dp_step', records, command=command)}")


if __name__ == "__main__":
    main()
