"""The lab on a Slurm cluster: MPI engines in a Slurm job, and batch scripts for the experiments.

From a notebook (on the login node, or a JupyterHub that submits to Slurm)::

    from ppu_lab.slurm import SlurmMPICluster
    with SlurmMPICluster(4, partition="short", time="00:30:00", account="myproj",
                         env_setup="module load mpich\\nsource ~/ppu-lab/.venv/bin/activate") as cl:
        cl.apply(lambda: (rank, size))        # [(0, 4), (1, 4), (2, 4), (3, 4)]

How the engines are started, and why
------------------------------------
The controller runs where the notebook runs; the ``n`` engines run in ONE Slurm job whose
batch script ends with ``srun --mpi=pmi2 python -m ipyparallel.engine ...`` (``mpi="pmi2"``,
the default). We use ipyparallel's own Slurm launcher (``sbatch`` to submit, ``scancel`` to
stop, the controller's address handed to the engines in ``$IPP_CONNECTION_INFO``) but replace
its batch script, for one reason: its default script ends with a plain ``srun``, and a plain
``srun`` starts ``n`` *independent* processes unless the site set ``MpiDefault``: with the pip
``mpich`` wheel each engine then reports rank 0 of 1. ``srun --mpi=pmi2`` gives each process
the PMI2 wire-up it needs, so the ``n`` engines form one ``MPI.COMM_WORLD``. We prefer srun over
``mpiexec`` inside the job because then Slurm itself starts, places (across nodes), tracks and
kills every rank: ``scancel`` cleans up everything, and nothing depends on an ``mpiexec``'s Slurm
integration. ``mpi="pmix"`` is the same for an Open MPI 5 built with PMIx. ``mpi="mpiexec"``
runs ``mpiexec -n N`` (mpi4py's own, or ``mpiexec=``) inside the allocation instead: the way
out on a Slurm without the pmi2 plugin (``srun --mpi=list``) or with a site MPI whose docs say
so. ``mpi="none"`` is the plain ``srun`` (ipyparallel's ``engines="slurm"``); it exists to
show the failure, which start() and :func:`preflight` detect and explain.

Engines on compute nodes must reach the controller: it listens on all interfaces
(``ip="*"``) by default; ipyparallel signs every message with the cluster's key. The batch
script and the engines' output go to ``job_dir`` (default ``~/.cache/ppu_lab/slurm``), which
must be on a file system the compute nodes share (home usually is; ``/tmp`` is not).

Clean-up: ``stop()``, leaving a ``with`` block, interpreter exit (atexit) and even a killed
kernel (a watchdog process) cancel the job, and ``stop()`` waits until ``squeue`` no longer
lists it.

Batch runs (no notebook)
------------------------
``experiments_script(...)`` (command line: ``python -m ppu_lab.slurm script``) writes an sbatch
script that runs ``python -m ppu_lab.experiments run ...`` on ``ntasks`` ranks; the committed
``scripts/slurm/experiments.sbatch`` is its default output. The runner appends one JSON line per
finished run, so a job killed at its time limit (or by ``scancel``) loses only the run in progress;
submitting the same script again resumes. See the README, "Running on a cluster".
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ppu_lab.cluster import ClusterError, MPICluster
from ppu_lab.mpiexec import find_mpiexec

__all__ = [
    "SlurmError", "SlurmMPICluster", "slurm_status", "batch_script", "experiments_script",
    "submit", "cancel", "job_state", "preflight", "MPI_MODES",
]

MPI_MODES = ("pmi2", "pmix", "mpiexec", "none")
COMMANDS = ("sbatch", "squeue", "scancel")
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$")
_NAME = re.compile(r"^[A-Za-z0-9_.,+@%-]+$")


class SlurmError(ClusterError):
    """Slurm is missing, refused the job, or the job failed; the message includes Slurm's own words."""


# --------------------------------------------------------------------------- small Slurm helpers


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


# --------------------------------------------------------------------------- batch scripts


