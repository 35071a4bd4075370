"""Overlapping communication with backward: what ``DistributedDataParallel`` does inside (notebook 08, section 5).

Backward computes the gradients layer by layer from the output back to the input: the last
layer's gradient is final long before the first layer's is. So the gradient buffer is cut into
*buckets* of consecutive parameters in backward order (``bucket_plan``), and a torch hook on each
parameter (``register_post_accumulate_grad_hook``, called when its ``.grad`` is complete) starts a
non-blocking ``Iallreduce`` of a bucket as soon as all its parameters are done, while backward
goes on with the earlier layers. After backward, ``Waitall`` waits only for what was not hidden.

Two facts decide whether it wins:

- **what there is to hide**: at best the step saves min(communication, the backward time after the
  first bucket); for the course's CNN on one machine the Allreduce takes tens of microseconds
  against milliseconds of backward, so there is nothing to gain; a bigger model on a slower network
  is a different story (the cost model of notebook 08 says where);
- **progress**: most MPI libraries move a non-blocking collective forward only while the program is
  inside an MPI call (MPICH without ``MPIR_CVAR_ASYNC_PROGRESS``, Open MPI on shared memory). The
  hooks therefore call ``Testall`` on the open requests each time they run, which advances them a
  little; DDP uses a background thread for that.

The result is the blocking Allreduce's, bucket by bucket (tested: equal to float32 rounding). MPI
requires the non-blocking collectives to start in the same order on every rank: the buckets
complete in the same order everywhere because every rank runs backward through the same graph.
"""

from __future__ import annotations

import functools

import numpy as np

from ppu_lab.costmodel import allreduce
from ppu_lab.designs.runner import Design
from ppu_lab.timing import no_timer

#: Default bucket size in bytes. DDP's is 25 MB for models of hundreds of MB; the course's CNN has
#: 116 kB of gradient, so 32 kB buckets give about one bucket per layer.
BUCKET_BYTES = 32 * 1024


def bucket_plan(sizes, itemsize: int, bucket_bytes: int = BUCKET_BYTES, extra: int = 1) -> list[dict]:
    """Buckets of the flat gradient in backward order (last parameter first).

    ``sizes``: elements of each parameter in the flat buffer's order. Parameters are taken from
    the last one backwards and a bucket is closed once it holds at least ``bucket_bytes``. Each
    bucket is ``{"params": [indices], "lo": .., "hi": ..}``, a contiguous slice of the buffer; the
    first bucket also covers the ``extra`` slots after the parameters (the loss).
    """
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    buckets, current = [], []
    for i in reversed(range(len(sizes))):
        current.append(i)
        if (offsets[current[0] + 1] - offsets[i]) * itemsize >= bucket_bytes or i == 0:
            hi = int(offsets[current[0] + 1]) + (extra if not buckets else 0)
            buckets.append({"params": list(current), "lo": int(offsets[i]), "hi": hi})
            current = []
    return buckets


#: Parameters of ``wide_mlp()`` (hidden = 1024): 784*1024 + 1024 + 1024*1024 + 1024 + 1024*10 + 10.
WIDE_MLP_PARAMS = 1_863_690


def wide_mlp(hidden: int = 1024, seed: int = 0):
    """A fully connected torch network 784 -> hidden -> hidden -> 10 (ReLU): for hidden = 1024 it has
    1.86 million parameters (64 times the CNN's) and 1.9 million multiply-adds per image (the CNN: 2.8 million), so
    its gradient Allreduce is large next to its backward pass: the case the overlap is made for.
    Same weights on every rank (``seed``)."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, 10))


class Overlapped(Design):
    """The synchronous step with the gradient Allreduce split into buckets started from backward hooks.

    ``obj`` must hold a torch model (``obj.model.net``, e.g. the CNN's ``ModelObjective``).
    """

    def __init__(self, obj, comm, bucket_bytes: int = BUCKET_BYTES, timer=no_timer):
        super().__init__(obj, comm, timer)
        net = getattr(getattr(obj, "model", None), "net", None)
        if net is None:
            raise ValueError("Overlapped needs a torch model (the CNN): backward hooks start the buckets")
        params = list(net.parameters())
        self.plan = bucket_plan([p.numel() for p in params], obj.grad.itemsize, bucket_bytes)
        self.bucket_of = {i: b for b, bucket in enumerate(self.plan) for i in bucket["params"]}
        self.requests, self.missing, self.active = [], [], False
        self.handles = [p.register_post_accumulate_grad_hook(functools.partial(self._ready, i))
                        for i, p in enumerate(params)]

    def _start(self, b: int) -> None:
        from mpi4py import MPI

        lo, hi = self.plan[b]["lo"], self.plan[b]["hi"]
        self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, self.obj.grad[lo:hi], op=MPI.SUM))
        self.traffic.collective(allreduce(self.obj.grad[lo:hi].nbytes, self.comm.Get_size(), self.obj.grad.itemsize))

    def _ready(self, i: int, param) -> None:
        """Hook: parameter i's gradient is complete; start its bucket if that was the last one missing."""
        from mpi4py import MPI

        if not self.active:
            return
        b = self.bucket_of[i]
        self.missing[b] -= 1
        if self.missing[b] == 0:
            self._start(b)
        MPI.Request.Testall(self.requests)   # let MPI move the open buckets on while backward continues

    def __call__(self, idx, step: int) -> None:
        from mpi4py import MPI

        obj, timer = self.obj, self.timer
        self.requests, self.missing = [], [len(b["params"]) for b in self.plan]
        self.active = True
        try:
            with timer("compute"):
                obj.shard_gradient(self.my_rows(idx))   # forward, backward: the hooks start the buckets
            with timer("comm"):
                for b, left in enumerate(self.missing):  # parameters without a gradient (none in the CNN)
                    if left > 0:
                        self._start(b)
                MPI.Request.Waitall(self.requests)       # what backward did not hide
        finally:
            self.active = False
        with timer("update"):
            obj.apply(obj.grad[:-1], len(idx))

    def close(self) -> None:
        """Remove the hooks from the model."""
        for h in self.handles:
            h.remove()
        self.handles = []
