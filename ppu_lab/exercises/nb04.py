"""Checks of notebook 04's exercises: the course's data-parallel step (on the MPI engines), and Amdahl's
law inverted (serial).

``dp_step(w, XY, idx, nb, lam, n, lr, comm)``: one SGD step of the course's design. Rank 0 holds
``XY = [X | y]`` and the minibatch ``idx`` (the others get None), ``Scatterv``s the batch's rows, every
rank computes ``ridge.data_gradient`` of its shard, ``Allgather`` puts the p shard sums on every rank,
which add them and step. The check runs the student's step in an SGD loop on the first p ranks
(``dp_report``, on every rank) and compares the weights with ``ridge.sgd`` to 1e-10, naming the typical
mistakes (``dp_verdict``): counts that drop the remainder, no N/|B|, a mean over the ranks, and ranks that
disagree because they add the p rows in different orders. ``tests/mpi/exercises_dp.py`` runs the same
under ``mpiexec`` with 2 and 3 ranks.
"""

from __future__ import annotations

import numpy as np

from ppu_lab import perfmodel, ridge
from ppu_lab.data import make_ridge_data
from ppu_lab.exercises.core import CommSpy, Notebook, compare, ranks_case
from ppu_lab.mpi import first_ranks

BOOK = Notebook("04_mpi_sgd_ridge")
check, require = BOOK.check, BOOK.require
LAB_ANSWERS = ("scatter_allgather_step", "sgd_scatter_allgather", "allreduce_step", "sgd_allreduce")
LAM = 1.0


def _problem(n, d, b, seed):
    X, y, _ = make_ridge_data(n, d, seed=seed)
    return X, y, 0.5 / ridge.minibatch_lipschitz(X, LAM, b)


def dp_report(fn, p, n, d, b, epochs, seed):
    """On every rank of COMM_WORLD (collective): SGD with the student's step on the first p ranks;
    returns this rank's {w, calls}, or None on the other ranks."""
    used = sorted(set(LAB_ANSWERS) & set(getattr(getattr(fn, "__code__", None), "co_names", ())))
    if used:
        raise PermissionError(f"dp_step calls {', '.join(used)}: that is the lab's answer; write the step itself")
    with first_ranks(p) as sub:
        if sub is None:
            return None
        X, y, lr = _problem(n, d, b, seed)
        root = sub.Get_rank() == 0
        XY, comm, w = (np.column_stack([X, y]) if root else None), CommSpy(sub), np.zeros(d)
        for epoch in range(1, epochs + 1):
            for idx in ridge.minibatches(n, b, seed, epoch):
                w = fn(w, XY, idx if root else None, len(idx), LAM, n, lr, comm)
                if w is None:
                    return {"w": None, "calls": comm.calls}
        return {"w": np.array(w, dtype=float, copy=True), "calls": sorted(set(comm.calls))}


