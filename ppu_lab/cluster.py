"""MPI engines for the notebooks: start, fail clearly, clean up (notebooks 00, 03, 04-07).

>>> from ppu_lab.cluster import MPICluster
>>> with MPICluster(n=2) as cl:               # doctest: +SKIP
...     cl.apply(lambda: __import__("mpi4py.MPI").MPI.COMM_WORLD.Get_rank())
[0, 1]

``MPICluster`` wraps ``ipyparallel.Cluster(engines="mpi")``: one controller bound to
127.0.0.1 and ``n`` engines started by ``mpiexec -n n``, so that the engines share one
``MPI.COMM_WORLD``. What it adds for a lab:

- ``preflight(n)`` runs first and turns the usual failures into one clear message:
  no ``mpiexec``; an ``mpiexec`` from another MPI than the one mpi4py was built for
  (every process is rank 0 of 1); Open MPI as root; more engines than cores.
- Engines that do not register in time raise :class:`ClusterError` with their own output.
- ``cl.view`` and ``cl.apply`` are ordered by MPI rank, not by engine id.
- ``cl.restart()`` replaces hung engines (e.g. a mismatched collective) by fresh ones.
- ``stop()`` (and ``with``, and interpreter exit, and even a killed kernel, through a small
  watchdog process) leaves no ``mpiexec``, engine or controller process behind.

Every engine gets ``comm``, ``rank`` and ``size`` in its namespace, for ``%%px`` cells.

Backends: ``launcher="local"`` (this machine, ``mpiexec``) is the only one here. A batch
backend (e.g. Slurm) subclasses :class:`MPICluster` and overrides :meth:`_engine_launch`
(which engine launcher class and keyword arguments ipyparallel gets) and, if it needs
other checks, :meth:`_preflight`; then registers itself in ``LAUNCHERS``.
``launcher="slurm"`` is :class:`ppu_lab.slurm.SlurmMPICluster` (engines in one Slurm job);
``MPICluster(n, launcher="slurm", partition=...)`` returns one.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

__all__ = ["MPICluster", "ClusterError", "OversubscribeWarning", "preflight", "find_mpiexec", "usable_cores",
           "LAUNCHERS"]

#: Known backends: name -> MPICluster subclass. Issue 6 may add "slurm".
LAUNCHERS: dict[str, type] = {}


# MPICH's UCX netmod sometimes fails in MPI_Init: a rank rejects a peer's address ("invalid
# bandwidth 0.00") and the job dies at start-up (pmodels/mpich#7417, also seen in mpi4py's CI).
# It is not our bug and a second start works; the OFI netmod avoids UCX altogether.
TRANSIENT_MPI_INIT_SIGNATURE = "UCX  ERROR failed to unpack address"
TRANSIENT_MPI_INIT_HINT = (
    "MPI start-up failed with a known intermittent MPICH/UCX error (pmodels/mpich#7417). "
    "It is not caused by your code; if it keeps happening, set MPIR_CVAR_CH4_NETMOD=ofi."
)


def transient_mpi_init_failure(output: str) -> bool:
    """True when ``output`` (a job's or engines' output) shows the known MPICH/UCX start-up failure."""
    return TRANSIENT_MPI_INIT_SIGNATURE in (output or "")


class ClusterError(RuntimeError):
    """The MPI cluster could not start, or stopped working; the message says what to do."""


class OversubscribeWarning(UserWarning):
    """More MPI processes than cores: it runs, but timings mean nothing."""


# --------------------------------------------------------------------------- preflight

_INSTALL_HINT = (
    "Install an MPI into this environment with `pip install mpich` (or `pip install -e '.[mpich]'` "
    "in the lab folder), or use a system MPI: `module load openmpi` (or mpich), put its bin folder "
    "on PATH, or set PPU_LAB_MPIEXEC=/path/to/mpiexec."
)

_RANK_PROBE = (
    "import os\n"
    "from mpi4py import MPI\n"
    "c = MPI.COMM_WORLD\n"
    "lib = ' '.join(MPI.Get_library_version().strip().splitlines()[0].split())\n"
    "os.write(1, f'PPU_RANK {c.Get_rank()} {c.Get_size()} {lib}\\n'.encode())\n"
)

_cache: dict = {}


def _python_bin_dir() -> Path:
    """The folder of this Python (a venv's bin); mpich's wheel puts mpiexec there."""
    return Path(sys.executable).parent


def find_mpiexec(mpiexec: str | os.PathLike | None = None) -> str | None:
    """The ``mpiexec`` to use, or None.

    Order: the argument; ``$PPU_LAB_MPIEXEC``; beside ``sys.executable`` (the venv's bin,
    where ``pip install mpich`` puts it); the first on ``PATH``.
    """
    explicit = mpiexec or os.environ.get("PPU_LAB_MPIEXEC")
    if explicit:
        path = shutil.which(str(explicit))
        return str(Path(path).resolve()) if path else None
    local = _python_bin_dir() / "mpiexec"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("mpiexec")
    return found


def _mpi_flavor(mpiexec: str) -> tuple[str, str]:
    """("MPICH" | "Open MPI" | "Intel MPI" | "unknown", first version line) of an mpiexec."""
    key = ("flavor", mpiexec)
    if key not in _cache:
        try:
            out = subprocess.run(
                [mpiexec, "--version"], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
            )
            text = out.stdout + out.stderr
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"({exc})"
        low = text.lower()
        if "open mpi" in low or "openrte" in low or "open-mpi" in low or "prte" in low:
            flavor = "Open MPI"
        elif "intel" in low:
            flavor = "Intel MPI"
        elif "hydra" in low or "mpich" in low:
            flavor = "MPICH"
        else:
            flavor = "unknown"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        first = next((ln for ln in lines if "version" in ln.lower()), lines[0] if lines else "")
        first = " ".join(first.split())
        _cache[key] = (flavor, first)
    return _cache[key]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


_cores = usable_cores


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _rank_check(mpiexec: str, mpi_args: tuple[str, ...], timeout: float) -> dict:
    """Run ``mpiexec -n 2 python -c <probe>``; return what each process says (cached)."""
    key = ("ranks", mpiexec, mpi_args, sys.executable)
    if key in _cache:
        return _cache[key]
    cmd = [mpiexec, "-n", "2", *mpi_args, sys.executable, "-c", _RANK_PROBE]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise ClusterError(
            f"`{' '.join(cmd[:3])} python -c <rank check>` did not finish in {timeout:.0f} s: mpiexec cannot "
            f"start MPI processes here.\n--- its output\n{out}"
        ) from None
    pairs, libs = [], set()
    for line in proc.stdout.splitlines():
        if line.startswith("PPU_RANK "):
            _, rank, size, lib = line.split(" ", 3)
            pairs.append((int(rank), int(size)))
            libs.add(lib)
    if proc.returncode != 0 or len(pairs) != 2:
        raise ClusterError(
            f"`{mpiexec} -n 2 {sys.executable} -c 'from mpi4py import MPI'` failed (exit {proc.returncode}). "
            "Check that mpi4py imports in this Python and that mpiexec works.\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    result = {"ranks": sorted(pairs), "mpi4py_library": sorted(libs)[0]}
    _cache[key] = result
    return result


def preflight(n: int = 2, mpiexec: str | None = None, *, check_ranks: bool = True, timeout: float = 60) -> dict:
    """Check that ``n`` MPI engines can start; return what was found, or raise :class:`ClusterError`.

    Cheap after the first call (results are cached per process). The returned dict has
    ``mpiexec``, ``mpi_flavor``, ``mpiexec_version``, ``mpi4py_library``, ``cores``, ``n``,
    ``mpi_args`` (extra mpiexec arguments, e.g. ``--oversubscribe``), ``env`` (variables set)
    and ``warnings`` (messages, also issued with :func:`warnings.warn`).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of MPI engines) must be an integer >= 1; got {n!r}")
    exe = find_mpiexec(mpiexec)
    if exe is None:
        where = f"{mpiexec!r} was not found" if mpiexec else (
            f"`mpiexec` is not on PATH and not beside this Python ({_python_bin_dir()})"
        )
        raise ClusterError(f"No MPI launcher: {where}. {_INSTALL_HINT}")
    flavor, version = _mpi_flavor(exe)
    cores = _cores()
    info = {
        "mpiexec": exe, "mpi_flavor": flavor, "mpiexec_version": version, "mpi4py_library": None,
        "cores": cores, "n": n, "mpi_args": [], "env": {}, "warnings": [],
    }
    if flavor == "Open MPI" and _is_root():
        for var in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
            os.environ[var] = "1"
            info["env"][var] = "1"
        info["warnings"].append(
            "Running as root: Open MPI refuses that by default, so OMPI_ALLOW_RUN_AS_ROOT=1 and "
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 were set for this process and its engines."
        )
    if flavor == "Open MPI" and n > cores:
        info["mpi_args"].append("--oversubscribe")
    if n > cores:
        info["warnings"].append(
            f"{n} engines on {cores} cores: the engines share cores (oversubscribed). It works, "
            "but timings and speedups measured this way are meaningless."
        )
    if check_ranks:
        probe_args = ("--oversubscribe",) if flavor == "Open MPI" and cores < 2 else ()
        ranks = _rank_check(exe, probe_args, timeout)
        info["mpi4py_library"] = ranks["mpi4py_library"]
        if ranks["ranks"] != [(0, 2), (1, 2)]:
            raise ClusterError(
                f"mpiexec and mpi4py belong to different MPI libraries: `{exe} -n 2` started 2 processes "
                f"but each one is {', '.join(f'rank {r} of {s}' for r, s in ranks['ranks'])} instead of "
                f"ranks 0 and 1 of 2. mpiexec is {flavor} ({version}); mpi4py uses "
                f"{ranks['mpi4py_library']}. Use the mpiexec that belongs to mpi4py's MPI (for the mpich "
                f"wheel: {_python_bin_dir() / 'mpiexec'}, or set PPU_LAB_MPIEXEC), or rebuild mpi4py "
                "against your MPI: `pip install --force-reinstall --no-binary mpi4py mpi4py`."
            )
    for msg in info["warnings"]:
        warnings.warn(msg, OversubscribeWarning if "oversubscribed" in msg else UserWarning, stacklevel=2)
    return info


