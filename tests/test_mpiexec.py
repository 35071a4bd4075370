"""ppu_lab.mpiexec: finding mpiexec, knowing its MPI, its command line, and the preflight checks."""

from __future__ import annotations

import os
import stat
import sys
import textwrap

import pytest

import ppu_lab.mpiexec as mpiexec
import ppu_lab.procs as procs
from ppu_lab.cluster import ClusterError, MPICluster
from ppu_lab.mpiexec import MPIStartError, OversubscribeWarning, mpiexec_command, preflight

# Every test here runs under each MPI of `make test` (marker mpi, tests/conftest.py).
pytestmark = pytest.mark.mpi


@pytest.fixture(autouse=True)
def fresh_cache():
    mpiexec._cache.clear()
    yield
    mpiexec._cache.clear()


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("flavor", ["MPICH", "Open MPI", "Intel MPI"])
@pytest.mark.parametrize("root", [False, True])
def test_command_adds_oversubscribe_only_for_open_mpi_beyond_the_cores_and_root_variables_only_as_root(
        tmp_path, monkeypatch, flavor, root):
    banner = {"MPICH": "HYDRA build details:\n    Version: 4.2.0", "Open MPI": "mpiexec (Open MPI) 5.0.3",
              "Intel MPI": "Intel(R) MPI Library for Linux* OS, Version 2021.10"}[flavor]
    fake = _fake_mpiexec(tmp_path, f'echo "{banner}"\n')
    monkeypatch.setattr(mpiexec, "is_root", lambda: root)
    for n, cores in ((2, 4), (4, 4), (5, 4)):
        launch = mpiexec_command(n, "python", "x.py", mpiexec=str(fake), cores=cores)
        assert launch.flavor == flavor
        settings = launch.cmd[3:-2]
        assert launch.cmd[:3] == [str(fake.resolve()), "-n", str(n)] and launch.cmd[-2:] == ["python", "x.py"]
        assert settings == (["--oversubscribe"] if flavor == "Open MPI" and n > cores else [])
        expect_env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        assert launch.env == (expect_env if flavor == "Open MPI" and root else {})
        assert len(launch.notes) == len(settings) + (1 if launch.env else 0)  # each setting says why


# What the real launchers and libraries print (mpiexec --version; MPI.Get_library_version()'s first line).
BANNERS = [
    ("HYDRA build details:\n    Version:                       5.0.2\n    Release Date: ...", "MPICH", "5.0.2"),
    ("MPICH Version:      5.0.2\nMPICH Release date: Fri Sep 25 2026", "MPICH", "5.0.2"),
    ("mpiexec (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/community/help/", "Open MPI", "5.0.11"),
    ("Open MPI v5.0.11, package: Open MPI user@localhost Distribution, ident: 5.0.11", "Open MPI", "5.0.11"),
    ("mpiexec (OpenRTE) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/", "Open MPI", "4.1.4"),
    ("Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, May 26, 2022", "Open MPI", "4.1.4"),
    ("Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619 (id: c2e19c2f3e)", "Intel MPI", "2021.10"),
    ("Intel(R) MPI Library 2021.10 for Linux* OS\n", "Intel MPI", "2021.10"),
    ("Intel(R) MPI Library 2019 Update 5 for Linux* OS\n", "Intel MPI", "2019 Update 5"),
    ("MVAPICH2 Version:     \t2.3.7\nMVAPICH2 Release date: Wed March 02 22:00:00 EST 2022", "MVAPICH", "2.3.7"),
    ("some-launcher 1.0\n", "unknown", "some-launcher 1.0"),
]


@pytest.mark.parametrize("text, name, version", BANNERS, ids=[f"{b[1]}-{i}" for i, b in enumerate(BANNERS)])
def test_mpi_name_reads_launchers_and_libraries(text, name, version):
    assert mpiexec.mpi_name(text) == (name, version)


