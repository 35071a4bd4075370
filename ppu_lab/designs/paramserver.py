"""A parameter server over MPI (notebook 08, section 2): the MPI counterpart of notebook 02's Hogwild!.

Rank 0, the *server*, holds the parameters and applies every update; ranks 1..W (W = p - 1), the
*workers*, compute gradients: a worker *pushes* its gradient sum (``Isend`` to rank 0) and *pulls*
the current weights (``Irecv`` from rank 0). The server computes no gradients: with p ranks, W = p - 1
of them compute (Li et al. 2014 describe the design at scale; DistBelief, Dean et al. 2012).

- ``sync_parameter_server``: every step the server waits for all W gradients of the global
  minibatch (worker w computed shard w of it), adds them in worker order, takes the step and sends
  the new weights to every worker. That is synchronous data-parallel SGD with a gather and a
  scatter instead of an Allreduce (tested: equal to it to rounding).
- ``async_parameter_server``: each worker runs SGD on its own part of the data with batch
  |B| / W and never waits for the others; the server applies each gradient *as it arrives*, to
  weights that other workers may have changed since the gradient's weights were sent: the
  gradient is *stale* by that many updates (measured, per update). ``bound`` caps it the way
  stale-synchronous parallel does (Ho et al. 2013): the server answers a worker only while it is at
  most ``bound`` pushes ahead of the slowest worker (``StalenessGate``); ``bound=None``: no cap.

All waiting is on non-blocking requests with a deadline (``mpi.wait_for``, ``timeout`` seconds), so
a dead worker ends the run with a ``TimeoutError`` that says so, and waiting ranks sleep instead of
spinning (the server shares a core with the workers on a small machine). ``timer``: the
step functions' hook; the spans are named "compute", "push", "pull" (workers) and "receive",
"update", "reply" (server), so a ``timeline.Tracer`` adds no barrier here.
"""

from __future__ import annotations

import time

import numpy as np

from ppu_lab.costmodel import reduce_local
from ppu_lab.designs.runner import DesignResult, History, Traffic, busiest, global_batches
from ppu_lab.mpi import shard_bounds, wait_for
from ppu_lab.timing import no_timer

PUSH, PULL = 21, 22          # message tags: gradients to the server, weights to a worker
POLL = 2e-4                  # seconds between tests while waiting (sleeps: leaves the core to others)


class StalenessGate:
    """Which held workers may get their weights: at most ``bound`` pushes ahead of the slowest running one.

    Pure bookkeeping (no MPI): ``pushed(w)`` after worker w's gradient was applied; ``release()``
    returns the workers to answer now. A worker's last push needs no answer; the slowest running
    worker is always released, so the run never stalls.
    """

    def __init__(self, workers: int, steps: int, bound: int | None = None):
        self.pushes, self.steps, self.bound = np.zeros(workers, dtype=int), int(steps), bound
        self.held: list[int] = []

    def pushed(self, w: int) -> None:
        if w in self.held:
            raise ValueError(f"worker {w + 1} pushed a gradient while waiting for its weights")
        self.pushes[w] += 1
        if self.pushes[w] < self.steps:
            self.held.append(w)

    def release(self) -> list[int]:
        running = self.pushes[self.pushes < self.steps]
        floor = running.min() if running.size else self.steps
        ready = [w for w in self.held if self.bound is None or self.pushes[w] - floor <= self.bound]
        self.held = [w for w in self.held if w not in ready]
        return ready


def _check_ranks(comm):
    if comm.Get_size() < 2:
        raise ValueError("a parameter server needs at least 2 ranks (rank 0 serves, the others compute): "
                         "start more engines or use mpiexec -n 2 or more")
    return comm.Get_size() - 1


def _waiter(comm, timeout):
    def wait(request, what, status=None):
        wait_for(request, timeout, lambda: f"rank {comm.Get_rank()} waited {timeout:.0f} s for {what}: a rank "
                 "of the parameter server is stuck or has failed; look at its output", status=status, poll=POLL)
    return wait


def sync_parameter_server(obj, comm, *, batch_size: int, steps: int, seed: int = 0, eval_every: int = 10,
                          timeout: float = 300.0, timer=no_timer) -> DesignResult:
    """Synchronous parameter server: ``steps`` global minibatches of ``batch_size``, split over the W workers.

    Collective over ``comm``; every rank must build ``obj`` with the same initial weights. Returns a
    ``DesignResult`` on every rank (the server's parameters, times and evaluation history).
    """
    W, rank = _check_ranks(comm), comm.Get_rank()
    wait, traffic, log, times = _waiter(comm, timeout), Traffic(), History(), []
    gbufs = np.zeros((W, obj.grad.size), dtype=obj.grad.dtype) if rank == 0 else None  # (W, m + 1)
    batches = global_batches(obj.n, batch_size, seed)
    for step in range(steps):
        idx, t0 = next(batches), time.perf_counter()
        if rank == 0:
            with timer("receive"):
                for w in range(W):
                    wait(comm.Irecv(gbufs[w], source=w + 1, tag=PUSH), f"worker {w + 1}'s gradient")
                    traffic.receive(gbufs[w].nbytes)
            with timer("update"):
                total = gbufs.sum(axis=0) if W > 1 else gbufs[0]      # worker order: deterministic
                obj.apply(total[:-1], len(idx))
            traffic.collective(reduce_local(gbufs[0].nbytes, W))
            times.append(time.perf_counter() - t0)
            log.seconds, log.steps_done = log.seconds + times[-1], step + 1
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                log.evaluate(obj.evaluate, obj.theta)                 # workers wait: the clock is paused
            with timer("reply"):
                sends = [comm.Isend(obj.theta, dest=w + 1, tag=PULL) for w in range(W)]
                for w, req in enumerate(sends):
                    wait(req, f"worker {w + 1} to take the weights")
                    traffic.send(obj.theta.nbytes)
        else:
            lo, hi = shard_bounds(len(idx), W, rank - 1)
            with timer("compute"):
                obj.shard_gradient(idx[lo:hi])
            with timer("push"):
                wait(comm.Isend(obj.grad, dest=0, tag=PUSH), "the server to take my gradient")
            traffic.send(obj.grad.nbytes)
            with timer("pull"):
                wait(comm.Irecv(obj.theta, source=0, tag=PULL), "the server's weights")
            traffic.receive(obj.theta.nbytes)
    return _result("sync PS", obj, comm, log, times, traffic, steps, {})


