"""Data-parallel minibatch SGD for the MNIST models (notebooks 05-07), serial when ``comm`` is None.

One function, ``train``, for both models and both communication designs:

- ``design="allreduce"`` (default): every rank draws the *same* global minibatch from the shared
  seed (``ppu_lab.ridge.minibatches``), takes its contiguous shard (``shard_bounds``), computes the
  summed gradient of the shard into one preallocated flat buffer whose last slot holds the shard's
  loss, and one ``Allreduce(SUM)`` of that buffer gives every rank the batch gradient and loss.
- ``design="scatter_allgather"`` (the course's): rank 0 gathers the minibatch's samples and
  ``Scatterv``s them; every rank computes its shard's gradient; ``Allgather`` of all shard buffers;
  every rank sums them in rank order.

Batch size is explicit: ``batch_mode="global"`` splits ``batch_size`` samples over the ranks (strong
scaling: same mathematics for any number of ranks), ``batch_mode="per_rank"`` gives each rank
``batch_size`` samples, so the global batch is ``batch_size * ranks`` (weak scaling: more ranks means
fewer, larger steps per epoch, which changes the optimisation).

The step, for a global batch B of a training set of N samples (``ppu_lab.models``), is

    theta <- theta - (lr / N) * ((N / |B|) * sum_{i in B} grad CE_i + lam * mask * theta)

i.e. SGD with step ``lr`` on the per-sample mean J / N, so ``lr`` does not depend on N.

The settings of a run are a ``TrainConfig`` (``ppu_lab.trainconfig``); the epochs, step count,
timings, progress bar and history are kept by a ``StepLog`` (``ppu_lab.steplog``), the same for
``ppu_lab.ddp``. Training draws nothing from NumPy's or torch's global random generators: the
initial weights come from ``seed`` through local generators, the minibatches from (seed, epoch).
"""

from __future__ import annotations

import math
import time

import numpy as np

from ppu_lab.config import limit_threads
from ppu_lab.models import build_model
from ppu_lab.ridge import DivergenceError
from ppu_lab.steplog import DIVERGENCE_LOSS, StepLog, TrainResult, diverging
from ppu_lab.trainconfig import DEFAULT_LR, TrainConfig

__all__ = ["train", "TrainConfig", "TrainResult", "DEFAULT_LR", "DIVERGENCE_LOSS", "evaluate_accuracy"]

EVAL_CHUNK = 1000  # test images per forward pass (bounds the CNN's activation memory)


def train(model=None, data=None, config: TrainConfig | None = None, *, comm=None, progress=True,
          **settings) -> TrainResult:
    """Train ``model`` ("ann" or "cnn") with minibatch SGD, data-parallel over ``comm`` (None: serial).

    The settings are ``config`` (a ``TrainConfig``; default ``TrainConfig()``) with ``model`` and the
    keywords ``settings`` applied: ``hidden=50, activation="sigmoid", lam=5.0, lr=None,
    batch_size=100, batch_mode="global", epochs=1, design="allreduce", seed=0, max_steps=None,
    threads="auto", evaluate=True``. For example ``train("ann", data, hidden=10, comm=comm)``.

    Every rank of ``comm`` must call it with the same settings and the same ``data``
    (``(x_train, y_train, x_test, y_test)`` from ``ppu_lab.data.load_mnist``). Returns a
    ``TrainResult``; its ``params`` and ``history`` are identical on every rank, and for a fixed
    global batch and seed they do not depend on the number of ranks (up to rounding).

    lr: step on the per-sample mean objective (see module docstring); None picks ``DEFAULT_LR[model]``.
    batch_mode: "global" (``batch_size`` samples per step, split over ranks) or "per_rank".
    threads: torch/BLAS threads per process; "auto" (default) means 1. Under MPI each rank owns one
        core: torch's default of one thread per core in every rank would run ranks x cores threads on
        the cores, and the ranks would slow each other down (measured on 2 loaded cores: a CNN step
        took 4x longer with 2 threads than with 1) and make the timings noisy. One thread in serial
        too, so that the 1-rank baseline of a speedup uses one core. None leaves the settings alone.
    max_steps: stop after this many steps in total (the last epoch is then partial).
    evaluate: compute the test accuracy after each epoch (in parallel: each rank a shard, counts summed).
    progress: a progress bar and one line per epoch on rank 0.

    Divergence (a non-finite or exploding loss on any rank) raises ``DivergenceError`` on every rank in
    the same step: the loss travels in the same Allreduce as the gradient, so all ranks see it.
    """
    cfg = (config or TrainConfig()).replace(**({} if model is None else {"model": model}), **settings)
    size = 1 if comm is None else comm.Get_size()
    cfg.check_data(data, size)
    if comm is not None:
        from ppu_lab.mpi import check_all

        sizes = (len(data[0]), len(data[2]))
        all_sizes = comm.allgather(sizes)  # small Python objects: lowercase
        check_all(all(s == sizes for s in all_sizes),
                  f"ranks were given different data (train/test sizes per rank: {all_sizes}); "
                  f"every rank must load the same data set", comm)
    with limit_threads(cfg.thread_count, import_torch=cfg.model == "cnn"):
        return _train(cfg, data, comm, progress)


