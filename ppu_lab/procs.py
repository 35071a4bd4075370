"""Processes the lab starts, and how they are stopped: never waiting forever, never leaving any behind.

- ``run(cmd, timeout)``     like ``subprocess.run(capture_output=True)``, in a new session; on timeout
  (or Ctrl-C) the whole process group is stopped (SIGTERM, then SIGKILL) and
  ``subprocess.TimeoutExpired`` carries the output so far
- ``stream(cmd, timeout)``  the same, passing each output line on as it arrives; the deadline holds
  whether or not output arrives
- ``kill_tree(pids)``       stop processes with all their descendants and process groups, then remove
  the shared-memory segments the killed MPI ranks left in /dev/shm (``remove_orphan_shm``)
- ``Watchdog``              a small process that stops a set of processes (and runs clean-up
  commands such as ``scancel``) when this process dies, even by SIGKILL: used by every cluster
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

# Seconds between SIGTERM and SIGKILL.
GRACE = 3.0


# --------------------------------------------------------------------------- stopping
def _tree(pids) -> list:
    """psutil.Process objects for ``pids`` and all their descendants (those that still exist)."""
    import psutil

    out, seen = [], set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            for q in (p, *p.children(recursive=True)):
                if q.pid not in seen:
                    seen.add(q.pid)
                    out.append(q)
        except psutil.Error:
            pass
    return out


def kill_tree(pids, grace: float = GRACE) -> None:
    """Stop ``pids``, their descendants and the process groups they lead: SIGTERM, then SIGKILL after
    ``grace`` seconds for whatever is still running. Returns once all of them are gone (or after a
    second ``grace`` for processes that cannot be reaped, e.g. zombies of another parent)."""
    import psutil

    procs = _tree(pids)
    groups = set()
    for p in procs:
        try:
            if os.getpgid(p.pid) == p.pid and p.pid != os.getpgid(0):
                groups.add(p.pid)
        except OSError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in groups:
            try:
                os.killpg(g, sig)
            except OSError:
                pass
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=grace)
        if not procs:
            break
    remove_orphan_shm()


# MPI ranks on one node share memory through files in /dev/shm (MPICH: mpich_shm_*; Open MPI:
# sm_segment.*, vader_segment.*). MPI_Finalize removes them; a killed rank cannot, and every killed job
# (a restart, a stopped cluster, a timeout) left a few MB of memory behind until the next reboot:
# about 700 files, 1.4 GB, after a day of running this lab's tests.
SHM_DIR = "/dev/shm"
SHM_PREFIXES = ("mpich_shm_", "sm_segment.", "vader_segment.")


def remove_orphan_shm(min_age: float = 5.0) -> int:
    """Remove this user's MPI shared-memory files in /dev/shm that no process maps or holds open; how many.

    Files younger than ``min_age`` seconds are kept (a rank of a starting job may have created one a
    moment before mapping it). Where the processes' maps cannot be read, nothing is removed.
    """
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIXES)]
    except OSError:  # no /dev/shm (macOS)
        return 0
    now, uid, candidates = time.time(), os.getuid(), []
    for name in names:
        path = os.path.join(SHM_DIR, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_uid == uid and now - st.st_mtime >= min_age:
            candidates.append(path)
    in_use = _shm_in_use() if candidates else set()
    if in_use is None:
        return 0
    removed = 0
    for path in candidates:
        if path not in in_use:
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
    return removed


def _shm_in_use() -> set | None:
    """The /dev/shm paths that some process maps or holds open (None: /proc cannot tell)."""
    try:
        with open("/proc/self/maps") as f:
            f.read(1)
    except OSError:
        return None
    used = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                used.update(line[line.index(SHM_DIR):].removesuffix(" (deleted)").strip()
                            for line in f if SHM_DIR in line)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(SHM_DIR):
                    used.add(target)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return used


def _stop(proc: subprocess.Popen, grace: float = GRACE) -> None:
    """Stop a process started by ``run``/``stream`` and everything in its session."""
    kill_tree([proc.pid], grace)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------- running
def run(cmd, timeout: float, *, input: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` with a deadline; return a ``CompletedProcess`` with text ``stdout`` and ``stderr``.

    The command runs in its own session, so that on timeout or Ctrl-C its whole process group
    (an ``mpiexec`` and its ranks, say) is stopped, not just the first process. On timeout raises
    ``subprocess.TimeoutExpired`` whose ``output``/``stderr`` hold what was printed until then.
    """
    kwargs.setdefault("stdin", subprocess.DEVNULL if input is None else subprocess.PIPE)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    except BaseException:  # Ctrl-C: nothing may stay behind
        _stop(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stream(cmd, timeout: float | None, on_line=None, **kwargs) -> tuple[int, str]:
    """Run ``cmd`` (stderr merged into stdout) and call ``on_line(line)`` for each line as it arrives.

    Returns ``(returncode, output)``. The deadline holds whether or not the command prints: on
    timeout the process group is stopped and ``subprocess.TimeoutExpired`` carries the output.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, bufsize=1, start_new_session=True, **kwargs)
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True, name="ppu-lab-stream")
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    got = []
    try:
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise subprocess.TimeoutExpired(cmd, timeout, output="".join(got))
            try:
                line = lines.get(timeout=None if wait is None else min(wait, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            got.append(line)
            if on_line is not None:
                on_line(line)
        left = None if deadline is None else max(0.1, deadline - time.monotonic())
        proc.wait(timeout=left)
    except BaseException:  # timeout, Ctrl-C or an error in on_line: stop everything
        _stop(proc)
        raise
    finally:
        reader.join(timeout=1.0)
    return proc.returncode, "".join(got)


# --------------------------------------------------------------------------- the watchdog
_WATCHDOG = r"""
import json, os, subprocess, sys, time
import psutil
spec = json.loads(sys.argv[1])
parent = spec["parent"]
def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
while alive(parent):
    time.sleep(spec["poll"])
from ppu_lab.procs import kill_tree
kill_tree(spec["pids"])
for cmd in spec["commands"]:
    try:
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)
    except (OSError, subprocess.SubprocessError):
        pass
"""


class Watchdog:
    """Stops ``pids`` (with their descendants) and runs ``commands`` when this process dies.

    A separate process in its own session that checks every ``poll`` seconds whether its parent
    still lives: a kernel that is killed, even by SIGKILL, leaves no engines (and no Slurm job)
    behind. ``watch`` replaces what it watches; ``stop`` ends the watchdog (after a clean stop).
    """

    def __init__(self, poll: float = 1.0):
        self.poll = poll
        self._proc: subprocess.Popen | None = None

    def watch(self, pids=(), commands=()) -> "Watchdog":
        self.stop()
        spec = {"parent": os.getpid(), "pids": [int(p) for p in pids], "commands": [list(c) for c in commands],
                "poll": self.poll}
        self._proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, json.dumps(spec)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
