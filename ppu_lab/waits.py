"""Every wait on the MPI engines has a deadline (used by :class:`ppu_lab.cluster.MPICluster`;
notebook 03, section 7): the errors a wait ends with, the start-up waits (engines registering,
getting through ``MPI_Init``), the deadline and Ctrl-C handling of calls, and the busy check.

ipyparallel queues each request behind the engine's current one. When that one never ends (a rank
waiting in a collective another rank never called), every later cell waits forever too, silently.
So ``cl.apply``, ``%%px`` cells and everything else sent through ``cl.view`` first ask the
controller (the hub, which answers even when engines are stuck) which engines still have
unfinished requests, and refuse with :class:`EnginesBusy` (the hang report, and ``cl.restart()``)
if any has.

Private ipyparallel API used here (pinned by ``tests/test_cluster.py``): ``Client._send`` on
``Client._query_stream``, ``Client._mux_stream``, and ``DirectView._really_apply``, the one method
every apply, push and pull goes through.
"""

from __future__ import annotations

import datetime as dt
import functools
import sys
import time

from ppu_lab import hangs
from ppu_lab.mpiexec import MPIStartError, transient_mpi_init_failure

__all__ = ["ClusterError", "ClusterTimeout", "EnginesBusy", "registration", "rank_check", "wait", "check_idle",
           "busy_engines", "checked_view", "move_magics"]


class ClusterError(MPIStartError):
    """The MPI cluster could not start, or stopped working; the message says what to do."""


class ClusterTimeout(ClusterError, TimeoutError):
    """A call got no answer in time; the message holds the hang report and ``cl.restart()``."""


class EnginesBusy(ClusterError):
    """New work refused: engines are still busy with earlier work (message: which, since when, where)."""


def _exit_code(launcher):
    """Exit code of a launcher's process (mpiexec), or None while it runs."""
    popen = getattr(launcher, "_popen_process", None)
    if popen is not None:
        return popen.poll()
    if getattr(launcher, "state", "running") == "after":
        return (getattr(launcher, "stop_data", None) or {}).get("exit_code", "?")
    return None


def registration(cl) -> None:
    """Until the ``cl.n`` new engines have registered: ClusterError when mpiexec exits first, or
    after ``cl.timeout`` seconds, with the engines' output."""
    deadline = time.monotonic() + cl.timeout
    es = cl._engine_set()
    while (got := len(cl._new_ids())) < cl.n:
        code = _exit_code(es)
        if code is not None:
            raise ClusterError(f"The MPI engines exited before registering (mpiexec exit code {code}); "
                               f"{got} of {cl.n} registered.\n--- engine output\n{cl._engine_output()}")
        if time.monotonic() > deadline:
            raise ClusterError(f"Only {got} of {cl.n} MPI engines registered within {cl.timeout:.0f} s. "
                               "Engines may be slow on a loaded machine (raise timeout=) or failing.\n"
                               f"--- engine output\n{cl._engine_output()}")
        time.sleep(0.05)


def rank_check(cl, ids, probe) -> list:
    """``probe()`` on each engine of ``ids`` (their first MPI call, so MPI_Init), within ``cl.timeout``."""
    ar = cl.client[ids].apply_async(probe)
    deadline = time.monotonic() + cl.timeout
    try:
        while not ar.ready() and time.monotonic() < deadline:
            ar.wait(min(2.0, max(0.0, deadline - time.monotonic())))
            if not ar.ready() and transient_mpi_init_failure(output := cl._engine_output()):
                raise ClusterError(f"The {cl.n} engines are stuck in MPI_Init after a known intermittent "
                                   f"start-up failure.\n--- engine output\n{output}")
        return ar.get(timeout=0)
    except TimeoutError:
        raise ClusterError(
            f"The {cl.n} engines registered but did not get through MPI_Init (their first MPI call) within "
            f"{cl.timeout:.0f} s. What to do: run `python -m ppu_lab.envcheck` (mpiexec and mpi4py must come "
            "from the same MPI); try `mpiexec -n 2 python -c \"from mpi4py import MPI\"` in a terminal; on a "
            f"loaded machine raise timeout=. Then start again.\n--- engine output\n{cl._engine_output()}") from None
    except ClusterError:
        raise
    except Exception as exc:  # noqa: BLE001 - an engine that dies in MPI_Init: say so, with its output
        time.sleep(1)  # let the dying engines' last words reach their output
        raise ClusterError(f"An MPI engine failed while initialising MPI ({type(exc).__name__}: {exc}).\n"
                           f"--- engine output\n{cl._engine_output()}") from exc


def explain(cl, what: str) -> str:
    """``what`` happened, then the hang report of cluster ``cl`` and the way out."""
    try:
        report = cl.hang_report()
    except Exception as exc:  # noqa: BLE001 - the message must still come out
        report = f"(no hang report: {type(exc).__name__}: {exc})"
    return hangs.explain(what, report)