def _train(cfg: TrainConfig, data, comm, progress) -> TrainResult:
    """The training loop: shard, local gradient, one collective, the update (see the module docstring)."""
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    m = build_model(cfg.model, hidden=cfg.hidden, activation=cfg.activation, seed=cfg.seed)
    x_tr, y_tr = m.prepare(data[0]), np.ascontiguousarray(data[1], dtype=np.int64)
    x_te, y_te = m.prepare(data[2]), np.ascontiguousarray(data[3], dtype=np.int64)
    n, lr, global_batch = len(y_tr), cfg.step_size, cfg.global_batch(size)
    theta, grad, gsum = m.theta, m.grad, m.grad_view
    decay = (1.0 - lr * cfg.lam / n * m.mask).astype(m.dtype)  # the L2 term folded into one multiply
    step_buf = np.empty_like(theta)
    exchange, get_shard = _design(cfg.design, grad, x_tr, y_tr, comm, size, rank, global_batch)

    with StepLog(n, global_batch, cfg.epochs, cfg.max_steps, show=progress and rank == 0,
                 desc=f"{cfg.model} x{size} ranks") as log:
        for epoch in log.epochs():
            for idx in log.minibatches(epoch, cfg.seed):
                t0 = time.perf_counter()
                X, y = get_shard(idx)
                local_loss = m.loss_grad(X, y)  # gradient sum into gsum
                grad[-1] = local_loss
                t1 = time.perf_counter()
                exchange()  # grad now holds the batch's gradient sum and loss sum
                t2 = time.perf_counter()
                batch_loss = float(grad[-1])
                if diverging(batch_loss, len(idx)):
                    raise _diverged(batch_loss / len(idx), local_loss, epoch, log.steps + 1, size, rank, lr,
                                    len(idx))
                np.multiply(theta, decay, out=theta)  # theta *= 1 - lr*lam/N*mask
                np.multiply(gsum, lr / len(idx), out=step_buf)
                theta -= step_buf  # theta -= lr/|B| * sum grad
                log.step(len(idx), batch_loss, total=time.perf_counter() - t0, compute=t1 - t0, comm=t2 - t1)
            if not np.isfinite(theta).all():  # identical on every rank, so every rank raises
                raise DivergenceError(f"training diverged in epoch {epoch}: non-finite parameters "
                                      f"(lr={lr:g}); lower lr and retrain.")
            log.end_epoch(evaluate_accuracy(m, x_te, y_te, comm) if cfg.evaluate else float("nan"))
    return log.result(np.array(theta, copy=True), cfg.describe(size, n, len(y_te)))


def _diverged(mean_loss, local_loss, epoch, step, size, rank, lr, b):
    """The error every rank raises in the same step (all saw the same summed loss)."""
    where = f"epoch {epoch}, step {step}, on {size} rank(s)"
    mine = "" if size == 1 else f" This rank's ({rank}) own shard loss was {local_loss:.3g}."
    if not math.isfinite(mean_loss):
        return DivergenceError(
            f"training stopped at {where}: the batch's loss is {mean_loss} (NaN or inf).{mine} Check the "
            f"input data for NaN/inf; if the data are clean, lr={lr:g} is too large: lower it (e.g. {lr / 4:g}).")
    return DivergenceError(
        f"training diverged at {where}: the batch's mean loss became {mean_loss:.3g} (> {DIVERGENCE_LOSS:g}; "
        f"guessing gives 2.3) with lr={lr:g} and global batch {b}.{mine} Lower lr (e.g. {lr / 4:g}) and retrain.")


