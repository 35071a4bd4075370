"""The check framework: a student's function against independent references, with feedback.

An exercise is declared once, in the checks module of its notebook (``nb01.py``)::

    BOOK = Notebook("01_serial_sgd_ridge")
    ex = BOOK.exercise("minibatch_gradient", points=2, hint="...")

    @ex.case("a batch of 50 of 1,000 rows")
    def _(fn):
        got = fn(w, X, y, lam, idx)                  # the student's function (wrapped, see below)
        return compare(got, reference, mistakes=[(variant, "you forgot ...")])

A case returns None when it passes, else a message. ``hidden=True`` cases run only when grading.
The notebook's check cell is ``check(minibatch_gradient)`` (``BOOK.check``): it shows a
:class:`Feedback` (passed, not attempted yet, or which case failed and a hint) and never raises.
The grader calls ``Exercise.grade`` (every case); the instructor edition's hidden-test cell calls
``BOOK.require``, which raises unless every case passes.

The student's function is wrapped: a ``NotImplementedError`` (the stub) ends the check as "not
attempted yet", any other exception as a failed case that names it. The whole check runs under a
time limit (SIGALRM, in the kernel's main thread), so an infinite loop or a hung collective ends as
"timed out" instead of blocking the notebook. Exercises that run on the MPI engines get their
results through :func:`on_engines`.
"""

from __future__ import annotations

import html
import os
import signal
import threading
import traceback
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CommSpy", "Exercise", "Feedback", "Notebook", "compare", "on_engines", "ranks_case", "NotAttempted"]

_LAB = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the ppu_lab package: not student code
PASSED, NOT_ATTEMPTED, FAILED, TIMED_OUT, MISSING = "passed", "not attempted yet", "failed", "timed out", "missing"


class NotAttempted(Exception):
    """The student's function is still the stub (it raised NotImplementedError)."""


class _Raised(Exception):
    """The student's function raised; ``args[0]`` says what and where."""


class _TimedOut(BaseException):
    """The check ran past its time limit (BaseException: student code cannot swallow it)."""


