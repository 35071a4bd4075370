"""The course's experiments: time and accuracy over a grid of ranks x batch sizes x models (notebook 07).

One **run** trains one model (``ann:10``, ``ann:50``, ``cnn``) with one batch size, batch mode and
number of MPI ranks through ``ppu_lab.train.train``. A grid of runs is executed by
``run_grid`` on the ranks of one communicator: for each rank count p the first p ranks form a
sub-communicator (``comm.Split``) and train while the others wait (sleeping, not spinning). So one
``mpiexec -n 4`` job, or one set of ipyparallel MPI engines, covers p = 1, 2, 4.

Results file (JSON lines, one record per completed run)
-------------------------------------------------------
Rank 0 alone appends one JSON object per line, written with a single ``write`` and then
``flush`` + ``fsync``: a crash loses at most the run in progress. A torn last line (a crash in
the middle of a write) is detected, reported with a warning and cut off before new records are
appended; ``load_results`` ignores it. Re-running the same command skips runs already in the
file: a run is identified by ``key`` (its configuration as asked for, see ``RunConfig.key``; an
``lr`` of None there means train()'s default, and the record's ``lr`` field holds the value used),
not by the machine. Each record holds:

- configuration: ``label`` (``ann:10``), ``model``, ``hidden``, ``ranks``, ``batch_size``,
  ``batch_mode`` (``global``: ``batch_size`` is split over the ranks; ``per_rank``: each rank
  takes ``batch_size``, so the global batch is ``ranks * batch_size``), ``global_batch``,
  ``epochs``, ``lr``, ``lam``, ``design``, ``seed``, ``train_samples``, ``test_samples``,
  ``max_steps``, ``threads_per_rank``, ``key``;
- timings (seconds): ``median_step_time``, ``epoch_time`` (the course's "time per iteration"),
  ``median_compute_time`` / ``median_comm_time`` per step, ``compute_time`` / ``comm_time``
  (totals), ``comm_fraction``, ``steps``, ``wall_time`` (the whole run, evaluation included);
- accuracy: ``final_accuracy``, ``final_train_loss`` and ``history``, a list of per-epoch
  ``{"epoch", "train_loss", "test_accuracy", "epoch_time"}`` (``epoch_rows`` flattens it);
- the machine: ``machine`` = hostname(s), cores, MPI library and versions of Python, NumPy,
  torch and mpi4py; ``finished`` (UTC time).

Command line (``python -m ppu_lab.experiments --help``)::

    mpiexec -n 4 python -m ppu_lab.experiments run --models ann:10,ann:50,cnn \\
        --batch-sizes 50,100,150,200 --epochs 1 --out results/grid.jsonl

From a notebook: ``launch(n, ...)`` starts that command with ``mpiexec`` and streams its output;
``run_on_engines(cluster, ...)`` runs the same grid on running ipyparallel MPI engines.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppu_lab.config import quick_mode
from ppu_lab.mpi import abort_job, sleeping_barrier, world

SCHEMA = 1
MODELS = ("ann", "cnn")
BATCH_MODES = ("global", "per_rank")
DESIGNS = ("allreduce", "scatter_allgather")
COURSE_BATCH_SIZES = (50, 100, 150, 200)
# The course's table: seconds per iteration (epoch) for batch sizes 50, 100, 150, 200.
COURSE_ITERATION_TIMES = {50: 9.18, 100: 11.95, 150: 12.99, 200: 11.69}
# Quick mode (tests, CI): a subsample and one epoch.
QUICK = {"train_samples": 2000, "test_samples": 500, "epochs": 1}
FULL_EPOCHS = 3


class ExperimentInputError(ValueError):
    """Bad arguments, raised on every rank before any training starts."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class RunConfig:
    """One point of the grid. ``key`` identifies it in the results file (resume)."""

    model: str
    hidden: int | None
    ranks: int
    batch_size: int
    batch_mode: str = "global"
    epochs: int = 1
    lr: float | None = None  # None: train()'s default for the model
    lam: float = 5.0
    design: str = "allreduce"
    seed: int = 0
    train_samples: int | None = None  # None: all of the training set
    test_samples: int | None = None
    max_steps: int | None = None
    threads_per_rank: int = 1

    @property
    def label(self) -> str:
        return self.model if self.hidden is None else f"{self.model}:{self.hidden}"

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.ranks if self.batch_mode == "per_rank" else self.batch_size

    def key(self) -> str:
        """Canonical JSON of every field: equal configurations, equal keys."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))


def parse_model(spec: str) -> tuple[str, int | None]:
    """``"ann:10"`` -> ``("ann", 10)``; ``"ann"`` -> ``("ann", 50)``; ``"cnn"`` -> ``("cnn", None)``."""
    name, _, hidden = str(spec).strip().lower().partition(":")
    if name not in MODELS:
        raise ExperimentInputError(f"models: unknown model {spec!r}; use ann:H (H hidden units, e.g. ann:10) or cnn")
    if name == "cnn":
        if hidden:
            raise ExperimentInputError(f"models: {spec!r}: the CNN is the course's fixed network; write just 'cnn'")
        return "cnn", None
    if not hidden:
        return "ann", 50
    if not hidden.isdigit() or int(hidden) < 1:
        raise ExperimentInputError(f"models: {spec!r}: the hidden size after 'ann:' must be an integer >= 1")
    return "ann", int(hidden)


def default_ranks(world_size: int) -> list[int]:
    """1, 2, 4, ... up to the world size, and the world size itself."""
    ranks = [2**k for k in range(int(math.log2(world_size)) + 1)]
    return ranks if ranks[-1] == world_size else ranks + [world_size]


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ExperimentInputError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


def expand_grid(models, ranks, batch_sizes, batch_modes=("global",), **fixed) -> list[RunConfig]:
    """All runs of the grid, ordered by rank count, then model, batch mode and batch size.

    ``fixed`` holds the other ``RunConfig`` fields (``epochs``, ``lr``, ...). Raises
    ``ExperimentInputError`` for an unknown model or batch mode or a global batch smaller than
    the number of ranks (some rank would get no sample).
    """
    models = [parse_model(m) if isinstance(m, str) else tuple(m) for m in models]
    ranks = sorted({_positive_int("ranks", p) for p in ranks})
    batch_sizes = [_positive_int("batch_sizes", b) for b in batch_sizes]
    if isinstance(batch_modes, str):
        batch_modes = [batch_modes]
    for mode in batch_modes:
        if mode not in BATCH_MODES:
            raise ExperimentInputError(f"batch_mode must be one of {BATCH_MODES}; got {mode!r}")
    if not (models and ranks and batch_sizes and batch_modes):
        raise ExperimentInputError("the grid is empty: give at least one model, rank count, batch size and batch mode")
    unknown = set(fixed) - {f.name for f in dataclasses.fields(RunConfig)}
    if unknown:
        raise ExperimentInputError(f"unknown run settings {sorted(unknown)}")
    if fixed.get("design", "allreduce") not in DESIGNS:
        raise ExperimentInputError(f"design must be one of {DESIGNS}; got {fixed['design']!r}")
    for name in ("epochs", "threads_per_rank"):
        if name in fixed:
            _positive_int(name, fixed[name])
    for name in ("train_samples", "test_samples", "max_steps"):
        if name in fixed:
            _positive_int(name, fixed[name], allow_none=True)
    lr = fixed.get("lr")
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ExperimentInputError(f"lr (learning rate) must be > 0; got {lr}")
    grid = []
    for p, (model, hidden), mode, b in itertools.product(ranks, models, batch_modes, batch_sizes):
        if mode == "global" and b < p:
            raise ExperimentInputError(
                f"batch size {b} < {p} ranks with batch_mode='global': each rank would get no sample. "
                f"Use batch sizes >= {p} or batch_mode='per_rank'")
        cfg = RunConfig(model, hidden, p, b, mode, **fixed)
        n = cfg.train_samples
        if n is not None and cfg.global_batch > n:
            raise ExperimentInputError(
                f"global batch {cfg.global_batch} (batch {b}, {p} ranks, {mode}) is larger than "
                f"train_samples={n}: use more samples or a smaller batch")
        grid.append(cfg)
    return grid


# --------------------------------------------------------------------------- results file
def _scan(path: Path):
    """(records, byte offset where valid content ends, problems) of a JSON-lines file."""
    records, problems, end = [], [], 0
    data = path.read_bytes() if path.exists() else b""
    pos = 0
    lineno = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        lineno += 1
        if nl < 0:  # no newline: a torn last line
            problems.append((lineno, "torn last line (no newline): the write was interrupted", True))
            break
        line = data[pos:nl]
        pos = nl + 1
        if not line.strip():
            end = pos
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            problems.append((lineno, f"unreadable line ({exc})", pos == len(data)))
            if pos == len(data):
                break
            end = pos
            continue
        records.append(rec)
        end = pos
    return records, end, problems


def load_results(path) -> list[dict]:
    """The records of a results file (list of dicts), oldest first.

    A torn or unreadable line is skipped with a warning naming it; the file is not modified.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results file {path}: run `python -m ppu_lab.experiments run --out {path}` first")
    records, _, problems = _scan(path)
    for lineno, why, _tail in problems:
        warnings.warn(f"{path}: line {lineno}: {why}; ignored", RuntimeWarning, stacklevel=2)
    return records