def test_open_mpi_counts_physical_cores_so_hyperthreads_get_oversubscribe(tmp_path, monkeypatch):
    # 4 CPUs that are 2 cores with 2 hardware threads each: Open MPI gives 2 slots, not 4.
    for cpu, core in enumerate([0, 0, 1, 1]):
        topo = tmp_path / "sys" / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    monkeypatch.setattr(mpiexec, "_SYSFS_CPU", tmp_path / "sys")
    monkeypatch.setattr(mpiexec.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert mpiexec.open_mpi_slots() == 2 and mpiexec.usable_cores() == 4
    ompi = _fake_mpiexec(tmp_path, 'echo "mpiexec (Open MPI) 5.0.11"\n')
    assert "--oversubscribe" in mpiexec_command(3, "python", mpiexec=str(ompi)).cmd
    assert "--oversubscribe" not in mpiexec_command(2, "python", mpiexec=str(ompi)).cmd
    (tmp_path / "mpich").mkdir()
    mpich = _fake_mpiexec(tmp_path / "mpich", 'echo "HYDRA build details:"; echo "  Version: 5.0.2"\n')
    assert mpiexec_command(3, "python", mpiexec=str(mpich)).cmd[3:] == ["python"]


def test_command_without_mpiexec_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("PPU_LAB_MPIEXEC", raising=False)
    monkeypatch.setattr(mpiexec, "_python_bin_dir", lambda: tmp_path)
    with pytest.raises(MPIStartError, match="pip install mpich"):
        mpiexec_command(2, "python")


# ----------------------------------------------------------------------------- preflight


def _fake_mpiexec(folder, body):
    exe = folder / "mpiexec"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def test_preflight_names_the_missing_mpiexec(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("PPU_LAB_MPIEXEC", raising=False)
    monkeypatch.setattr(mpiexec, "_python_bin_dir", lambda: empty)
    with pytest.raises(MPIStartError, match=r"mpiexec` is not on PATH.*pip install mpich.*PPU_LAB_MPIEXEC"):
        preflight(2)
    with pytest.raises(ClusterError, match="No MPI launcher"):
        MPICluster(n=2).start()


def test_preflight_detects_mpiexec_of_another_mpi(tmp_path):
    # An mpiexec from another MPI library starts n unrelated singletons: each is rank 0 of 1.
    fake = _fake_mpiexec(tmp_path, textwrap.dedent("""\
        if [ "$1" = "--version" ]; then echo "mpiexec (OpenRTE) 4.1.2"; exit 0; fi
        n=$2; shift 2
        i=0; while [ $i -lt $n ]; do env -u PMI_RANK -u PMI_SIZE "$@" & i=$((i+1)); done; wait
    """))
    with pytest.raises(MPIStartError, match=r"(?s)different MPI libraries.*rank 0 of 1, rank 0 of 1.*Open MPI"):
        preflight(2, mpiexec=str(fake))


def test_preflight_names_both_mpis_when_mpiexec_belongs_to_the_other_one():
    """The real mismatch, both ways under `make test`: mpi4py on one MPI wheel, mpiexec from the other.
    MPICH's mpiexec starts Open MPI's mpi4py as singletons (rank 0 of 1 each); Open MPI's mpiexec makes
    MPICH stop in MPI_Init (it does not speak PMIx). Either way the message names both MPIs."""
    other = os.environ.get("PPU_LAB_OTHER_MPIEXEC")
    if not other:
        pytest.skip("needs PPU_LAB_OTHER_MPIEXEC, an mpiexec of another MPI than mpi4py's (make test sets it)")
    library, theirs = mpiexec.mpi4py_library(), mpiexec.mpi_flavor(other)
    assert library[0] != theirs[0] and "unknown" not in (library[0], theirs[0])
    with pytest.raises(MPIStartError) as err:
        preflight(2, mpiexec=other, warn=False)
    msg = str(err.value)
    assert "different MPI libraries" in msg
    assert f"mpiexec is {' '.join(theirs)}; mpi4py uses {' '.join(library)}" in msg
    if {library[0], theirs[0]} == {"MPICH", "Open MPI"}:  # the two wheels of make test
        assert ("rank 0 of 1, rank 0 of 1" in msg) == (theirs[0] == "MPICH")


def test_preflight_open_mpi_as_root_returns_allow_variables(tmp_path, monkeypatch):
    fake = _fake_mpiexec(tmp_path, 'echo "mpiexec (Open MPI) 5.0.3"\n')
    for var in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
        monkeypatch.setenv(var, "x")  # so that monkeypatch restores the original state afterwards
        monkeypatch.delenv(var)
    monkeypatch.setattr(mpiexec, "is_root", lambda: False)
    info = preflight(1, mpiexec=str(fake), check_ranks=False)
    assert info["env"] == {}
    monkeypatch.setattr(mpiexec, "is_root", lambda: True)
    with pytest.warns(UserWarning, match="root"):
        info = preflight(1, mpiexec=str(fake), check_ranks=False)
    assert info["mpi_flavor"] == "Open MPI"
    assert info["env"] == {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in os.environ  # returned, not set: the caller applies it


def test_preflight_warns_when_oversubscribed(tmp_path, monkeypatch):
    cores = mpiexec.usable_cores()
    info = preflight(cores, warn=False)  # real mpiexec (as root, Open MPI needs its root variables); rank check
    assert not [w for w in info["warnings"] if "oversubscribed" in w] and info["mpi4py_library"]
    with pytest.warns(OversubscribeWarning, match="meaningless"):
        info = preflight(cores + 1)
    assert info["n"] == cores + 1
    monkeypatch.setattr(mpiexec, "is_root", lambda: False)
    fake = _fake_mpiexec(tmp_path, 'echo "mpiexec (Open MPI) 5.0.3"\n')
    with pytest.warns(OversubscribeWarning):
        assert "--oversubscribe" in preflight(cores + 1, mpiexec=str(fake), check_ranks=False)["mpi_args"]


def test_preflight_is_cached(monkeypatch):
    first = preflight(2)

    def no_more_processes(*args, **kwargs):
        raise AssertionError(f"preflight started a process again: {args[0] if args else kwargs}")

    monkeypatch.setattr(mpiexec.subprocess, "run", no_more_processes)
    monkeypatch.setattr(procs.subprocess, "Popen", no_more_processes)
    assert preflight(2)["mpiexec"] == first["mpiexec"]




def test_slurm_job_line_uses_the_command_builder(tmp_path, monkeypatch):
    """`mpi="mpiexec"` in a Slurm batch script: Open MPI's root variables as root, never
    --oversubscribe (the job holds a slot per rank), and the plain line for MPICH."""
    from ppu_lab.slurm.scripts import launch_prefix

    ompi = _fake_mpiexec(tmp_path, 'echo "mpiexec (Open MPI) 5.0.3"\n')
    monkeypatch.setattr(mpiexec, "is_root", lambda: True)
    monkeypatch.setattr(mpiexec, "open_mpi_slots", lambda: 1)  # this machine's cores do not matter in a job
    line = launch_prefix(4, "mpiexec", mpiexec=str(ompi))
    assert line == f"env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 {ompi.resolve()} -n 4"
    monkeypatch.setattr(mpiexec, "is_root", lambda: False)
    mpiexec._cache.clear()
    assert launch_prefix(4, "mpiexec", mpiexec=str(ompi)) == f"{ompi.resolve()} -n 4"
    mpich = tmp_path / "mpich"
    mpich.mkdir()
    hydra = _fake_mpiexec(mpich, 'echo "HYDRA build details:"; echo "    Version: 4.2.0"\n')
    assert launch_prefix(3, "mpiexec", mpiexec=str(hydra)) == f"{hydra.resolve()} -n 3"


def test_a_killed_job_leaves_no_shared_memory_behind(tmp_path, monkeypatch):
    """Ranks killed in the middle of a job cannot run MPI_Finalize, which removes their shared-memory
    files in /dev/shm (a few MB of memory each, until a reboot): kill_tree removes them, and keeps those
    of a job that is still running."""
    import subprocess
    import time

    if not os.path.isdir(procs.SHM_DIR):
        pytest.skip("no /dev/shm here")
    monkeypatch.setattr(procs, "remove_orphan_shm", lambda real=procs.remove_orphan_shm: real(min_age=0))
    ready = tmp_path / "ready"
    code = ("import os, time\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\nc.Barrier()\n"
            f"open(r'{ready}' + str(c.rank), 'w').close()\ntime.sleep(120)\n")

    def start():
        for f in tmp_path.glob("ready*"):
            f.unlink()
        launch = mpiexec_command(2, sys.executable, "-c", code)
        job = subprocess.Popen(launch.cmd, env=launch.environ(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready*"))) < 2:
            assert job.poll() is None and time.monotonic() < deadline, "the 2-rank job did not start"
            time.sleep(0.1)
        return job

    def segments():
        return {n for n in os.listdir(procs.SHM_DIR) if n.startswith(procs.SHM_PREFIXES)}

    before = segments()
    running = start()
    try:
        mine = segments() - before
        killed = start()
        theirs = segments() - before - mine
        assert theirs, "the MPI ranks made no shared-memory file: nothing to check"
        procs.kill_tree([killed.pid], grace=0.5)
        left = segments()
        assert not (theirs & left), f"left in /dev/shm by the killed job: {sorted(theirs & left)}"
        assert mine <= left, "a running job's shared memory was removed"
    finally:
        procs.kill_tree([running.pid], grace=0.5)
    assert not (mine & segments())
