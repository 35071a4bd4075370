"""Synchronous designs built on one Allreduce: the baseline, and local SGD (notebook 08, sections 2 and 3).

- ``AllreduceSGD``: the lab's data-parallel step (notebooks 04-06): each rank the gradient of its
  shard of the global minibatch, one ``Allreduce`` of the flat buffer, the same update everywhere.
- ``LocalSGD`` (periodic model averaging; Zinkevich et al. 2010, Lin et al. 2020 "Don't use large
  mini-batches, use local SGD"): each rank takes a step with *its own* shard's gradient and
  communicates only every ``period`` (H) steps, averaging the *parameters*. The average is weighted
  by shard size, ``theta = sum_r (b_r / |B|) theta_r``, so that for H = 1

      sum_r (b_r/|B|) (theta decay - (lr/b_r) g_r) = theta decay - (lr/|B|) sum_r g_r,

  which is exactly the synchronous step: H = 1 *is* synchronous SGD (to rounding). H > 1 sends
  H times fewer bytes, and the ranks' models drift apart between averages.

Each design is called as ``design(idx, step)`` by ``runner.run_synchronous``; ``timer`` is the
``timer(name)`` hook of the step functions (``timing.Timer``, ``timeline.Tracer``).
"""

from __future__ import annotations

from ppu_lab.costmodel import allreduce
from ppu_lab.designs.runner import Design
from ppu_lab.timing import no_timer


class AllreduceSGD(Design):
    """The synchronous baseline: gradient sum of my shard, ``Allreduce`` (gradient and loss), the step."""

    def __call__(self, idx, step: int) -> None:
        from mpi4py import MPI

        obj, comm, timer = self.obj, self.comm, self.timer
        with timer("compute"):
            obj.shard_gradient(self.my_rows(idx))                # obj.grad: my gradient sum and loss
        with timer("comm"):
            comm.Allreduce(MPI.IN_PLACE, obj.grad, op=MPI.SUM)   # the batch's gradient sum and loss
        self.traffic.collective(allreduce(obj.grad.nbytes, comm.Get_size(), obj.grad.itemsize))
        with timer("update"):
            obj.apply(obj.grad[:-1], len(idx))


class LocalSGD(Design):
    """Local SGD: a local step on my shard every step, a weighted model average every ``period`` steps."""

    def __init__(self, obj, comm, period: int = 4, timer=no_timer):
        from ppu_lab.checks import integer

        super().__init__(obj, comm, timer)
        self.period = integer("period (H, steps between model averages)", period, 1)
        self.weight = 1.0 / comm.Get_size()
        self._synced = True

    def __call__(self, idx, step: int) -> None:
        obj, timer = self.obj, self.timer
        with timer("compute"):
            rows = self.my_rows(idx)
            obj.shard_gradient(rows)
        with timer("update"):
            obj.apply(obj.grad[:-1], len(rows))                 # a step with my shard alone
        self.weight = len(rows) / len(idx)                      # b_r / |B|: exact synchronous SGD at H = 1
        self._synced = (step + 1) % self.period == 0
        if self._synced:
            self.average()

    def average(self) -> None:
        """theta <- sum over ranks of (b_r / |B|) theta_r, on every rank (one Allreduce of the parameters)."""
        from mpi4py import MPI

        with self.timer("comm"):
            self.obj.theta *= self.weight
            self.comm.Allreduce(MPI.IN_PLACE, self.obj.theta, op=MPI.SUM)
        self.traffic.collective(allreduce(self.obj.theta.nbytes, self.comm.Get_size(), self.obj.theta.itemsize))
        self._synced = True

    def synced(self, step: int) -> bool:
        return (step + 1) % self.period == 0

    def finish(self) -> None:
        if not self._synced:
            self.average()
