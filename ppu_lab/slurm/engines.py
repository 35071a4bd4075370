"""``SlurmMPICluster``: the notebook's MPI engines as one Slurm job (see ``ppu_lab.slurm``)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ppu_lab import waits
from ppu_lab.cluster import MPICluster
from ppu_lab.mpiexec import find_mpiexec
from ppu_lab.slurm.commands import SlurmError, _require_commands, _run, cancel, job_state, submit
from ppu_lab.slurm.nodes import ENDED, controller_ip, describe, job_end
from ppu_lab.slurm.preflight import _check_mpi_plugin, _job_root, _rank0_of_1_advice
from ppu_lab.slurm.scripts import _check_options, batch_script, no_control


def _engine_launcher_class():
    """ipyparallel's Slurm engine launcher, with sbatch/scancel errors that carry Slurm's message."""
    from ipyparallel.cluster.launcher import SlurmEngineSetLauncher

    class SlurmEngines(SlurmEngineSetLauncher):
        def _run_command(self, command, **kwargs):
            proc = _run(command, **kwargs)  # bounded: SlurmError when Slurm does not answer
            if proc.returncode != 0 and command[0] == "sbatch":
                raise SlurmError(f"Slurm rejected the engines' job (sbatch exit {proc.returncode}):\n"
                                 f"{(proc.stderr + proc.stdout).strip()}")
            return proc.stdout  # scancel of a job that has already ended is fine

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
    ip : the address the controller listens on. None (default): chosen at start by
        :func:`~ppu_lab.slurm.nodes.controller_ip`: this machine's address on the route to the
        partition's nodes (loopback when they are this machine, all interfaces ``"*"`` only when no
        single address reaches them all); ``cl.info["controller_ip"]`` says which and why.
    job_poll : seconds between checks of the engines' job while ``apply`` waits for a result.
    """

    def __init__(self, n: int = 2, *, partition=None, time="00:30:00", account=None, nodes=None, extra=(),
                 env_setup=None, mpi="pmi2", queue_timeout: float = 600, job_dir=None, ip=None,
                 timeout: float = 120, job_poll: float = 2.0, **kwargs):
        super().__init__(n, ip=ip, timeout=timeout, **kwargs)
        self.ip_choice = ip
        self.job_poll = self._seconds("job_poll (seconds between checks of the engines' job)", job_poll)
        _check_options(n, partition, time, account, nodes, extra, mpi)
        if env_setup is not None:
            no_control("env_setup", env_setup, lines=True)
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
        self.ip, why = (self.ip_choice, "given as ip=") if self.ip_choice else controller_ip(self.slurm["partition"])
        return {"slurm_test_only": answer, "mpi": self.slurm["mpi"], "job_dir": self._job_tmp, "warnings": [],
                "controller_ip": (self.ip, why)}

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
        while len(self._new_ids()) < self.n:
            now = time.monotonic()
            if now - last_check > 1.0:
                state, last_check = job_state(job), now
                if state is None or state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "COMPLETED"):
                    raise SlurmError(
                        f"The engines' Slurm job {job} ended ({state or 'gone from squeue'}) before all engines "
                        f"registered ({len(self._new_ids())} of {self.n}).\n--- job output\n{self._engine_output()}")
                if state == "RUNNING" and running_since is None:
                    running_since = now
            if running_since is None and now - started > self.queue_timeout:
                reason = _run(["squeue", "-h", "-j", job, "-o", "%r"]).stdout.strip()
                raise SlurmError(f"job {job} waited {self.queue_timeout:.0f} s in the queue ({state}, reason: "
                                 f"{reason}); raise queue_timeout= or choose another partition")
            if running_since is not None and now - running_since > self.timeout:
                raise SlurmError(
                    f"Only {len(self._new_ids())} of {self.n} engines registered within {self.timeout:.0f} s of job "
                    f"{job} starting. Can the compute nodes reach this machine (ip=)?\n"
                    f"--- job output\n{self._engine_output()}")
            time.sleep(0.1)

    def _check_ranks(self, info) -> None:
        if self.n > 1 and all(tuple(x) == (0, 1) for x in info):
            raise SlurmError(_rank0_of_1_advice(self.n, self.slurm["mpi"]))
        super()._check_ranks(info)

    def _stack_dir(self) -> str | None:
        return self._job_tmp  # on the shared file system, like the engines' output

    def _stop_engines(self) -> None:
        job = self.job_id
        super()._stop_engines()  # scancel through ipyparallel's launcher
        cancel(job)  # and wait until squeue no longer lists the job

    def _wait(self, ar, limit: float, what: str):
        """As :meth:`MPICluster._wait`, watching the engines' job (every ``job_poll`` s) meanwhile.

        When the job ends under a running call (a lost node: Slurm ends the job, NODE_FAIL, and kills
        its ranks on the other nodes), the cluster is stopped and :class:`SlurmError` says how the job
        ended and names the lost node, instead of waiting the whole ``limit`` for engines that are gone.
        """
        deadline = time.monotonic() + limit
        try:
            while not ar.ready() and time.monotonic() < deadline:
                ar.wait(min(self.job_poll, max(0.0, deadline - time.monotonic())))
                if not ar.ready() and self._job_ended():
                    self._lost_job(what)
        except KeyboardInterrupt:
            print(waits.explain(self, f"Interrupted while waiting for {what}."), file=sys.stderr)
            raise
        try:
            return super()._wait(ar, max(deadline - time.monotonic(), 0.01), what)
        except Exception as exc:  # noqa: BLE001 - engines that died with their job: say why
            if self.running and self._job_ended():
                self._lost_job(what, exc)
            raise

    def _job_ended(self) -> bool:
        state = job_state(self.job_id)
        return state is None or state == "COMPLETING" or state in ENDED

    def _lost_job(self, what: str, cause=None):
        job = self.job_id
        try:
            end = describe(job_end(job, timeout=120, poll=0.25))
        except SlurmError as exc:
            end = str(exc)
        self.stop()
        raise SlurmError(f"The engines' Slurm job {job} ended while {what} ran on them; the cluster is stopped "
                         f"(start it again to go on).\n{end}") from cause

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
