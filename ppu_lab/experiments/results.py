"""The results file: JSON lines, one record per finished run, written so that a crash loses at most
the run in progress (see the package docstring for the record's fields)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

from ppu_lab.experiments.grid import ExperimentInputError, RunConfig

__all__ = ["SCHEMA", "load_results", "repair_results", "append_record", "check_writable", "default_out",
           "make_record"]

SCHEMA = 1


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
    repo = Path(__file__).resolve().parents[2]  # ppu_lab/experiments/results.py -> the checkout
    return (repo / "results" if (repo / "pyproject.toml").exists() else Path("results")) / name


def _times(values) -> tuple[list[float], float]:
    """(the values as floats, their median or NaN)."""
    values = [float(v) for v in values]
    return values, (float(np.median(values)) if values else float("nan"))


def make_record(cfg: RunConfig, res, machine: dict, wall_time: float, n_train: int, n_test: int) -> dict:
    """The JSON record of one finished run: ``cfg``, its ``TrainResult`` ``res`` and the machine."""
    summary = res.summary()
    comp, med_comp = _times(res.step_times.get("compute", []))
    comm_t, med_comm = _times(res.step_times.get("comm", []))
    total, _ = _times(res.step_times.get("total", []))
    history = [{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in h.items()}
               for h in res.history]
    rec = {**dataclasses.asdict(cfg), "label": cfg.label, "global_batch": cfg.global_batch, "lr": res.config["lr"]}
    rec.update({
        "schema": SCHEMA, "key": cfg.key(),
        "median_step_time": float(summary["median_step_time"]), "epoch_time": float(summary["epoch_time"]),
        "median_compute_time": med_comp, "median_comm_time": med_comm,
        "compute_time": sum(comp), "comm_time": sum(comm_t),
        "comm_fraction": (sum(comm_t) / sum(total)) if sum(total) > 0 else float("nan"),
        "steps": int(summary["steps"]), "n_train": n_train, "n_test": n_test,
        "steps_per_epoch": math.ceil(n_train / cfg.global_batch),
        "final_accuracy": float(summary["final_accuracy"]),
        "final_train_loss": float(history[-1]["train_loss"]) if history else float("nan"),
        "history": history, "summary": summary, "wall_time": wall_time, "machine": machine,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return rec
