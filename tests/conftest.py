"""Shared test fixtures.

MPI tests do not run pytest under mpiexec: each one launches ``mpiexec -n N python
tests/mpi/<script>.py ...`` through the ``mpirun`` fixture, with a timeout, so that a
hung collective fails one test with the ranks' output instead of hanging the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ppu_lab.cluster import transient_mpi_init_failure

ROOT = Path(__file__).resolve().parents[1]
MPI_SCRIPTS = ROOT / "tests" / "mpi"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist-10k"


def find_mpiexec() -> str | None:
    """The venv's mpiexec (mpich wheel) if present, else the first on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    return shutil.which("mpiexec")


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
        cmd = [mpiexec, "-n", str(n), sys.executable, *target, *map(str, args)]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
            if proc.returncode != 0 and transient_mpi_init_failure(proc.stdout + proc.stderr):
                # MPICH/UCX start-up flake (see ppu_lab.cluster), not the code under test: once more.
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            pytest.fail(f"{' '.join(cmd)} hung for {timeout}s\n--- stdout\n{out}\n--- stderr\n{err}")
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
