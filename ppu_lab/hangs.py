"""Where is each MPI rank? The hang report, and the check that keeps new work from queueing behind
a stuck engine (notebook 03, section 7; used by :class:`ppu_lab.cluster.MPICluster`).

A rank that waits in a collective which another rank never calls waits forever, and so does every
request queued behind it. The report says, for every rank, where its main thread is, reduced to
the lines that matter (cells, functions defined in the notebook, ``ppu_lab``)::

    rank 0: idle
    rank 1: in `comm.Barrier()` at line 9 of mismatched() (cell In[30])

How the engines answer, and why this way
----------------------------------------
Each engine runs ipykernel's *control thread* beside its main thread, and mpi4py releases the GIL
inside blocking MPI calls. So :func:`install` (run on every engine at start) registers a handler
for one more control-channel message type; the control thread answers it with the main thread's
stack (``sys._current_frames``), formatted by ``traceback`` on the engine, whose ``linecache``
knows the source of its ``%%px`` cells. This gives source lines and works on engines on other
machines (Slurm) through the same sockets as everything else.

When an engine does not answer within ``wait`` seconds (its main thread holds the GIL in C code
that never releases it, or its control thread is busy), a fallback asks ``faulthandler``, also
registered by :func:`install`: ipyparallel's nanny process sends the engine ``SIGUSR2`` (the
public ``Client.send_signal``) and the engine's C-level handler appends every thread's stack to a
file, which the client reads when it can (this machine, or a shared file system). That stack has
file and line but no source text, which the client fills in from its own ``linecache`` where it
can (functions defined in the notebook).

Private ipyparallel API used here (pinned by ``tests/test_cluster.py``): ``Client._send`` on
``Client._control_stream`` / ``Client._query_stream``, ``Client._engines`` (engine id -> uuid), and
ipykernel's ``Kernel.control_handlers``.
"""

from __future__ import annotations

import faulthandler
import io
import os
import re
import signal
import socket
import sys
import sysconfig
import threading
import time
import tokenize
import traceback
from dataclasses import dataclass, field

__all__ = ["Frame", "RankState", "HangReport", "install", "where", "explain", "parse_faulthandler", "RECOVER"]

REQUEST, REPLY = "ppu_lab_where_request", "ppu_lab_where_reply"
FAULT_SIGNAL = "SIGUSR2"
RECOVER = "cl.restart()"

_PKG = os.path.dirname(os.path.abspath(__file__))
_LIBS = tuple({os.path.realpath(p) + os.sep for k, p in sysconfig.get_paths().items()
               if k in ("stdlib", "platstdlib", "purelib", "platlib")})


# --------------------------------------------------------------------------- frames


def _is_library(filename: str) -> bool:
    """Frames a student never needs to see: the standard library, installed packages (ipyparallel,
    ipykernel, IPython, zmq, tornado, asyncio, threading ...), ``<string>`` and ``<frozen ...>`` code."""
    if filename.startswith("<"):
        return not filename.startswith("<ipython-input")
    path = os.path.realpath(filename)
    if path.startswith(_PKG + os.sep):
        return False
    return path.startswith(_LIBS) or f"{os.sep}site-packages{os.sep}" in path or f"{os.sep}dist-packages{os.sep}" in path


def _cell_label(filename: str, shell=None) -> str | None:
    """``"In[30]"`` when ``filename`` is a cell of this IPython (``shell``), else None."""
    try:
        shell = shell or _ipython()
        named = shell.compile.format_code_name(filename) if shell is not None else None
    except Exception:  # noqa: BLE001 - no IPython, or an older one
        return None
    return named[1] if named else None


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _code(line: str) -> str:
    """A source line without its comment: ``comm.Barrier()  # waits`` -> ``comm.Barrier()``."""
    line = (line or "").strip()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line).readline):
            if tok.type == tokenize.COMMENT:
                return line[: tok.start[1]].rstrip()
    except (tokenize.TokenError, SyntaxError):  # an unfinished line: keep it as it is
        pass
    return line


