"""Slurm's client commands (``sbatch``, ``squeue``, ``scancel``, ``sinfo``) and the errors they raise."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from ppu_lab.cluster import ClusterError

COMMANDS = ("sbatch", "squeue", "scancel")


class SlurmError(ClusterError):
    """Slurm is missing, refused the job, or the job failed; the message includes Slurm's own words."""


def _run(cmd, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def slurm_status() -> str | None:
    """None when Slurm can take jobs from here; else why not (one line, for skips and errors)."""
    missing = [c for c in (*COMMANDS, "sinfo") if shutil.which(c) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH: this machine is not a Slurm submit host"
    try:
        proc = _run(["sinfo", "-h", "-o", "%T"], timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s (is slurmctld running?)"
    if proc.returncode != 0:
        return f"sinfo failed: {(proc.stderr or proc.stdout).strip()}"
    states = proc.stdout.split()
    if not any(s.rstrip("*~#$@").lower() in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable Slurm node (sinfo states: {' '.join(states) or 'none'})"
    return None


def _require_commands() -> None:
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        raise SlurmError(
            f"{', '.join(missing)} not found on PATH: Slurm jobs can only be submitted from a machine with "
            "the Slurm client commands (a cluster's login node; try `module load slurm`). To run the lab "
            "on this machine alone, use ppu_lab.cluster.MPICluster(n)."
        )


def job_state(job_id: str) -> str | None:
    """The job's state in ``squeue`` (``PENDING``, ``RUNNING``, ``COMPLETING`` ...), None once it is gone."""
    proc = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], timeout=30)
    if proc.returncode != 0:  # "Invalid job id specified": finished and purged
        return None
    state = proc.stdout.strip().splitlines()
    return state[0].strip() if state else None


def cancel(job_id: str, wait: float = 30) -> None:
    """``scancel`` the job and wait (up to ``wait`` s) until ``squeue`` no longer lists it."""
    if not job_id:
        return
    _run(["scancel", str(job_id)], timeout=30)
    deadline = time.monotonic() + wait
    while job_state(job_id) is not None:
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} still in squeue ({job_state(job_id)}) {wait:.0f} s after scancel")
        time.sleep(0.2)


def submit(script: str | os.PathLike, *args: str, test_only: bool = False, cwd=None) -> str:
    """``sbatch`` a script file (with script arguments); return the job id, or raise SlurmError.

    ``test_only=True`` runs ``sbatch --test-only``: Slurm checks the request (partition, account,
    time limit, task count) and schedules nothing; returns Slurm's answer.
    """
    _require_commands()
    cmd = ["sbatch", *(["--test-only"] if test_only else ["--parsable"]), str(script), *map(str, args)]
    proc = _run(cmd, timeout=60, cwd=cwd)
    message = (proc.stderr + proc.stdout).strip()
    if proc.returncode != 0:
        raise SlurmError(f"Slurm rejected the job ({' '.join(cmd)}):\n{message}")
    if test_only:
        return message
    job = proc.stdout.strip().split(";")[0]
    if not job.isdigit():
        raise SlurmError(f"could not read a job id from sbatch's output: {message!r}")
    return job