def _check_options(n, partition, time, account, nodes, extra, mpi):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of MPI ranks = Slurm tasks) must be an integer >= 1; got {n!r}")
    for name, value in (("partition", partition), ("account", account)):
        if value is not None and not (isinstance(value, str) and _NAME.match(value)):
            raise ValueError(f"{name} must be a Slurm name such as 'short' (no spaces); got {value!r}")
    if time is not None and not (isinstance(time, str) and _TIME.match(time)):
        raise ValueError(f"time (Slurm time limit) must be like '30' (minutes), '01:30:00' or '1-00:00:00'; got {time!r}")
    if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= n):
        raise ValueError(f"nodes must be an integer between 1 and n={n}; got {nodes!r}")
    if isinstance(extra, str):
        raise ValueError("extra must be a list of sbatch options, e.g. ['--mem-per-cpu=2G', '--qos=debug']")
    for line in extra or ():
        if not (isinstance(line, str) and (line.startswith("-") or line.startswith("#SBATCH "))):
            raise ValueError(f"extra: each entry must be an sbatch option ('--mem=4G') or an '#SBATCH ...' line; got {line!r}")
    if mpi not in MPI_MODES:
        raise ValueError(f"mpi must be one of {MPI_MODES} (how the ranks are started); got {mpi!r}")


def launch_prefix(n: int, mpi: str = "pmi2", mpiexec: str | None = None) -> str:
    """The command that starts ``n`` ranks inside the job: ``srun --mpi=pmi2`` or ``mpiexec -n n``.

    ``srun`` gets ``--kill-on-bad-exit=1``: by default Slurm lets the other tasks run on when one
    dies, and MPI ranks whose peer died at start-up wait for it until the time limit. (mpiexec
    already ends the whole job when a rank fails.)
    """
    if mpi == "mpiexec":
        exe = mpiexec or find_mpiexec() or "mpiexec"
        return f"{shlex.quote(exe)} -n {n}"
    return "srun" if mpi == "none" else f"srun --mpi={mpi} --kill-on-bad-exit=1"


def batch_script(command: str, n: int, *, partition=None, time="00:30:00", account=None, nodes=None,
                 extra=(), env_setup=None, mpi="pmi2", mpiexec=None, job_name="ppu-lab",
                 output=None, comment=None, prelude=()) -> str:
    """An sbatch script that runs ``<launch prefix> command`` on ``n`` tasks (one core each).

    ``env_setup``: shell line(s) run first, e.g. ``"module load mpich\\nsource .venv/bin/activate"``.
    ``extra``: more sbatch options (``["--mem-per-cpu=2G"]``). ``output``: sbatch ``--output``.
    ``prelude``: shell lines run after ``env_setup``, just before the launch line.
    """
    _check_options(n, partition, time, account, nodes, extra, mpi)
    lines = ["#!/bin/bash"]
    if comment:
        lines += [f"# {ln}".rstrip() for ln in comment.splitlines()]
    sb = [f"--job-name={job_name}", f"--ntasks={n}", "--cpus-per-task=1"]
    sb += [f"--nodes={nodes}"] if nodes else []
    sb += [f"--partition={partition}"] if partition else []
    sb += [f"--account={account}"] if account else []
    sb += [f"--time={time}"] if time else []
    sb += [f"--output={output}"] if output else []
    lines += [f"#SBATCH {o}" for o in sb]
    lines += [ln if ln.startswith("#SBATCH ") else f"#SBATCH {ln}" for ln in extra or ()]
    lines += ["", "set -e"]
    if env_setup:
        lines += ["# Environment (module load / activate)", *env_setup.strip().splitlines()]
    lines += [*prelude, "export PYTHONUNBUFFERED=1", f"{launch_prefix(n, mpi, mpiexec)} {command}", ""]
    return "\n".join(lines)


