"""Running a grid under MPI: for each rank count p the first p ranks train, the others sleep.

``run_grid`` is collective over a communicator (``mpiexec`` or ipyparallel MPI engines); rank 0
alone appends the records. Bad input raises ``ExperimentInputError`` on every rank before any
training; a run that fails on some rank fails the whole grid on every rank, and a rank that waits
for a failed one too long ends the job, so that nothing hangs.
"""

from __future__ import annotations

import itertools
import os
import platform
import socket
import time

import numpy as np

from ppu_lab.experiments.grid import ExperimentInputError, RunConfig
from ppu_lab.experiments.results import append_record, check_writable, make_record, repair_results
from ppu_lab.mpi import RankError, abort_job, check_everywhere, node_ranks_and_cores, sleeping_barrier, world

__all__ = ["run_grid", "run_on_engines", "machine_info", "agree"]


def agree(fn, comm, *, only_root: bool = False):
    """``check_everywhere`` with the runner's errors: bad input anywhere -> ``ExperimentInputError`` on
    every rank (the command line exits with status 2); any other failure -> ``RankError``."""
    def input_error(failures, size):
        if only_root or size == 1:
            return ExperimentInputError(next(iter(failures.values())))
        return ExperimentInputError(str(RankError(failures, size)))

    return check_everywhere(fn, comm, RankError, only_root=only_root, input_error=input_error)


def machine_info(comm=None) -> dict:
    """Hostnames, cores and library versions (collective: every rank of ``comm`` calls it)."""
    from importlib.metadata import PackageNotFoundError, version

    import mpi4py
    from mpi4py import MPI

    comm = world(comm)
    hosts = sorted(set(comm.allgather(socket.gethostname())))
    try:  # without importing torch (seconds per rank)
        torch_version = version("torch")
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        torch_version = None
    return {
        "hostname": hosts[0], "hosts": hosts, "cores": os.cpu_count(),
        "cores_available": node_ranks_and_cores(comm)[1],  # the ranks' cores together (Open MPI binds each)
        "world_size": comm.Get_size(),
        "mpi_library": " ".join(MPI.Get_library_version().strip().splitlines()[0].split()),
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        "python": platform.python_version(), "platform": platform.platform(),
        "numpy": np.__version__, "torch": torch_version, "mpi4py": mpi4py.__version__,
    }


def _subsample(data, train_samples, test_samples):
    x, y, xt, yt = data
    if train_samples is not None and train_samples > len(x):
        raise ExperimentInputError(f"train_samples={train_samples} but the training set has only {len(x)} images")
    if test_samples is not None and test_samples > len(xt):
        raise ExperimentInputError(f"test_samples={test_samples} but the test set has only {len(xt)} images")
    return x[:train_samples], y[:train_samples], xt[:test_samples], yt[:test_samples]


def _todo(grid, out, size) -> list[RunConfig]:
    """The runs of ``grid`` not yet in ``out`` (rank 0: checks the grid fits, repairs the file)."""
    if not grid:
        raise ExperimentInputError("the grid is empty: nothing to run")
    top = max(c.ranks for c in grid)
    if top > size:
        raise ExperimentInputError(
            f"ranks: the grid needs {top} ranks but only {size} MPI processes run: start it with "
            f"`mpiexec -n {top} python -m ppu_lab.experiments run ...` or use fewer --ranks")
    check_writable(out)
    done = {r.get("key") for r in repair_results(out)}
    return [c for c in grid if c.key() not in done]


def _load(data, data_root, todo):
    """The data set (``data``, or MNIST from ``data_root``), its sizes checked against every run."""
    if data is None:
        from ppu_lab.data import load_mnist

        data = load_mnist(data_root)
    for cfg in todo:
        _subsample(data, cfg.train_samples, cfg.test_samples)
    return data