# --------------------------------------------------------------------------- process cleanup

_WATCHDOG = r"""
import os, sys, time
import psutil
parent, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
while psutil.pid_exists(parent) and psutil.Process(parent).status() != psutil.STATUS_ZOMBIE:
    time.sleep(1.0)
procs = []
for pid in pids:
    try:
        p = psutil.Process(pid)
        procs += [p] + p.children(recursive=True)
    except psutil.Error:
        pass
for p in procs:
    try:
        p.terminate()
    except psutil.Error:
        pass
gone, alive = psutil.wait_procs(procs, timeout=3)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def _tree(pids) -> list:
    """psutil.Process objects for pids and all their descendants (that still exist)."""
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out += [p, *p.children(recursive=True)]
        except psutil.Error:
            pass
    return out


def _kill_all(procs, timeout: float = 3.0) -> None:
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)


# Running clusters, held strongly: one started without keeping a reference is still stopped at exit.
_live: "set[MPICluster]" = set()


@atexit.register
def _stop_all_at_exit() -> None:
    for cl in list(_live):
        try:
            cl.stop()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


# --------------------------------------------------------------------------- the cluster


def _rank_info():  # runs on an engine
    from mpi4py import MPI

    c = MPI.COMM_WORLD
    return c.Get_rank(), c.Get_size()


class MPICluster:
    """``n`` ipyparallel engines under one ``mpiexec``, with a client and a rank-ordered view.

    Parameters
    ----------
    n : number of engines (= MPI ranks).
    launcher : ``"local"`` (mpiexec on this machine). Other backends subclass this class.
    ip : address the controller listens on (default 127.0.0.1: nothing outside can connect).
    timeout : seconds to wait for all engines to register.
    mpiexec : path of ``mpiexec`` (default: see :func:`find_mpiexec`).
    engine_cmd : command that starts one engine (advanced; default ``python -m ipyparallel.engine``).
    """

    def __new__(cls, *args, launcher: str = "local", **kwargs):
        # MPICluster(n, launcher="slurm", partition=...) builds the registered backend's subclass.
        if cls is MPICluster and launcher == "slurm":
            import ppu_lab.slurm  # noqa: F401 - registers LAUNCHERS["slurm"]
        if cls is MPICluster and LAUNCHERS.get(launcher, MPICluster) is not MPICluster:
            cls = LAUNCHERS[launcher]
        return super().__new__(cls)

    def __init__(
        self,
        n: int = 2,
        *,
        launcher: str = "local",
        ip: str = "127.0.0.1",
        timeout: float = 60,
        mpiexec: str | None = None,
        engine_cmd: list[str] | None = None,
        log_level: int = 40,
    ):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (number of MPI engines) must be an integer >= 1; got {n!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout (seconds to wait for engines) must be > 0; got {timeout!r}")
        if launcher != "local" and type(self) is MPICluster:
            if launcher in LAUNCHERS:
                raise ValueError(f"launcher={launcher!r}: use {LAUNCHERS[launcher].__name__} for it")
            raise ValueError(f"launcher must be one of {['local', *LAUNCHERS]}; got {launcher!r}")
        self.n, self.launcher, self.ip, self.timeout = n, launcher, ip, float(timeout)
        self.mpiexec, self.engine_cmd, self.log_level = mpiexec, engine_cmd, log_level
        self.info: dict | None = None
        self.cluster = None  # ipyparallel.Cluster
        self.client = None
        self.view = None
        self.ranks: list[int] = []
        self.engine_ids: list[int] = []  # engine id of rank 0, 1, ...
        self._pids: list[int] = []
        self._watchdog: subprocess.Popen | None = None
        self._profile_dir: str | None = None

    # -- hooks for other backends ------------------------------------------------------------
    def _preflight(self) -> dict:
        """Checks before anything starts (local: :func:`preflight`)."""
        return preflight(self.n, self.mpiexec)

    def _engine_launch(self) -> tuple[str, dict]:
        """(ipyparallel engine launcher name, keyword arguments for it)."""
        kw = {"mpi_cmd": [self.info["mpiexec"]], "mpi_args": list(self.info["mpi_args"])}
        if self.engine_cmd is not None:
            kw["engine_cmd"] = list(self.engine_cmd)
        return "mpi", kw

    # -- life cycle ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def running(self) -> bool:
        return self.cluster is not None

    def start(self) -> "MPICluster":
        """Preflight, start the controller and ``n`` engines, wait for them, order them by rank.

        A start that dies of the known intermittent MPICH/UCX start-up failure
        (``transient_mpi_init_failure``) is retried once, with a warning.
        """
        try:
            return self._start()
        except ClusterError as exc:
            if not transient_mpi_init_failure(str(exc)):
                raise
            warnings.warn(f"{TRANSIENT_MPI_INIT_HINT} Retrying the start once.", RuntimeWarning, stacklevel=2)
            return self._start()

    def _start(self) -> "MPICluster":
        if self.running:
            return self
        import ipyparallel as ipp

        self.info = self._preflight()
        engines, launch_kw = self._engine_launch()
        self._profile_dir = tempfile.mkdtemp(prefix="ppu-lab-ipp-")
        self.cluster = ipp.Cluster(
            engines=engines, n=self.n, controller_ip=self.ip, profile_dir=self._profile_dir,
            engine_timeout=int(self.timeout), log_level=self.log_level, shutdown_atexit=False,
        )
        _live.add(self)
        try:
            self.cluster.start_controller_sync()
            self._track()
            self.cluster.start_engines_sync(self.n, **launch_kw)
            self._track()
            self.client = self.cluster.connect_client_sync()
            self._wait_for_engines()
            self._order_by_rank()
        except BaseException:
            self.stop()
            raise
        return self

    def _engine_set(self):
        return next(iter(self.cluster.engines.values()), None) if self.cluster else None

    def _engine_output(self) -> str:
        es = self._engine_set()
        try:
            out = es.get_output() if es is not None else ""
        except Exception as exc:  # noqa: BLE001
            out = f"(could not read engine output: {exc!r})"
        return out.strip() or "(no output)"

    def _track(self) -> None:
        """Remember the launched process ids; (re)start the watchdog that kills them if we die."""
        pids = []
        if self.cluster.controller is not None and getattr(self.cluster.controller, "pid", None):
            pids.append(self.cluster.controller.pid)
        for es in self.cluster.engines.values():
            if getattr(es, "pid", None):
                pids.append(es.pid)
        self._pids = pids
        self._stop_watchdog()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), *map(str, pids)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None

    @staticmethod
    def _exit_code(launcher):
        """Exit code of a launcher's process (mpiexec), or None while it runs."""
        popen = getattr(launcher, "_popen_process", None)
        if popen is not None:
            return popen.poll()
        if getattr(launcher, "state", "running") == "after":
            return (getattr(launcher, "stop_data", None) or {}).get("exit_code", "?")
        return None

    def _wait_for_engines(self) -> None:
        deadline = time.monotonic() + self.timeout
        es = self._engine_set()
        while len(self.client.ids) < self.n:
            code = self._exit_code(es)
            if code is not None:
                raise ClusterError(
                    f"The MPI engines exited before registering (mpiexec exit code {code}); "
                    f"{len(self.client.ids)} of {self.n} registered.\n"
                    f"--- engine output\n{self._engine_output()}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"Only {len(self.client.ids)} of {self.n} MPI engines registered within {self.timeout:.0f} s. "
                    "Engines may be slow on a loaded machine (raise timeout=) or failing.\n"
                    f"--- engine output\n{self._engine_output()}"
                )
            time.sleep(0.1)

    def _order_by_rank(self) -> None:
        ids = sorted(self.client.ids)
        try:
            info = self.client[ids].apply_sync(_rank_info)  # the engines' first MPI call: MPI_Init
        except Exception as exc:  # noqa: BLE001 - an engine that dies in MPI_Init: say so, with its output
            time.sleep(1)  # let the dying engines' last words reach their output
            raise ClusterError(
                f"An MPI engine failed while initialising MPI ({type(exc).__name__}: {exc}).\n"
                f"--- engine output\n{self._engine_output()}"
            ) from exc
        by_rank = sorted(zip(info, ids))
        ranks = [r for (r, _), _ in by_rank]
        sizes = {s for (_, s), _ in by_rank}
        if ranks != list(range(self.n)) or sizes != {self.n}:
            raise ClusterError(
                f"The {self.n} engines are not one MPI job: they report (rank, size) {sorted(info)}. "
                "mpiexec and mpi4py probably belong to different MPI libraries; run "
                "ppu_lab.cluster.preflight() for details."
            )
        self.ranks = ranks
        self.engine_ids = [eid for _, eid in by_rank]
        self.view = self.client[self.engine_ids]
        self.view.block = True
        self.view.execute(
            "from mpi4py import MPI\ncomm = MPI.COMM_WORLD\nrank = comm.Get_rank()\nsize = comm.Get_size()\n"
        )

    def apply(self, fn, *args, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every engine; return the results ordered by MPI rank."""
        if not self.running:
            raise ClusterError("the cluster is not running: call start() (or use `with MPICluster(...)`)")
        return self.view.apply_sync(fn, *args, **kwargs)

    def stop(self) -> None:
        """Stop engines and controller; kill anything left. Safe to call twice."""
        if self.cluster is None:
            return
        procs = _tree(self._pids)
        try:
            if self.client is not None:
                self.client.close()
        except Exception:  # noqa: BLE001
            pass
        # Engines stuck in a collective ignore polite shutdown requests: signal the whole process
        # tree ourselves (fast), then let ipyparallel tidy its bookkeeping.
        _kill_all(procs)
        try:
            self.cluster.stop_cluster_sync()
        except Exception:  # noqa: BLE001 - the processes are gone already
            pass
        self._stop_watchdog()
        if self._profile_dir:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
        _live.discard(self)
        self.cluster = self.client = self.view = None
        self.ranks, self.engine_ids, self._pids, self._profile_dir = [], [], [], None

    def restart(self) -> "MPICluster":
        """Replace all engines (and the controller) by fresh ones: the way out of a hung collective."""
        self.stop()
        return self.start()

    def __enter__(self) -> "MPICluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running, ranks {self.ranks}" if self.running else "stopped"
        return f"MPICluster(n={self.n}, launcher={self.launcher!r}, {state})"


LAUNCHERS["local"] = MPICluster
