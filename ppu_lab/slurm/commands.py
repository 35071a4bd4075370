"""Slurm's client commands (``sbatch``, ``squeue``, ``scancel``, ``sinfo``) and the errors they raise."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time

from ppu_lab.cluster import ClusterError
from ppu_lab.procs import run

COMMANDS = ("sbatch", "squeue", "scancel")


class SlurmError(ClusterError):
    """Slurm is missing, refused the job, or the job failed; the message includes Slurm's own words."""


# Seconds a Slurm client command may take. They answer in well under a second on a healthy cluster;
# a controller that is down makes them retry for a while, then fail.
TIMEOUT = 60


def _run(cmd, timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a Slurm command (new session, stopped with its group on timeout); SlurmError if it hangs.

    ``timeout`` defaults to the module's ``TIMEOUT``, read at each call (tests lower it)."""
    timeout = TIMEOUT if timeout is None else min(timeout, TIMEOUT)
    try:
        return run([str(c) for c in cmd], timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        said = ((exc.stderr or "") + (exc.output or "")).strip()
        raise SlurmError(
            f"Slurm did not answer `{shlex.join(map(str, cmd))}` within {timeout:.0f} s"
            + (f" (it said: {said})" if said else "")
            + ". The Slurm controller may be down or overloaded: check with `sinfo` in a terminal, wait a "
            "minute and try again; if it keeps happening, ask your cluster's admins."
        ) from None
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found on PATH: this machine has no Slurm client commands "
                         "(on a cluster's login node, try `module load slurm`).") from None


def slurm_status() -> str | None:
    """None when Slurm can take jobs from here; else why not (one line, for skips and errors)."""
    missing = [c for c in (*COMMANDS, "sinfo") if shutil.which(c) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH: this machine is not a Slurm submit host"
    try:
        proc = _run(["sinfo", "-h", "-o", "%T"], timeout=20)
    except SlurmError as exc:
        return f"sinfo: {exc}"
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
    proc = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
    if proc.returncode != 0:
        said = (proc.stderr + proc.stdout).strip()
        if "invalid job id" in said.lower():  # finished and purged
            return None
        raise SlurmError(f"squeue could not tell the state of job {job_id}: {said}. Check with `squeue --me` "
                         "in a terminal; if Slurm is down, try again in a minute.")
    state = proc.stdout.strip().splitlines()
    return state[0].strip() if state else None


def cancel(job_id: str, wait: float = 30) -> None:
    """``scancel`` the job and wait (up to ``wait`` s) until ``squeue`` no longer lists it."""
    if not job_id:
        return
    _run(["scancel", str(job_id)])
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
    proc = _run(cmd, cwd=cwd)
    message = (proc.stderr + proc.stdout).strip()
    if proc.returncode != 0:
        raise SlurmError(f"Slurm rejected the job ({' '.join(cmd)}):\n{message}")
    if test_only:
        return message
    job = proc.stdout.strip().split(";")[0]
    if not job.isdigit():
        raise SlurmError(f"could not read a job id from sbatch's output: {message!r}")
    return job
