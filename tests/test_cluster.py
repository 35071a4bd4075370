"""ppu_lab.cluster: MPI engines start in rank order, fail with clear messages and leave nothing behind.

Each cluster start costs several seconds, so the tests that start one check several things.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import psutil
import pytest

import ppu_lab.procs as procs
import ppu_lab.mpiexec as mpiexec
from ppu_lab.cluster import ClusterError, ClusterTimeout, EnginesBusy, MPICluster, OversubscribeWarning

# Every test here runs under each MPI of `make test` (marker mpi, tests/conftest.py).
pytestmark = pytest.mark.mpi


@pytest.fixture(autouse=True)
def fresh_cache():
    mpiexec._cache.clear()
    yield
    mpiexec._cache.clear()


def _alive(pids):
    """The pids that still run (zombies count as gone)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _cluster_pids(cl):
    return [p.pid for p in procs._tree(cl._pids)]


def _by_cluster_id(cluster_id):
    """Processes whose command line names this ipyparallel cluster (mpiexec, engines, controller)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cluster_id in cmd and "pytest" not in cmd:
            found.append((p.pid, cmd[:120]))
    return found


def _rank_and_double(x):
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    return rank, 2 * x + rank


def _stuck_in_barrier():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() < 2:
        comm.Barrier()  # the last rank never calls it
    return "never"


def _hold_the_gil(seconds):
    import ctypes

    ctypes.PyDLL(None).sleep(seconds)  # C code that keeps the GIL: the control thread cannot answer


# Engines cannot import this test module: send these functions by value.
for _f in (_rank_and_double, _stuck_in_barrier, _hold_the_gil):
    _f.__module__ = "__main__"
_BARRIER_LINE = _stuck_in_barrier.__code__.co_firstlineno + 5  # the line of `comm.Barrier()`
_GIL_LINE = _hold_the_gil.__code__.co_firstlineno + 3


def test_ranks_ordered_and_nothing_left_after_exception():
    pids, cluster_id = [], None
    with pytest.raises(ZeroDivisionError):
        with MPICluster(n=2) as cl:
            cluster_id = cl.cluster.cluster_id
            pids = _cluster_pids(cl)
            assert cl.ranks == [0, 1] and cl.size == 2
            # the view is ordered by MPI rank: rank r is at position r
            assert cl.view.pull("rank") == [0, 1]
            assert cl.apply(_rank_and_double, 10) == [(0, 20), (1, 21)]
            # an engine-id-ordered view may differ; ours is built from the ranks
            assert [cl.client[e].apply_sync(_rank_and_double, 0)[0] for e in cl.engine_ids] == [0, 1]
            assert str(cl.hang_report()) == "rank 0: idle\nrank 1: idle"
            raise ZeroDivisionError("an error inside the with block")
    assert not cl.running
    assert len(pids) >= 4  # controller, mpiexec, 2 engines (+ proxies, nannies)
    assert _alive(pids) == []
    assert _by_cluster_id(cluster_id) == []


def _interrupt_main_after(seconds):
    """Send SIGINT (what the notebook's interrupt button does to the kernel) to this main thread."""
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.timeout(240)
def test_a_hang_is_reported_refused_interrupted_and_restarted(capsys):
    """3 engines: ranks 0 and 1 wait in a Barrier that rank 2 never calls. Nothing may hang."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OversubscribeWarning)  # 3 engines on a 2-core machine
        cl = MPICluster(n=3).start()
    cluster_id, controller, view = cl.cluster.cluster_id, cl.cluster.controller.pid, cl.view
    try:
        # An engine whose Python never lets go of the GIL cannot answer on its control thread:
        # faulthandler (SIGUSR2 through ipyparallel's nanny) still says where it is.
        ar = cl.view.apply_async(_hold_the_gil, 6)
        time.sleep(0.5)
        report = cl.hang_report(wait=1)
        assert [r.state for r in report.ranks] == ["busy"] * 3, str(report)
        assert f"in `ctypes.PyDLL(None).sleep(seconds)` at line {_GIL_LINE} of _hold_the_gil()" in str(report)
        assert "faulthandler" in report.ranks[0].note
        ar.get(timeout=30)

        # The hung call times out with the hang report: the stuck ranks, their call, the idle rank.
        with pytest.raises(ClusterTimeout) as info:
            cl.apply(_stuck_in_barrier, timeout=2)
        text = str(info.value)
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, ClusterError)
        for rank in (0, 1):
            assert f"rank {rank}: in `comm.Barrier()` at line {_BARRIER_LINE} of _stuck_in_barrier() (test_cluster.py)" in text
        assert "rank 2: idle" in text and "cl.restart()" in text

        # The next calls are refused at once (nothing queued behind the stuck ranks), saying why.
        busy = r"(?s)ranks 0, 1 are still busy with earlier work since .*rank 2: idle.*cl\.restart\(\)"
        with pytest.raises(EnginesBusy, match=busy):
            cl.apply(_rank_and_double, 1)
        with pytest.raises(EnginesBusy, match=r"(?s)%px cell.*cl\.restart"):  # what %%px calls
            cl.view.execute("x = 1")
        with pytest.raises(EnginesBusy):
            cl.view.push({"x": 1})
        report = cl.hang_report()
        assert report.busy == [0, 1] and report.ranks[2].state == "idle"
        assert report.ranks[1].frames[-1].code == "comm.Barrier()"

        # restart kills the stuck engines and starts new ones under the same controller and view.
        old = [p.pid for p in procs._tree(cl._engine_pids())]  # mpiexec, engines, nannies
        assert len(old) >= 7
        cl.restart()
        assert _alive(old) == []
        assert cl.cluster.controller.pid == controller and cl.view is view
        assert cl.apply(_rank_and_double, 1) == [(0, 2), (1, 3), (2, 4)]
        assert cl.view.pull("rank") == [0, 1, 2]  # the new engines are set up like the first ones

        # Ctrl-C (the notebook's interrupt) during a blocking call prints the report, then raises.
        capsys.readouterr()
        timer = _interrupt_main_after(1.5)
        with pytest.raises(KeyboardInterrupt):
            cl.apply(_stuck_in_barrier, timeout=60)
        timer.join()
        err = capsys.readouterr().err
        assert "Interrupted while waiting for cl.apply(_stuck_in_barrier)" in err
        assert "rank 1: in `comm.Barrier()`" in err and "rank 2: idle" in err and "cl.restart()" in err
        cl.restart()
        assert cl.apply(_rank_and_double, 2) == [(0, 4), (1, 5), (2, 6)]
        after = _cluster_pids(cl)
    finally:
        cl.stop()
    cl.stop()  # idempotent
    assert _alive(after) == [] and _by_cluster_id(cluster_id) == []
    with pytest.raises(ClusterError, match="not running"):
        cl.apply(_rank_and_double, 1)


def test_killed_parent_leaves_nothing(tmp_path):
    """A notebook kernel killed with SIGKILL runs no atexit: the watchdog cleans up."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        import ppu_lab.cluster as cluster
        import ppu_lab.procs as procs
        cl = cluster.MPICluster(n=2).start()
        print("PIDS", *[p.pid for p in procs._tree(cl._pids)], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PIDS")), None)
    assert line, f"cluster did not start:\n{proc.stdout}\n{proc.stderr}"
    pids = [int(p) for p in line.split()[1:]]
    deadline = time.monotonic() + 15
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(pids) == []


def test_engines_that_never_register_time_out_with_their_output():
    stuck = [sys.executable, "-c", "import time; print('ENGINE-STUCK-HERE', flush=True); time.sleep(120)"]
    cl = MPICluster(n=2, timeout=4, engine_cmd=stuck)
    with pytest.raises(ClusterError, match=r"(?s)0 of 2 MPI engines registered within 4 s.*ENGINE-STUCK-HERE"):
        cl.start()
    assert not cl.running


# An engine that registers, then never gets through its first MPI call (MPI_Init): mpi4py's MPI
# module replaced by one whose COMM_WORLD never comes, and the engine started without --mpi.
_MPI_INIT_NEVER_RETURNS = """
import sys, time, types
class Stuck(types.ModuleType):
    def __getattr__(self, name):
        if name == "COMM_WORLD":
            time.sleep(600)
        raise AttributeError(name)
import mpi4py
sys.modules["mpi4py.MPI"] = Stuck("mpi4py.MPI")
sys.argv.remove("--mpi")
from ipyparallel.engine.app import main
main()
"""


@pytest.mark.timeout(60)
def test_engines_stuck_in_mpi_init_time_out_with_advice():
    cl = MPICluster(n=2, timeout=8, engine_cmd=[sys.executable, "-c", _MPI_INIT_NEVER_RETURNS])
    with pytest.raises(ClusterError, match=r"registered but did not get through MPI_Init .* within 8 s\. What to do"):
        cl.start()
    assert not cl.running


@pytest.mark.timeout(45)  # reported when mpiexec exits, not after the 60 s timeout
def test_engines_that_crash_report_their_output():
    crash = [sys.executable, "-c", "import sys; print('ENGINE-CRASHED: bad flag', flush=True); sys.exit(3)"]
    cl = MPICluster(n=2, timeout=60, engine_cmd=crash)
    with pytest.raises(ClusterError, match=r"(?s)exited before registering.*ENGINE-CRASHED"):
        cl.start()


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="n .number of MPI engines"):
        MPICluster(n=0)
    with pytest.raises(TypeError, match="launcher"):  # engines in a Slurm job: ppu_lab.slurm.SlurmMPICluster
        MPICluster(n=2, launcher="slurm")
    with pytest.raises(ValueError, match="timeout"):
        MPICluster(n=2, timeout=0)
    with pytest.raises(ValueError, match="call_timeout"):
        MPICluster(n=2, call_timeout=-1)
    with pytest.raises(ValueError, match="timeout must be > 0"):  # checked before anything is sent
        MPICluster(n=2).apply(_rank_and_double, 1, timeout=0)
    with pytest.raises(ClusterError, match="not running"):
        MPICluster(n=2).hang_report()


# ----------------------------------------------------------------------------- envcheck (notebook 00)


def test_envcheck_reports_what_to_fix(tmp_path, monkeypatch):
    import io

    from ppu_lab import data, envcheck

    for name in data.FILES:  # presence is what envcheck checks
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    items = envcheck.check()
    names = [i.name for i in items]
    assert names[:2] == ["python", "numpy"] and "mpiexec" in names and names[-1] == "MNIST"
    assert all(i.ok for i in items), [i for i in items if not i.ok]
    mpi = next(i for i in items if i.name == "mpi4py's MPI library")
    assert "ranks 0 and 1 of 2" in mpi.value

    # now break two things: no MNIST, no mpiexec
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mpiexec, "_python_bin_dir", lambda: tmp_path)
    out = io.StringIO()
    assert envcheck.report(file=out) is False
    text = out.getvalue()
    assert "FIX  mpiexec" in text and "pip install mpich" in text
    assert "FIX  MNIST" in text and "python -m ppu_lab.data fetch" in text
    assert "2 thing(s) to fix" in text