_EXPERIMENTS_COMMENT = """\
PPU Lab: the experiment grid (python -m ppu_lab.experiments run) as a Slurm batch job.
Generated by `python -m ppu_lab.slurm script`; edit the #SBATCH lines and the environment
lines for your cluster, then from the lab folder on the login node:
    sbatch scripts/slurm/experiments.sbatch                  # the default grid
    sbatch scripts/slurm/experiments.sbatch --models cnn --epochs 2 --out results/cnn.jsonl
Arguments after the script name go to `python -m ppu_lab.experiments run` (see its --help).
Results: one JSON line per finished run, appended and fsynced by rank 0. A job killed at its
time limit (or by scancel) loses only the run in progress; submitting the same command again
skips the finished runs and resumes. To chain jobs: submit it twice with
--dependency=singleton (same job name): the second starts when the first ends.
MNIST must be in $PPU_LAB_DATA (or ~/.cache/ppu_lab/mnist): compute nodes often have no
internet, so fetch it on the login node first: python -m ppu_lab.data fetch"""


def experiments_script(n: int = 4, *, default_args=("--out", "results/grid.jsonl"), time="01:00:00", job_name="ppu-lab-grid",
                       output="ppu-lab-grid-%j.out", env_setup="# module load mpich    # only with a system MPI\n"
                       "# source .venv/bin/activate", python="python", **options) -> str:
    """The sbatch script that runs the experiment grid on ``n`` ranks (options as :func:`batch_script`).

    Script arguments replace ``default_args`` (``"${@:-...}"``), so one file serves every grid.
    """
    default = " ".join(shlex.quote(a) for a in default_args)
    return batch_script(f'{python} -m ppu_lab.experiments run "$@"', n, time=time, job_name=job_name, output=output,
                        env_setup=env_setup, comment=_EXPERIMENTS_COMMENT,
                        prelude=["# No arguments: the default ones.", f"[ $# -gt 0 ] || set -- {default}"],
                        **options)


# --------------------------------------------------------------------------- preflight

_PROBE = (
    "import os\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
    "os.write(1, f'PPU_RANK {c.Get_rank()} {c.Get_size()} {MPI.Get_processor_name()}\\n'.encode())\n"
)


def _rank0_of_1_advice(n: int, mpi: str) -> str:
    return (
        f"The {n} Slurm tasks did not form one MPI job: each task (engine) is rank 0 of 1 (mpi={mpi!r}). A plain "
        "`srun` (ipyparallel's engines='slurm') starts independent processes unless the MPI library gets "
        "Slurm's PMI wire-up. Use mpi='pmi2' (srun --mpi=pmi2, MPICH incl. the pip wheel, Intel MPI), "
        "mpi='pmix' (Open MPI >= 5) or mpi='mpiexec' (mpiexec inside the allocation); `srun --mpi=list` "
        "shows what this Slurm supports."
    )


def _check_mpi_plugin(mpi: str) -> None:
    if mpi not in ("pmi2", "pmix") or shutil.which("srun") is None:
        return
    proc = _run(["srun", "--mpi=list"], timeout=30)
    listing = (proc.stdout + proc.stderr).lower()
    if proc.returncode == 0 and not re.search(rf"\b{mpi}", listing):
        raise SlurmError(
            f"This Slurm has no '{mpi}' MPI plugin (`srun --mpi=list`: {' '.join(listing.split())}). "
            "Use mpi='mpiexec' (mpiexec inside the allocation) or another listed plugin."
        )


