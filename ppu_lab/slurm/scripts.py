"""Batch scripts: the ``#SBATCH`` options checked, the launch line, the experiment grid's script."""

from __future__ import annotations

import re
import shlex

from ppu_lab.mpiexec import MPIStartError, mpiexec_command

MPI_MODES = ("pmi2", "pmix", "mpiexec", "none")
_TIME = re.compile(r"(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)")
_NAME = re.compile(r"[A-Za-z0-9_.,+@%-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PLAIN = re.compile(r"[^\s\"'\\#]+")  # what sbatch reads as one word on an #SBATCH line without quotes


def no_control(name: str, value, *, lines: bool = False) -> str:
    """``value`` if it is a string without control characters (``lines=True``: newlines and tabs allowed).

    A newline in a value written on an ``#SBATCH`` line would start a new line of the batch script:
    a value such as ``"--qos=debug\nrm -rf ~"`` would inject commands. So every value is checked.
    """
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string; got {value!r}")
    bad = _CONTROL.search(value.replace("\n", "").replace("\t", "") if lines else value)
    if bad:
        what = "control characters" if lines else "newlines or other control characters"
        raise ValueError(f"{name} must not contain {what} (found {bad.group()!r}: it would break the batch "
                         f"script's lines); got {value!r}")
    return value


def sbatch_value(value: str) -> str:
    """``value`` as sbatch reads it on an ``#SBATCH`` line: as it is when it is one plain word, else in
    double quotes with ``\\`` and ``"`` escaped (sbatch groups quoted text, honours backslashes and
    drops an unquoted ``#`` and what follows as a comment)."""
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_options(n, partition, time, account, nodes, extra, mpi):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of MPI ranks = Slurm tasks) must be an integer >= 1; got {n!r}")
    for name, value in (("partition", partition), ("account", account)):
        if value is not None and not (isinstance(value, str) and _NAME.fullmatch(value)):
            raise ValueError(f"{name} must be a Slurm name such as 'short' (no spaces); got {value!r}")
    if time is not None and not (isinstance(time, str) and _TIME.fullmatch(time)):
        raise ValueError(f"time (Slurm time limit) must be like '30' (minutes), '01:30:00' or '1-00:00:00'; got {time!r}")
    if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= n):
        raise ValueError(f"nodes must be an integer between 1 and n={n}; got {nodes!r}")
    if isinstance(extra, str):
        raise ValueError("extra must be a list of sbatch options, e.g. ['--mem-per-cpu=2G', '--qos=debug']")
    for line in extra or ():
        if not (isinstance(line, str) and (line.startswith("-") or line.startswith("#SBATCH "))):
            raise ValueError(f"extra: each entry must be an sbatch option ('--mem=4G') or an '#SBATCH ...' line; got {line!r}")
        no_control("extra entry", line)
    if mpi not in MPI_MODES:
        raise ValueError(f"mpi must be one of {MPI_MODES} (how the ranks are started); got {mpi!r}")


def launch_prefix(n: int, mpi: str = "pmi2", mpiexec: str | None = None) -> str:
    """The command that starts ``n`` ranks inside the job: ``srun --mpi=pmi2`` or ``mpiexec -n n``.

    ``srun`` gets ``--kill-on-bad-exit=1``: by default Slurm lets the other tasks run on when one
    dies, and MPI ranks whose peer died at start-up wait for it until the time limit. (mpiexec
    already ends the whole job when a rank fails.) ``mpi="mpiexec"``: the line of
    :func:`ppu_lab.mpiexec.mpiexec_command` (Open MPI's root variables when submitting as root; no
    ``--oversubscribe``, the job holds a slot per rank), or a bare ``mpiexec -n n`` found on the
    node's PATH when none is found here.
    """
    if mpi == "mpiexec":
        try:
            launch = mpiexec_command(n, mpiexec=mpiexec, cores=n)
        except MPIStartError:
            return f"{shlex.quote(no_control('mpiexec', mpiexec or 'mpiexec'))} -n {n}"
        cmd = " ".join(shlex.quote(no_control("mpiexec", a)) for a in launch.cmd)
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(launch.env.items()))
        return f"env {env} {cmd}" if env else cmd
    return "srun" if mpi == "none" else f"srun --mpi={mpi} --kill-on-bad-exit=1"