def repair_results(path) -> list[dict]:
    """Cut a torn last line off ``path`` (with a warning) and return the valid records."""
    path = Path(path)
    if not path.exists():
        return []
    records, end, problems = _scan(path)
    for lineno, why, tail in problems:
        action = "cut off" if tail else "ignored"
        warnings.warn(f"{path}: line {lineno}: {why}; {action} (a crash mid-write; that run will be redone)",
                      RuntimeWarning, stacklevel=2)
    if end < path.stat().st_size and any(tail for *_, tail in problems):
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    return records


def append_record(path, record: dict) -> None:
    """Append one record as one line, in one write, then flush and fsync."""
    line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(path) -> Path:
    """Create the folder of ``path`` and check we can append to it; ``ExperimentInputError`` if not."""
    path = Path(path)
    try:
        if path.exists() and path.is_dir():
            raise OSError("it is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.close(fd)
    except OSError as exc:
        raise ExperimentInputError(f"out: cannot write results to {path} ({exc}); choose another --out") from None
    return path


def default_out(name: str = "grid.jsonl") -> Path:
    """``$PPU_LAB_RESULTS/name``, else ``<lab checkout>/results/name``, else ``./results/name``."""
    env = os.environ.get("PPU_LAB_RESULTS")
    if env:
        return Path(env) / name
    repo = Path(__file__).resolve().parents[1]
    return (repo / "results" if (repo / "pyproject.toml").exists() else Path("results")) / name


def epoch_rows(records) -> list[dict]:
    """One flat row per (run, epoch): the configuration fields plus that epoch's values (tidy)."""
    keep = ("label", "model", "hidden", "ranks", "batch_size", "batch_mode", "global_batch", "key")
    return [{**{k: r.get(k) for k in keep}, **h} for r in records for h in r.get("history", [])]


# --------------------------------------------------------------------------- machine
def machine_info(comm=None) -> dict:
    """Hostnames, cores and library versions (collective: every rank of ``comm`` calls it)."""
    import mpi4py
    from mpi4py import MPI

    comm = world(comm)
    hosts = sorted(set(comm.allgather(socket.gethostname())))
    from importlib.metadata import PackageNotFoundError, version

    try:  # without importing torch (seconds per rank)
        torch_version = version("torch")
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        torch_version = None
    return {
        "hostname": hosts[0], "hosts": hosts, "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "world_size": comm.Get_size(),
        "mpi_library": " ".join(MPI.Get_library_version().strip().splitlines()[0].split()),
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        "python": platform.python_version(), "platform": platform.platform(),
        "numpy": np.__version__, "torch": torch_version, "mpi4py": mpi4py.__version__,
    }


# --------------------------------------------------------------------------- collectives
def _agree(comm, fn, *args, root_only=False):
    """Run ``fn`` (on rank 0 only if ``root_only``); if it raised anywhere, raise it on every rank."""
    err, value = None, None
    if comm.Get_rank() == 0 or not root_only:
        try:
            value = fn(*args)
        except Exception as exc:  # re-raised below on every rank
            err = (isinstance(exc, ValueError), str(exc))
    errors = comm.allgather(err)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        rank, (bad_input, msg) = bad[0]
        cls = ExperimentInputError if bad_input else RuntimeError
        where = "" if root_only or comm.Get_size() == 1 else f" (rank {rank}{' and others' if len(bad) > 1 else ''})"
        raise cls(f"{msg}{where}")
    return comm.bcast(value, root=0) if root_only else value


# --------------------------------------------------------------------------- running
def _subsample(data, train_samples, test_samples):
    x, y, xt, yt = data
    if train_samples is not None and train_samples > len(x):
        raise ExperimentInputError(f"train_samples={train_samples} but the training set has only {len(x)} images")
    if test_samples is not None and test_samples > len(xt):
        raise ExperimentInputError(f"test_samples={test_samples} but the test set has only {len(xt)} images")
    return x[:train_samples], y[:train_samples], xt[:test_samples], yt[:test_samples]


def _median(values):
    values = [float(v) for v in values or []]
    return statistics.median(values) if values else float("nan")


def make_record(cfg: RunConfig, res, machine: dict, wall_time: float, lr_used, n_train=None, n_test=None) -> dict:
    """The JSON record of one finished run (see the module docstring)."""
    summary = dict(res.summary())
    steps = res.step_times or {}
    comp, comm_t, total = (list(map(float, steps.get(k, []))) for k in ("compute", "comm", "total"))
    history = [{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in h.items()}
               for h in res.history]
    last = history[-1] if history else {}
    rec = {**dataclasses.asdict(cfg), "label": cfg.label, "global_batch": cfg.global_batch, "lr": lr_used}
    rec.update({
        "schema": SCHEMA, "key": cfg.key(),
        "median_step_time": float(summary.get("median_step_time", _median(total))),
        "epoch_time": float(summary.get("epoch_time", _median([h.get("epoch_time") for h in history]))),
        "median_compute_time": _median(comp), "median_comm_time": _median(comm_t),
        "compute_time": sum(comp), "comm_time": sum(comm_t),
        "comm_fraction": (sum(comm_t) / sum(total)) if sum(total) > 0 else float("nan"),
        "steps": int(summary.get("steps", len(total))),
        "n_train": n_train, "n_test": n_test,
        "steps_per_epoch": math.ceil(n_train / cfg.global_batch) if n_train else None,
        "final_accuracy": float(summary.get("final_accuracy", last.get("test_accuracy", float("nan")))),
        "final_train_loss": float(last.get("train_loss", float("nan"))),
        "history": history, "summary": summary, "wall_time": wall_time, "machine": machine,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return rec


def _accepts(fn, name) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _default_lr(train_fn, model):
    import inspect

    try:
        default = inspect.signature(train_fn).parameters["lr"].default
    except (KeyError, TypeError, ValueError):
        return None
    if default is inspect.Parameter.empty or default is None:
        table = getattr(sys.modules.get(getattr(train_fn, "__module__", ""), None), "DEFAULT_LR", None)
        return table.get(model) if isinstance(table, dict) else None
    return default.get(model) if isinstance(default, dict) else default


def run_grid(grid, out, *, comm=None, data=None, data_root=None, train_fn=None, progress=False,
             abort_after: float = 60.0, log=print) -> list[dict]:
    """Run every configuration of ``grid`` not yet in ``out``; append one record per finished run.

    Collective over ``comm`` (default ``COMM_WORLD``), whose size must be at least the largest
    rank count of the grid. Bad input raises ``ExperimentInputError`` on every rank before any
    training. ``data`` is ``(x_train, y_train, x_test, y_test)``; None loads MNIST from
    ``data_root`` (else ``$PPU_LAB_DATA``) on every rank. ``train_fn`` defaults to
    ``ppu_lab.train.train`` (tests pass a fake). Returns, on rank 0, the records written by this
    call (``[]`` on other ranks).
    """
    comm = world(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    grid = list(grid)

    def check():
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

    todo = _agree(comm, check, root_only=True)
    if rank == 0 and len(todo) < len(grid):
        log(f"resume: {len(grid) - len(todo)} of {len(grid)} runs already in {out}; running the other {len(todo)}")
    if not todo:
        return []

    if train_fn is None:
        from ppu_lab.train import train as train_fn

    def load():
        if data is not None:
            full = data
        else:
            from ppu_lab.data import load_mnist

            full = load_mnist(data_root)
        for cfg in todo:  # sizes checked before any training
            _subsample(full, cfg.train_samples, cfg.test_samples)
        return full

    full = _agree(comm, load)
    machine = machine_info(comm)
    written = []
    for p, cfgs in itertools.groupby(todo, key=lambda c: c.ranks):
        sub = comm.Split(0 if rank < p else 1, rank)  # the first p ranks train, the others sleep
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
                    append_record(out, rec)
                    written.append(rec)
                    log(f"[{len(written)}/{len(todo)}] {cfg.label:7s} ranks={p} batch={cfg.batch_size:<4d} "
                        f"({cfg.batch_mode}) {rec['epoch_time']:.3g} s/epoch, "
                        f"{rec['median_step_time'] * 1e3:.3g} ms/step, "
                        f"comm {100 * rec['comm_fraction']:.0f}%, acc {rec['final_accuracy']:.3f}")
        finally:
            sub.Free()
    return written


@contextlib.contextmanager
def _threads(n):
    """Limit BLAS (and torch, if loaded) to ``n`` threads on this rank (1 = one core per rank)."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    old = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        if torch:
            torch.set_num_threads(old)


def _one_run(cfg: RunConfig, sub, full, train_fn, machine, progress):
    """Train one configuration on ``sub``; return ``(error message or None, record or None)``."""
    try:
        data = _subsample(full, cfg.train_samples, cfg.test_samples)
        kwargs = dict(model=cfg.model, data=data, lam=cfg.lam, batch_size=cfg.batch_size,
                      batch_mode=cfg.batch_mode, epochs=cfg.epochs, design=cfg.design, seed=cfg.seed,
                      comm=sub, progress=progress, max_steps=cfg.max_steps)
        if cfg.hidden is not None:
            kwargs["hidden"] = cfg.hidden
        if cfg.lr is not None:
            kwargs["lr"] = cfg.lr
        if _accepts(train_fn, "threads"):  # train() limits its own threads; else we do it here
            kwargs["threads"] = cfg.threads_per_rank
        with contextlib.nullcontext() if "threads" in kwargs else _threads(cfg.threads_per_rank):
            start = time.perf_counter()
            res = train_fn(**kwargs)
            wall = time.perf_counter() - start
        lr_used = cfg.lr
        if lr_used is None:
            lr_used = getattr(res, "config", {}).get("lr", _default_lr(train_fn, cfg.model))
        rec = (make_record(cfg, res, machine, wall, lr_used, len(data[0]), len(data[2]))
               if sub.Get_rank() == 0 else None)
        return None, rec
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", None


def run_on_engines(cluster, grid, out, **kwargs):
    """Run ``grid`` on the MPI engines of a running ``ppu_lab.cluster.MPICluster``; rank 0's records.

    The engines' ``COMM_WORLD`` is split per rank count, so engines are started once with the
    largest rank count of the grid.
    """
    return cluster.apply(_engine_run_grid, list(grid), str(out), kwargs)[0]


def _engine_run_grid(grid, out, kwargs):
    from ppu_lab.experiments import run_grid

    return run_grid(grid, out, **kwargs)


# --------------------------------------------------------------------------- analysis (notebook 07)
def select(records, **where) -> list[dict]:
    """The records whose fields equal ``where`` (e.g. ``label="cnn", batch_mode="global"``)."""
    return [r for r in records if all(r.get(k) == v for k, v in where.items())]


def group_by(records, *fields) -> dict:
    """``{(value of each field, ...): [records]}``, e.g. ``group_by(records, "batch_mode", "ranks")``."""
    groups: dict = {}
    for r in records:
        groups.setdefault(tuple(r.get(f) for f in fields), []).append(r)
    return groups


def _median_of(records, field_, **where):
    values = [float(r[field_]) for r in select(records, **where)]
    return statistics.median(values) if values else float("nan")


def course_table(records, label, ranks=1, batch_mode="global") -> list[dict]:
    """The course's batch-size table beside ours: seconds per iteration (epoch) for each batch size.

    ``relative`` columns divide by the batch-50 time, so that the shapes compare even though the
    machines and data sizes differ.
    """
    rows = []
    ours50 = _median_of(records, "epoch_time", label=label, ranks=ranks, batch_mode=batch_mode, batch_size=50)
    for b, course in COURSE_ITERATION_TIMES.items():
        ours = _median_of(records, "epoch_time", label=label, ranks=ranks, batch_mode=batch_mode, batch_size=b)
        rows.append({"batch_size": b, "course_s": course, "ours_s": ours,
                     "course_relative": course / COURSE_ITERATION_TIMES[50], "ours_relative": ours / ours50})
    return rows


def format_course_table(rows) -> str:
    lines = [f"{'batch':>5s}  {'course (s)':>10s}  {'ours (s)':>9s}  {'course / b50':>12s}  {'ours / b50':>10s}"]
    lines += [f"{r['batch_size']:5d}  {r['course_s']:10.2f}  {r['ours_s']:9.3f}  {r['course_relative']:12.2f}  "
              f"{r['ours_relative']:10.2f}" for r in rows]
    return "\n".join(lines)


def check_conclusions(records, label) -> list[dict]:
    """Each of the course's four conclusions against our records of one model.

    Returns one dict per conclusion: ``claim``, ``verdict`` (``"holds"``, ``"does not hold"``,
    ``"holds only with per-rank batch"``, ...) and ``evidence`` (the numbers behind it).
    Needs runs at 1 rank and at least one more rank count, in the batch modes present.
    """
    recs = select(records, label=label)
    if not recs:
        raise ValueError(f"label: no records of {label!r}; the results hold {sorted({r['label'] for r in records})}")
    modes = sorted({r["batch_mode"] for r in recs})
    pmax = max(r["ranks"] for r in recs)
    if pmax == 1:
        raise ValueError("check_conclusions needs runs on more than one rank")
    batches = sorted({r["batch_size"] for r in recs})
    out = []

    def ratios(field_, mode, a, b, over="batch_size"):
        """field at b / field at a (a, b rank counts), per batch size."""
        return {k: _median_of(recs, field_, batch_mode=mode, ranks=b, **{over: k}) /
                _median_of(recs, field_, batch_mode=mode, ranks=a, **{over: k}) for k in batches}

    # (1) more nodes -> less time per iteration
    ev, holds = [], {}
    for mode in modes:
        r = ratios("epoch_time", mode, 1, pmax)
        holds[mode] = sum(v < 1 for v in r.values()) > len(r) / 2
        ev.append(f"{mode}: T({pmax})/T(1) = " + ", ".join(f"{v:.2f}" for v in r.values()) + f" for batch {batches}")
    out.append({"claim": "(1) more nodes reduce the time per iteration",
                "verdict": _verdict(holds), "evidence": "; ".join(ev)})
    # (2) the batch size changes the time per iteration
    times = [_median_of(recs, "epoch_time", batch_mode=modes[0], ranks=1, batch_size=b) for b in batches]
    spread = (max(times) - min(times)) / min(times)
    monotone = all(x >= y for x, y in zip(times, times[1:])) or all(x <= y for x, y in zip(times, times[1:]))
    out.append({"claim": "(2) the batch size changes the time per iteration",
                "verdict": "holds" if spread > 0.1 else "does not hold (within 10%)",
                "evidence": "1 rank: " + ", ".join(f"{t:.3g} s" for t in times) + f" for batch {batches}: spread "
                            f"{100 * spread:.0f}%, {'monotone' if monotone else 'not monotone'} "
                            f"(course: 9.18, 11.95, 12.99, 11.69 s, spread 42%, not monotone)"})
    # (3) larger batch -> lower accuracy after a fixed number of epochs
    accs = [_median_of(recs, "final_accuracy", batch_mode=modes[0], ranks=1, batch_size=b) for b in batches]
    noise = _accuracy_noise(recs)
    change = accs[-1] - accs[0]
    out.append({"claim": "(3) accuracy decreases as the batch size grows (fixed epochs)",
                "verdict": ("holds" if change < -noise else "does not hold" if change > noise
                            else "not shown (within the test set's sampling noise)"),
                "evidence": "1 rank: accuracy " + ", ".join(f"{100 * a:.1f}%" for a in accs) + f" for batch {batches}"
                            f"; change {100 * change:+.2f} points against a noise level of {100 * noise:.2f}"})
    # (4) more nodes -> lower accuracy
    ev, holds = [], {}
    for mode in modes:
        diffs = {b: _median_of(recs, "final_accuracy", batch_mode=mode, ranks=pmax, batch_size=b) -
                 _median_of(recs, "final_accuracy", batch_mode=mode, ranks=1, batch_size=b) for b in batches}
        holds[mode] = sum(d < -noise for d in diffs.values()) > len(diffs) / 2
        ev.append(f"{mode}: accuracy({pmax}) - accuracy(1) = " +
                  ", ".join(f"{100 * d:+.2f}" for d in diffs.values()) + " points")
    ev.append(f"a drop counts when larger than the noise level, {100 * noise:.2f} points")
    out.append({"claim": "(4) more nodes reduce the accuracy", "verdict": _verdict(holds), "evidence": "; ".join(ev)})
    return out


def _accuracy_noise(recs) -> float:
    """Two standard errors of the difference of two test accuracies (binomial, n_test images each).

    A difference in accuracy smaller than this is what a different draw of test images alone
    could give, so it is no evidence for or against a claim.
    """
    acc = statistics.median(float(r["final_accuracy"]) for r in recs)
    n = min(int(r.get("n_test") or 0) for r in recs) or 1
    return 2 * math.sqrt(2 * max(acc * (1 - acc), 1e-4) / n)


def _verdict(holds: dict) -> str:
    if all(holds.values()):
        return "holds"
    if not any(holds.values()):
        return "does not hold"
    return "holds only with " + " and ".join(m.replace("_", "-") for m, h in holds.items() if h) + " batch"


def format_conclusions(checks) -> str:
    return "\n".join(f"{c['claim']}: {c['verdict'].upper()}\n    {c['evidence']}" for c in checks)


# --------------------------------------------------------------------------- command line
def _csv(kind):
    def parse(text):
        try:
            return [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}; got {text!r}")
    return parse


def build_parser() -> argparse.ArgumentParser:
    quick = (f"train_samples={QUICK['train_samples']}, test_samples={QUICK['test_samples']}, "
             f"epochs={QUICK['epochs']}")
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
    r.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights and the minibatch order. Default: 0")
    r.add_argument("--train-samples", type=int, default=None,
                   help="use the first N training images (default: all; quick mode: %d)" % QUICK["train_samples"])
    r.add_argument("--test-samples", type=int, default=None,
                   help="use the first N test images (default: all; quick mode: %d)" % QUICK["test_samples"])
    r.add_argument("--max-steps", type=int, default=None,
                   help="stop each run after this many SGD steps (smoke tests; epoch times are then partial)")
    r.add_argument("--threads-per-rank", type=int, default=1,
                   help="BLAS/torch threads per rank (1 = one core per rank, the fair setting for scaling). Default: 1")
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
    t = sub.add_parser("table", help="print a results file as a table (time per iteration, accuracy)")
    t.add_argument("path", help="a JSON-lines results file written by `run`")
    return p


def grid_from_args(args, world_size: int) -> list[RunConfig]:
    quick = args.quick or quick_mode()

    def choose(value, name, full):
        return value if value is not None else (QUICK[name] if quick else full)

    return expand_grid(
        args.models, args.ranks or default_ranks(world_size), args.batch_sizes, args.batch_mode,
        epochs=choose(args.epochs, "epochs", FULL_EPOCHS), lr=args.lr, lam=args.lam, design=args.design, seed=args.seed,
        train_samples=choose(args.train_samples, "train_samples", None),
        test_samples=choose(args.test_samples, "test_samples", None),
        max_steps=args.max_steps, threads_per_rank=args.threads_per_rank)


def format_table(records) -> str:
    """A plain-text table of records: one line per run."""
    head = (f"{'model':7s} {'ranks':>5s} {'batch':>5s} {'mode':8s} {'s/epoch':>9s} {'ms/step':>8s} "
            f"{'comm%':>6s} {'acc':>6s}")
    lines = [head]
    for r in sorted(records, key=lambda r: (r["label"], r["batch_mode"], r["ranks"], r["batch_size"])):
        lines.append(f"{r['label']:7s} {r['ranks']:5d} {r['batch_size']:5d} {r['batch_mode']:8s} "
                     f"{r['epoch_time']:9.3f} {1e3 * r['median_step_time']:8.2f} "
                     f"{100 * r['comm_fraction']:6.1f} {r['final_accuracy']:6.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command line; returns the exit status (2: bad input, reported by rank 0 on every rank's behalf)."""
    return _main(build_parser().parse_args(argv))


def _main(args) -> int:
    if args.command == "table":
        print(format_table(load_results(args.path)))
        return 0
    comm = world()
    rank = comm.Get_rank()
    out = Path(args.out) if args.out else default_out()
    try:
        grid = _agree(comm, grid_from_args, args, comm.Get_size(), root_only=True)
        if args.dry_run:
            if rank == 0:
                done = {r.get("key") for r in load_results(out)} if out.exists() else set()
                for cfg in grid:
                    print(f"{'done' if cfg.key() in done else 'todo'}  {cfg.label:7s} ranks={cfg.ranks} "
                          f"batch={cfg.batch_size} ({cfg.batch_mode}) global batch {cfg.global_batch}")
            return 0
        run_grid(grid, out, comm=comm, data_root=args.data_root, progress=args.progress)
    except ExperimentInputError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def launch(n: int, *args: str, timeout: float | None = None, echo: bool = True) -> str:
    """Run ``mpiexec -n n python -m ppu_lab.experiments run ARGS`` from a notebook; stream its output.

    Raises RuntimeError with the output when it fails. Returns the output.
    """
    from shutil import which

    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec not found: install the lab's mpich extra (pip install -e .[mpich]) or load an MPI")
    cmd = [mpiexec, "-n", str(int(n)), sys.executable, "-m", "ppu_lab.experiments", "run", *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, start = [], time.monotonic()
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
            if timeout is not None and time.monotonic() - start > timeout:
                raise subprocess.TimeoutExpired(cmd, timeout)
        proc.wait(timeout=None if timeout is None else max(1.0, timeout - (time.monotonic() - start)))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    output = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-4000:]}")
    return output


if __name__ == "__main__":
    from ppu_lab.mpi import mpi_main

    _args = build_parser().parse_args()  # --help and usage errors before MPI starts
    sys.exit(mpi_main(lambda: _main(_args)))
