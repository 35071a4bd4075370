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
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from ppu_lab.models import build_model
from ppu_lab.ridge import DivergenceError, minibatches

# Mean cross-entropy per sample above which training is declared divergent (uniform guessing: log 10 = 2.3).
DIVERGENCE_LOSS = 100.0
# Learning rates (on J/N) used when ``lr`` is None: tuned for MNIST, batch 100, stable up to batch 512.
DEFAULT_LR = {"ann": 1.0, "cnn": 0.2}
EVAL_CHUNK = 1000  # test images per forward pass (bounds the CNN's activation memory)


@dataclass
class TrainResult:
    """What ``train`` returns (identical ``params`` and ``history`` on every rank)."""

    params: np.ndarray
    history: list = field(default_factory=list)  # per epoch: epoch, train_loss, test_accuracy, epoch_time
    step_times: dict = field(default_factory=dict)  # "compute", "comm", "total": seconds per step
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Medians per step, mean epoch time, final accuracy and the run's shape, as one flat dict."""
        med = {k: (statistics.median(v) if v else float("nan")) for k, v in self.step_times.items()}
        full = [h["epoch_time"] for h in self.history if h.get("complete", True)] or \
               [h["epoch_time"] for h in self.history]
        return {
            "median_step_time": med.get("total", float("nan")),
            "epoch_time": float(np.mean(full)) if full else float("nan"),
            "compute_time": med.get("compute", float("nan")),
            "comm_time": med.get("comm", float("nan")),
            "final_accuracy": self.history[-1]["test_accuracy"] if self.history else float("nan"),
            "steps": len(self.step_times.get("total", [])),
            "global_batch": self.config.get("global_batch"),
            "ranks": self.config.get("ranks", 1),
        }


# --------------------------------------------------------------------------- checks
def _check_args(model, data, lr, batch_size, batch_mode, epochs, design, max_steps, size):
    if model not in ("ann", "cnn"):
        raise ValueError(f"model must be 'ann' or 'cnn'; got {model!r}")
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
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr (learning rate) must be > 0; got {lr}")
    if batch_mode not in ("global", "per_rank"):
        raise ValueError(f"batch_mode must be 'global' (split over ranks) or 'per_rank' (grows with ranks); "
                         f"got {batch_mode!r}")
    if design not in ("allreduce", "scatter_allgather"):
        raise ValueError(f"design must be 'allreduce' or 'scatter_allgather'; got {design!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size}")
    global_batch = int(batch_size) * (size if batch_mode == "per_rank" else 1)
    if global_batch > len(x_tr):
        raise ValueError(f"the global batch ({global_batch}) is larger than the training set ({len(x_tr)}): "
                         f"use a smaller batch_size")
    if global_batch < size:
        raise ValueError(f"the global batch ({global_batch}) is smaller than the number of ranks ({size}): "
                         f"every rank needs at least one sample; raise batch_size or use batch_mode='per_rank'")
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1; got {epochs}")
    if max_steps is not None and (int(max_steps) != max_steps or max_steps < 1):
        raise ValueError(f"max_steps must be None or an integer >= 1; got {max_steps}")
    return global_batch


def _threads(n, stack, model):
    """Limit torch and BLAS to ``n`` threads for the duration of training (restored afterwards)."""
    if n is None:
        return
    from threadpoolctl import threadpool_limits

    if model == "cnn" or "torch" in sys.modules:  # the ANN does not need torch: do not import it
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(int(n))
        stack.callback(torch.set_num_threads, old)
    stack.enter_context(threadpool_limits(int(n)))


# --------------------------------------------------------------------------- training
def train(model="ann", data=None, *, hidden=50, lam=5.0, lr=None, batch_size=100, batch_mode="global",
          epochs=1, design="allreduce", seed=0, comm=None, progress=True, max_steps=None,
          activation="sigmoid", threads="auto", evaluate=True):
    """Train ``model`` ("ann" or "cnn") with minibatch SGD, data-parallel over ``comm`` (None: serial).

    Every rank of ``comm`` must call it with the same arguments and the same ``data``
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

    Divergence (a non-finite or exploding loss on any rank) raises ``DivergenceError`` on every rank in
    the same step: the loss travels in the same Allreduce as the gradient, so all ranks see it.
    """
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    global_batch = _check_args(model, data, lr, batch_size, batch_mode, epochs, design, max_steps, size)
    lr = DEFAULT_LR[model] if lr is None else float(lr)
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam (the L2 weight) must be finite and >= 0; got {lam}")
    if comm is not None:
        from ppu_lab.mpi import check_all

        sizes = (len(data[0]), len(data[2]))
        all_sizes = comm.allgather(sizes)  # small Python objects: lowercase
        check_all(all(s == sizes for s in all_sizes),
                  f"ranks were given different data (train/test sizes per rank: {all_sizes}); "
                  f"every rank must load the same data set", comm)
    with ExitStack() as stack:
        _threads(1 if threads == "auto" else threads, stack, model)
        return _train(model, data, hidden, lam, lr, int(batch_size), batch_mode, global_batch, int(epochs),
                      design, seed, comm, rank, size, progress, max_steps, activation, evaluate)


