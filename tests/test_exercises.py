"""The exercise checks catch typical mistakes with a useful message, pass the lab's own solutions, say
"not attempted yet" to a stub, stop infinite loops and hung collectives; the student edition differs
from the instructor edition only where solutions and hidden tests were."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from ppu_lab import reference, ridge
from ppu_lab.costmodel import AlphaBeta
from ppu_lab.mpi import shard_bounds
from ppu_lab.exercises import edition, nb00, nb01, nb02, nb03, nb04, nb05, nb06, nb07
from ppu_lab.exercises.core import NOT_ATTEMPTED, PASSED, TIMED_OUT

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def named(name):
    """Give a planted function the exercise's name (the checks find the exercise by it)."""

    def rename(fn):
        fn.__name__ = name
        return fn

    return rename


def _grad(w, X, y, lam, idx, scale=True, per_sample=False):
    XB, yB = X[idx], y[idx]
    s = len(y) / len(idx) if scale else 1.0
    pen = len(idx) * lam * w if per_sample else lam * w
    return s * (-XB.T @ (yB - XB @ w)) + (s * pen if per_sample else pen)


# --------------------------------------------------------------------------- notebook 01
def test_minibatch_gradient_passes_and_names_the_classic_mistakes():
    assert nb01.require(named("minibatch_gradient")(_grad)).passed
    fb = nb01.check(named("minibatch_gradient")(lambda w, X, y, lam, idx: _grad(w, X, y, lam, idx, scale=False)))
    assert fb.points == 0 and "without the factor N/|B|" in fb.message and "Case 'a batch of 50" in fb.message
    fb = nb01.check(named("minibatch_gradient")(lambda w, X, y, lam, idx: _grad(w, X, y, lam, idx, per_sample=True)))
    assert "once per sample" in fb.message
    # using the lab's kernel is the answer itself: all cases pass, yet no points
    fb = nb01.check(named("minibatch_gradient")(
        lambda w, X, y, lam, idx: ridge.combine(w, ridge.data_gradient(w, X[idx], y[idx]), lam, len(y), len(idx))))
    assert not fb.passed and "combine" in fb.message


def test_a_stub_is_not_attempted_an_error_names_its_line_an_infinite_loop_times_out():
    @named("minibatch_gradient")
    def stub(w, X, y, lam, idx):
        ...
        raise NotImplementedError("Student exercise: implement the minibatch gradient")

    fb = nb01.check(stub)
    assert fb.status == NOT_ATTEMPTED and fb.points == 0 and "Traceback" not in fb.text()

    @named("minibatch_gradient")
    def shapes(w, X, y, lam, idx):
        return X[idx] @ X[idx]                       # (|B|, d) @ (|B|, d): a shape error

    fb = nb01.check(shapes)
    assert "raised ValueError" in fb.message and "X[idx] @ X[idx]" in fb.message

    @named("sgd_decay")
    def forever(*args, **kwargs):
        while True:
            pass

    fb = nb01.BOOK.exercises["sgd_decay"].grade(forever, time_limit=1.0)
    assert fb.status == TIMED_OUT and "did not finish within 1 s" in fb.message


def _sgd(X, y, lam, lr, batch_size, epochs, seed=0, decay=1.0, off_by_one=False, same_batches=False):
    n, w = len(y), np.zeros(X.shape[1])
    for t in range(1, epochs + 1):
        step = lr / (1 + decay * (t if off_by_one else t - 1))
        for idx in ridge.minibatches(n, batch_size, seed, 1 if same_batches else t):
            w = ridge.sgd_step(w, ridge.combine(w, ridge.data_gradient(w, X[idx], y[idx]), lam, n, len(idx)), step)
    return w


