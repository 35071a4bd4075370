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
# The untouched student edition of these; 03 and 04 run once each, in alice's and bob's folders, with one
# exercise planted with a mistake and the other untouched (their stubs' "not attempted yet": test_exercises.py).
UNTOUCHED = ("00_setup", "01_serial_sgd_ridge", "02_threads", "05_ann_mnist", "06_cnn_mnist")
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


RING_SKIPS_LAST_STEP = '''%%px
import numpy as np
from ppu_lab.mpi import shard_bounds

def ring_allreduce(x, comm):
    """Each phase stops one step short (range(p - 2)): the chunks never finish their trip round the ring."""
    p, r = comm.Get_size(), comm.Get_rank()
    chunks = [slice(*shard_bounds(len(x), p, c)) for c in range(p)]
    out = np.array(x, dtype=float)
    for shift in (0, 1):
        for s in range(p - 2):
            send, recv = chunks[(r + shift - s) % p], chunks[(r + shift - s - 1) % p]
            buf = np.empty(recv.stop - recv.start)
            comm.Sendrecv(out[send], dest=(r + 1) % p, recvbuf=buf, source=(r - 1) % p)
            out[recv] = out[recv] + buf if shift == 0 else buf
    return out'''

SCATTERV_DROPS_REMAINDER = '''%%px
import numpy as np
from mpi4py import MPI
from ppu_lab import ridge

def dp_step(w, XY, idx, nb, lam, n, lr, comm):
    """Counts nb // p rows per rank: the last nb % p rows of every batch are never sent."""
    p, rank, d = comm.Get_size(), comm.Get_rank(), w.size
    counts = np.full(p, nb // p) * (d + 1)
    shard = np.empty((counts[rank] // (d + 1), d + 1))
    displs = np.arange(p) * counts[0]
    comm.Scatterv([XY[idx], counts, displs, MPI.DOUBLE] if rank == 0 else None, shard, root=0)
    gathered = np.empty((p, d))
    gathered[rank] = ridge.data_gradient(w, shard[:, :d], shard[:, d])
    comm.Allgather(MPI.IN_PLACE, gathered)
    return ridge.sgd_step(w, ridge.combine(w, gathered.sum(axis=0), lam, n, nb), lr)'''


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
        "untouched": {n: _notebook(n, "student") for n in UNTOUCHED},
        "alice": {"01_serial_sgd_ridge": _plant(_plant(_notebook("01_serial_sgd_ridge", "student"),
                                                       "minibatch_gradient", MISTAKE), "sgd_decay", LOOP),
                  "03_mpi_collectives": _plant(_notebook("03_mpi_collectives", "student"), "ring_allreduce",
                                               RING_SKIPS_LAST_STEP)},
        "bob": {"00_setup": _plant(_notebook("00_setup", "student"), "my_share", HUNG),
                "01_serial_sgd_ridge": _notebook("01_serial_sgd_ridge", "instructor"),
                "04_mpi_sgd_ridge": _plant(_notebook("04_mpi_sgd_ridge", "student"), "dp_step",
                                           SCATTERV_DROPS_REMAINDER)},
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
    assert sorted(untouched) == sorted(["my_share", "minibatch_gradient", "sgd_decay", "sharded_mean_gradient",
                                        "gradient_python_map", "output_layer_grads", "hidden_layer_grads",
                                        "parallel_accuracy", "allreduce_gradients"])
    for ex, r in untouched.items():
        assert (float(r["points"]), r["status"]) == (0.0, "not attempted yet"), (ex, r["feedback"])
        assert float(r["max"]) > 0 and "Traceback" not in r["feedback"]


def test_a_mistake_is_named_and_an_infinite_loop_costs_only_its_exercise(graded):
    rows, *_ = graded
    mistake, loop = rows["alice", "minibatch_gradient"], rows["alice", "sgd_decay"]
    assert mistake["status"] == "failed" and "without the factor N/|B|" in mistake["feedback"]
    assert loop["status"] == "timed out" and float(loop["points"]) == 0


def test_mpi_mistakes_are_named_and_the_other_exercise_is_not_attempted(graded):
    rows, *_ = graded
    ring, dp = rows["alice", "ring_allreduce"], rows["bob", "dp_step"]
    assert ring["status"] == "failed" and "hold a wrong sum" in ring["feedback"], ring["feedback"]
    assert "takes p - 1 = 1 steps in each of its two phases" in ring["feedback"], ring["feedback"]
    assert dp["status"] == "failed" and "Scatterv counts drop the remainder" in dp["feedback"], dp["feedback"]
    for student, ex in (("alice", "floats_for"), ("bob", "ranks_for_speedup")):
        assert rows[student, ex]["status"] == "not attempted yet", rows[student, ex]


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
