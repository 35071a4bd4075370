"""PyTorch's own data parallelism, ``DistributedDataParallel`` over gloo, for comparison (notebook 06).

``train_ddp`` trains the course's CNN with exactly the mathematics of ``ppu_lab.train.train`` (same
initial weights, same global minibatches from the shared seed, same shard per rank, same step and L2
on the weights), but lets DDP do the communication: gradients bucketed and all-reduced by gloo while
backward runs, averaged over ranks, then ``torch.optim.SGD`` with weight decay. Run it on the ranks of
an MPI job (``mpiexec`` or ipyparallel MPI engines): ``init_from_mpi`` starts torch.distributed from the
MPI rank and size, on 127.0.0.1 with a free port chosen by rank 0 and broadcast with mpi4py.

``benchmarks/dp_step.py`` times both side by side.
"""

from __future__ import annotations

import os
import socket
import time
from types import SimpleNamespace

import numpy as np

from ppu_lab.config import limit_threads
from ppu_lab.models import make_cnn
from ppu_lab.mpi import shard_bounds, world
from ppu_lab.ridge import DivergenceError
from ppu_lab.steplog import StepLog, TrainResult, diverging
from ppu_lab.train import evaluate_accuracy
from ppu_lab.trainconfig import TrainConfig


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``addr`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def init_from_mpi(comm=None, backend: str = "gloo", addr: str = "127.0.0.1", timeout_s: float = 60):
    """Start torch.distributed on the ranks of ``comm`` (COMM_WORLD if None); returns (rank, size).

    Idempotent: a second call on a process whose group is already up returns at once. Rank 0 picks a
    free port and broadcasts it (lowercase ``bcast``: a small Python object). All ranks run on one
    machine (``addr`` 127.0.0.1); on a cluster pass rank 0's address.
    """
    import datetime

    import torch.distributed as dist

    comm = world(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    if dist.is_initialized():
        if dist.get_world_size() != size or dist.get_rank() != rank:
            raise RuntimeError(f"torch.distributed is already running as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not {rank} of {size}: call shutdown() first")
        return rank, size
    port = comm.bcast(free_port(addr) if rank == 0 else None, root=0)
    if addr == "127.0.0.1":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: do not guess a network interface
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return rank, size


def shutdown():
    """Tear down the torch.distributed group started by ``init_from_mpi`` (if any)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def train_ddp(data, config: TrainConfig | None = None, *, comm=None, progress=True, **settings) -> TrainResult:
    """Train the CNN with ``DistributedDataParallel`` (gloo); same settings and result as ``train("cnn")``.

    ``config``/``settings`` as for ``ppu_lab.train.train`` (the model is the CNN; ``design`` is DDP's
    own). ``step_times`` has "total" per step; "compute" and "comm" are NaN because DDP overlaps its
    all-reduce with backward, so the two cannot be timed apart.
    """
    cfg = (config or TrainConfig(model="cnn")).replace(**settings)
    if cfg.model != "cnn":
        raise ValueError(f"train_ddp trains the CNN; got model={cfg.model!r}")
    comm = world(comm)
    rank, size = init_from_mpi(comm)
    cfg.check_data(data, size)
    with limit_threads(cfg.thread_count, import_torch=True):  # one core per rank (see ppu_lab.train.train)
        return _train_ddp(cfg, data, comm, rank, size, progress)


def _train_ddp(cfg: TrainConfig, data, comm, rank, size, progress) -> TrainResult:
    import torch
    from mpi4py import MPI
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = make_cnn(cfg.seed)  # the same initial weights as ppu_lab.models.CnnModel(seed)
    model, n, lr = DDP(net), len(data[1]), cfg.step_size
    weights = [p for p in net.parameters() if p.dim() > 1]
    biases = [p for p in net.parameters() if p.dim() <= 1]
    # p <- p - lr * (mean grad over B + lam/N * p): ppu_lab's step on J/N, weight decay on weights only
    opt = torch.optim.SGD([{"params": weights, "weight_decay": cfg.lam / n},
                           {"params": biases, "weight_decay": 0.0}], lr=lr)
    ce = torch.nn.CrossEntropyLoss(reduction="sum")
    x_tr = torch.from_numpy(np.ascontiguousarray(data[0], dtype=np.float32).reshape(n, 1, 28, 28))
    y_tr = torch.from_numpy(np.ascontiguousarray(data[1], dtype=np.int64))
    x_te = torch.from_numpy(np.ascontiguousarray(data[2], dtype=np.float32).reshape(-1, 1, 28, 28))
    y_te = np.ascontiguousarray(data[3], dtype=np.int64)
    evaluator = SimpleNamespace(predict=lambda X: net(X).argmax(dim=1).numpy())  # what evaluate_accuracy needs
    bad = 0.0  # NaN once this rank saw a diverging loss
    with StepLog(n, cfg.global_batch(size), cfg.epochs, cfg.max_steps, show=progress and rank == 0,
                 desc=f"DDP x{size} ranks", label="DDP epoch") as log:
        for epoch in log.epochs():
            for idx in log.minibatches(epoch, cfg.seed):
                t0 = time.perf_counter()
                lo, hi = shard_bounds(len(idx), size, rank)
                mine = idx[lo:hi]
                opt.zero_grad()
                # DDP averages gradients over ranks; scale so the average is sum_B grad / |B|
                loss = ce(model(x_tr[mine]), y_tr[mine])
                (loss * (size / len(idx))).backward()
                opt.step()
                t1 = time.perf_counter()
                if diverging(loss.item(), hi - lo):
                    bad = float("nan")
                log.step(len(idx), loss.item(), total=t1 - t0)  # this rank's shard loss; summed per epoch
            totals = np.array([log.loss_sum, bad])
            comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
            if not np.isfinite(totals).all():  # checked once per epoch: DDP's step has no hook for it
                raise DivergenceError(f"DDP training diverged in epoch {epoch} (lr={lr:g}): lower lr and retrain.")
            with torch.no_grad():
                acc = evaluate_accuracy(evaluator, x_te, y_te, comm) if cfg.evaluate else float("nan")
            log.end_epoch(acc, loss_sum=totals[0])
    params = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    return log.result(params, cfg.describe(size, n, len(y_te), impl="ddp", design="ddp"))


def side_by_side(data, *, batch_size, batch_mode="global", steps=30, warmup=5, repeats=2, lr=0.01, comm=None,
                 extra=None) -> dict:
    """Median seconds per CNN step of ppu_lab's ``train`` and of ``train_ddp`` on all ranks of ``comm``.

    The two alternate ``repeats`` times (``steps`` steps each, the first ``warmup`` dropped), so that a
    change in the machine's load hits both. ``extra`` maps more names to ``fn(comm) -> list of step
    times`` (the benchmark adds its minimal loop). Collective; returns rank 0's medians on every rank.
    Starts torch.distributed on ``comm`` and shuts it down at the end.
    """
    import statistics

    from ppu_lab.train import train

    comm = world(comm)
    init_from_mpi(comm)
    kw = dict(batch_size=batch_size, batch_mode=batch_mode, epochs=10**6, max_steps=steps, evaluate=False,
              progress=False, comm=comm, lr=lr)
    times = {"ppu_lab": [], "DDP": [], **{k: [] for k in (extra or {})}}
    try:
        for _ in range(repeats):
            times["ppu_lab"] += train("cnn", data, **kw).step_times["total"][warmup:]
            times["DDP"] += train_ddp(data, **kw).step_times["total"][warmup:]
            for name, fn in (extra or {}).items():
                times[name] += list(fn(comm))[warmup:]
    finally:
        shutdown()
    return comm.bcast({k: statistics.median(v) for k, v in times.items()}, root=0)


def side_by_side_over_ranks(data, ranks, *, batch_size, batch_mode="global", comm=None, **kwargs) -> list[dict]:
    """``side_by_side`` on the first p ranks of ``comm`` for each p in ``ranks`` (the others sleep).

    Returns on every rank a list of ``{"ranks": p, "ppu_lab": s, "DDP": s}`` (seconds per step).
    One set of MPI engines (of the largest size) serves every p. Notebook 06.
    """
    from ppu_lab.mpi import first_ranks, sleeping_barrier

    comm = world(comm)
    rows = []
    for p in ranks:
        row = None
        with first_ranks(p, comm) as sub:
            if sub is not None:
                row = {"ranks": p, **side_by_side(data, batch_size=batch_size, batch_mode=batch_mode, comm=sub,
                                                  **kwargs)}
        sleeping_barrier(comm)
        rows.append(comm.bcast(row, root=0))
    return rows


def main(argv=None):
    """``mpiexec -n 2 python -m ppu_lab.ddp``: train the CNN with ppu_lab and with DDP, print both."""
    import argparse

    from ppu_lab.config import pick
    from ppu_lab.data import load_mnist
    from ppu_lab.mpi import mpi_main
    from ppu_lab.train import train

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--epochs", type=int, default=pick(2, 1), help="epochs (default 2; 1 in quick mode)")
    ap.add_argument("--batch-size", type=int, default=100, help="global batch (default 100)")
    ap.add_argument("--data", default=None, help="MNIST folder (default: $PPU_LAB_DATA or the cache)")
    args = ap.parse_args(argv)

    def run():
        comm = world()
        data = load_mnist(args.data)
        ours = train("cnn", data, epochs=args.epochs, batch_size=args.batch_size, comm=comm, progress=False)
        theirs = train_ddp(data, epochs=args.epochs, batch_size=args.batch_size, comm=comm, progress=False)
        shutdown()
        if comm.Get_rank() == 0:
            for name, r in (("ppu_lab", ours), ("DDP", theirs)):
                s = r.summary()
                print(f"{name:8s} ranks {s['ranks']}: accuracy {s['final_accuracy']:.4f}, "
                      f"median step {1e3 * s['median_step_time']:.1f} ms, epoch {s['epoch_time']:.2f} s")
            print(f"max |params difference| = {np.abs(ours.params - theirs.params).max():.2e}")

    mpi_main(run)


if __name__ == "__main__":
    main()
