"""Checks of notebook 03's exercises: a ring Allreduce from point-to-point calls (on the MPI engines),
and the alpha-beta-gamma model inverted (serial).

``ring_allreduce(x, comm)``: the sum of every rank's ``x`` on every rank, as a ring does it: p - 1
steps of reduce-scatter, then p - 1 steps of allgather, one chunk (``shard_bounds``) per step. The
check runs it on every engine on the first p ranks (``first_ranks``), hands it a ``CommSpy``
that counts what each rank sends and refuses collectives, and compares with MPI's own ``Allreduce``:
the sum (to rounding), the same bits on every rank, 2(p - 1) messages and at most 2(p - 1) chunks of
bytes per rank (the 2(p - 1)/p * m law). ``ring_report`` (per rank) and ``ring_verdict`` (the
message) are also what ``tests/mpi/exercises_ring.py`` runs under ``mpiexec`` with 1-4 ranks.
"""

from __future__ import annotations

import numpy as np

from ppu_lab.costmodel import AlphaBeta
from ppu_lab.exercises.core import CommSpy, Notebook, compare, ranks_case
from ppu_lab.mpi import first_ranks, shard_counts

BOOK = Notebook("03_mpi_collectives")
check, require = BOOK.check, BOOK.require

def ring_report(fn, p, n, seed):
    """On every rank of COMM_WORLD (collective): run ``fn(x, comm)`` on the first p ranks with a
    CommSpy; returns this rank's {got, ref, messages, bytes}, or None on the other ranks."""
    with first_ranks(p) as sub:
        if sub is None:
            return None
        x = np.random.default_rng([seed, sub.Get_rank()]).standard_normal(n)   # (n,) this rank's vector
        ref = np.empty(n)
        sub.Allreduce(x, ref)
        comm = CommSpy(sub, collectives=False)
        got = fn(x.copy(), comm)
        return {"got": None if got is None else np.array(got, dtype=float, copy=True), "ref": ref,
                "messages": comm.messages, "bytes": comm.bytes}


def _wrong_chunks(got, ref, p):
    bounds = np.concatenate([[0], np.cumsum(shard_counts(len(ref), p))])
    return [c for c in range(p) if not np.allclose(got[bounds[c]:bounds[c + 1]], ref[bounds[c]:bounds[c + 1]],
                                                   rtol=1e-12, atol=1e-12 * max(1.0, float(np.abs(ref).max())))]


