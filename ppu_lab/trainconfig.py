"""The settings of one training run: one dataclass shared by ``train``, ``ddp.train_ddp`` and the
experiment runner (notebooks 05-07).

``TrainConfig`` checks itself when it is made (a ``ValueError`` that names the setting and what
to pass); ``check_data`` adds the checks that need the data and the number of ranks. Notebooks rarely
make one by hand: ``train("ann", data, hidden=10, batch_size=50)`` builds it from its keywords.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ppu_lab.checks import integer, optional_integer, real

MODELS = ("ann", "cnn")
BATCH_MODES = ("global", "per_rank")
DESIGNS = ("allreduce", "scatter_allgather")
# Learning rates (on J/N) used when ``lr`` is None: tuned for MNIST, batch 100, stable up to batch 512.
DEFAULT_LR = {"ann": 1.0, "cnn": 0.2}


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how (see ``ppu_lab.train.train`` for the meaning of each setting)."""

    model: str = "ann"  # "ann" or "cnn"
    hidden: int = 50  # ANN: hidden units
    activation: str = "sigmoid"  # ANN: "sigmoid", "tanh" or "relu"
    lam: float = 5.0  # L2 weight (the course's 5)
    lr: float | None = None  # step on J/N; None: DEFAULT_LR[model]
    batch_size: int = 100
    batch_mode: str = "global"  # "global": batch_size split over ranks; "per_rank": each rank takes it
    epochs: int = 1
    design: str = "allreduce"  # or the course's "scatter_allgather"
    seed: int = 0  # initial weights and minibatch order
    max_steps: int | None = None  # stop after this many steps in total
    threads: int | str | None = "auto"  # torch/BLAS threads per rank; "auto": 1; None: leave alone
    evaluate: bool = True  # test accuracy after each epoch

    def __post_init__(self):
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}; got {getattr(self, name)!r}")

        choice("model", MODELS)
        choice("batch_mode", BATCH_MODES)
        choice("design", DESIGNS)
        lam = real("lam (the L2 weight)", self.lam)
        if not (np.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam (the L2 weight) must be finite and >= 0; got {self.lam}")
        if self.lr is not None and not (np.isfinite(real("lr", self.lr)) and self.lr > 0):
            raise ValueError(f"lr (learning rate) must be > 0; got {self.lr}")
        fixed = {"lam": lam, "lr": None if self.lr is None else float(self.lr),
                 "batch_size": integer("batch_size", self.batch_size, 1),
                 "epochs": integer("epochs", self.epochs, 1),
                 "max_steps": optional_integer("max_steps", self.max_steps, 1),
                 "seed": integer("seed", self.seed, 0),
                 "threads": self.threads if self.threads in ("auto", None) else integer("threads", self.threads, 1)}
        for name, value in fixed.items():  # normalised (100.0 -> 100); frozen, hence object.__setattr__
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` applied (and checked); an unknown name is a ``TypeError`` naming it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown training setting(s) {unknown}; the settings are "
                            f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    @property
    def step_size(self) -> float:
        """``lr``, or the model's default learning rate when it is None."""
        return DEFAULT_LR[self.model] if self.lr is None else self.lr

    @property
    def thread_count(self) -> int | None:
        """Threads per rank for ``config.limit_threads``: "auto" means 1 (one core per rank)."""
        return 1 if self.threads == "auto" else self.threads

    def global_batch(self, ranks: int = 1) -> int:
        """Samples per step over all ranks: ``batch_size``, times ``ranks`` with a per-rank batch."""
        return self.batch_size * (ranks if self.batch_mode == "per_rank" else 1)

    def check_data(self, data, ranks: int = 1) -> int:
        """Check ``data`` = (x_train, y_train, x_test, y_test) against this run on ``ranks`` ranks;
        return the global batch. Raises ``ValueError`` saying what to change."""
        if not (isinstance(data, (tuple, list)) and len(data) == 4):
            raise ValueError("data must be (x_train, y_train, x_test, y_test), e.g. ppu_lab.data.load_mnist()")
        x_tr, y_tr, x_te, y_te = data
        for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            if np.ndim(x) != 3 or np.shape(x)[1:] != (28, 28):
                raise ValueError(f"x_{name} must have shape (n, 28, 28); got {np.shape(x)}")
            if np.ndim(y) != 1 or len(y) != len(x):
                raise ValueError(f"y_{name} must be 1-D with one label per image ({len(x)}); got {np.shape(y)}")
        if len(x_tr) == 0 or len(x_te) == 0:
            raise ValueError("data has an empty train or test set")
        global_batch = self.global_batch(ranks)
        if global_batch > len(x_tr):
            raise ValueError(f"the global batch ({global_batch}) is larger than the training set ({len(x_tr)}): "
                             f"use a smaller batch_size")
        if global_batch < ranks:
            raise ValueError(f"the global batch ({global_batch}) is smaller than the number of ranks ({ranks}): "
                             f"every rank needs at least one sample; raise batch_size or use batch_mode='per_rank'")
        return global_batch

    def describe(self, ranks: int, n_train: int, n_test: int, **extra) -> dict:
        """The run as ``TrainResult.config`` records it: the settings used (``lr`` resolved), the shape."""
        ann = self.model == "ann"
        return {"model": self.model, "hidden": self.hidden if ann else None, "lam": self.lam, "lr": self.step_size,
                "batch_size": self.batch_size, "batch_mode": self.batch_mode, "global_batch": self.global_batch(ranks),
                "epochs": self.epochs, "design": self.design, "seed": self.seed, "ranks": ranks, "n_train": n_train,
                "n_test": n_test, "activation": self.activation if ann else None, **extra}