def _sgd_variant(X, y, lr, b, epochs, seed, p, drop=False, scale=True, mean=False):
    """Serial SGD with one of the typical mistakes of the parallel step (to name it)."""
    n, w = len(y), np.zeros(X.shape[1])
    for epoch in range(1, epochs + 1):
        for idx in ridge.minibatches(n, b, seed, epoch):
            rows = idx[:p * (len(idx) // p)] if drop else idx
            G = ridge.data_gradient(w, X[rows], y[rows]) / (p if mean else 1)
            w = ridge.sgd_step(w, ridge.combine(w, G, LAM, n, len(idx)) if scale else G + LAM * w, lr)
    return w


def dp_verdict(reports, p, n, d, b, epochs, seed) -> str | None:
    """None when every rank's weights are serial SGD's (1e-10) and all ranks agree; else what is wrong."""
    reps = [r for r in reports if r is not None]
    X, y, lr = _problem(n, d, b, seed)
    ref = ridge.sgd(X, y, LAM, lr, b, epochs, seed=seed).w
    args = (X, y, lr, b, epochs, seed, p)
    mistakes = [(_sgd_variant(*args, drop=True), "the Scatterv counts drop the remainder: the last |B| % p rows "
                 "of every batch are never sent; the first |B| % p ranks take one row more (shard_counts)"),
                (_sgd_variant(*args, scale=False), "the gradient is not scaled by N/|B|: ridge.combine does it, "
                 "with the global batch size nb"),
                (_sgd_variant(*args, mean=True), "it averages the p shard gradients: each is a sum over its rows, "
                 "add them")]
    for k, r in enumerate(reps):
        msg = compare(r["w"], ref, what=f"rank {k}'s weights after {epochs} epochs", rtol=1e-10, atol=1e-10,
                      mistakes=mistakes)
        if msg:
            return f"with p = {p} ranks: {msg}"
    spread = max(float(np.abs(r["w"] - reps[0]["w"]).max()) for r in reps)
    if spread > 0:
        return (f"with p = {p} ranks each rank is close to serial SGD, but the ranks disagree (by up to {spread:.1e}): "
                "every rank must add the p shard gradients in the same order, or the replicas drift apart")
    missing = [c for c in ("Scatterv", "Allgather") if p > 1 and c not in reps[0]["calls"]]
    if missing:
        return f"the step is right, but it is not the course's design: it never calls comm.{' or comm.'.join(missing)}"
    return None


dp_ex = BOOK.exercise(
    "dp_step", points=3, time_limit=40, engines=True, needs=("cl",), by_name=True,
    hint="counts and displacements of Scatterv are in numbers (rows times d + 1) and must cover all nb rows "
         "(mpi.shard_counts); every rank puts its shard's data_gradient in its row of a (p, d) buffer for "
         "Allgather; then add the p rows and let ridge.combine scale by N/|B| with the global nb.")


def _dp_case(p, n=205, d=5, b=20, epochs=2, seed=41):
    return ranks_case(dp_report, dp_verdict, p, n, d, b, epochs, seed)


dp_ex.case("p = 2 ranks, batches of 20 rows (the last one 5)")(_dp_case(2))
dp_ex.case("p = 3 ranks: 20 rows are 7 + 7 + 6")(_dp_case(3, seed=42))
dp_ex.case("p = 1 rank", hidden=True)(_dp_case(1, seed=43))
dp_ex.case("every engine, batches of 23 rows", hidden=True)(_dp_case(None, n=100, b=23, seed=44))


# --------------------------------------------------------------------------- exercise 2: Amdahl inverted
amdahl_ex = BOOK.exercise(
    "ranks_for_speedup", points=1, time_limit=20,
    hint="solve S = 1 / (f + (1 - f) / p) for p; when S >= 1/f no p is enough (return inf).")


def _amdahl_case(S, f):
    def run(fn):
        got = fn(S, f)
        if f > 0 and S >= 1 / f:
            return None if got == float("inf") else f"S = {S} with f = {f} cannot be reached (S >= 1/f): return inf"
        lo, hi = 1.0, 2.0
        while perfmodel.amdahl_speedup(hi, f) < S:            # the reference: bisection on Amdahl's law itself
            hi *= 2
        for _ in range(200):
            lo, hi = ((lo + hi) / 2, hi) if perfmodel.amdahl_speedup((lo + hi) / 2, f) < S else (lo, (lo + hi) / 2)
        return compare(got, (lo + hi) / 2, what="p", rtol=1e-8, mistakes=[
            (S * (1 - f), "p is not S (1 - f): solve 1/S = f + (1 - f)/p for p")])

    return run


amdahl_ex.case("speedup 3 with f = 0.1")(_amdahl_case(3.0, 0.1))
amdahl_ex.case("speedup 10 with f = 0.1: out of reach")(_amdahl_case(10.0, 0.1))
amdahl_ex.case("speedup 50 with f = 0.01", hidden=True)(_amdahl_case(50.0, 0.01))
amdahl_ex.case("speedup 4 with f = 0: p = 4", hidden=True)(_amdahl_case(4.0, 0.0))