def ring_verdict(reports, p, n, seed=None) -> str | None:
    """None when every rank's result and traffic are a ring Allreduce's; else what is wrong."""
    reps, steps = [r for r in reports if r is not None], 2 * (p - 1)
    for k, r in enumerate(reps):
        msg = compare(r["got"], r["ref"], what=f"rank {k}'s result", rtol=1e-12, atol=1e-12)
        if msg and ("None" in msg or "shape" in msg or "numeric" in msg):
            return msg
    wrong = {k: _wrong_chunks(r["got"], r["ref"], p) for k, r in enumerate(reps)}
    wrong = {k: c for k, c in wrong.items() if c}
    if wrong:
        k = next(iter(wrong))
        short = (f" Rank {k} sent {reps[k]['messages']} messages; a ring on {p} ranks takes p - 1 = {p - 1} steps "
                 f"in each of its two phases (reduce-scatter, then allgather): {steps} in all."
                 if reps[k]["messages"] < steps else "")
        return (f"with p = {p} ranks and {n} numbers, ranks {sorted(wrong)} hold a wrong sum (rank {k} in chunk(s) "
                f"{wrong[k]} of shard_bounds({n}, {p}, .)); MPI's Allreduce gives the sum of every rank's x.{short}")
    differ = [k for k, r in enumerate(reps) if not np.array_equal(r["got"], reps[0]["got"])]
    if differ:
        return (f"ranks {differ} hold different bits from rank 0 (each is a correct sum, added in another order): "
                "in a ring each chunk is summed once, along the ring, and then copied to every rank")
    per_chunk = -(-n // p) * 8
    for k, r in enumerate(reps):
        if r["messages"] > steps:
            return f"rank {k} sent {r['messages']} messages; the ring sends 2(p - 1) = {steps} on {p} ranks"
        if r["bytes"] > steps * per_chunk:
            return (f"rank {k} sent {r['bytes']:,} bytes for m = {8 * n:,} bytes; a ring sends 2(p - 1)/p * m, "
                    f"about {steps * 8 * n / p:,.0f}: one chunk (about m/p) per step, not the whole vector")
        if p > 1 and n >= p and r["messages"] == 0:
            return "no point-to-point call went through the `comm` given: use it (and only it) for the ring"
    return None


ring_ex = BOOK.exercise(
    "ring_allreduce", points=3, time_limit=30, engines=True, needs=("cl",), by_name=True,
    hint="cut x into p chunks with shard_bounds; in step s = 0 .. p-2 of the reduce-scatter send chunk (rank - s) "
         "to the right neighbour and add the chunk (rank - s - 1) that comes from the left; then p - 1 steps of "
         "allgather pass the finished chunks around the ring the same way, copying instead of adding.")


def on_ranks(p, *args):
    """A case on the first p ranks of the engines (None: all), n numbers, a seed."""
    return ranks_case(ring_report, ring_verdict, p, *args)


ring_ex.case("p = 2 ranks, 10 numbers")(on_ranks(2, 10, 31))
ring_ex.case("p = 2 ranks, 7 numbers (not divisible by p)")(on_ranks(2, 7, 32))
ring_ex.case("p = 1 rank (nothing to send)", hidden=True)(on_ranks(1, 5, 33))
ring_ex.case("p = 2 ranks, 1 number (shorter than p)", hidden=True)(on_ranks(2, 1, 34))
ring_ex.case("every engine, 2p + 1 numbers", hidden=True)(on_ranks(None, lambda q: 2 * q + 1, 35))
ring_ex.case("every engine, 1,000 numbers", hidden=True)(on_ranks(None, 1000, 36))


# --------------------------------------------------------------------------- exercise 2: the model inverted
floats_ex = BOOK.exercise(
    "floats_for", points=1, time_limit=20, forbid=("allreduce",),
    hint="write the model's Allreduce time on p ranks (a power of 2) as alpha * messages + beta * bytes sent + "
         "gamma * bytes added, with bytes = 4 n (section 6's table), and solve the linear equation for n.")


def _floats_case(budget, p, alpha, beta, gamma):
    def run(fn):
        model = AlphaBeta(alpha, beta, gamma)
        lo, hi = 0.0, 1.0
        while model.allreduce(4 * hi, p) < budget:          # the reference: bisection on the model itself
            hi *= 2
        for _ in range(200):
            lo, hi = ((lo + hi) / 2, hi) if model.allreduce(2 * (lo + hi), p) < budget else (lo, (lo + hi) / 2)
        per = 4 * (p - 1) / p
        return compare(fn(budget, p, model), (lo + hi) / 2, what="n", rtol=1e-6, mistakes=[
            ((budget - 2 * np.log2(p) * alpha) / (per * (beta + gamma)), "bytes are sent twice (reduce-scatter, "
             "then allgather): 2 (p - 1)/p * 4n * beta"),
            ((budget - np.log2(p) * alpha) / (per * (2 * beta + gamma)),
             "2 log2(p) messages: one per step of each phase"),
            ((budget - 2 * np.log2(p) * alpha) / (per * 2 * beta), "the additions cost gamma per byte too"),
        ])

    return run


floats_ex.case("1 ms on 8 ranks")(_floats_case(1e-3, 8, 5e-6, 2e-10, 1e-10))
floats_ex.case("10 ms on 4 ranks, no gamma", hidden=True)(_floats_case(1e-2, 4, 2e-6, 1e-10, 0.0))
