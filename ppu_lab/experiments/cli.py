"""The command line (``python -m ppu_lab.experiments run|table``) and ``launch``, which starts it
under ``mpiexec`` from a notebook."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ppu_lab.config import quick_mode
from ppu_lab.experiments.analysis import format_table
from ppu_lab.experiments.grid import (COURSE_BATCH_SIZES, DESIGNS, FULL_EPOCHS, QUICK, ExperimentInputError, RunConfig,
                                      default_ranks, expand_grid)
from ppu_lab.experiments.plans import PLANS, plan
from ppu_lab.experiments.results import default_out, load_results
from ppu_lab.experiments.runner import GRID_TIMEOUT, agree, run_grid
from ppu_lab.mpi import world
from ppu_lab.trainconfig import LR_SCALINGS

__all__ = ["build_parser", "grid_from_args", "main", "run_command", "launch", "LAUNCH_TIMEOUT"]

# Default deadline of ``launch`` (seconds). The whole course grid on the full MNIST set and 8 ranks
# takes about an hour; a grid stopped at its deadline resumes where it stopped.
LAUNCH_TIMEOUT = GRID_TIMEOUT  # one deadline for a grid, launched under mpiexec or run on engines


def _csv(kind):
    def parse(text):
        try:
            return [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}; got {text!r}")
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ppu_lab.experiments",
        description="The course's experiments: data-parallel ANN/CNN training on MNIST over a grid of "
                    "MPI ranks x batch sizes x models; one JSON line per finished run.",
        epilog="Example: mpiexec -n 4 python -m ppu_lab.experiments run --models ann:10,ann:50,cnn "
               "--batch-sizes 50,100,150,200 --epochs 1 --out results/grid.jsonl")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run", help="run the grid (start with mpiexec -n N; N = the largest rank count)",
        description="Run every run of the grid not yet in --out. Start it with `mpiexec -n N`; the "
                    "runs with p < N ranks use the first p ranks while the others sleep. Rank 0 "
                    "appends one JSON line per finished run (flushed and fsynced), so a crash loses at "
                    "most the run in progress and the same command resumes where it stopped.")
    _grid_options(r)
    _run_options(r)
    t = sub.add_parser("table", help="print a results file as a table (time per iteration, accuracy)")
    t.add_argument("path", help="a JSON-lines results file written by `run`")
    return p


def _grid_options(r) -> None:
    r.add_argument("--models", type=_csv(str), default=["ann:10", "ann:50", "cnn"],
                   help="comma-separated models: ann:H (sigmoid hidden layer of H units, e.g. ann:10) or cnn "
                        "(the course's 2-conv network). Default: ann:10,ann:50,cnn")
    r.add_argument("--ranks", type=_csv(int), default=None,
                   help="comma-separated numbers of MPI ranks to time, each <= the mpiexec -n N of the job "
                        "(default: 1, 2, 4, ... up to N, and N)")
    r.add_argument("--batch-sizes", type=_csv(int), default=list(COURSE_BATCH_SIZES),
                   help="comma-separated minibatch sizes; see --batch-mode. Default: the course's 50,100,150,200")
    r.add_argument("--batch-mode", type=_csv(str), default=["global"],
                   help="'global': the batch size is the global batch, split over the ranks (strong scaling: "
                        "the SGD steps do not depend on the ranks); 'per_rank': every rank takes a whole batch, "
                        "so the global batch is ranks x batch (weak scaling: fewer, larger steps per epoch). "
                        "'global,per_rank' runs both. Default: global")
    r.add_argument("--epochs", type=int, default=None,
                   help="epochs per run; one epoch is the course's 'iteration' "
                        f"(default {QUICK['epochs']} in quick mode, else {FULL_EPOCHS})")
    r.add_argument("--lr", type=float, default=None, help="learning rate (default: train()'s default for the model)")
    r.add_argument("--lam", type=float, default=5.0, help="L2 regularisation weight lambda. Default: the course's 5")
    r.add_argument("--design", choices=DESIGNS, default="allreduce",
                   help="gradient exchange: one Allreduce of a flat buffer, or the course's Scatter+Allgather. "
                        "Default: allreduce")
    r.add_argument("--seeds", "--seed", type=_csv(int), default=[0], dest="seeds",
                   help="comma-separated seeds of the initial weights and the minibatch order; every run is "
                        "repeated once per seed (the spread is the noise of a comparison). Default: 0")
    r.add_argument("--lr-scaling", choices=LR_SCALINGS, default="none",
                   help="'linear': the learning rate times global batch / --base-batch, reached by a linear "
                        "warm-up over --warmup-epochs (Goyal et al. 2017). Default: none (a fixed rate)")
    r.add_argument("--base-batch", type=int, default=100,
                   help="the global batch the learning rate is tuned for (with --lr-scaling linear). Default: 100")
    r.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="epochs of linear warm-up to the scaled learning rate. Default: 0")
    r.add_argument("--plan", choices=sorted(PLANS), default=None,
                   help="run a notebook's grid instead of the grid options above: 'ann' (notebook 05's course "
                        "grid) or 'conclusions' (notebook 07's test of the course's conclusions); --quick "
                        "chooses its quick version")
    r.add_argument("--train-samples", type=int, default=None,
                   help="use the first N training images (default: all; quick mode: %d)" % QUICK["train_samples"])
    r.add_argument("--test-samples", type=int, default=None,
                   help="use the first N test images (default: all; quick mode: %d)" % QUICK["test_samples"])
    r.add_argument("--max-steps", type=int, default=None,
                   help="stop each run after this many SGD steps (smoke tests; epoch times are then partial)")
    r.add_argument("--threads-per-rank", type=int, default=1,
                   help="BLAS/torch threads per rank (1 = one core per rank, the fair setting for scaling). Default: 1")


def _run_options(r) -> None:
    quick = ", ".join(f"{k}={v}" for k, v in QUICK.items())
    r.add_argument("--quick", action="store_true",
                   help=f"quick mode, as PPU_LAB_QUICK=1 does: {quick} unless given explicitly")
    r.add_argument("--data-root", default=None,
                   help="folder with the four MNIST IDX .gz files "
                        "(default: $PPU_LAB_DATA, then ~/.cache/ppu_lab/mnist)")
    r.add_argument("--out", default=None,
                   help="JSON-lines results file, appended to and resumed from "
                        "(default: $PPU_LAB_RESULTS/grid.jsonl, else results/grid.jsonl)")
    r.add_argument("--progress", action="store_true", help="show a progress bar per run on rank 0")
    r.add_argument("--dry-run", action="store_true", help="print the runs to do and those already done; train nothing")


def grid_from_args(args, world_size: int) -> list[RunConfig]:
    quick = args.quick or quick_mode()
    if args.plan:
        return plan(args.plan, quick)

    def choose(value, name, full):
        return value if value is not None else (QUICK[name] if quick else full)

    return expand_grid(
        args.models, args.ranks or default_ranks(world_size), args.batch_sizes, args.batch_mode,
        epochs=choose(args.epochs, "epochs", FULL_EPOCHS), lr=args.lr, lam=args.lam, design=args.design,
        seeds=args.seeds,
        lr_scaling=args.lr_scaling, base_batch=args.base_batch, warmup_epochs=args.warmup_epochs,
        train_samples=choose(args.train_samples, "train_samples", None),
        test_samples=choose(args.test_samples, "test_samples", None),
        max_steps=args.max_steps, threads_per_rank=args.threads_per_rank)


def main(argv=None) -> int:
    """The command line; returns the exit status (2: bad input, reported by rank 0 on every rank's behalf)."""
    return run_command(build_parser().parse_args(argv))


def run_command(args) -> int:
    """Run parsed arguments (``build_parser``): ``table``, or ``run`` on the ranks of ``COMM_WORLD``."""
    if args.command == "table":
        print(format_table(load_results(args.path)))
        return 0
    comm = world()
    out = Path(args.out) if args.out else default_out()
    try:
        grid = agree(lambda: grid_from_args(args, comm.Get_size()), comm, only_root=True)
        if args.dry_run:
            if comm.Get_rank() == 0:
                _print_plan(grid, out)
            return 0
        run_grid(grid, out, comm=comm, data_root=args.data_root, progress=args.progress)
    except ExperimentInputError as exc:
        if comm.Get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def _print_plan(grid, out) -> None:
    done = {r.get("key") for r in load_results(out)} if out.exists() else set()
    for cfg in grid:
        lr = "" if cfg.lr_scaling == "none" else f", lr {cfg.lr_scaling}"
        print(f"{'done' if cfg.key() in done else 'todo'}  {cfg.label:7s} ranks={cfg.ranks} "
              f"batch={cfg.batch_size} ({cfg.batch_mode}) global batch {cfg.global_batch}, seed {cfg.seed}{lr}")


def launch(n: int, *args, timeout: float | None = LAUNCH_TIMEOUT, echo: bool = True) -> str:
    """Run ``mpiexec -n n python -m ppu_lab.experiments run ARGS`` from a notebook; stream its output.

    The command line comes from ``ppu_lab.mpiexec.mpiexec_command`` (Open MPI gets what it needs).
    The deadline ``timeout`` (seconds; default ``LAUNCH_TIMEOUT``) holds whether or not the job
    prints anything; at the deadline, on Ctrl-C or on an error, mpiexec and all its ranks are
    stopped. Raises ``TimeoutError`` at the deadline and ``RuntimeError`` with the output when the
    job fails. Returns the output.
    """
    from ppu_lab.mpiexec import mpiexec_command
    from ppu_lab.procs import stream

    job = mpiexec_command(n, sys.executable, "-m", "ppu_lab.experiments", "run", *map(str, args))
    shown = " ".join(job.cmd)
    show = (lambda line: print(line, end="", flush=True)) if echo else None
    try:
        code, output = stream(job.cmd, timeout, on_line=show, env=job.environ({**os.environ, "PYTHONUNBUFFERED": "1"}))
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(
            f"`{shown}` did not finish within {timeout:g} s and was stopped with all its ranks. The runs "
            "that finished are kept in the results file: call launch again with the same arguments to go on "
            "from there, with a larger timeout= if one run takes that long.\n"
            f"--- its output\n{(exc.output or '')[-4000:]}") from None
    if code != 0:
        raise RuntimeError(f"{shown} exited with {code}:\n{output[-4000:]}")
    return output
