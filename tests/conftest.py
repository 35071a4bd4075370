"""Shared test fixtures.

MPI tests do not run pytest under mpiexec: each one launches ``mpiexec -n N python
tests/mpi/<script>.py ...`` through the ``mpirun`` fixture, with a timeout, so that a
hung collective fails one test with the ranks' output instead of hanging the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppu_lab.mpiexec import find_mpiexec, mpiexec_command, transient_mpi_init_failure
from ppu_lab.procs import run as run_with_timeout

ROOT = Path(__file__).resolve().parents[1]
MPI_SCRIPTS = ROOT / "tests" / "mpi"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist-10k"


@pytest.fixture(scope="session")
def mpiexec() -> str:
    exe = find_mpiexec()
    if exe is None:
        pytest.fail("mpiexec not found: install the lab with `make test` (mpich wheel) or load an MPI module")
    return exe


@pytest.fixture
def mpirun(mpiexec):
    """Run ``tests/mpi/<script>`` (or ``-m module``) on n ranks; fail with all ranks' output on error."""

    def run(n: int, script: str, *args: str, timeout: float = 120, check: bool = True, env=None):
        target = ["-m", script[3:]] if script.startswith("-m ") else [str(MPI_SCRIPTS / script)]
        launch = mpiexec_command(n, sys.executable, *target, *map(str, args), mpiexec=mpiexec)
        cmd = launch.cmd
        full_env = launch.environ({**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            proc = run_with_timeout(cmd, timeout, env=full_env, cwd=ROOT)
            if proc.returncode != 0 and transient_mpi_init_failure(proc.stdout + proc.stderr):
                # MPICH/UCX start-up flake (see ppu_lab.mpiexec), not the code under test: once more.
                proc = run_with_timeout(cmd, timeout, env=full_env, cwd=ROOT)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{' '.join(cmd)} hung for {timeout}s (stopped with its process group)\n"
                        f"--- stdout\n{exc.output}\n--- stderr\n{exc.stderr}")
        if check and proc.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    return run


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Folder with MNIST IDX files: $PPU_LAB_DATA, else ../shared/data/mnist-10k."""
    env = os.environ.get("PPU_LAB_DATA")
    root = Path(env) if env else SHARED_MNIST
    if not (root / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"MNIST not found in {root}: set PPU_LAB_DATA or run `python -m ppu_lab.data fetch`")
    return root
