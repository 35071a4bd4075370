"""What every design of ``ppu_lab.designs`` needs of a model: one interface for the ridge problem
(notebooks 01, 04) and the MNIST models (notebooks 05, 06).

An objective holds the parameters as one flat vector ``theta`` (the model's own memory: for the CNN
a NumPy view of the torch parameters) and one flat buffer ``grad`` whose last slot holds the loss,
and offers three operations, none of which communicates:

- ``shard_gradient(rows)``: the data term's gradient *summed* over the training rows ``rows``
  into ``grad[:-1]``, their summed loss into ``grad[-1]``;
- ``apply(gsum, batch)``: one SGD step with a gradient sum over ``batch`` samples, L2 term included
  (``ppu_lab.train.sgd_update``: the step of ``train``, for the ridge problem in ``ridge.sgd``'s scale);
- ``evaluate(comm=None)``: test accuracy (MNIST) or J(theta) (ridge); collective when ``comm`` is given.

So a design's step is "gradients of my rows, some communication, ``apply``", whatever the model.
"""

from __future__ import annotations

import numpy as np

from ppu_lab.train import local_shard, sgd_update


class RidgeObjective:
    """J(w) = 1/2 ||y - Xw||^2 + lam/2 ||w||^2 with ``ridge.sgd``'s step ``lr`` (on J, a sum over samples).

    One step is ``w <- w - lr ((N/|B|) g_B + lam w)`` = ``w (1 - lr lam) - (lr N / |B|) g_B``, the
    update of ``ridge.sgd`` and ``parallel.sgd_allreduce`` (equal to rounding, ~1e-16 relative).
    """

    name = "ridge"

    def __init__(self, X, y, lam, lr, w0=None):
        from ppu_lab import ridge

        self.X, self.y = ridge.check_problem(X, y, lam)
        self.n, d = self.X.shape
        self.lam, self.lr = float(lam), float(lr)
        self.theta = np.zeros(d) if w0 is None else np.array(w0, dtype=float)
        self.grad = np.zeros(d + 1)                          # gradient sum, then the loss sum
        self.decay = 1.0 - self.lr * self.lam
        self.dtype = np.float64
        self._buf = np.empty(d)

    def shard_gradient(self, rows) -> None:
        X, y = self.X[rows], self.y[rows]
        r = y - np.dot(X, self.theta)                        # (rows,) residual
        self.grad[:-1] = -np.dot(X.T, r)                     # ridge.data_gradient, keeping r for the loss
        self.grad[-1] = 0.5 * float(r @ r)

    def apply(self, gsum, batch: int) -> None:
        sgd_update(self.theta, gsum, self.decay, self.lr * self.n / batch, self._buf)

    def evaluate(self, comm=None) -> float:
        r = self.y - self.X @ self.theta
        return 0.5 * float(r @ r) + 0.5 * self.lam * float(self.theta @ self.theta)


class ModelObjective:
    """The ANN or the CNN of ``ppu_lab.models`` with ``train``'s objective and step (lr on J/N).

    ``config``: a ``TrainConfig`` (model, hidden, lam, lr, seed, threads); ``data``: ``load_mnist``'s
    four arrays; ``net``: another torch module to train instead of the course's CNN (notebook 08's
    larger model). ``max_rows``: the most rows one ``shard_gradient`` call takes (its gather buffers).
    """

    def __init__(self, config, data, max_rows: int, net=None):
        from ppu_lab.models import CnnModel, build_model

        cfg = config
        m = CnnModel(cfg.seed, net=net) if net is not None else build_model(cfg.model, cfg.hidden, cfg.activation,
                                                                              cfg.seed)
        self.model, self.name = m, cfg.model if net is None else "torch"
        x_tr, y_tr = m.prepare(data[0]), np.ascontiguousarray(data[1], dtype=np.int64)
        self.x_test, self.y_test = m.prepare(data[2]), np.ascontiguousarray(data[3], dtype=np.int64)
        self.n, self.lr = len(y_tr), cfg.step_size
        self.theta, self.grad, self.dtype = m.theta, m.grad, m.dtype
        self.decay = (1.0 - self.lr * cfg.lam / self.n * m.mask).astype(m.dtype)
        self._rows = local_shard(x_tr, y_tr, 1, 0, max_rows)  # gathers the given rows into fixed buffers
        self._buf = np.empty_like(self.theta)

    def shard_gradient(self, rows) -> None:
        X, y = self._rows(rows)
        self.model.loss_grad(X, y)      # writes the loss into grad[-1] itself (before backward: see overlap)

    def apply(self, gsum, batch: int) -> None:
        sgd_update(self.theta, gsum, self.decay, self.lr / batch, self._buf)

    def evaluate(self, comm=None) -> float:
        from ppu_lab.train import evaluate_accuracy

        return evaluate_accuracy(self.model, self.x_test, self.y_test, comm)


def make_objective(model, data, config=None, *, max_rows, net=None, **settings):
    """``RidgeObjective`` for ``model="ridge"`` (``data = (X, y)``, settings ``lam``, ``lr``), else a
    ``ModelObjective`` of ``TrainConfig(model=model, **settings)`` on MNIST ``data``."""
    if model == "ridge":
        return RidgeObjective(data[0], data[1], settings.get("lam", 1.0), settings["lr"])
    from ppu_lab.trainconfig import TrainConfig

    cfg = (config or TrainConfig()).replace(model=model, **settings)
    return ModelObjective(cfg, data, max_rows, net=net)