def test_sgd_loop_passes_and_names_its_mistakes():
    assert nb01.require(named("sgd_decay")(_sgd)).passed
    fb = nb01.check(named("sgd_decay")(lambda *a, **k: _sgd(*a, **k, off_by_one=True)))
    assert "first epoch steps with lr itself" in fb.message
    fb = nb01.check(named("sgd_decay")(lambda *a, **k: _sgd(*a, **k, same_batches=True)))
    assert "same minibatches" in fb.message


# --------------------------------------------------------------------------- notebook 02
def _shard_mean(w, Xs, ys):
    return -Xs.T @ (ys - Xs @ w) / len(ys)


def _sharded(w, X, y, pool, k, weighted=True, clamp=True):
    n = len(y)
    k = min(k, n) if clamp else k
    bounds = [shard_bounds(n, k, j) for j in range(k)]
    futures = [pool.submit(_shard_mean, w, X[lo:hi], y[lo:hi]) for lo, hi in bounds]
    if weighted:
        return sum((hi - lo) / n * f.result() for (lo, hi), f in zip(bounds, futures))
    return np.mean([f.result() for f in futures], axis=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the empty shards, in pool threads
def test_sharded_gradient_weights_by_shard_size_and_uses_the_pool():
    assert nb02.require(named("sharded_mean_gradient")(_sharded)).passed
    fb = nb02.check(named("sharded_mean_gradient")(lambda *a: _sharded(*a, weighted=False)))
    assert "plain average of the shard means" in fb.message and "1,001 rows in 3 shards" in fb.message
    fb = nb02.BOOK.find("sharded_mean_gradient").grade(named("sharded_mean_gradient")(
        lambda *a: _sharded(*a, clamp=False)))
    assert "an empty shard's mean is NaN" in fb.message, fb.text()
    fb = nb02.check(named("sharded_mean_gradient")(lambda w, X, y, pool, k: _shard_mean(w, X, y)))
    assert "0 task(s) went to the pool" in fb.message
    py = named("gradient_python_map")(lambda w, X, y: np.array(
        [sum(-(yi - sum(a * b for a, b in zip(r, w))) * r[j] for r, yi in zip(X.tolist(), y)) for j in range(len(w))]))
    assert nb02.require(py).passed


# --------------------------------------------------------------------------- notebook 05
def _hidden(d2, W2, A, X, transposed=False, no_sigma=False):
    d1 = (d2 @ (W2.T if transposed else W2)) * (1 if no_sigma else A * (1 - A))
    return d1.T @ X, d1.sum(axis=0)


def test_backprop_checks_against_autograd_and_finite_differences():
    assert nb05.require(named("hidden_layer_grads")(_hidden)).passed
    assert nb05.require(named("output_layer_grads")(lambda d2, A: (d2.T @ A, d2.sum(axis=0)))).passed
    fb = nb05.check(named("hidden_layer_grads")(lambda *a: _hidden(*a, transposed=True)))
    assert "not its transpose" in fb.message
    fb = nb05.check(named("hidden_layer_grads")(lambda *a: _hidden(*a, no_sigma=True)))
    assert "sigma'(Z1) is missing" in fb.message
    fb = nb05.check(named("hidden_layer_grads")(lambda d2, W2, A, X: (X.T @ ((d2 @ W2) * A * (1 - A)), 0)))
    assert "transpose: W1 and its gradient have shape (h, 784)" in fb.message
    fb = nb05.check(named("output_layer_grads")(lambda d2, A: (d2.T @ A, d2.mean(axis=0))))
    assert "mean over the batch" in fb.message


# --------------------------------------------------------------------------- notebook 07
def _step_time(p, t_compute, t_serial, alpha, beta, gamma, nbytes, *, comm_over_p=False, bytes_once=False,
               no_serial=False, one_latency=False):
    share = (p - 1) / p * nbytes
    comm = 2 * np.log2(p) * alpha + (1 if bytes_once else 2) * share * beta + share * gamma
    comm = comm / p if comm_over_p else comm + (alpha if one_latency else 0.0)
    return t_compute / p + (0.0 if no_serial else t_serial) + comm


@pytest.mark.parametrize("mistake, message", [
    ("comm_over_p", "the communication is divided by p"),
    ("bytes_once", "the Allreduce's bytes are counted once"),
    ("no_serial", "T_serial is missing"),
    ("one_latency", "on one rank there is nothing to communicate: T_comm(1) = 0")])
def test_step_model_names_its_mistakes(mistake, message):
    fb = nb07.check(named("predict_step_time")(lambda *a: _step_time(*a, **{mistake: True})))
    assert fb.points == 0 and message in fb.message, fb.text()


def test_step_model_passes_a_stub_is_not_attempted_the_lab_model_is_refused():
    assert nb07.require(named("predict_step_time")(_step_time)).passed
    assert nb07.check(named("predict_step_time")(_step_time)).cases == 3

    @named("predict_step_time")
    def stub(p, t_compute, t_serial, alpha, beta, gamma, nbytes):
        ...
        raise NotImplementedError("Student exercise: T(p)")

    assert nb07.check(stub).status == NOT_ATTEMPTED
    assert "not written yet" in nb07.against_your_runs(stub, reference.records("07_conclusions"), "ann:50")

    @named("predict_step_time")
    def lab(p, t_compute, t_serial, alpha, beta, gamma, nbytes):
        from ppu_lab.costmodel import AlphaBeta
        from ppu_lab.perfmodel import StepModel
        return StepModel.from_parts(t_compute, t_serial, 1680, grad_bytes=nbytes).time(p, AlphaBeta(alpha, beta, gamma))

    fb = nb07.check(lab)
    assert fb.cases == 3 and not fb.passed and "StepModel" in fb.message


def test_step_model_is_held_against_the_reference_run_measurements():
    """Right formula everywhere but 8 times the per-step overhead: the synthetic cases fail, and the
    reference run's case alone says how far from the measured step the prediction is."""
    reference_case = next(c for c in nb07.BOOK.find("predict_step_time").cases if "reference run" in c.description)
    assert reference_case.run(_step_time) is None
    msg = reference_case.run(lambda p, tc, ts, *rest: _step_time(p, tc, 8 * ts, *rest))
    assert "ANN h=50 on 1 rank(s)" in msg and "the run measured" in msg and "25%" in msg, msg
    msg = reference_case.run(lambda p, tc, *rest: _step_time(p, p * tc, *rest))     # t_compute not shared
    assert "ANN h=50 on 2 rank(s)" in msg and "T_compute is not divided by p" in msg, msg


def test_steps_per_epoch_against_the_reference_grid():
    assert nb07.require(named("steps_per_epoch")(
        lambda n, b, p, mode: -(-n // (b * p if mode == "per_rank" else b)))).passed
    fb = nb07.check(named("steps_per_epoch")(lambda n, b, p, mode: n // (b * p if mode == "per_rank" else b)))
    assert "round n_train / global batch up" in fb.message and "(8000, 150, 1, 'global')" in fb.message
    fb = nb07.check(named("steps_per_epoch")(lambda n, b, p, mode: -(-n // b)))
    assert "every step takes ranks * batch_size rows" in fb.message


# --------------------------------------------------------------------------- MPI engines (00 and 05)
PX_ACCURACY = '''
import numpy as np
from ppu_lab.models import AnnModel
from ppu_lab.mpi import shard_bounds
from mpi4py import MPI

def parallel_accuracy(theta, x_test, y_test, comm):
    m = AnnModel(50)
    m.theta[:] = theta
    lo, hi = shard_bounds(len(y_test), comm.Get_size(), comm.Get_rank())
    correct = np.array([(m.predict(m.prepare(x_test[lo:hi])) == y_test[lo:hi]).sum()], dtype=np.int64)
    {collective}
    return correct[0] / len(y_test)
'''


@pytest.fixture(scope="module")
def cl():
    from ppu_lab.cluster import MPICluster

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = MPICluster(n=2).start()
    yield cluster
    cluster.stop()


AS_IN_A_NOTEBOOK = '''
def my_share(n):
    from mpi4py import MPI
    base, extra = divmod(n, MPI.COMM_WORLD.Get_size())
    return base + (1 if MPI.COMM_WORLD.Get_rank() < extra else 0)

def floor_share(n):
    from mpi4py import MPI
    return n // MPI.COMM_WORLD.Get_size()

def hangs(n):
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() == 0:
        MPI.COMM_WORLD.Barrier()                 # rank 1 never comes: rank 0 waits forever
    return 0
'''


def notebook_functions():
    """Functions defined as in a notebook cell (module __main__), so that the engines can unpickle them."""
    ns = {"__name__": "__main__"}
    exec(AS_IN_A_NOTEBOOK, ns)
    return ns


def test_engine_checks_catch_mistakes_and_a_hung_collective(cl):
    f = notebook_functions()
    assert nb00.require(f["my_share"], cl).passed
    fb = nb00.check(named("my_share")(f["floor_share"]), cl)
    assert "add up to 6, not 7" in fb.message
    for collective, expect in [("comm.Allreduce(MPI.IN_PLACE, correct, op=MPI.SUM)", PASSED),
                               ("pass", "Does every rank add the counts"),
                               ("comm.Reduce(MPI.IN_PLACE if comm.Get_rank() == 0 else correct, correct, op=MPI.SUM)",
                                "Allreduce, not Reduce")]:
        cl.view.execute(PX_ACCURACY.format(collective=collective))
        fb = nb05.BOOK.find("parallel_accuracy").grade("parallel_accuracy", cl)
        assert fb.status == PASSED if expect == PASSED else expect in fb.message, fb.text()

    fb = nb00.BOOK.exercises["my_share"].grade(named("my_share")(f["hangs"]), cl, time_limit=3)
    assert fb.status == TIMED_OUT and "cl.restart()" in fb.message
    cl.restart()                                     # the way out the feedback names
    assert nb00.check(f["my_share"], cl).passed


PX_RING = '''
import numpy as np
from ppu_lab.mpi import shard_bounds

def ring_allreduce(x, comm):
    p, r = comm.Get_size(), comm.Get_rank()
    chunks = [slice(*shard_bounds(len(x), p, c)) for c in range(p)]
    out = np.array(x, dtype=float)
    {todo}
    for phase, shift in (("reduce-scatter", 0), ("allgather", 1)):
        for s in range(p - 1 - {skip}):
            send, recv = chunks[(r + shift - s) % p], chunks[(r + shift - s - 1) % p]
            buf = np.empty(recv.stop - recv.start)
            comm.Sendrecv(out[send], dest=(r + 1) % p, recvbuf=buf, source=(r - 1) % p)
            out[recv] = out[recv] + buf if shift == 0 else buf
    return {result}
'''


def test_ring_check_on_the_engines_counts_steps_and_refuses_collectives(cl):
    ex = nb03.BOOK.find("ring_allreduce")
    for todo, skip, result, expect in [
            ("", 0, "out", PASSED),
            ("raise NotImplementedError('Student exercise')", 0, "out", NOT_ATTEMPTED),
            ("", 1, "out", "a ring on 2 ranks takes p - 1 = 1 steps in each of its two phases"),
            ("", 0, "comm.Allreduce(x, out) or out", "comm.Allreduce is not allowed here")]:
        cl.view.execute(PX_RING.format(todo=todo, skip=skip, result=result)).get()
        fb = ex.grade("ring_allreduce", cl)
        assert fb.status == expect if expect in (PASSED, NOT_ATTEMPTED) else expect in fb.message, fb.text()


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_ring_check_under_mpiexec_for_every_p(mpirun, ranks):
    out = mpirun(ranks, "exercises_ring.py", timeout=120).stdout
    assert f"p={ranks}: ring passes" in out, out


def test_floats_for_against_the_model_and_its_mistakes():
    sol = named("floats_for")(lambda budget, p, m: (budget - 2 * np.log2(p) * m.alpha)
                              / (4 * (p - 1) / p * (2 * m.beta + m.gamma)))
    assert nb03.require(sol).passed
    assert np.isclose(AlphaBeta(5e-6, 2e-10, 1e-10).allreduce(4 * sol(1e-3, 8, AlphaBeta(5e-6, 2e-10, 1e-10)), 8), 1e-3)
    once = named("floats_for")(lambda budget, p, m: (budget - 2 * np.log2(p) * m.alpha)
                               / (4 * (p - 1) / p * (m.beta + m.gamma)))
    assert "bytes are sent twice" in nb03.check(once).message
    fb = nb03.check(named("floats_for")(lambda budget, p, m: budget / m.allreduce(4.0, p) * 1.0))
    assert not fb.passed


PX_DP = '''
import numpy as np
from mpi4py import MPI
from ppu_lab import mpi, parallel, ridge

def dp_step(w, XY, idx, nb, lam, n, lr, comm):
    p, rank, d = comm.Get_size(), comm.Get_rank(), w.size
    {body}
'''
DP_BODY = """counts = mpi.shard_counts(nb, p) * (d + 1)
    shard = np.empty((counts[rank] // (d + 1), d + 1))
    comm.Scatterv([XY[idx], counts, mpi.shard_displs(counts), MPI.DOUBLE] if rank == 0 else None, shard, root=0)
    g = ridge.data_gradient(w, shard[:, :d], shard[:, d])
    comm.Allreduce(MPI.IN_PLACE, g)
    return ridge.sgd_step(w, ridge.combine(w, g, lam, n, nb), lr)"""


def test_dp_step_check_on_the_engines_wants_the_course_design_and_not_the_lab_answer(cl):
    ex = nb04.BOOK.find("dp_step")
    for body, expect in [
            ("raise NotImplementedError('Student exercise')", NOT_ATTEMPTED),
            (DP_BODY, "it never calls comm.Allgather"),                    # right weights, Allreduce instead
            ("return parallel.scatter_allgather_step(w, XY, idx, nb, lam, n, lr, comm, np.empty((p, d)))",
             "that is the lab's answer")]:
        cl.view.execute(PX_DP.format(body=body)).get()
        fb = ex.grade("dp_step", cl)
        assert fb.status == expect if expect == NOT_ATTEMPTED else expect in fb.message, fb.text()


@pytest.mark.parametrize("ranks", [2, 3])
def test_dp_step_check_under_mpiexec(mpirun, ranks):
    out = mpirun(ranks, "exercises_dp.py", timeout=120).stdout
    assert f"p={ranks}: step passes" in out, out
    if ranks == 3:
        assert "ranks disagree" in out, out


def test_ranks_for_speedup_inverts_amdahl():
    sol = named("ranks_for_speedup")(lambda S, f: float("inf") if f > 0 and S >= 1 / f else (1 - f) / (1 / S - f))
    assert nb04.require(sol).passed
    fb = nb04.check(named("ranks_for_speedup")(lambda S, f: abs((1 - f) / (1 / S - f + 1e-300))))
    assert "cannot be reached (S >= 1/f): return inf" in fb.message and "out of reach" in fb.message


PX_FLAT = '''
import numpy as np
import torch
from mpi4py import MPI

def allreduce_gradients(model, comm):
    grads = [q.grad for q in model.parameters()]
    {body}
'''
FLAT_BODIES = {
    "correct": """flat = torch.cat([g.reshape(-1) for g in grads]).numpy()
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    flat /= {divide}
    start = 0
    for g in grads:
        g.copy_(torch.from_numpy(flat[start:start + g.numel()]).view_as(g))
        start += g.numel()""",
    "not copied back": """flat = torch.cat([g.reshape(-1) for g in grads]).numpy()
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)""",
    "per parameter": """for g in grads:
        a = g.numpy()
        comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        a /= comm.Get_size()""",
}


def test_flat_buffer_check_on_the_engines_names_sum_copy_back_and_per_parameter(cl):
    ex = nb06.BOOK.find("allreduce_gradients")
    for body, expect in [
            (FLAT_BODIES["correct"].format(divide="comm.Get_size()"), PASSED),
            ("raise NotImplementedError('Student exercise')", NOT_ATTEMPTED),
            (FLAT_BODIES["correct"].format(divide="1"), "sum over the ranks: divide by comm.Get_size()"),
            (FLAT_BODIES["not copied back"], "copy the reduced buffer back"),
            (FLAT_BODIES["per parameter"], "one Allreduce of one flat buffer")]:
        cl.view.execute(PX_FLAT.format(body=body)).get()
        fb = ex.grade("allreduce_gradients", cl)
        assert fb.status == expect if expect in (PASSED, NOT_ATTEMPTED) else expect in fb.message, fb.text()


# --------------------------------------------------------------------------- the two editions
def _src(cell):
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_student_edition_differs_only_in_solutions_and_hidden_tests(path):
    teacher = json.loads(path.read_text())
    student = edition.student_notebook(teacher, path.name)
    kept = [c for c in teacher["cells"] if edition.HIDDEN not in edition.tags(c)]
    assert len(student["cells"]) == len(kept)
    assert {k: v for k, v in student.items() if k != "cells"} == {k: v for k, v in teacher.items() if k != "cells"}
    for t, s in zip(kept, student["cells"], strict=True):
        assert (t.get("id"), t["cell_type"], t["metadata"]) == (s.get("id"), s["cell_type"], s["metadata"])
        if edition.SOLUTION in edition.tags(t):
            assert "BEGIN SOLUTION" not in _src(s) and "raise NotImplementedError(\"Student exercise: " in _src(s)
            outside = [ln for ln in _src(t).split("\n") if ln.strip().startswith(("def ", '"""', "'''", "%%px"))]
            assert all(ln in _src(s).split("\n") for ln in outside), "the signature and docstring stay"
        elif "BEGIN SOLUTION" in _src(t):
            assert "*(your answer)*" in _src(s) and "BEGIN SOLUTION" not in _src(s)
        else:
            assert _src(t) == _src(s)


def test_graded_notebooks_have_a_solution_check_and_hidden_test_per_exercise():
    from ppu_lab.exercises import CHECKS, book

    for stem in CHECKS:
        nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
        for name in book(stem).exercises:
            roles = [edition.tags(c) for c in nb["cells"]
                     if c["cell_type"] == "code" and re.search(rf"\b{name}\b", _src(c))]
            assert [["solution"], ["check"], ["hidden-test"]] == [r for r in roles if r], (stem, name, roles)


def test_markers_must_balance_and_match_the_solution_tag():
    cell = {"cell_type": "code", "metadata": {"tags": ["solution"]}, "outputs": [], "execution_count": None,
            "source": "def f():\n    ### BEGIN SOLUTION (do it)\n    return 1\n"}
    with pytest.raises(edition.MarkerError, match="without END SOLUTION"):
        edition.student_notebook({"cells": [cell]})
    cell["metadata"] = {}
    cell["source"] += "    ### END SOLUTION\n"
    with pytest.raises(edition.MarkerError, match="no 'solution' tag"):
        edition.student_notebook({"cells": [cell]})
    cell["metadata"] = {"tags": ["solution"]}
    out = edition.student_notebook({"cells": [cell]})["cells"][0]
    assert "".join(out["source"]) == ('def f():\n    ...  # your code here\n'
                                      '    raise NotImplementedError("Student exercise: do it")\n')


def test_make_student_writes_the_edition_and_dist_is_ignored(tmp_path):
    from ppu_lab.exercises.__main__ import main

    assert main(["student", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
    assert "dist/" in (ROOT / ".gitignore").read_text().split()
