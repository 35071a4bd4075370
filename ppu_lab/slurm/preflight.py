"""Can ``n`` MPI ranks run as one job through Slurm here? (``python -m ppu_lab.slurm check``)"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ppu_lab.slurm.commands import SlurmError, _require_commands, _run, cancel, job_state, submit
from ppu_lab.slurm.scripts import _check_options, batch_script, launch_prefix


# One line: batch_script refuses commands with newlines (they would break the script's lines).
_PROBE = ("import os; from mpi4py import MPI; c = MPI.COMM_WORLD; "
          "os.write(1, f'PPU_RANK {c.Get_rank()} {c.Get_size()} {MPI.Get_processor_name()}\\n'.encode())")


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
    proc = _run(["srun", "--mpi=list"])
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
    reports its MPI rank, size and host (``info["hosts"]``: rank r ran on ``hosts[r]``), and raises
    :class:`SlurmError` with what to change when the tasks are not one communicator (the "every
    engine is rank 0 of 1" case). ``options`` are those of :func:`batch_script`.
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
    found = sorted((int(r), int(s), h) for r, s, h in re.findall(r"^PPU_RANK (\d+) (\d+) (\S+)", text, re.M))
    pairs = [(r, s) for r, s, _ in found]
    info["ranks"], info["hosts"] = pairs, [h for _, _, h in found]
    if pairs == [(r, n) for r in range(n)]:
        return info
    if pairs and all(p == (0, 1) for p in pairs):
        raise SlurmError(_rank0_of_1_advice(n, mpi) + f"\n--- job output\n{text.strip()}")
    raise SlurmError(f"the preflight job's {n} tasks reported (rank, size) {pairs}, not ranks 0..{n - 1} of {n}."
                     f"\n--- job output\n{text.strip()}")


def _job_root(job_dir=None) -> str:
    root = Path(job_dir or os.environ.get("PPU_LAB_SLURM_JOBS") or Path.home() / ".cache" / "ppu_lab" / "slurm")
    root.mkdir(parents=True, exist_ok=True)
    return str(root)
