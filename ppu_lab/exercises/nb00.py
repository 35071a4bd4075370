"""Checks of notebook 00's exercise: a function run on every MPI engine (the first MPI exercise).

``my_share(n)``: how many of ``n`` items this engine gets in the lab's balanced split (the first
``n % size`` ranks take one more), computed from the rank and size alone. The reference is
``ppu_lab.mpi.shard_counts``; the ranks are those the cluster recorded when it ordered its engines.
"""

from __future__ import annotations

from ppu_lab.exercises.core import Notebook, on_engines
from ppu_lab.mpi import shard_counts

BOOK = Notebook("00_setup")
check, require = BOOK.check, BOOK.require

share_ex = BOOK.exercise(
    "my_share", points=1, time_limit=20, engines=True, needs=("cl",),
    hint="every item goes to exactly one rank, and the first n % size ranks take one more than the others.")


def _share_case(n):
    def run(fn, cl):
        got = on_engines(cl, fn, n)
        expect = [int(c) for c in shard_counts(n, cl.size)]
        if got == expect:
            return None
        try:
            total = sum(got)
        except TypeError:
            return f"the engines returned {got}; each should return a whole number, its share"
        why = (f"the shares add up to {total}, not {n}: every item must go to exactly one rank"
               if total != n else "the remainder goes to the first ranks, as ppu_lab.mpi.shard_bounds does")
        return f"for n = {n} the engines returned {got} (in rank order); expected {expect}: {why}"

    return run


share_ex.case("7 items")(_share_case(7))
share_ex.case("10 items")(_share_case(10))
share_ex.case("1 item: fewer items than engines", hidden=True)(_share_case(1))
share_ex.case("1001 items", hidden=True)(_share_case(1001))