def preflight(n: int = 2, *, probe: bool = True, timeout: float = 300, **options) -> dict:
    """Check that ``n`` MPI ranks can run through Slurm here; return what was found, or raise.

    Checks, cheapest first: the Slurm commands exist; the MPI plugin exists (``srun --mpi=list``);
    ``sbatch --test-only`` accepts the request (partition, account, time, tasks: Slurm's message
    otherwise). With ``probe=True`` it then runs a tiny job (``sbatch --wait``) in which every task
    reports its MPI rank and size, and raises :class:`SlurmError` with what to change when the
    tasks are not one communicator (the "every engine is rank 0 of 1" case). ``options`` are
    those of :func:`batch_script`.
    """
    mpi = options.get("mpi", "pmi2")
    job_dir = options.pop("job_dir", None)
    _check_options(n, options.get("partition"), options.get("time", "00:30:00"), options.get("account"),
                   options.get("nodes"), options.get("extra", ()), mpi)
    _require_commands()
    _check_mpi_plugin(mpi)
    info = {"n": n, "mpi": mpi, "launch": launch_prefix(n, mpi, options.get("mpiexec"))}
    with tempfile.TemporaryDirectory(prefix="ppu-lab-slurm-", dir=_job_root(job_dir)) as tmp:
        out = Path(tmp) / "probe.out"
        script = Path(tmp) / "probe.sbatch"
        probe_cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(_PROBE)}"
        options.setdefault("time", "00:05:00")
        script.write_text(batch_script(probe_cmd, n, job_name="ppu-lab-preflight", output=str(out), **options))
        info["test_only"] = submit(script, test_only=True)
        if not probe:
            return info
        job = submit(script, cwd=tmp)
        deadline = time.monotonic() + timeout
        while (state := job_state(job)) is not None:
            if time.monotonic() > deadline:
                cancel(job)
                raise SlurmError(f"the preflight job {job} did not finish in {timeout:.0f} s (last state {state}); "
                                 "the queue may be busy: try again, or pass probe=False")
            time.sleep(0.2)
        text = out.read_text() if out.exists() else "(no output file)"
    pairs = sorted((int(r), int(s)) for r, s in re.findall(r"^PPU_RANK (\d+) (\d+)", text, re.M))
    info["ranks"] = pairs
    if pairs == [(r, n) for r in range(n)]:
        return info
    if pairs and all(p == (0, 1) for p in pairs):
        raise SlurmError(_rank0_of_1_advice(n, mpi) + f"\n--- job output\n{text.strip()}")
    raise SlurmError(f"the preflight job's {n} tasks reported (rank, size) {pairs}, not ranks 0..{n - 1} of {n}."
                     f"\n--- job output\n{text.strip()}")


# --------------------------------------------------------------------------- the cluster


def _job_root(job_dir=None) -> str:
    root = Path(job_dir or os.environ.get("PPU_LAB_SLURM_JOBS") or Path.home() / ".cache" / "ppu_lab" / "slurm")
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def _engine_launcher_class():
    """ipyparallel's Slurm engine launcher, with sbatch/scancel errors that carry Slurm's message."""
    from ipyparallel.cluster.launcher import SlurmEngineSetLauncher

    class SlurmEngines(SlurmEngineSetLauncher):
        def _run_command(self, command, **kwargs):
            proc = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL, **kwargs)
            out, err = proc.stdout.decode("utf8", "replace"), proc.stderr.decode("utf8", "replace")
            if proc.returncode != 0 and command[0] == "sbatch":
                raise SlurmError(f"Slurm rejected the engines' job (sbatch exit {proc.returncode}):\n{(err + out).strip()}")
            return out  # scancel of a job that has already ended is fine

    return SlurmEngines


