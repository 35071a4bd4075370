"""The grader, end to end, on planted submissions: the untouched student edition scores 0 "not attempted
yet" everywhere and runs to the end; a typical mistake is named; an infinite loop (one that even swallows
the check's own time limit) and a hung collective cost their exercise only, within their time limits;
the lab's solutions score full points; and nothing the grader started is left running.

One grading run (``python -m ppu_lab.exercises grade``, a subprocess with a deadline) serves every test.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from ppu_lab.exercises import edition
from ppu_lab.procs import run as run_with_timeout

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.grading
TIME_LIMIT = 5          # seconds per exercise in this run (--time-limit); the grader adds its grace on top

MISTAKE = '''def minibatch_gradient(w, X, y, lam, idx):
    """Forgets the factor N/|B|."""
    XB, yB = X[idx], y[idx]
    return -XB.T @ (yB - XB @ w) + lam * w'''

LOOP = '''def sgd_decay(X, y, lam, lr, batch_size, epochs, seed=0, decay=1.0):
    """Never returns, and a bare except swallows the check's own time limit: only the grader can stop it."""
    while True:
        try:
            while True:
                pass
        except:  # noqa: E722
            pass'''

HUNG = '''def my_share(n):
    """Rank 0 waits in a barrier that rank 1 never enters."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        MPI.COMM_WORLD.Barrier()
    return n'''


def _plant(nb: dict, name: str, source: str) -> dict:
    cell = next(c for c in nb["cells"]
                if edition.SOLUTION in edition.tags(c) and f"def {name}(" in "".join(c["source"]))
    cell["source"] = source
    return nb


def _notebook(name: str, edition_: str) -> dict:
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    if edition_ == "student":
        return edition.student_notebook(nb, name)
    nb["cells"] = [c for c in nb["cells"] if edition.HIDDEN not in edition.tags(c)]   # solved, as handed in
    return nb


def _submissions(root: Path) -> None:
    subs = {
        "untouched": {n: _notebook(n, "student") for n in ("00_setup", "01_serial_sgd_ridge", "05_ann_mnist")},
        "alice": {"01_serial_sgd_ridge": _plant(_plant(_notebook("01_serial_sgd_ridge", "student"),
                                                       "minibatch_gradient", MISTAKE), "sgd_decay", LOOP)},
        "bob": {"00_setup": _plant(_notebook("00_setup", "student"), "my_share", HUNG),
                "01_serial_sgd_ridge": _notebook("01_serial_sgd_ridge", "instructor")},
    }
    for student, notebooks in subs.items():
        for name, nb in notebooks.items():
            edition.write_notebook(nb, root / student / f"{name}.ipynb")


def _tagged(tag: str) -> list:
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.environ().get("PPU_LAB_GRADE_TAG") == tag:
                left.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except psutil.Error:
            pass
    return left


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("submissions")
    _submissions(root)
    tag = uuid.uuid4().hex
    env = {**os.environ, "PPU_LAB_GRADE_TAG": tag, "PPU_LAB_QUICK": "1", "MPLBACKEND": "Agg"}
    proc = run_with_timeout([sys.executable, "-m", "ppu_lab.exercises", "grade", str(root),
                             "--time-limit", str(TIME_LIMIT)], timeout=540, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(root / "grades" / "grades.csv", encoding="utf-8")))
    return {(r["student"], r["exercise"]): r for r in rows}, root, tag, proc.stdout


def test_untouched_student_edition_scores_zero_not_attempted(graded):
    rows, root, *_ = graded
    notes = (root / "grades" / "feedback" / "untouched.md").read_text()
    assert "- note:" not in notes, "the untouched student edition should run to the end: no error, no hang"
    untouched = {ex: r for (s, ex), r in rows.items() if s == "untouched"}
    assert sorted(untouched) == sorted(["my_share", "minibatch_gradient", "sgd_decay", "output_layer_grads",
                                        "hidden_layer_grads", "parallel_accuracy"])
    for ex, r in untouched.items():
        assert (float(r["points"]), r["status"]) == (0.0, "not attempted yet"), (ex, r["feedback"])
        assert float(r["max"]) > 0 and "Traceback" not in r["feedback"]


def test_a_mistake_is_named_and_an_infinite_loop_costs_only_its_exercise(graded):
    rows, *_ = graded
    mistake, loop = rows["alice", "minibatch_gradient"], rows["alice", "sgd_decay"]
    assert mistake["status"] == "failed" and "without the factor N/|B|" in mistake["feedback"]
    assert loop["status"] == "timed out" and float(loop["points"]) == 0


def test_a_hung_collective_costs_only_its_exercise(graded):
    rows, *_ = graded
    hung = rows["bob", "my_share"]
    assert hung["status"] == "timed out" and "collective" in hung["feedback"]
    for ex in ("minibatch_gradient", "sgd_decay"):          # the lab's solutions, handed in by bob
        assert rows["bob", ex]["status"] == "passed" and rows["bob", ex]["points"] == rows["bob", ex]["max"]


def test_feedback_files_and_nothing_left_running(graded):
    rows, root, tag, out = graded
    for student in ("untouched", "alice", "bob"):
        text = (root / "grades" / "feedback" / f"{student}.md").read_text()
        assert f"# Feedback for {student}" in text and "points" in out
    alice, bob = ((root / "grades" / "feedback" / f"{s}.md").read_text() for s in ("alice", "bob"))
    assert "without the factor N/|B|" in alice
    assert "after: the check of sgd_decay hung" in alice        # the loop swallowed the check's alarm
    assert "fresh kernel and engines after: my_share left the MPI engines stuck" in bob
    assert _tagged(tag) == [], "the grader left processes behind (kernels, engines, mpiexec, controllers)"