def run_grid(grid, out, *, comm=None, data=None, data_root=None, train_fn=None, progress=False,
             abort_after: float = 60.0, log=print) -> list[dict]:
    """Run every configuration of ``grid`` not yet in ``out``; append one record per finished run.

    Collective over ``comm`` (default ``COMM_WORLD``), whose size must be at least the largest
    rank count of the grid. Bad input raises ``ExperimentInputError`` on every rank before any
    training. ``data`` is ``(x_train, y_train, x_test, y_test)``; None loads MNIST from
    ``data_root`` (else ``$PPU_LAB_DATA``) on every rank. ``train_fn(data=, config=, comm=, progress=)``
    returns a ``TrainResult``; it defaults to ``ppu_lab.train.train`` (tests pass a fake). Returns,
    on rank 0, the records written by this call (``[]`` on other ranks).
    """
    comm = world(comm)
    grid = list(grid)
    todo = agree(lambda: _todo(grid, out, comm.Get_size()), comm, only_root=True)
    if comm.Get_rank() == 0 and len(todo) < len(grid):
        log(f"resume: {len(grid) - len(todo)} of {len(grid)} runs already in {out}; running the other {len(todo)}")
    if not todo:
        return []
    if train_fn is None:
        from ppu_lab.train import train as train_fn

    full = agree(lambda: _load(data, data_root, todo), comm)
    machine = machine_info(comm)
    written = []

    def finished(rec):  # rank 0, after every rank of the run is done
        append_record(out, rec)
        written.append(rec)
        lr = "" if rec.get("lr_scaling", "none") == "none" else f" lr x{rec['peak_lr'] / rec['lr']:g}"
        log(f"[{len(written)}/{len(todo)}] {rec['label']:7s} ranks={rec['ranks']} batch={rec['batch_size']:<4d} "
            f"({rec['batch_mode']}) seed {rec['seed']}{lr}: {rec['epoch_time']:.3g} s/epoch, "
            f"{rec['median_step_time'] * 1e3:.3g} ms/step, "
            f"comm {100 * rec['comm_fraction']:.0f}%, acc {rec['final_accuracy']:.3f}")

    for p, cfgs in itertools.groupby(todo, key=lambda c: c.ranks):
        _run_group(p, list(cfgs), comm, full, train_fn, machine, progress, abort_after, finished)
    return written


def _run_group(p, cfgs, comm, full, train_fn, machine, progress, abort_after, on_record):
    """The runs on ``p`` ranks: the first p ranks of ``comm`` train, the others sleep at the barrier."""
    rank = comm.Get_rank()
    sub = comm.Split(0 if rank < p else 1, rank)
    try:
        for cfg in cfgs:
            err, rec = _one_run(cfg, sub, full, train_fn, machine, progress) if rank < p else (None, None)
            # A rank whose run failed waits a bounded time for the others, then aborts the job.
            try:
                sleeping_barrier(comm, **({"timeout": abort_after} if err else {}))
            except TimeoutError:
                abort_job(f"rank {rank}: run {cfg.label} failed and the other ranks did not finish: "
                          f"aborting the job. {err}", comm)
            errors = [e for e in comm.allgather(err) if e]
            if errors:
                raise RuntimeError(f"run {cfg.label}, {p} ranks, batch {cfg.batch_size} "
                                   f"({cfg.batch_mode}) failed: {errors[0]}")
            if rank == 0:
                on_record(rec)
    finally:
        sub.Free()


def _one_run(cfg: RunConfig, sub, full, train_fn, machine, progress):
    """Train one configuration on ``sub``; return ``(error message or None, record or None)``."""
    try:
        data = _subsample(full, cfg.train_samples, cfg.test_samples)
        start = time.perf_counter()
        res = train_fn(data=data, config=cfg.train_config(), comm=sub, progress=progress)
        wall = time.perf_counter() - start
        rec = make_record(cfg, res, machine, wall, len(data[0]), len(data[2])) if sub.Get_rank() == 0 else None
        return None, rec
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", None


GRID_TIMEOUT = 3 * 3600.0  # seconds a grid may take by default, on the engines or by experiments.launch


def run_on_engines(cluster, grid, out, *, timeout: float = GRID_TIMEOUT, **kwargs):
    """Run ``grid`` on the MPI engines of a running ``ppu_lab.cluster.MPICluster``; rank 0's records.

    The engines' ``COMM_WORLD`` is split per rank count, so engines are started once with the
    largest rank count of the grid. ``timeout``: seconds to wait for the whole grid (the cluster's
    own default, a few minutes, is meant for single calls); past it the cluster's hang report says
    where each rank is, and the records finished so far are in ``out``.
    """
    return cluster.apply(_engine_run_grid, list(grid), str(out), kwargs, timeout=timeout)[0]


def _engine_run_grid(grid, out, kwargs):
    return run_grid(grid, out, **kwargs)
