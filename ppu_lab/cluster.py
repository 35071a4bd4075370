"""MPI engines for the notebooks: start, fail clearly, never hang, clean up (notebooks 00, 03, 04-07).

>>> from ppu_lab.cluster import MPICluster
>>> with MPICluster(n=2) as cl:               # doctest: +SKIP
...     cl.apply(lambda: (rank, size))
[(0, 2), (1, 2)]

``MPICluster`` wraps ``ipyparallel.Cluster(engines="mpi")``: one controller bound to 127.0.0.1 and
``n`` engines started by ``mpiexec -n n``, so that they share one ``MPI.COMM_WORLD``; each has
``comm``, ``rank`` and ``size`` in its namespace for ``%%px`` cells. What it adds for a lab:

- ``ppu_lab.mpiexec.preflight(n)`` first turns the usual failures into one clear message (no
  ``mpiexec``; one from another MPI than mpi4py's; Open MPI as root; more engines than cores).
- Engines that do not register, or do not get through ``MPI_Init``, in time raise
  :class:`ClusterError` with their own output and what to do.
- ``cl.view`` and ``cl.apply`` are ordered by MPI rank, not by engine id.
- Nothing waits forever: ``cl.apply`` gives up after ``timeout`` seconds (default
  ``MPICluster.call_timeout``) with :class:`ClusterTimeout`; new work (``cl.apply``, ``%%px`` cells,
  anything through ``cl.view``) is refused at once with :class:`EnginesBusy` while an engine is still
  busy with earlier work (:mod:`ppu_lab.waits`); Ctrl-C during a call prints the same **hang report**
  (``cl.hang_report()``: where every rank is, :mod:`ppu_lab.hangs`) and the way out, ``cl.restart()``.
- ``cl.restart()`` kills the engines, stuck ones too, and starts new ones under the same controller
  and client in a few seconds; ``cl.view`` and ``%%px`` then talk to the new engines.
- ``stop()`` (and ``with``, interpreter exit, even a killed kernel through a watchdog process)
  leaves no ``mpiexec``, engine or controller process behind.

Backends: a batch backend subclasses this class and overrides :meth:`_engine_launch` (launcher class
and its keyword arguments), :meth:`_preflight`, :meth:`_cleanup_commands`, :meth:`_stop_engines` and
:meth:`_stack_dir`: engines in one Slurm job are :class:`ppu_lab.slurm.SlurmMPICluster`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
import time
import warnings

from ppu_lab import hangs, waits
from ppu_lab.waits import ClusterError, ClusterTimeout, EnginesBusy
from ppu_lab.checks import real
from ppu_lab.mpiexec import (TRANSIENT_MPI_INIT_HINT, MPIStartError, OversubscribeWarning, preflight,
                             transient_mpi_init_failure, usable_cores)
from ppu_lab.procs import Watchdog, kill_tree

__all__ = ["MPICluster", "ClusterError", "ClusterTimeout", "EnginesBusy", "OversubscribeWarning", "usable_cores"]


# Running clusters, held strongly: one started without keeping a reference is still stopped at exit.
_live: "set[MPICluster]" = set()


@atexit.register
def _stop_all_at_exit() -> None:
    for cl in list(_live):
        try:
            cl.stop()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def _rank_info():  # runs on an engine
    from mpi4py import MPI

    c = MPI.COMM_WORLD
    return c.Get_rank(), c.Get_size()


def _is_nanny(proc) -> bool:
    try:
        return "ipyparallel.engine.nanny" in " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return False


def _engine_setup(stack_path):  # runs on an engine: the namespace of %%px cells, the hang-report hook
    from IPython import get_ipython
    from mpi4py import MPI

    from ppu_lab import hangs

    comm = MPI.COMM_WORLD
    get_ipython().user_ns.update(comm=comm, rank=comm.Get_rank(), size=comm.Get_size())
    return hangs.install(stack_path)


class MPICluster:
    """``n`` ipyparallel engines under one ``mpiexec``, with a client and a rank-ordered view.

    Parameters
    ----------
    n : number of engines (= MPI ranks).
    ip : address the controller listens on (default 127.0.0.1: nothing outside can connect).
    timeout : seconds to wait for all engines to register, and again for them to initialise MPI.
    call_timeout : seconds ``apply`` waits by default (class default ``MPICluster.call_timeout``).
    mpiexec : path of ``mpiexec`` (default: see :func:`find_mpiexec`).
    engine_cmd : command that starts one engine (advanced; default ``python -m ipyparallel.engine``).
    """

    call_timeout: float = 300.0  # seconds a blocking call may wait; per call: apply(..., timeout=)
    report_wait: float = 2.0  # seconds each engine has to say where it is (hang report, busy check)
    kill_grace: float = 0.1  # seconds between SIGTERM and SIGKILL when stopping engines
    # The controller completes an engine's registration at its next heartbeat or two: ipyparallel's
    # 3 s period made every start and restart wait about 6 s for that alone.
    heartbeat_ms: int = 250

    def __init__(self, n: int = 2, *, ip: str = "127.0.0.1", timeout: float = 60, call_timeout: float | None = None,
                 mpiexec: str | None = None, engine_cmd: list[str] | None = None, log_level: int = 40):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (number of MPI engines) must be an integer >= 1; got {n!r}")
        self.timeout = self._seconds("timeout (seconds to wait for engines)", timeout)
        if call_timeout is not None:
            self.call_timeout = self._seconds("call_timeout", call_timeout)
        self.n, self.ip = n, ip
        self.mpiexec, self.engine_cmd, self.log_level = mpiexec, engine_cmd, log_level
        self.info: dict | None = None
        self.cluster = self.client = self.view = None  # ipyparallel's Cluster, Client, (checked) DirectView
        self.ranks: list[int] = []
        self.engine_ids: list[int] = []  # engine id of rank 0, 1, ...
        self._engine_info: dict = {}  # rank -> what hangs.install returned there
        self._known: set = set()  # uuids of engines registered before the current ones were launched
        self._pids: list[int] = []
        self._watchdog = Watchdog()
        self._profile_dir: str | None = None

    @staticmethod
    def _seconds(name, value) -> float:
        value = real(name, value, " of seconds")
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds; got {value!r}")
        return value

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

    def _cleanup_commands(self) -> list:
        """Commands the watchdog runs after stopping the processes (a batch backend: cancel its job)."""
        return []

    def _stack_dir(self) -> str | None:
        """A folder the engines can write and this process can read (faulthandler stacks)."""
        return self._profile_dir

    def _stop_engines(self) -> None:
        """Kill the engines now (SIGKILL: stuck ones ignore anything else); keep controller and client.
        Their nannies (ipyparallel's watcher beside each engine) are spared for a moment: they see
        their engine die and tell the controller, which frees the engine ids for the new engines."""
        import psutil

        tree = []
        for pid in self._engine_pids():
            try:
                tree += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.Error:
                pass
        nannies = [p for p in tree if _is_nanny(p)]
        for p in tree:
            if p not in nannies:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        deadline = time.monotonic() + 1.0
        while nannies and set(self.engine_ids) & set(self.client.ids) and time.monotonic() < deadline:
            time.sleep(0.02)  # until the controller has let go of the old engines (or 1 s)
        kill_tree([p.pid for p in tree], grace=self.kill_grace)  # the nannies, and anything left
        for es_id in list(self.cluster.engines):
            self.cluster.stop_engines_sync(es_id)  # ipyparallel's bookkeeping; the processes are gone

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
        self._profile_dir = tempfile.mkdtemp(prefix="ppu-lab-ipp-")
        self.cluster = ipp.Cluster(
            engines=self._engine_launch()[0], n=self.n, controller_ip=self.ip, profile_dir=self._profile_dir,
            engine_timeout=int(self.timeout), log_level=self.log_level, shutdown_atexit=False,
            controller_args=[f"--HeartMonitor.period={self.heartbeat_ms}",  # misses: ipyparallel's 30 s, kept
                             f"--HeartMonitor.max_heartmonitor_misses={30_000 // self.heartbeat_ms}"],
        )
        _live.add(self)
        try:
            self.cluster.start_controller_sync()
            self._track()
            self.client = self.cluster.connect_client_sync()
            self._launch_engines()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch_engines(self) -> None:
        """Start ``n`` engines under the running controller; wait for them; rank-order and set them up."""
        self._known = set(self.client._engines.values())  # uuids: a new engine may get an old engine's id
        _, launch_kw = self._engine_launch()
        self.cluster.start_engines_sync(self.n, **launch_kw)
        self._track()
        self._wait_for_engines()
        self._order_by_rank()
        self._setup_engines()

    def _new_ids(self) -> list[int]:
        """Engines registered since the current ones were launched (restart: not the old ones)."""
        return sorted(eid for eid, uuid in dict(self.client._engines).items() if uuid not in self._known)

    def _engine_set(self):
        return next(iter(self.cluster.engines.values()), None) if self.cluster else None

    def _engine_pids(self) -> list[int]:
        pids = [getattr(es, "pid", None) for es in self.cluster.engines.values()] if self.cluster else []
        return [p for p in pids if isinstance(p, int) and p > 0]  # batch launchers have no local pid

    def _engine_output(self) -> str:
        es = self._engine_set()
        try:
            out = es.get_output() if es is not None else ""
        except Exception as exc:  # noqa: BLE001
            out = f"(could not read engine output: {exc!r})"
        return out.strip() or "(no output)"

    def _track(self) -> None:
        """Remember the launched process ids; (re)start the watchdog that stops them if we die."""
        controller = self.cluster.controller
        pids = [controller.pid] if controller is not None and getattr(controller, "pid", None) else []
        self._pids = pids + self._engine_pids()
        self._watchdog.watch(self._pids, self._cleanup_commands())

    def _wait_for_engines(self) -> None:
        waits.registration(self)

    def _rank_check(self, ids) -> list:
        """(rank, size) of each engine of ``ids``: their first MPI call (MPI_Init), with a deadline."""
        return waits.rank_check(self, ids, _rank_info)

    def _check_ranks(self, info) -> None:
        """The engines must be ranks 0..n-1 of one communicator of size n."""
        if sorted(info) != [(r, self.n) for r in range(self.n)]:
            raise ClusterError(f"The {self.n} engines are not one MPI job: they report (rank, size) {sorted(info)}. "
                               "mpiexec and mpi4py probably belong to different MPI libraries; run "
                               "ppu_lab.cluster.preflight() for details.")

    def _order_by_rank(self) -> None:
        ids = self._new_ids()
        info = self._rank_check(ids)
        self._check_ranks(info)
        by_rank = sorted(zip(info, ids))
        self.ranks = [r for (r, _), _ in by_rank]
        self.engine_ids = [eid for _, eid in by_rank]
        if self.view is None:
            self.view = waits.checked_view(self.client, self.engine_ids)
        else:  # restart: the same view (and so the same %%px magics) now talks to the new engines
            self.view.check = None
            self.view.targets = list(self.engine_ids)

    def _setup_engines(self) -> None:
        """``comm``, ``rank``, ``size`` in every engine's namespace; the hang-report hook."""
        folder = self._stack_dir()
        paths = [os.path.join(folder, f"stack-{id(self)}-e{e}.txt") if folder else None for e in self.engine_ids]
        ars = [self.client[e].apply_async(_engine_setup, p) for e, p in zip(self.engine_ids, paths)]
        self._engine_info = {r: waits.wait(self, ar, self.timeout, "the engines' set-up") for r, ar in zip(self.ranks, ars)}
        self.view.check = functools.partial(waits.check_idle, self)

    # -- calls ---------------------------------------------------------------------------------
    def apply(self, fn, *args, timeout: float | None = None, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every engine; return the results ordered by MPI rank.

        Waits at most ``timeout`` seconds (default ``self.call_timeout``), then raises
        :class:`ClusterTimeout` with the hang report. Raises :class:`EnginesBusy` at once, sending
        nothing, while an engine is still busy with earlier work. (``timeout`` is apply's own
        argument; to pass one to ``fn``, wrap it: ``functools.partial(fn, timeout=...)``.)
        """
        limit = self.call_timeout if timeout is None else self._seconds("timeout", timeout)
        self._require_running()
        what = f"cl.apply({getattr(fn, '__name__', 'fn')})"
        waits.check_idle(self, what)  # EnginesBusy: nothing is sent
        return self._wait(self.client[self.engine_ids].apply_async(fn, *args, **kwargs), limit, what)

    def _wait(self, ar, limit: float, what: str):
        """``ar``'s result within ``limit`` s (:func:`waits.wait`). A backend that can tell why engines
        stopped answering (the Slurm job ended) overrides it."""
        return waits.wait(self, ar, limit, what)

    def _require_running(self) -> None:
        if not self.running:
            raise ClusterError("the cluster is not running: call start() (or use `with MPICluster(...)`)")

    def hang_report(self, wait: float | None = None) -> hangs.HangReport:
        """Where every rank is now (``str()`` of the result is the text); answers within about
        ``wait`` seconds (default ``self.report_wait``) even when engines are stuck."""
        self._require_running()
        wait = self.report_wait if wait is None else self._seconds("wait", wait)
        return hangs.where(self.client, dict(zip(self.ranks, self.engine_ids)), wait, self._engine_info)

    # -- stop and restart ----------------------------------------------------------------------
    def stop(self) -> None:
        """Stop engines and controller; kill anything left. Safe to call twice."""
        if self.cluster is None:
            return
        try:
            if self.client is not None:
                self.client.close(linger=0)
        except Exception:  # noqa: BLE001
            pass
        # Engines stuck in a collective ignore polite shutdown requests: signal the whole process
        # tree ourselves (SIGKILL after kill_grace), then let ipyparallel tidy its bookkeeping.
        kill_tree(self._pids, grace=self.kill_grace)
        try:
            self.cluster.stop_cluster_sync()
        except Exception:  # noqa: BLE001 - the processes are gone already
            pass
        self._watchdog.stop()
        if self._profile_dir:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
        _live.discard(self)
        self.cluster = self.client = self.view = None
        self.ranks, self.engine_ids, self._pids, self._profile_dir, self._engine_info = [], [], [], None, {}

    def restart(self) -> "MPICluster":
        """Kill all engines (stuck ones too) and start new ones: the way out of a hung collective.

        The controller, the client and ``cl.view`` stay, so ``%%px`` cells talk to the new engines.
        If that fails (e.g. the controller died), everything is stopped and started again.
        """
        if not self.running:
            return self.start()
        try:
            self._stop_engines()
            self._launch_engines()
            return self
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                self.stop()
                raise
            warnings.warn(f"restart with the same controller failed ({type(exc).__name__}: {exc}); "
                          "starting everything again", RuntimeWarning, stacklevel=2)
        old_view = self.view
        self.stop()
        self.start()
        waits.move_magics(old_view, self.view)
        return self

    def __enter__(self) -> "MPICluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running, ranks {self.ranks}" if self.running else "stopped"
        return f"MPICluster(n={self.n}, {state})"