# --------------------------------------------------------------------------- communication designs
def _design(design, grad, x, y, comm, size, rank, global_batch):
    """``(exchange, get_shard)`` of a design: the collective on ``grad`` and how a rank gets its rows."""
    if design == "allreduce":
        return _make_allreduce(grad, comm), _local_shard(x, y, size, rank, global_batch)
    return _make_allgather(grad, comm, size), _scatter_shard(x, y, comm, size, rank, global_batch)


def _make_allreduce(grad, comm):
    if comm is None:
        return lambda: None
    from mpi4py import MPI

    in_place = MPI.IN_PLACE
    return lambda: comm.Allreduce(in_place, grad, op=MPI.SUM)


def _make_allgather(grad, comm, size):
    if comm is None:
        return lambda: None
    gathered = np.empty((size, grad.size), dtype=grad.dtype)

    def step():
        comm.Allgather(grad, gathered)
        np.sum(gathered, axis=0, out=grad)  # rank order: the same sum on every rank

    return step


def _local_shard(x, y, size, rank, global_batch):
    """This rank's rows of each global minibatch, gathered into two buffers allocated once.

    ``np.take(..., out=)`` into a preallocated buffer: no allocation per step, and about 5x faster than
    indexing a torch tensor with a NumPy index array (which converts the index and allocates the
    batch every step). The returned ``(X, y)`` are overwritten by the next call.
    """
    from ppu_lab.mpi import shard_bounds

    is_torch = not isinstance(x, np.ndarray)
    x_np = x.numpy() if is_torch else x
    cap = -(-global_batch // size)  # the largest shard: ceil(global_batch / size)
    buf_x = np.empty((cap,) + x_np.shape[1:], dtype=x_np.dtype)
    buf_y = np.empty(cap, dtype=y.dtype)
    if is_torch:
        import torch

        out_x, out_y = torch.from_numpy(buf_x), torch.from_numpy(buf_y)  # views: no copy
    else:
        out_x, out_y = buf_x, buf_y

    def get(idx):
        lo, hi = shard_bounds(len(idx), size, rank)
        k = hi - lo
        mine = idx[lo:hi]  # a permutation's entries: always in range, so mode="clip" changes nothing
        np.take(x_np, mine, axis=0, out=buf_x[:k], mode="clip")  # mode="raise" would buffer the copy
        np.take(y, mine, out=buf_y[:k], mode="clip")
        return out_x[:k], out_y[:k]

    return get


def _scatter_shard(x, y, comm, size, rank, global_batch):
    """The course's design: rank 0 packs the minibatch and Scatterv's it; others receive their shard."""
    if comm is None:
        return _local_shard(x, y, 1, 0, global_batch)
    from ppu_lab.mpi import mpi_dtype, shard_counts, shard_displs

    is_torch = not isinstance(x, np.ndarray)
    x_np = x.numpy() if is_torch else x
    row = int(np.prod(x_np.shape[1:]))
    recv_x = np.empty((global_batch // size + 1,) + x_np.shape[1:], dtype=x_np.dtype)
    recv_y = np.empty(global_batch // size + 1, dtype=np.int64)
    if is_torch:
        import torch

        recv_x_t = torch.from_numpy(recv_x)

    def get(idx):
        counts = shard_counts(len(idx), size)
        displs = shard_displs(counts)
        send_x = x_np[idx] if rank == 0 else None
        send_y = y[idx] if rank == 0 else None
        k = int(counts[rank])
        comm.Scatterv([send_x, counts * row, displs * row, mpi_dtype(x_np)] if rank == 0 else None,
                      recv_x[:k], root=0)
        comm.Scatterv([send_y, counts, displs, mpi_dtype(y)] if rank == 0 else None, recv_y[:k], root=0)
        return (recv_x_t[:k] if is_torch else recv_x[:k]), recv_y[:k]

    return get


def evaluate_accuracy(m, x_test, y_test, comm=None) -> float:
    """Fraction of ``x_test`` classified correctly; under MPI each rank classifies a shard, counts summed."""
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    from ppu_lab.mpi import shard_bounds

    lo, hi = shard_bounds(len(y_test), size, rank)
    correct = 0
    for a in range(lo, hi, EVAL_CHUNK):
        b = min(a + EVAL_CHUNK, hi)
        correct += int((m.predict(x_test[a:b]) == y_test[a:b]).sum())
    counts = np.array([correct], dtype=np.int64)
    if comm is not None:
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
    return float(counts[0]) / len(y_test)
