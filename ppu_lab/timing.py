"""The one timer helper used everywhere in the lab (notebooks, benchmarks, experiments)."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field


@dataclass
class Timer:
    """Accumulates wall-clock intervals under names.

    >>> t = Timer()
    >>> with t("compute"):
    ...     pass
    >>> t.total("compute") >= 0
    True
    """

    laps: dict[str, list[float]] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str = "total"):
        start = time.perf_counter()
        try:
            yield self
        finally:
            self.laps.setdefault(name, []).append(time.perf_counter() - start)

    def total(self, name: str = "total") -> float:
        return sum(self.laps.get(name, []))

    def median(self, name: str = "total") -> float:
        laps = self.laps.get(name, [])
        return statistics.median(laps) if laps else float("nan")

    def count(self, name: str = "total") -> int:
        return len(self.laps.get(name, []))


def time_it(fn, *args, repeat: int = 5, number: int = 1, warmup: int = 1, **kwargs) -> float:
    """Median seconds per call of ``fn(*args, **kwargs)`` over ``repeat`` rounds of ``number`` calls."""
    if repeat < 1 or number < 1:
        raise ValueError("time_it: repeat and number must be >= 1")
    for _ in range(warmup):
        fn(*args, **kwargs)
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn(*args, **kwargs)
        rounds.append((time.perf_counter() - start) / number)
    return statistics.median(rounds)


def no_timer(name: str = "total"):
    """A timer that times nothing: the default of the step functions (``ppu_lab.parallel``)."""
    return nullcontext()