@dataclass
class Feedback:
    """The verdict on one exercise: what the check cell shows and what the grader records."""

    exercise: str
    status: str
    points: float
    max_points: float
    message: str = ""
    hint: str = ""
    cases: int = 0

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def text(self) -> str:
        mark = {PASSED: "PASS", NOT_ATTEMPTED: "TODO"}.get(self.status, "FAIL")
        lines = [f"[{mark}] {self.exercise}: {self.status} ({self.points:g}/{self.max_points:g} points)"]
        if self.message:
            lines.append(self.message)
        if self.hint and self.status in (FAILED, TIMED_OUT):
            lines.append(f"Hint: {self.hint}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        colour = {PASSED: "#2e7d32", NOT_ATTEMPTED: "#8a6d00"}.get(self.status, "#c62828")
        body = html.escape(self.text()).replace("\n", "<br>")
        return (f'<div class="ppu-lab-feedback" style="border-left:4px solid {colour};padding:4px 8px;'
                f'font-family:monospace;white-space:normal">{body}</div>')



# --------------------------------------------------------------------------- comparing results
def compare(got, expected, *, what="the result", rtol=1e-8, atol=0.0, mistakes=()) -> str | None:
    """None when ``got`` equals ``expected`` (an array) to ``rtol``; else what differs.

    ``mistakes`` is a list of ``(wrong_result, explanation)``: when ``got`` matches one of them the
    message names that mistake instead of just the size of the error.
    """
    expected = np.asarray(expected, dtype=float)
    if got is None:
        return f"{what} is None: does your function `return` its result?"
    try:
        arr = np.asarray(got, dtype=float)
    except (TypeError, ValueError):
        return f"{what} should be a numeric array of shape {expected.shape}; got {type(got).__name__}"
    for wrong, why in mistakes:
        wrong = np.asarray(wrong, dtype=float)
        differs = wrong.shape != expected.shape or not np.allclose(wrong, expected, rtol=rtol, atol=atol)
        if arr.shape == wrong.shape and differs and np.allclose(arr, wrong, rtol=rtol, atol=atol):
            return f"{what} is not right: {why}"
    if arr.shape != expected.shape:
        return f"{what} has shape {arr.shape}; it should have shape {expected.shape}"
    if not np.all(np.isfinite(arr)):
        return f"{what} contains NaN or inf"
    if np.allclose(arr, expected, rtol=rtol, atol=atol):
        return None
    scale = max(float(np.abs(expected).max()), 1e-300)
    return (f"{what} differs from the reference by up to {float(np.abs(arr - expected).max()) / scale:.1e} "
            f"(relative to its largest entry; allowed {rtol:.0e})")


# --------------------------------------------------------------------------- the student's code
def _where(exc: BaseException) -> str:
    """'line N of your cell' for the innermost frame that is not the lab's own code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_LAB)]
    if not frames:
        return ""
    f = frames[-1]
    return f" (in {f.name}, line {f.lineno}: `{(f.line or '').strip()}`)"


def student(fn):
    """Wrap the student's function: the stub becomes NotAttempted, other exceptions a failed case."""

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NotImplementedError:
            raise NotAttempted() from None
        except _TimedOut:
            raise
        except Exception as exc:  # noqa: BLE001 - any student error is feedback, not a traceback
            raise _Raised(f"your function raised {type(exc).__name__}: {exc}{_where(exc)}") from None

    call.__name__, call.__wrapped__ = getattr(fn, "__name__", "function"), fn
    return call


class _time_limit:
    """Raise _TimedOut in the main thread after ``seconds`` (no limit off the main thread)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")

    def _fire(self, signum, frame):
        raise _TimedOut()

    def __enter__(self):
        if self.armed:
            self.old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)
        return False


# --------------------------------------------------------------------------- exercises
@dataclass
class _Case:
    description: str
    run: object
    hidden: bool = False


@dataclass
class Exercise:
    """One graded exercise: its function's name, points, time limit, hint and cases.

    ``forbid``: names the student's function may not use (e.g. the lab's kernel that *is* the answer).
    ``engines``: True when the exercise runs on the MPI engines; a time-out there leaves them busy,
    so the feedback says to run ``cl.restart()`` and the grader restarts the notebook's kernel.
    ``needs``: names of the notebook's variables the check takes after the function (e.g. ``("cl",)``);
    ``by_name``: the function is defined on the engines (``%%px``) and checked by its name.
    """

    name: str
    notebook: str
    points: float = 1.0
    hint: str = ""
    time_limit: float = 20.0
    forbid: tuple = ()
    engines: bool = False
    needs: tuple = ()
    by_name: bool = False
    cases: list = field(default_factory=list)

    def case(self, description: str, hidden: bool = False):
        """Decorator: register ``run(fn, *needs) -> None | message`` as a case of this exercise."""

        def register(run):
            self.cases.append(_Case(description, run, hidden))
            return run

        return register

    @property
    def limit(self) -> float:
        """The time limit in seconds; ``$PPU_LAB_EXERCISE_TIMEOUT`` caps it (faster grading, tests)."""
        cap = os.environ.get("PPU_LAB_EXERCISE_TIMEOUT", "").strip()
        return min(self.time_limit, float(cap)) if cap else self.time_limit

    def _verdict(self, status, message="", cases=0) -> Feedback:
        pts = self.points if status == PASSED else 0.0
        return Feedback(self.name, status, pts, self.points, message, self.hint, cases)

    def grade(self, fn, *needs, full: bool = True, time_limit: float | None = None) -> Feedback:
        """Run the cases (all of them when ``full``) on the student's ``fn``; never raises."""
        if fn is None:
            return self._verdict(MISSING, f"`{self.name}` is not defined: run its cell (or restore it).")
        cases = [c for c in self.cases if full or not c.hidden]
        limit = self.limit if time_limit is None else time_limit
        done = 0
        try:
            with _time_limit(limit):
                for c in cases:
                    msg = c.run(fn if isinstance(fn, str) else student(fn), *needs)
                    if msg:
                        return self._verdict(FAILED, f"Case '{c.description}': {msg}", done)
                    done += 1
        except NotAttempted:
            return self._verdict(NOT_ATTEMPTED, f"Fill in `{self.name}` (where the stub raises "
                                                "NotImplementedError) and run its cell and this one again.")
        except _Raised as exc:
            return self._verdict(FAILED, f"Case '{cases[done].description}': {exc.args[0]}", done)
        except _TimedOut:
            after = (" The engines are still busy: `cl.restart()` gives fresh ones (then run the cells that set "
                     "them up again)." if self.engines else "")
            return self._verdict(TIMED_OUT, f"Case '{cases[done].description}' did not finish within {limit:g} "
                                            f"s: an infinite loop, or a collective that not every rank calls?{after}",
                                 done)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run says why, not with a traceback
            return self._verdict(FAILED, f"Case '{cases[done].description}': the check could not run "
                                         f"({type(exc).__name__}: {exc})", done)
        used = sorted(set(self.forbid) & set(getattr(getattr(fn, "__code__", None), "co_names", ())))
        if used:
            return self._verdict(FAILED, f"All cases pass, but the exercise asks you to write it without "
                                         f"{', '.join(used)}: that is the lab's own answer.", done)
        return self._verdict(PASSED, f"{done} case(s) checked against the lab's references.", done)


class Notebook:
    """The exercises of one notebook; ``check`` and ``require`` are what its cells call."""

    def __init__(self, notebook: str):
        self.notebook = notebook
        self.exercises: dict[str, Exercise] = {}

    def exercise(self, name: str, **kw) -> Exercise:
        ex = self.exercises[name] = Exercise(name, self.notebook, **kw)
        return ex

    def find(self, fn_or_name) -> Exercise:
        name = fn_or_name if isinstance(fn_or_name, str) else getattr(fn_or_name, "__name__", "?")
        if name not in self.exercises:
            raise KeyError(f"{self.notebook} has no exercise `{name}` (its exercises: {', '.join(self.exercises)}); "
                           "keep the function's name as the stub gives it")
        return self.exercises[name]

    def check(self, fn, *needs) -> Feedback:
        """The check cell: the visible cases, feedback shown in the notebook."""
        return self.find(fn).grade(fn, *needs, full=False)

    def require(self, fn, *needs) -> Feedback:
        """The hidden-test cell of the instructor edition: every case must pass, else AssertionError."""
        fb = self.find(fn).grade(fn, *needs, full=True)
        if not fb.passed:
            raise AssertionError(fb.text())
        return fb