def batch_script(command: str, n: int, *, partition=None, time="00:30:00", account=None, nodes=None,
                 extra=(), env_setup=None, mpi="pmi2", mpiexec=None, job_name="ppu-lab",
                 output=None, comment=None, prelude=()) -> str:
    """An sbatch script that runs ``<launch prefix> command`` on ``n`` tasks (one core each).

    ``env_setup``: shell line(s) run first, e.g. ``"module load mpich\\nsource .venv/bin/activate"``.
    ``extra``: more sbatch options (``["--mem-per-cpu=2G"]``). ``output``: sbatch ``--output``.
    ``prelude``: shell lines run after ``env_setup``, just before the launch line.
    The job says ``--no-requeue``: when one of its nodes fails, Slurm ends it (``NODE_FAIL``) instead of
    putting it back in the queue, where it would wait for the lost node and later start again unasked
    (engines that no notebook waits for; a grid that runs twice). Submitting it again resumes a grid.
    Every value is checked: Slurm names and times by their form, free text (``job_name``, ``output``)
    quoted for sbatch, and no value may hold a newline or other control character, except
    ``env_setup`` and ``command`` (shell text after the ``#SBATCH`` block, where sbatch reads no more
    directives) and ``comment`` (each of its lines becomes a ``#`` comment line).
    """
    _check_options(n, partition, time, account, nodes, extra, mpi)
    no_control("command", command, lines=True)  # after the #SBATCH block: sbatch reads no directive there
    lines = ["#!/bin/bash"]
    if comment:
        lines += [f"# {ln}".rstrip() for ln in no_control("comment", comment, lines=True).splitlines()]
    sb = [f"--job-name={sbatch_value(no_control('job_name', job_name))}", f"--ntasks={n}", "--cpus-per-task=1",
          "--no-requeue"]
    sb += [f"--nodes={nodes}"] if nodes else []
    sb += [f"--partition={partition}"] if partition else []
    sb += [f"--account={account}"] if account else []
    sb += [f"--time={time}"] if time else []
    sb += [f"--output={sbatch_value(no_control('output', output))}"] if output else []
    lines += [f"#SBATCH {o}" for o in sb]
    lines += [ln if ln.startswith("#SBATCH ") else f"#SBATCH {ln}" for ln in extra or ()]
    lines += ["", "set -e"]
    if env_setup:
        no_control("env_setup", env_setup, lines=True)
        lines += ["# Environment (module load / activate)", *env_setup.strip().splitlines()]
    lines += [*(no_control("prelude line", ln) for ln in prelude)]
    lines += ["export PYTHONUNBUFFERED=1", f"{launch_prefix(n, mpi, mpiexec)} {command}", ""]
    return "\n".join(lines)


_EXPERIMENTS_COMMENT = """\
PPU Lab: the experiment grid (python -m ppu_lab.experiments run) as a Slurm batch job.
Generated by `python -m ppu_lab.slurm script`; edit the #SBATCH lines and the environment
lines for your cluster, then from the lab folder on the login node:
    sbatch scripts/slurm/experiments.sbatch                  # the default grid
    sbatch scripts/slurm/experiments.sbatch --models cnn --epochs 2 --out results/cnn.jsonl
Arguments after the script name go to `python -m ppu_lab.experiments run` (see its --help).
Results: one JSON line per finished run, appended and fsynced by rank 0. A job killed at its
time limit, by scancel or by a lost node (it then ends NODE_FAIL: --no-requeue) loses only the
run in progress; submitting the same command again skips the finished runs and resumes.
To chain jobs: submit it twice with --dependency=singleton (same job name): the second
starts when the first ends. `python -m ppu_lab.slurm wait JOBID` waits and says how it ended.
MNIST must be in $PPU_LAB_DATA (or ~/.cache/ppu_lab/mnist): compute nodes often have no
internet, so fetch it on the login node first: python -m ppu_lab.data fetch"""


def experiments_script(n: int = 4, *, default_args=("--out", "results/grid.jsonl"), time="01:00:00", job_name="ppu-lab-grid",
                       output="ppu-lab-grid-%j.out", env_setup="# module load mpich    # only with a system MPI\n"
                       "# source .venv/bin/activate", python="python", **options) -> str:
    """The sbatch script that runs the experiment grid on ``n`` ranks (options as :func:`batch_script`).

    Script arguments replace ``default_args`` (``"${@:-...}"``), so one file serves every grid.
    """
    default = " ".join(shlex.quote(no_control("default argument", a)) for a in default_args)
    python = shlex.quote(no_control("python", python))
    return batch_script(f'{python} -m ppu_lab.experiments run "$@"', n, time=time, job_name=job_name, output=output,
                        env_setup=env_setup, comment=_EXPERIMENTS_COMMENT,
                        prelude=["# No arguments: the default ones.", f"[ $# -gt 0 ] || set -- {default}"],
                        **options)
