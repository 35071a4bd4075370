"""One source, two editions: the notebooks in ``notebooks/`` are the instructor edition; this builds the
student edition from them (``make student``, ``python -m ppu_lab.exercises student``).

Markers (nbgrader's convention, with an optional hint)::

    def minibatch_gradient(w, X, y, lam, idx):         # a code cell tagged "solution"
        \"\"\"...\"\"\"
        ### BEGIN SOLUTION (implement the minibatch gradient)
        ...the instructor's code...
        ### END SOLUTION

becomes, in the student edition, ``...`` and ``raise NotImplementedError("Student exercise: implement
the minibatch gradient")`` at the marker's indentation. In markdown, ``<!-- BEGIN SOLUTION -->`` ...
``<!-- END SOLUTION -->`` (invisible in the rendered instructor notebook) becomes "*(your answer)*".
Cells tagged ``hidden-test`` (the instructor's ``require(...)``) are removed. Nothing else changes;
outputs and execution counts are cleared.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

CODE_BEGIN = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION[ \t]*(?:\((?P<hint>.*)\))?[ \t]*$")
CODE_END = re.compile(r"^[ \t]*### END SOLUTION[ \t]*$")
MD_BEGIN = re.compile(r"^[ \t]*<!-- BEGIN SOLUTION -->[ \t]*$")
MD_END = re.compile(r"^[ \t]*<!-- END SOLUTION -->[ \t]*$")
HIDDEN, SOLUTION, CHECK = "hidden-test", "solution", "check"
DEFAULT_HINT = "write your solution here"
# An exercise in the old style: its solution in a cell of its own (not converted to markers yet).
LEGACY = re.compile(r"^\s*(\*Solution|# Solution)", re.M)


class MarkerError(ValueError):
    """Unbalanced or misplaced solution markers; the message names the notebook and cell."""


def tags(cell) -> list:
    return list(cell.get("metadata", {}).get("tags", []))


def _source(cell) -> str:
    s = cell.get("source", "")
    return s if isinstance(s, str) else "".join(s)


def _lines(text: str) -> list:
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def strip_solutions(text: str, cell_type: str, where: str = "") -> tuple[str, int]:
    """``text`` with every marked solution replaced by its stub; returns (new text, number of regions)."""
    begin, end = (CODE_BEGIN, CODE_END) if cell_type == "code" else (MD_BEGIN, MD_END)
    out, inside, regions = [], False, 0
    for line in text.split("\n"):
        m = begin.match(line)
        if m:
            if inside:
                raise MarkerError(f"{where}: BEGIN SOLUTION inside another solution")
            inside, regions = True, regions + 1
            if cell_type == "code":
                ind, hint = m.group("indent"), (m.group("hint") or DEFAULT_HINT).strip()
                stub = json.dumps("Student exercise: " + hint)
                out += [f"{ind}...  # your code here", f"{ind}raise NotImplementedError({stub})"]
            else:
                out.append("*(your answer)*")
        elif end.match(line):
            if not inside:
                raise MarkerError(f"{where}: END SOLUTION without BEGIN SOLUTION")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: BEGIN SOLUTION without END SOLUTION")
    return "\n".join(out), regions


def student_notebook(nb: dict, name: str = "notebook") -> dict:
    """The student edition of one notebook (a JSON dict, as json.load gives it)."""
    nb = copy.deepcopy(nb)
    cells = []
    for i, cell in enumerate(nb["cells"]):
        where = f"{name}, cell {i}"
        if HIDDEN in tags(cell):
            continue
        text, regions = strip_solutions(_source(cell), cell["cell_type"], where)
        if cell["cell_type"] == "code":
            if regions and SOLUTION not in tags(cell):
                raise MarkerError(f"{where}: has solution markers but no 'solution' tag (the grader needs it)")
            if SOLUTION in tags(cell) and not regions:
                raise MarkerError(f"{where}: tagged 'solution' but has no ### BEGIN SOLUTION marker")
            cell["outputs"], cell["execution_count"] = [], None
        if regions:
            cell["source"] = _lines(text)
        cells.append(cell)
    nb["cells"] = cells
    return nb


def legacy_exercises(nb: dict) -> bool:
    """True when the notebook still shows an exercise's solution in a cell of its own (old style)."""
    return any(LEGACY.match(_source(c)) and not tags(c) for c in nb["cells"])


def write_notebook(nb: dict, path: Path) -> None:
    """Write as the repository does (indent 1, UTF-8, trailing newline): small diffs, same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")


def build(src: Path, out: Path) -> list[str]:
    """Write the student edition of every notebook in ``src`` to ``out``; return one line per notebook."""
    src, out = Path(src), Path(out)
    report = []
    for path in sorted(src.glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        student = student_notebook(nb, path.name)
        write_notebook(student, out / path.name)
        removed = len(nb["cells"]) - len(student["cells"])
        solutions = sum(SOLUTION in tags(c) for c in nb["cells"])
        line = f"{path.name}: {solutions} solution cell(s) stubbed, {removed} hidden test(s) removed"
        if legacy_exercises(nb):
            line += ("  WARNING: still has old-style exercises whose solutions sit in their own cells "
                     "(not converted to solution markers yet): the student edition shows them")
        report.append(line)
    return report
