"""The grader: every student notebook in a fresh kernel, each exercise with a time limit (``make grade``).

Layout: ``SUBMISSIONS/<student>/<NN_name>.ipynb`` (the file names of the student edition). For each
notebook the grader starts a fresh kernel (nbclient; the kernel in its own session) and runs the
cells in order. At each check cell (tag ``check``) it runs, instead of the student's cell, its own
grading call: every case of that exercise (the hidden ones too) on the function the student's cells
defined, under the exercise's time limit, printing a JSON verdict marked with a random token. When
a cell does not finish in its time (an infinite loop, a hung collective), or an exercise on the MPI
engines timed out, the grader kills the kernel's whole process tree (engines, mpiexec, controller),
starts a fresh kernel, replays the cells run so far (skipping the one that hung) and goes on. After
each notebook nothing it started is left running. It writes ``grades.csv`` (student, notebook,
exercise, points, max, status, feedback) and ``feedback/<student>.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ppu_lab.exercises import book
from ppu_lab.exercises.core import TIMED_OUT, Feedback
from ppu_lab.exercises.edition import CHECK, HIDDEN, SOLUTION, tags
from ppu_lab.procs import kill_tree

CELL_TIMEOUT = 300.0        # seconds for a cell that is not part of an exercise
MAX_RESTARTS = 6            # kernels per notebook
CHECK_CALL = re.compile(r"""\b(?:check|require)\(\s*["']?(\w+)""")


def backstop(limit: float) -> float:
    """Seconds before the grader kills a kernel whose check has not returned: the check's own limit
    (its alarm in the kernel) plus as much again, at least 5 and at most 15 s."""
    return limit + max(5.0, min(15.0, limit))


def report(token, notebook, name, namespace) -> None:
    """Runs in the student's kernel: grade one exercise, print the verdict as one marked JSON line."""
    ex = book(notebook).exercises[name]
    fn = name if ex.by_name else namespace.get(name)
    fb = ex.grade(fn, *[namespace.get(n) for n in ex.needs], full=True)
    print(token + json.dumps(dataclasses.asdict(fb)), flush=True)


class _Restart(Exception):
    """The kernel must be replaced (a cell hung, or engines are stuck)."""


@dataclass
class _Run:
    """The state of grading one notebook across kernel restarts."""

    path: Path
    nb: object
    exercises: dict
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    verdicts: dict = field(default_factory=dict)   # exercise name -> Feedback
    replay: list = field(default_factory=list)     # cells run so far, to rerun in a fresh kernel
    skipped: set = field(default_factory=set)      # cells that hung: never run again
    notes: list = field(default_factory=list)
    restarts: int = 0


def _plan(nb, exercises) -> list:
    """[(cell index, exercise name or None)]: which cells to run, and where to grade which exercise."""
    plan, seen = [], set()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or HIDDEN in tags(cell):
            continue
        if CHECK in tags(cell):
            m = CHECK_CALL.search(cell.source)
            if m and m.group(1) in exercises and m.group(1) not in seen:
                plan.append((i, m.group(1)))
                seen.add(m.group(1))
            continue
        plan.append((i, None))
    return plan + [(None, n) for n in exercises if n not in seen]   # check cell deleted: grade at the end


def _kernel_tree(client) -> list:
    import psutil

    proc = getattr(getattr(client.km, "provisioner", None), "process", None) if client.km else None
    if proc is None:
        return []
    try:
        return [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        return [proc.pid]


def _stop_kernel(client) -> None:
    """Kill the kernel and everything it started (engines, mpiexec, controller, watchdogs)."""
    pids = _kernel_tree(client)
    kill_tree(pids, grace=2.0)
    try:
        client._cleanup_kernel()
    except Exception:  # noqa: BLE001 - the processes are gone already
        pass
    client.km = client.kc = None


def _execute(client, cell, index, timeout) -> None:
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    client.timeout = int(max(1, timeout))
    try:
        client.execute_cell(cell, index)
    except (CellTimeoutError, DeadKernelError, TimeoutError) as exc:
        raise _Restart(f"cell {index} hung ({type(exc).__name__})") from None


def _grade_cell(run, client, name) -> None:
    import nbformat

    ex = run.exercises[name]
    cell = nbformat.v4.new_code_cell(
        f"from ppu_lab.exercises.grading import report as _ppu_report\n"
        f"_ppu_report({run.token!r}, {ex.notebook!r}, {name!r}, globals())")
    try:
        _execute(client, cell, 0, backstop(ex.limit))
    except _Restart:
        run.verdicts[name] = ex._verdict(TIMED_OUT, f"did not finish within {backstop(ex.limit):g} s: "
                                                    "an infinite loop, or a collective that not every rank calls?")
        raise _Restart(f"the check of {name} hung past its time limit") from None
    text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
    rows = [ln[len(run.token):] for ln in text.splitlines() if ln.startswith(run.token)]
    if rows:
        run.verdicts[name] = fb = Feedback(**json.loads(rows[-1]))
        if ex.engines and fb.status == TIMED_OUT:
            raise _Restart(f"{name} left the MPI engines stuck")
    else:
        errors = [f"{o['ename']}: {o['evalue']}" for o in cell.outputs if o.get("output_type") == "error"]
        err = errors[0] if errors else "no verdict"
        run.verdicts[name] = ex._verdict("failed", f"the grader could not check it ({err})")


def _run_cells(run, client, plan, env) -> None:
    """Run the plan in this kernel; on a hang, record it and raise _Restart."""
    for index, name in plan:
        if name is not None:
            if name not in run.verdicts:
                _grade_cell(run, client, name)
            continue
        cell = run.nb.cells[index]
        solution_of = next((n for n in run.exercises if SOLUTION in tags(cell) and f"def {n}(" in cell.source), None)
        limit = backstop(run.exercises[solution_of].limit) if solution_of else CELL_TIMEOUT
        try:
            _execute(client, cell, index, limit)
        except _Restart:
            run.skipped.add(index)
            run.notes.append(f"cell {index} did not finish within {limit:g} s and was skipped")
            if solution_of and solution_of not in run.verdicts:
                ex = run.exercises[solution_of]
                run.verdicts[solution_of] = ex._verdict(TIMED_OUT, f"its cell did not finish within {limit:g} s")
            raise
        run.replay.append(index)
        for o in cell.outputs:
            if o.get("output_type") == "error":
                run.notes.append(f"cell {index} raised {o['ename']}: {str(o['evalue'])[:200]}")


def _replay(run, client) -> None:
    for index in list(run.replay):
        try:
            _execute(client, run.nb.cells[index], index, CELL_TIMEOUT)
        except _Restart:
            run.replay.remove(index)
            run.skipped.add(index)
            run.notes.append(f"cell {index} hung when replayed and was skipped")
            raise


def grade_notebook(path: Path, student: str = "", env: dict | None = None) -> tuple[list, list]:
    """Grade one notebook; returns ([Feedback per exercise], [notes])."""
    import nbformat
    from nbclient import NotebookClient

    bk = book(Path(path).stem)
    if bk is None:
        return [], [f"{Path(path).name}: no graded exercises"]
    nb = nbformat.read(str(path), as_version=4)
    run = _Run(Path(path), nb, bk.exercises)
    plan = _plan(nb, bk.exercises)
    env = {**os.environ, **(env or {})}
    with tempfile.TemporaryDirectory(prefix="ppu-lab-grade-") as work:
        while True:
            client = NotebookClient(nb, kernel_name="python3", allow_errors=True, interrupt_on_timeout=False,
                                    resources={"metadata": {"path": work}})
            client.km = client.create_kernel_manager()
            try:
                with open(Path(work) / "kernel.log", "ab") as log:   # the kernel's own chatter, not cell output
                    client.start_new_kernel(env=env, stdout=log, stderr=log)
                client.start_new_kernel_client()
                _replay(run, client)
                done = set(run.replay) | run.skipped
                _run_cells(run, client, [(i, n) for i, n in plan if i not in done], env)
                break
            except _Restart as why:
                run.restarts += 1
                run.notes.append(f"fresh kernel and engines after: {why} (the cells before were run again)")
                if run.restarts >= MAX_RESTARTS:
                    run.notes.append(f"gave up after {run.restarts} kernel restarts")
                    break
            finally:
                _stop_kernel(client)
    return [run.verdicts.get(n) or bk.exercises[n]._verdict("missing", "never reached")
            for n in bk.exercises], run.notes


def _safe_grade(path: Path, student: str, env) -> tuple[list, list]:
    """grade_notebook, but a notebook the grader cannot run is 'not graded' instead of ending the run."""
    try:
        return grade_notebook(path, student, env)
    except Exception as exc:  # noqa: BLE001 - one broken notebook must not stop the class's grading
        bk = book(path.stem)
        verdicts = [] if bk is None else [ex._verdict("not graded", f"the grader failed: {exc!r}")
                                          for ex in bk.exercises.values()]
        return verdicts, [f"could not be graded: {type(exc).__name__}: {exc}"]


def _grade_student(student_dir: Path, env, log) -> tuple[list, list]:
    """(grades.csv rows, feedback file lines) of one student's folder."""
    student, rows, lines = student_dir.name, [], [f"# Feedback for {student_dir.name}\n"]
    for path in sorted(student_dir.glob("*.ipynb")):
        start = time.perf_counter()
        verdicts, notes = _safe_grade(path, student, env)
        log(f"{student}/{path.name}: {sum(v.points for v in verdicts):g}/"
            f"{sum(v.max_points for v in verdicts):g} points in {time.perf_counter() - start:.0f} s")
        lines.append(f"## {path.name}\n")
        for v in verdicts:
            rows.append({"student": student, "notebook": path.stem, "exercise": v.exercise, "points": f"{v.points:g}",
                         "max": f"{v.max_points:g}", "status": v.status, "feedback": v.text().replace("\n", " | ")})
            lines.append(f"- **{v.exercise}**: {v.points:g}/{v.max_points:g} ({v.status})\n\n  "
                         + v.text().replace("\n", "\n  ") + "\n")
        lines += [f"- note: {n}\n" for n in notes]
    return rows, lines


def grade_folder(submissions, out=None, env: dict | None = None, log=print) -> list[dict]:
    """Grade ``submissions/<student>/*.ipynb``; write grades.csv and feedback/<student>.md under ``out``."""
    submissions = Path(submissions)
    out = Path(out) if out else submissions / "grades"
    rows = []
    for student_dir in sorted(p for p in submissions.iterdir() if p.is_dir() and p != out):
        student_rows, lines = _grade_student(student_dir, env, log)
        rows += student_rows
        (out / "feedback").mkdir(parents=True, exist_ok=True)
        (out / "feedback" / f"{student_dir.name}.md").write_text("\n".join(lines), encoding="utf-8")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["student", "notebook", "exercise", "points", "max", "status", "feedback"])
        w.writeheader()
        w.writerows(rows)
    log(f"wrote {out / 'grades.csv'} ({len(rows)} rows) and {out / 'feedback'}/")
    return rows