def test_envcheck_names_a_missing_package(monkeypatch):
    from ppu_lab import envcheck

    item = envcheck.check_package("surely_not_a_package_xyz", "1.0", "pip install xyz")
    assert not item.ok and "missing" in item.value and "pip install xyz" in item.fix
    old = envcheck.check_package("numpy", "999.0", "pip install 'numpy>=999'")
    assert not old.ok and "needs >= 999.0" in old.fix


def test_start_retries_once_after_the_known_mpich_ucx_startup_failure(monkeypatch):
    calls = []

    def flaky_start(self):
        calls.append(1)
        if len(calls) == 1:
            raise ClusterError("The MPI engines exited before registering\n--- engine output\n"
                               "[vm:387:0] address.c:985  UCX  ERROR failed to unpack address, invalid bandwidth 0.00")
        return self

    monkeypatch.setattr(MPICluster, "_start", flaky_start)
    cl = MPICluster(n=2)
    with pytest.warns(RuntimeWarning, match="pmodels/mpich#7417"):
        assert cl.start() is cl
    assert len(calls) == 2


def test_start_does_not_retry_other_failures(monkeypatch):
    calls = []

    def broken_start(self):
        calls.append(1)
        raise ClusterError("Only 1 of 2 MPI engines registered within 60 s.")

    monkeypatch.setattr(MPICluster, "_start", broken_start)
    with pytest.raises(ClusterError, match="Only 1 of 2"):
        MPICluster(n=2).start()
    assert len(calls) == 1