def _train(model_name, data, hidden, lam, lr, batch_size, batch_mode, global_batch, epochs, design, seed,
           comm, rank, size, progress, max_steps, activation, evaluate):
    from tqdm import tqdm

    m = build_model(model_name, hidden=hidden, activation=activation, seed=seed)
    # Rank-aware seeding: initial weights and minibatch order come from ``seed`` (identical on every
    # rank); anything a rank draws on its own (none of the models does yet) comes from (seed, rank).
    np.random.seed((seed * 7919 + rank) % 2**32)
    if model_name == "cnn":
        import torch

        torch.manual_seed(seed * 7919 + rank + 1)
    x_tr, y_tr = m.prepare(data[0]), np.ascontiguousarray(data[1], dtype=np.int64)
    x_te, y_te = m.prepare(data[2]), np.ascontiguousarray(data[3], dtype=np.int64)
    n = len(y_tr)
    theta, grad, gsum = m.theta, m.grad, m.grad_view
    decay = (1.0 - lr * lam / n * m.mask).astype(m.dtype)  # the L2 term folded into one multiply
    step_buf = np.empty_like(theta)

    if design == "allreduce":
        comm_step = _make_allreduce(grad, comm)
        get_shard = _local_shard(x_tr, y_tr, size, rank, global_batch)
    else:
        comm_step = _make_allgather(grad, comm, size)
        get_shard = _scatter_shard(x_tr, y_tr, comm, size, rank, global_batch)

    steps_per_epoch = math.ceil(n / global_batch)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    bar = tqdm(total=total_steps, disable=not (progress and rank == 0), desc=f"{model_name} x{size} ranks",
               unit="step", file=sys.stderr, mininterval=0.5)
    times = {"compute": [], "comm": [], "total": []}
    history = []
    step = 0
    try:
        for epoch in range(1, epochs + 1):
            loss_sum, seen = 0.0, 0
            t_epoch = time.perf_counter()
            for idx in minibatches(n, global_batch, seed, epoch):
                t0 = time.perf_counter()
                X, y = get_shard(idx)
                local_loss = m.loss_grad(X, y)  # gradient sum into gsum
                grad[-1] = local_loss
                t1 = time.perf_counter()
                comm_step()  # grad now holds the batch's gradient sum and loss sum
                t2 = time.perf_counter()
                b = len(idx)
                batch_loss = float(grad[-1])
                if not math.isfinite(batch_loss) or batch_loss / b > DIVERGENCE_LOSS:
                    raise _diverged(batch_loss / b, local_loss, epoch, step + 1, size, rank, lr, b)
                np.multiply(theta, decay, out=theta)  # theta *= 1 - lr*lam/N*mask
                np.multiply(gsum, lr / b, out=step_buf)
                theta -= step_buf  # theta -= lr/|B| * sum grad
                t3 = time.perf_counter()
                times["compute"].append(t1 - t0)
                times["comm"].append(t2 - t1)
                times["total"].append(t3 - t0)
                loss_sum += batch_loss
                seen += b
                step += 1
                bar.update(1)
                if step == total_steps:
                    break
            epoch_time = time.perf_counter() - t_epoch
            if not np.isfinite(theta).all():  # identical on every rank, so every rank raises
                raise DivergenceError(f"training diverged in epoch {epoch}: non-finite parameters "
                                      f"(lr={lr:g}); lower lr and retrain.")
            acc = evaluate_accuracy(m, x_te, y_te, comm) if evaluate else float("nan")
            record_epoch(history, epoch, loss_sum, seen, n, acc, epoch_time, bar if progress and rank == 0 else None)
            if step == total_steps:
                break
    finally:
        bar.close()
    config = {"model": model_name, "hidden": hidden if model_name == "ann" else None, "lam": lam, "lr": lr,
              "batch_size": batch_size, "batch_mode": batch_mode, "global_batch": global_batch,
              "epochs": epochs, "design": design, "seed": seed, "ranks": size, "n_train": n,
              "n_test": len(y_te), "activation": activation if model_name == "ann" else None}
    return TrainResult(params=np.array(theta, copy=True), history=history, step_times=times, config=config)


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


def record_epoch(history, epoch, loss_sum, seen, n, acc, epoch_time, bar=None, label="epoch"):
    """Append one epoch's entry to ``history`` (the format ``TrainResult.history`` documents) and,
    given rank 0's progress ``bar``, log it there. Shared by ``train`` and ``ppu_lab.ddp``."""
    history.append({"epoch": epoch, "train_loss": loss_sum / seen, "test_accuracy": acc,
                    "epoch_time": epoch_time, "complete": seen == n})
    if bar is not None:
        bar.write(f"{label} {epoch}: train loss {loss_sum / seen:.4f}, test accuracy {acc:.4f}, {epoch_time:.2f} s")


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