def async_parameter_server(obj, comm, *, batch_size: int, steps: int, bound: int | None = None, seed: int = 0,
                           eval_every: int = 10, timeout: float = 300.0, timer=no_timer) -> DesignResult:
    """Asynchronous parameter server with bounded staleness ``bound`` (None: unbounded).

    Worker w holds part w of a permutation of the training rows (as Hogwild! in notebook 02) and
    runs ``steps`` SGD steps of ``batch_size // W`` rows, so the run sees ``steps * batch_size``
    samples, as ``steps`` synchronous steps do. ``history["step"]`` counts W updates as one step.
    ``extra["staleness"]``: for each update, how many updates the server applied between sending
    the weights the gradient was computed on and applying it.
    """
    W, rank = _check_ranks(comm), comm.Get_rank()
    b = batch_size // W
    if b < 1:
        raise ValueError(f"batch_size ({batch_size}) must be at least the number of workers ({W})")
    wait, traffic = _waiter(comm, timeout), Traffic()
    if rank == 0:
        log, times, staleness = _serve(obj, comm, W, b, steps, bound, eval_every, wait, traffic, timer)
    else:
        log, times, staleness = History(), [], []
        perm = np.random.default_rng(seed).permutation(obj.n)
        mine = perm[slice(*shard_bounds(obj.n, W, rank - 1))]
        rows = (mine[i] for i in global_batches(len(mine), b, seed * 10_007 + rank))
        for s in range(steps):
            with timer("compute"):
                obj.shard_gradient(next(rows))
            with timer("push"):
                wait(comm.Isend(obj.grad, dest=0, tag=PUSH), "the server to take my gradient")
            traffic.send(obj.grad.nbytes)
            if s + 1 < steps:
                with timer("pull"):
                    wait(comm.Irecv(obj.theta, source=0, tag=PULL), "the server's weights")
                traffic.receive(obj.theta.nbytes)
    name = "async PS" + ("" if bound is None else f", bound {bound}")
    return _result(name, obj, comm, log, times, traffic, steps, {"staleness": comm.bcast(staleness, root=0)})


def _serve(obj, comm, W, b, steps, bound, eval_every, wait, traffic, timer):
    """The asynchronous server's loop: receive any gradient, apply it, answer the workers the gate releases."""
    from mpi4py import MPI

    gate, log, times, staleness = StalenessGate(W, steps, bound), History(), [], []
    gbuf, replies = np.empty_like(obj.grad), np.empty((W, obj.theta.size), dtype=obj.theta.dtype)
    sent_at, open_sends, version, status = np.zeros(W, dtype=int), [None] * W, 0, MPI.Status()
    t_step = time.perf_counter()
    for u in range(W * steps):
        t0 = time.perf_counter()
        with timer("receive"):
            wait(comm.Irecv(gbuf, source=MPI.ANY_SOURCE, tag=PUSH), "a worker's gradient", status)
        w = status.Get_source() - 1
        traffic.receive(gbuf.nbytes)
        with timer("update"):
            obj.apply(gbuf[:-1], b)
        staleness.append(version - sent_at[w])
        version += 1
        gate.pushed(w)
        log.seconds, log.steps_done = log.seconds + time.perf_counter() - t0, (u + 1) / W
        if (u + 1) % W == 0:
            times.append(time.perf_counter() - t_step)
            if (u + 1) % (W * eval_every) == 0 or u + 1 == W * steps:
                log.evaluate(obj.evaluate, obj.theta)            # the workers wait: the clock is paused
            t_step = time.perf_counter()
        t0 = time.perf_counter()
        with timer("reply"):
            for v in gate.release():
                if open_sends[v] is not None:                  # v took the previous weights before pushing
                    wait(open_sends[v], f"worker {v + 1} to take the weights")
                replies[v] = obj.theta                         # a snapshot: theta changes on
                open_sends[v], sent_at[v] = comm.Isend(replies[v], dest=v + 1, tag=PULL), version
                traffic.send(obj.theta.nbytes)
        log.seconds += time.perf_counter() - t0
    for v, req in enumerate(open_sends):
        if req is not None:
            wait(req, f"worker {v + 1} to take the weights")
    return log, times, staleness


def _result(name, obj, comm, log, times, traffic, steps, extra) -> DesignResult:
    """The server's parameters, times and history on every rank; bytes per step of the busiest rank."""
    theta = comm.bcast(np.array(obj.theta, copy=True) if comm.Get_rank() == 0 else None, root=0)
    history, times = comm.bcast((log.history, np.array(times)) if comm.Get_rank() == 0 else None, root=0)
    sent, cost = busiest(traffic, comm, steps)
    return DesignResult(name, comm.Get_size(), theta, history, times, sent, extra, cost_per_step=cost)