def wait(cl, ar, limit: float, what: str):
    """``ar.get()`` within ``limit`` seconds. On timeout: ClusterTimeout with the hang report; on
    Ctrl-C (KeyboardInterrupt, the notebook's interrupt): print the report, then re-raise."""
    try:
        return ar.get(timeout=limit)
    except TimeoutError:
        if ar.ready():
            raise  # the function itself raised TimeoutError
        raise ClusterTimeout(explain(cl, f"{what} got no answer within {limit:g} s.")) from None
    except KeyboardInterrupt:
        print(explain(cl, f"Interrupted while waiting for {what}."), file=sys.stderr)
        raise


def check_idle(cl, what: str) -> None:
    """Raise EnginesBusy when an engine of ``cl`` still has earlier work: new work would queue behind it."""
    try:
        found = busy_engines(cl.client, cl.engine_ids, cl.report_wait)
    except TimeoutError as exc:
        raise ClusterTimeout(f"The ipyparallel controller does not answer ({exc}); recover with "
                             f"{hangs.RECOVER}") from None
    if found:
        ranks = [r for r, e in zip(cl.ranks, cl.engine_ids) if e in found]
        raise EnginesBusy(explain(cl, _refusal(what, ranks, list(found.values()))))


def busy_engines(client, engine_ids, timeout: float) -> dict:
    """Engine id -> when its oldest unfinished request was submitted (epoch seconds, None if
    unknown), for each engine of ``engine_ids`` that has one. Asks the controller (hub), which
    answers even when engines are stuck; raises ``TimeoutError`` when it does not answer in time.

    The hub learns that a request finished slightly after this client gets its reply, so requests
    this client already has the answer to are not counted.
    """
    from concurrent.futures import TimeoutError as FutureTimeout

    ids = [int(e) for e in engine_ids]
    fut = client._send(client._query_stream, "queue_request", content={"targets": ids, "verbose": True})
    try:
        content = fut.result(timeout=timeout)["content"]
    except FutureTimeout:
        raise TimeoutError(f"the controller did not answer within {timeout:g} s") from None
    if content.get("status") != "ok":
        raise RuntimeError(f"the controller could not list the engines' queues: {content}")
    done = set(client.history) - set(client.outstanding)
    busy = {}
    for eid in ids:
        pending = [m for m in content[str(eid)]["queue"] if m not in done]
        if pending:
            stamps = [client.metadata[m].get("submitted") for m in pending if m in client.metadata]
            stamps = [s.timestamp() for s in stamps if isinstance(s, dt.datetime)]
            busy[eid] = min(stamps) if stamps else None
    return busy


def _refusal(what: str, ranks, since: list) -> str:
    """First line of the EnginesBusy message: what was refused, which ranks are busy, since when."""
    known = [t for t in since if t is not None]
    when = (f" since {time.strftime('%H:%M:%S', time.localtime(min(known)))} "
            f"({time.time() - min(known):.0f} s ago)") if known else ""
    many = len(ranks) > 1
    return (f"Refused {what}: rank{'s' if many else ''} {', '.join(map(str, ranks))} {'are' if many else 'is'} "
            f"still busy with earlier work{when} (an interrupted or timed-out cell, or an apply_async); new "
            "work would wait behind it, so nothing was sent. If that work is only slow, wait for it (ar.get() "
            "on its AsyncResult) and try again.")


@functools.lru_cache(maxsize=None)
def _checked_view_class():
    from ipyparallel import DirectView

    class CheckedView(DirectView):
        """A DirectView that refuses new work (``%%px`` cells, apply, push ...) while an engine is
        still busy with earlier work. To queue work deliberately, use ``cl.client[cl.engine_ids]``."""

        check = None  # set by MPICluster: raises EnginesBusy

        def execute(self, code, *args, **kwargs):  # what %%px and %px call
            if self.check is not None:
                self.check("this %px cell (view.execute)")
            return super().execute(code, *args, **kwargs)

        def _really_apply(self, f, *args, **kwargs):  # apply, apply_async, push, pull, map ...
            if self.check is not None:
                self.check(f"view.apply({getattr(f, '__name__', f)})")
            return super()._really_apply(f, *args, **kwargs)

    return CheckedView


def checked_view(client, targets):
    """A DirectView on ``targets`` whose ``check(what)`` (None until set) runs before any new work."""
    view = _checked_view_class()(client=client, socket=client._mux_stream, targets=list(targets))
    view.block = True
    return view


def move_magics(old_view, new_view) -> None:
    """Point IPython's %px magics that used ``old_view`` at ``new_view`` (after a full restart)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    magics = ip.magics_manager.registry.get("ParallelMagics") if ip is not None else None
    if magics is not None and old_view is not None and getattr(magics, "view", None) is old_view:
        new_view.activate(getattr(magics, "suffix", ""))
