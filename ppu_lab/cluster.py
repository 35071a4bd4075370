"""MPI engines for the notebooks: start, fail clearly, clean up (notebooks 00, 03, 04-07).

>>> from ppu_lab.cluster import MPICluster
>>> with MPICluster(n=2) as cl:               # doctest: +SKIP
...     cl.apply(lambda: __import__("mpi4py.MPI").MPI.COMM_WORLD.Get_rank())
[0, 1]

``MPICluster`` wraps ``ipyparallel.Cluster(engines="mpi")``: one controller bound to
127.0.0.1 and ``n`` engines started by ``mpiexec -n n``, so that the engines share one
``MPI.COMM_WORLD``. What it adds for a lab:

- ``ppu_lab.mpiexec.preflight(n)`` runs first and turns the usual failures into one clear message:
  no ``mpiexec``; an ``mpiexec`` from another MPI than the one mpi4py was built for
  (every process is rank 0 of 1); Open MPI as root; more engines than cores.
- Engines that do not register in time raise :class:`ClusterError` with their own output.
- ``cl.view`` and ``cl.apply`` are ordered by MPI rank, not by engine id.
- ``cl.restart()`` replaces hung engines (e.g. a mismatched collective) by fresh ones.
- ``stop()`` (and ``with``, and interpreter exit, and even a killed kernel, through a small
  watchdog process) leaves no ``mpiexec``, engine or controller process behind.

Every engine gets ``comm``, ``rank`` and ``size`` in its namespace, for ``%%px`` cells.

Backends: this class starts the engines on this machine with ``mpiexec``. A batch backend
subclasses it and overrides :meth:`_engine_launch` (which engine launcher class and keyword
arguments ipyparallel gets), :meth:`_preflight` and :meth:`_cleanup_commands`: engines in one
Slurm job are :class:`ppu_lab.slurm.SlurmMPICluster`.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
import warnings

from ppu_lab.mpiexec import (TRANSIENT_MPI_INIT_HINT, MPIStartError, OversubscribeWarning, preflight,
                             transient_mpi_init_failure, usable_cores)
from ppu_lab.procs import Watchdog, kill_tree

__all__ = ["MPICluster", "ClusterError", "OversubscribeWarning", "usable_cores"]


class ClusterError(MPIStartError):
    """The MPI cluster could not start, or stopped working; the message says what to do."""


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
    ip : address the controller listens on (default 127.0.0.1: nothing outside can connect).
    timeout : seconds to wait for all engines to register.
    mpiexec : path of ``mpiexec`` (default: see :func:`find_mpiexec`).
    engine_cmd : command that starts one engine (advanced; default ``python -m ipyparallel.engine``).
    """

    def __init__(
        self,
        n: int = 2,
        *,
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
        self.n, self.ip, self.timeout = n, ip, float(timeout)
        self.mpiexec, self.engine_cmd, self.log_level = mpiexec, engine_cmd, log_level
        self.info: dict | None = None
        self.cluster = None  # ipyparallel.Cluster
        self.client = None
        self.view = None
        self.ranks: list[int] = []
        self.engine_ids: list[int] = []  # engine id of rank 0, 1, ...
        self._pids: list[int] = []
        self._watchdog = Watchdog()
        self._profile_dir: str | None = None

    # -- hooks for other backends ------------------------------------------------------------
    def _preflight(self) -> dict:
        """Checks before anything starts (local: :func:`ppu_lab.mpiexec.preflight`), as ClusterError."""
        try:
            info = preflight(self.n, self.mpiexec, warn=False)
        except MPIStartError as exc:
            raise ClusterError(str(exc)) from None
        for msg in info["warnings"]:
            warnings.warn(msg, OversubscribeWarning if "oversubscribed" in msg else UserWarning, stacklevel=4)
        return info

    def _engine_launch(self) -> tuple[str, dict]:
        """(ipyparallel engine launcher name, keyword arguments for it)."""
        kw = {"mpi_cmd": [self.info["mpiexec"]], "mpi_args": list(self.info["mpi_args"]),
              "environment": dict(self.info["env"])}  # e.g. Open MPI's root variables, from preflight
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
        """Remember the launched process ids; (re)start the watchdog that stops them if we die."""
        pids = []
        if self.cluster.controller is not None and getattr(self.cluster.controller, "pid", None):
            pids.append(self.cluster.controller.pid)
        for es in self.cluster.engines.values():
            if getattr(es, "pid", None):
                pids.append(es.pid)
        self._pids = pids
        self._watchdog.watch(pids, self._cleanup_commands())

    def _cleanup_commands(self) -> list:
        """Commands the watchdog runs after stopping the processes (a batch backend: cancel its job)."""
        return []

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
        try:
            if self.client is not None:
                self.client.close()
        except Exception:  # noqa: BLE001
            pass
        # Engines stuck in a collective ignore polite shutdown requests: signal the whole process
        # tree ourselves (fast), then let ipyparallel tidy its bookkeeping.
        kill_tree(self._pids)
        try:
            self.cluster.stop_cluster_sync()
        except Exception:  # noqa: BLE001 - the processes are gone already
            pass
        self._watchdog.stop()
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
        return f"MPICluster(n={self.n}, {state})"