# --------------------------------------------------------------------------- a communicator that watches
POINT_TO_POINT = ("Send", "Recv", "Sendrecv", "Isend", "Irecv", "send", "recv", "sendrecv", "isend", "irecv")


class CollectiveRefused(RuntimeError):
    """The student's code called a collective where the exercise is to build one from point-to-point calls."""


class CommSpy:
    """The communicator a check hands the student's function: every call is passed on and its name
    recorded (``calls``); point-to-point sends are counted (``messages``, ``bytes`` sent by this rank);
    with ``collectives=False`` any other MPI call (a collective) is refused."""

    def __init__(self, comm, collectives: bool = True):
        self._comm, self._collectives = comm, collectives
        self.messages, self.bytes, self.calls = 0, 0, []

    def Get_size(self):
        return self._comm.Get_size()

    def Get_rank(self):
        return self._comm.Get_rank()

    size, rank = property(Get_size), property(Get_rank)

    def _sent(self, buf):
        data = buf[0] if isinstance(buf, (list, tuple)) and buf and not np.isscalar(buf[0]) else buf
        self.messages += 1
        self.bytes += int(np.asarray(data).nbytes)

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if not callable(attr) or name.startswith(("Get_", "Is_")):
            return attr
        if name not in POINT_TO_POINT and name[:1].isupper() and not self._collectives:
            raise CollectiveRefused(f"comm.{name} is not allowed here: build it from point-to-point "
                                    f"calls only ({', '.join(POINT_TO_POINT[:5])})")

        def watched(*args, **kwargs):
            self.calls.append(name)
            if name in POINT_TO_POINT and (not name.lower().endswith("recv") or name.lower() == "sendrecv"):
                self._sent(args[0] if args else kwargs.get("sendbuf", kwargs.get("buf", kwargs.get("obj"))))
            return attr(*args, **kwargs)

        return watched


# --------------------------------------------------------------------------- MPI engines
def _on_rank(fn, args, comm_arg, via=None):  # runs on an engine
    from mpi4py import MPI

    try:
        if via is not None:
            return "ok", via(fn, *args)
        return "ok", fn(*args, MPI.COMM_WORLD) if comm_arg else fn(*args)
    except NotImplementedError:
        return "todo", ""
    except Exception as exc:  # noqa: BLE001 - reported back to the notebook
        return "raised", f"{type(exc).__name__}: {exc}"


def on_engines(cl, fn, *args, comm_arg: bool = False, via=None) -> list:
    """Run the student's ``fn(*args[, comm])`` on every engine; return the results in rank order.

    ``fn`` is a function, or the name of one defined on the engines (a ``%%px`` cell). A stub on
    any rank raises NotAttempted; an error on any rank a failed case that names the ranks.
    ``via``: a function of the checks module, run on every engine as ``via(fn, *args)`` instead
    (it builds the case's communicator and data there and calls the student's ``fn`` itself).
    """
    import ipyparallel as ipp

    if cl is None or not getattr(cl, "running", False):
        raise _Raised("this check runs on the MPI engines: start them first (the cell with `cl = MPICluster(...)`)")
    target = ipp.Reference(fn) if isinstance(fn, str) else getattr(fn, "__wrapped__", fn)  # the engines report
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", "function")
    try:
        out = cl.view.apply_async(_on_rank, target, args, comm_arg, via).get()
    except ipp.error.RemoteError as exc:
        if "NameError" in f"{exc.ename}":
            raise _Raised(f"`{name}` is not defined on the engines: run its %%px cell first") from None
        raise _Raised(f"the engines raised {exc}") from None
    if any(status == "todo" for status, _ in out):
        raise NotAttempted()
    bad = {r: v for r, (status, v) in enumerate(out) if status == "raised"}
    if bad:
        raise _Raised("; ".join(f"rank {r} raised {v}" for r, v in bad.items()))
    return [v for _, v in out]


def ranks_case(report, verdict, p, *args):
    """A case on the first ``p`` ranks of the engines (None: all of them): every rank runs
    ``report(fn, ranks, *args)`` (``via``), then ``verdict(reports, ranks, *args)`` gives the message.
    An argument that is a function gets the number of ranks (``lambda p: 2 * p + 1``)."""

    def run(name, cl):
        ranks = min(p or cl.size, cl.size)
        values = tuple(a(ranks) if callable(a) else a for a in args)
        return verdict(on_engines(cl, name, ranks, *values, via=report), ranks, *values)

    return run