@dataclass
class Frame:
    """One line of user code on a rank's stack."""

    file: str
    line: int
    function: str
    code: str = ""
    cell: str | None = None  # "In[30]": a cell of this notebook; "%%px": a cell run on the engines

    def place(self) -> str:
        if self.cell == "%%px":
            return f"line {self.line} of the %%px cell" + ("" if self.function == "<module>" else f", in {self.function}()")
        where = f"line {self.line}" + ("" if self.function == "<module>" else f" of {self.function}()")
        if self.cell:
            return f"{where} (cell {self.cell})"
        parts = self.file.split(os.sep)
        short = os.sep.join(parts[parts.index("ppu_lab"):]) if "ppu_lab" in parts[:-1] else os.path.basename(self.file)
        return f"{where} ({short})"

    def __str__(self) -> str:
        return (f"in `{self.code}` at " if self.code else "at ") + self.place()


def _user_frames(frame, shell=None) -> list[dict]:
    """The stack above ``frame``, outermost first, without library frames, as plain dicts."""
    out = []
    for f in traceback.extract_stack(frame):
        if _is_library(f.filename):
            continue
        out.append({"file": f.filename, "line": f.lineno or 0, "function": f.name, "code": _code(f.line),
                    "cell": "%%px" if _cell_label(f.filename, shell) else None})
    return out


# --------------------------------------------------------------------------- on the engines

_stack_file = None  # kept open: faulthandler writes into it from a signal handler


def install(stack_path: str | None = None) -> dict:
    """On an engine: answer where-requests on the control thread; with ``stack_path``, also let
    ``SIGUSR2`` append every thread's stack to that file (faulthandler). Returns facts the client
    needs: pid, host, the main thread's id."""
    global _stack_file
    kernel = _ipython().kernel
    kernel.control_handlers[REQUEST] = _answer_where
    if stack_path:
        if _stack_file is not None:
            _stack_file.close()
        _stack_file = open(stack_path, "a")  # noqa: SIM115 - must stay open for the signal handler
        faulthandler.register(getattr(signal, FAULT_SIGNAL), file=_stack_file, all_threads=True, chain=False)
    return {"pid": os.getpid(), "host": socket.gethostname(), "main_thread": threading.main_thread().ident,
            "stack_path": stack_path}


def _answer_where(stream, idents, parent):
    """Control-thread handler: reply with the main thread's user frames."""
    shell = _ipython()
    try:
        frame = sys._current_frames().get(threading.main_thread().ident)
        content = {"status": "ok", "frames": [] if frame is None else _user_frames(frame, shell)}
    except Exception as exc:  # noqa: BLE001 - the reply says what went wrong
        content = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    shell.kernel.session.send(stream, REPLY, content=content, parent=parent, ident=idents)


# --------------------------------------------------------------------------- the report


@dataclass
class RankState:
    """Where one rank is: ``state`` is ``"idle"``, ``"busy"`` (``frames`` say where) or ``"no answer"``."""

    rank: int
    engine_id: int
    state: str
    frames: list[Frame] = field(default_factory=list)  # outermost first; the last is where it waits
    note: str = ""

    def __str__(self) -> str:
        if self.state != "busy":
            return f"rank {self.rank}: {self.note or self.state}"
        head = f"rank {self.rank}: {self.frames[-1]}" + (f" ({self.note})" if self.note else "")
        return "\n".join([head, *(f"        called from {f.place()}" for f in reversed(self.frames[-4:-1]))])


@dataclass
class HangReport:
    """Where every rank is (``cl.hang_report()``); ``str()`` gives the text, one rank per line."""

    ranks: list[RankState]

    @property
    def busy(self) -> list[int]:
        """Ranks that are running user code (or did not answer)."""
        return [r.rank for r in self.ranks if r.state != "idle"]

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.ranks) or "(no engines)"

    def _repr_pretty_(self, p, cycle):  # what a notebook shows for `cl.hang_report()`
        p.text(str(self))


def _frames(dicts, engine_pid=None) -> list[Frame]:
    """Frames from an engine, with what this process knows added: its own cells' names (functions
    defined in this notebook) and their source lines."""
    import linecache

    out = []
    for d in dicts:
        f = Frame(d["file"], int(d["line"]), d["function"], d.get("code") or "", d.get("cell"))
        if f.cell is None and engine_pid and f"ipykernel_{engine_pid}{os.sep}" in f.file:
            f.cell = "%%px"  # a cell compiled on that engine (faulthandler stacks carry no label)
        f.cell = f.cell or _cell_label(f.file)
        f.code = f.code or _code(linecache.getline(f.file, f.line))
        out.append(f)
    return out


