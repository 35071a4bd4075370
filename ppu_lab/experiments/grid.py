"""The grid of runs and the configuration of one run (``RunConfig``), checked before anything runs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass

from ppu_lab.checks import integer, optional_integer
from ppu_lab.trainconfig import BATCH_MODES, DESIGNS, MODELS, TrainConfig

__all__ = ["ExperimentInputError", "RunConfig", "parse_model", "default_ranks", "expand_grid", "MODELS",
           "BATCH_MODES", "DESIGNS", "COURSE_BATCH_SIZES", "QUICK", "FULL_EPOCHS"]

COURSE_BATCH_SIZES = (50, 100, 150, 200)
# Quick mode (tests, CI): a subsample and one epoch.
QUICK = {"train_samples": 2000, "test_samples": 500, "epochs": 1}
FULL_EPOCHS = 3


class ExperimentInputError(ValueError):
    """Bad arguments, raised on every rank before any training starts."""


@contextmanager
def _as_input_error():
    """Re-raise a ValueError from a shared check (``ppu_lab.checks``, ``TrainConfig``) as ``ExperimentInputError``."""
    try:
        yield
    except ExperimentInputError:
        raise
    except ValueError as exc:
        raise ExperimentInputError(str(exc)) from None


@dataclass(frozen=True)
class RunConfig:
    """One point of the grid. ``key`` identifies it in the results file (resume).

    The training settings are those of ``TrainConfig`` (``train_config()`` makes it, and the checks
    are its own); a run adds how many ranks train, how much of MNIST and how many threads per rank.
    """

    model: str
    hidden: int | None
    ranks: int
    batch_size: int
    batch_mode: str = TrainConfig.batch_mode
    epochs: int = TrainConfig.epochs
    lr: float | None = TrainConfig.lr  # None: train()'s default for the model
    lam: float = TrainConfig.lam
    design: str = TrainConfig.design
    seed: int = TrainConfig.seed
    train_samples: int | None = None  # None: all of the training set
    test_samples: int | None = None
    max_steps: int | None = TrainConfig.max_steps
    threads_per_rank: int = 1

    def __post_init__(self):
        with _as_input_error():
            integer("ranks", self.ranks, 1)
            integer("threads_per_rank", self.threads_per_rank, 1)
            for name in ("train_samples", "test_samples"):
                optional_integer(name, getattr(self, name), 1)
            self.train_config()

    @property
    def label(self) -> str:
        return self.model if self.hidden is None else f"{self.model}:{self.hidden}"

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.ranks if self.batch_mode == "per_rank" else self.batch_size

    def key(self) -> str:
        """Canonical JSON of every field: equal configurations, equal keys (the same as earlier versions
        of the lab wrote, so that their results files resume)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    def train_config(self, **settings) -> TrainConfig:
        """The ``TrainConfig`` of this run (``settings`` override, e.g. ``evaluate=False``)."""
        hidden = {} if self.hidden is None else {"hidden": self.hidden}
        return TrainConfig(model=self.model, lam=self.lam, lr=self.lr, batch_size=self.batch_size,
                           batch_mode=self.batch_mode, epochs=self.epochs, design=self.design, seed=self.seed,
                           max_steps=self.max_steps, threads=self.threads_per_rank, **hidden).replace(**settings)


def parse_model(spec: str) -> tuple[str, int | None]:
    """``"ann:10"`` -> ``("ann", 10)``; ``"ann"`` -> ``("ann", 50)``; ``"cnn"`` -> ``("cnn", None)``."""
    name, _, hidden = str(spec).strip().lower().partition(":")
    if name not in MODELS:
        raise ExperimentInputError(f"models: unknown model {spec!r}; use ann:H (H hidden units, e.g. ann:10) or cnn")
    if name == "cnn":
        if hidden:
            raise ExperimentInputError(f"models: {spec!r}: the CNN is the course's fixed network; write just 'cnn'")
        return "cnn", None
    if not hidden:
        return "ann", 50
    if not hidden.isdigit() or int(hidden) < 1:
        raise ExperimentInputError(f"models: {spec!r}: the hidden size after 'ann:' must be an integer >= 1")
    return "ann", int(hidden)


def default_ranks(world_size: int) -> list[int]:
    """1, 2, 4, ... up to the world size, and the world size itself."""
    ranks = [2**k for k in range(int(math.log2(world_size)) + 1)]
    return ranks if ranks[-1] == world_size else ranks + [world_size]


def expand_grid(models, ranks, batch_sizes, batch_modes=("global",), **fixed) -> list[RunConfig]:
    """All runs of the grid, ordered by rank count, then model, batch mode and batch size.

    ``fixed`` holds the other ``RunConfig`` fields (``epochs``, ``lr``, ...). Raises
    ``ExperimentInputError`` for an unknown model or batch mode, a bad setting, or a global batch
    smaller than the number of ranks (some rank would get no sample) or larger than ``train_samples``.
    """
    models = [parse_model(m) if isinstance(m, str) else tuple(m) for m in models]
    batch_modes = [batch_modes] if isinstance(batch_modes, str) else list(batch_modes)
    with _as_input_error():
        ranks = sorted({integer("ranks", p, 1) for p in ranks})
        batch_sizes = [integer("batch_sizes", b, 1) for b in batch_sizes]
    if not (models and ranks and batch_sizes and batch_modes):
        raise ExperimentInputError("the grid is empty: give at least one model, rank count, batch size and batch mode")
    unknown = set(fixed) - {f.name for f in dataclasses.fields(RunConfig)}
    if unknown:
        raise ExperimentInputError(f"unknown run settings {sorted(unknown)}")
    grid = []
    for p, (model, hidden), mode, b in itertools.product(ranks, models, batch_modes, batch_sizes):
        if mode == "global" and b < p:
            raise ExperimentInputError(
                f"batch size {b} < {p} ranks with batch_mode='global': each rank would get no sample. "
                f"Use batch sizes >= {p} or batch_mode='per_rank'")
        cfg = RunConfig(model, hidden, p, b, mode, **fixed)
        n = cfg.train_samples
        if n is not None and cfg.global_batch > n:
            raise ExperimentInputError(
                f"global batch {cfg.global_batch} (batch {b}, {p} ranks, {mode}) is larger than "
                f"train_samples={n}: use more samples or a smaller batch")
        grid.append(cfg)
    return grid