class SlurmMPICluster(MPICluster):
    """``n`` MPI engines in one Slurm job (one communicator), controller and client here.

    Parameters (besides those of :class:`~ppu_lab.cluster.MPICluster`)
    -------------------------------------------------------------------
    partition, time, account, nodes : the job's ``--partition``, ``--time`` (default 30 minutes),
        ``--account``, ``--nodes``. The job has ``n`` tasks of one core each.
    extra : more sbatch options, e.g. ``["--mem-per-cpu=2G", "--qos=debug"]``.
    env_setup : shell line(s) run in the job before the engines, e.g.
        ``"module load mpich\\nsource ~/ppu-lab/.venv/bin/activate"``. The job also inherits this
        process's environment (``--export=ALL``).
    mpi : ``"pmi2"`` (default, ``srun --mpi=pmi2``), ``"pmix"``, ``"mpiexec"`` or ``"none"``; see the
        module docstring for the choice.
    queue_timeout : seconds the job may wait in the queue (PENDING) before start() gives up
        (then ``timeout`` seconds for the engines to register once it runs).
    job_dir : where the batch script and engine output go (shared file system); see module doc.
    ip : the controller's address; ``"*"`` (default) so that engines on compute nodes reach it.
    """

    def __init__(self, n: int = 2, *, partition=None, time="00:30:00", account=None, nodes=None, extra=(),
                 env_setup=None, mpi="pmi2", queue_timeout: float = 600, job_dir=None, ip="*",
                 timeout: float = 120, **kwargs):
        super().__init__(n, ip=ip, timeout=timeout, **kwargs)
        _check_options(n, partition, time, account, nodes, extra, mpi)
        if not (isinstance(queue_timeout, (int, float)) and queue_timeout > 0):
            raise ValueError(f"queue_timeout (seconds the job may wait in the queue) must be > 0; got {queue_timeout!r}")
        self.slurm = dict(partition=partition, time=time, account=account, nodes=nodes, extra=list(extra or ()),
                          env_setup=env_setup, mpi=mpi, mpiexec=self.mpiexec)
        self.queue_timeout = float(queue_timeout)
        self.job_dir = job_dir
        self._job_tmp: str | None = None

    # -- hooks of MPICluster -------------------------------------------------------------------
    def _preflight(self) -> dict:
        _require_commands()
        _check_mpi_plugin(self.slurm["mpi"])
        if self.slurm["mpi"] == "mpiexec" and find_mpiexec(self.mpiexec) is None:
            raise SlurmError("mpi='mpiexec' but no mpiexec found: `module load` your MPI or pass mpiexec=")
        self._job_tmp = tempfile.mkdtemp(prefix="ppu-lab-engines-", dir=_job_root(self.job_dir))
        try:
            test = Path(self._job_tmp) / "test.sbatch"
            test.write_text(batch_script("true", self.n, job_name="ppu-lab-engines", **self.slurm))
            answer = submit(test, test_only=True)  # SlurmError with Slurm's message if it refuses
        except BaseException:
            shutil.rmtree(self._job_tmp, ignore_errors=True)
            self._job_tmp = None
            raise
        return {"slurm_test_only": answer, "mpi": self.slurm["mpi"], "job_dir": self._job_tmp, "warnings": []}

    def _engine_launch(self) -> tuple:
        out = os.path.join(self._job_tmp, "engines.out")
        slurm = {**self.slurm, "extra": ["--export=ALL", *self.slurm["extra"]]}
        script = batch_script("PPU_LAB_ENGINE_COMMAND", self.n, job_name="ppu-lab-engines", output=out, **slurm)
        # ipyparallel formats the script with str.format: protect braces, then insert its engine command.
        script = _escape(script).replace("PPU_LAB_ENGINE_COMMAND", "{program_and_args}")
        kw = {"batch_template": script, "batch_file_name": os.path.join(self._job_tmp, "engines.sbatch"),
              "output_file": out}
        if self.engine_cmd is not None:
            kw["engine_cmd"] = list(self.engine_cmd)
        return _engine_launcher_class(), kw

    @property
    def job_id(self) -> str | None:
        """The Slurm job id of the engines (None when not submitted)."""
        es = self._engine_set()
        return getattr(es, "job_id", None) or None

    def _cleanup_commands(self) -> list:
        job = self.job_id  # if this process dies without stop(), the watchdog cancels the job
        return [["scancel", job]] if job else []

    def _wait_for_engines(self) -> None:
        job, started = self.job_id, time.monotonic()
        running_since, state, last_check = None, None, 0.0
        while len(self.client.ids) < self.n:
            now = time.monotonic()
            if now - last_check > 1.0:
                state, last_check = job_state(job), now
                if state is None or state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "COMPLETED"):
                    raise SlurmError(
                        f"The engines' Slurm job {job} ended ({state or 'gone from squeue'}) before all engines "
                        f"registered ({len(self.client.ids)} of {self.n}).\n--- job output\n{self._engine_output()}")
                if state == "RUNNING" and running_since is None:
                    running_since = now
            if running_since is None and now - started > self.queue_timeout:
                reason = _run(["squeue", "-h", "-j", job, "-o", "%r"]).stdout.strip()
                raise SlurmError(f"job {job} waited {self.queue_timeout:.0f} s in the queue ({state}, reason: "
                                 f"{reason}); raise queue_timeout= or choose another partition")
            if running_since is not None and now - running_since > self.timeout:
                raise SlurmError(
                    f"Only {len(self.client.ids)} of {self.n} engines registered within {self.timeout:.0f} s of job "
                    f"{job} starting. Can the compute nodes reach this machine (ip=)?\n"
                    f"--- job output\n{self._engine_output()}")
            time.sleep(0.1)

    def _order_by_rank(self) -> None:
        from ppu_lab.cluster import _rank_info

        ids = sorted(self.client.ids)
        info = self.client[ids].apply_sync(_rank_info)
        if self.n > 1 and all(tuple(x) == (0, 1) for x in info):
            raise SlurmError(_rank0_of_1_advice(self.n, self.slurm["mpi"]))
        super()._order_by_rank()

    def stop(self) -> None:
        """Stop engines and controller; cancel the job and wait until squeue no longer lists it."""
        job = self.job_id
        try:
            super().stop()
        finally:
            try:
                if job:
                    cancel(job)
            finally:
                if self._job_tmp:
                    shutil.rmtree(self._job_tmp, ignore_errors=True)
                    self._job_tmp = None

    def __repr__(self) -> str:
        state = f"running, ranks {self.ranks}, job {self.job_id}" if self.running else "stopped"
        return f"SlurmMPICluster(n={self.n}, mpi={self.slurm['mpi']!r}, {state})"