def _state(rank: int, eid: int, content: dict | None, wait: float) -> RankState:
    if content is None:
        return RankState(rank, eid, "no answer", note=f"no answer within {wait:g} s (engine {eid})")
    if content.get("status") != "ok":
        return RankState(rank, eid, "no answer", note=f"could not read its stack: {content.get('error')}")
    frames = _frames(content["frames"])
    return RankState(rank, eid, "busy" if frames else "idle", frames)


def where(client, engines: dict, wait: float = 2.0, engine_info: dict | None = None) -> HangReport:
    """Ask every engine (``engines``: rank -> engine id) where its main thread is; answer within
    about ``wait`` seconds (``2 * wait`` when the faulthandler fallback runs). ``engine_info``:
    rank -> what :func:`install` returned there (for the fallback)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    futures = {}
    for rank, eid in engines.items():
        try:
            ident = client._engines[eid].encode()
            futures[rank] = client._send(client._control_stream, REQUEST, content={}, ident=ident)
        except (KeyError, OSError):  # engine unregistered, client closed
            futures[rank] = None
    deadline = time.monotonic() + wait
    states = {}
    for rank, fut in futures.items():
        content = None
        if fut is not None:
            try:
                content = fut.result(timeout=max(0.0, deadline - time.monotonic()))["content"]
            except (TimeoutError, FutureTimeout):
                pass
        states[rank] = _state(rank, engines[rank], content, wait)
    silent = [r for r, s in states.items() if s.state == "no answer"]
    if silent and engine_info:
        _ask_faulthandler(client, states, {r: engine_info[r] for r in silent if r in engine_info}, wait)
    return HangReport([states[r] for r in sorted(states)])


_FH_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-fA-F]+)", re.M)
_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.+)$')


def parse_faulthandler(text: str, thread_id: int) -> list[dict] | None:
    """The user frames (outermost first) of thread ``thread_id`` in a faulthandler dump, or None
    when the dump does not contain that thread (yet)."""
    heads = list(_FH_THREAD.finditer(text))
    for i, m in enumerate(heads):
        if int(m.group(1), 16) != thread_id:
            continue
        block = text[m.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        frames = [_FH_FRAME.match(ln) for ln in block.splitlines()]
        return [{"file": f.group(1), "line": int(f.group(2)), "function": f.group(3).strip()}
                for f in reversed([f for f in frames if f]) if not _is_library(f.group(1))]
    return None


def _ask_faulthandler(client, states: dict, info: dict, wait: float) -> None:
    """Fallback for ranks whose control thread did not answer: SIGUSR2 through ipyparallel's nanny,
    then read the stack that faulthandler appended to the rank's file (if this machine can)."""
    files = {r: i for r, i in info.items() if i.get("stack_path") and os.access(i["stack_path"], os.R_OK)}
    if not files:
        return
    start = {r: os.path.getsize(i["stack_path"]) for r, i in files.items()}
    try:
        client.send_signal(FAULT_SIGNAL, targets=[states[r].engine_id for r in files], block=False)
    except Exception:  # noqa: BLE001 - the report keeps "no answer"
        return
    deadline = time.monotonic() + wait
    while files and time.monotonic() < deadline:
        time.sleep(0.1)
        for r in list(files):
            with open(files[r]["stack_path"]) as fh:
                fh.seek(start[r])
                found = parse_faulthandler(fh.read(), files[r]["main_thread"])
            if found is not None:
                frames = _frames(found, engine_pid=files[r].get("pid"))
                note = "stack from faulthandler: the engine's Python did not answer"
                states[r] = RankState(r, states[r].engine_id, "busy" if frames else "idle", frames,
                                      note if frames else f"idle ({note})")
                del files[r]


def explain(what: str, report) -> str:
    """The message of a call that timed out, was refused or interrupted: what happened, where every
    rank is (``report``: a HangReport, or a string saying why there is none), and the way out."""
    text = "\n".join("  " + line for line in str(report).splitlines())
    return (f"{what}\nWhere each rank is:\n{text}\n"
            "A rank waiting in a collective (or a Recv) that another rank never calls waits forever, "
            "and so does everything sent after it. Stop the stuck engines and start new ones (all "
            f"variables on the engines are lost) with:\n    {RECOVER}")