def _escape(text):
    """Protect braces from ipyparallel's template formatting."""
    return None if text is None else text.replace("{", "{{").replace("}", "}}")



# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppu_lab.slurm", description="Slurm helpers for PPU Lab.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("script", help="print an sbatch script that runs the experiment grid "
                                      "(arguments after -- become its default `experiments run` arguments)")
    s.add_argument("-n", "--ntasks", type=int, default=4, help="MPI ranks (Slurm tasks). Default: 4")
    s.add_argument("--partition"), s.add_argument("--account")
    s.add_argument("--time", default="01:00:00", help="time limit (minutes, HH:MM:SS or D-HH:MM:SS). Default: 01:00:00")
    s.add_argument("--nodes", type=int)
    s.add_argument("--extra", action="append", default=[], help="another sbatch option (repeatable)")
    s.add_argument("--env-setup", default=None, help="shell line(s) before the launch, e.g. 'module load mpich'")
    s.add_argument("--mpi", choices=MPI_MODES, default="pmi2")
    s.add_argument("-o", "--output", default=None, help="write the script here instead of printing it")
    s.add_argument("run_args", nargs="*", help="default arguments of `experiments run`")
    c = sub.add_parser("check", help="preflight: can n ranks run as one MPI job through Slurm here?")
    c.add_argument("-n", "--ntasks", type=int, default=2)
    c.add_argument("--partition"), c.add_argument("--account")
    c.add_argument("--mpi", choices=MPI_MODES, default="pmi2")
    args = p.parse_args(argv)
    try:
        if args.command == "check":
            info = preflight(args.ntasks, partition=args.partition, account=args.account, mpi=args.mpi)
            print(f"ok: {args.ntasks} tasks form one MPI job with `{info['launch']}` (ranks {info['ranks']})")
            return 0
        kw = {} if args.env_setup is None else {"env_setup": args.env_setup}
        text = experiments_script(args.ntasks, partition=args.partition, account=args.account, time=args.time,
                                  nodes=args.nodes, extra=args.extra, mpi=args.mpi,
                                  **({"default_args": args.run_args} if args.run_args else {}), **kw)
    except (ValueError, SlurmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
        os.chmod(args.output, 0o755)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
