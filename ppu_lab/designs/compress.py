"""Gradient compression: send fewer bytes per step, pay in accuracy (notebook 08, section 4).

- ``TopK``: top-k sparsification with error feedback (Stich et al. 2018, "Sparsified SGD with
  memory"; Lin et al. 2018, "Deep gradient compression"). Each rank adds its shard's gradient to a
  *residual*, sends only the k coordinates of the residual largest in magnitude (k values and their
  k indices) and keeps the rest for later steps: nothing is lost, only delayed. The k pairs of
  every rank travel by ``Allgather`` (the ranks choose different coordinates, so there is nothing
  to reduce in place); every rank adds them into a dense sum. With k = all coordinates the residual
  is always sent in full and the step is exactly the synchronous one (to summation order).
- ``Float16``: the gradient sums travel as float16, half the bytes of float32. MPI has no standard
  float16 sum (MPICH 5 rejects ``MPI_SUM`` on its float16 type), so the reduction is a user-defined
  ``MPI.Op`` over 16-bit words that adds them as float16. The sums are rounded to 11 significant
  bits (relative error about 5e-4 per addition) and must stay below 65,504; the CNN's summed
  gradients stay far below (mixed-precision training scales the loss for larger ones).

The kernels (``topk_with_feedback``, ``sparse_sum``) are pure NumPy and tested without MPI.
"""

from __future__ import annotations

import numpy as np

from ppu_lab.costmodel import allgather, allreduce, reduce_local
from ppu_lab.designs.runner import Design
from ppu_lab.timing import no_timer


def topk_with_feedback(residual, g, k: int, idx_out, val_out) -> None:
    """Error feedback and top-k, in place: ``residual += g``; the k largest ``|residual|`` go to
    ``idx_out`` (int32 indices) and ``val_out`` (their values) and are zeroed in ``residual``."""
    residual += g
    m = residual.size
    sel = np.arange(m) if k >= m else np.argpartition(np.abs(residual), m - k)[m - k:]
    idx_out[:] = sel
    val_out[:] = residual[sel]
    residual[sel] = 0


def sparse_sum(indices, values, out) -> None:
    """``out`` = sum over rows r of the sparse vectors (``indices[r]``, ``values[r]``), rows added in order.
    The indices within one row are distinct (top-k), so one fancy-indexed add per row is exact."""
    out[:] = 0
    for idx, val in zip(indices, values):
        out[idx] += val


class TopK(Design):
    """Top-k with error feedback: ``ratio`` of the coordinates (k = round(ratio m), at least 1) per rank and step."""

    def __init__(self, obj, comm, ratio: float = 0.01, timer=no_timer):
        if not 0 < float(ratio) <= 1:
            raise ValueError(f"ratio (fraction of the gradient sent) must be in (0, 1]; got {ratio!r}")
        super().__init__(obj, comm, timer)
        m, p = obj.theta.size, comm.Get_size()
        self.k = max(1, min(m, round(float(ratio) * m)))
        self.residual = np.zeros(m, dtype=obj.dtype)          # what was not sent yet
        self.idx, self.val = np.empty(self.k, np.int32), np.empty(self.k, obj.dtype)
        self.all_idx, self.all_val = np.empty((p, self.k), np.int32), np.empty((p, self.k), obj.dtype)
        self.total = np.empty(m, dtype=obj.dtype)

    def __call__(self, idx, step: int) -> None:
        obj, comm, timer = self.obj, self.comm, self.timer
        with timer("compute"):
            obj.shard_gradient(self.my_rows(idx))
            topk_with_feedback(self.residual, obj.grad[:-1], self.k, self.idx, self.val)
        with timer("comm"):
            comm.Allgather(self.idx, self.all_idx)                # (p, k) every rank's indices
            comm.Allgather(self.val, self.all_val)                # (p, k) and values
        p = comm.Get_size()
        self.traffic.collective(allgather(self.idx.nbytes, p) + allgather(self.val.nbytes, p)
                                + reduce_local(self.val.nbytes, p))
        with timer("update"):
            sparse_sum(self.all_idx, self.all_val, self.total)    # (m,) dense sum, ranks in order
            obj.apply(self.total, len(idx))


_HALF_SUM = None


def _half_sum(inbuf, inoutbuf, datatype) -> None:
    """The user-defined reduction: inoutbuf += inbuf, both read as float16."""
    out = np.frombuffer(inoutbuf, dtype=np.float16)
    out += np.frombuffer(inbuf, dtype=np.float16)


def half_sum():
    """The float16 sum as an ``MPI.Op`` (created once per process, on first use)."""
    global _HALF_SUM
    if _HALF_SUM is None:
        from mpi4py import MPI

        _HALF_SUM = MPI.Op.Create(_half_sum, commute=True)
    return _HALF_SUM


class Float16(Design):
    """The synchronous step with the gradient sums sent and added as float16 (the loss is not sent)."""

    def __init__(self, obj, comm, timer=no_timer):
        super().__init__(obj, comm, timer)
        self.half = np.empty(obj.theta.size, np.float16)          # what travels
        self.total = np.empty(obj.theta.size, obj.dtype)

    def __call__(self, idx, step: int) -> None:
        from mpi4py import MPI

        obj, comm, timer = self.obj, self.comm, self.timer
        with timer("compute"):
            obj.shard_gradient(self.my_rows(idx))
            self.half[:] = obj.grad[:-1]                          # rounded to float16
        with timer("comm"):
            comm.Allreduce(MPI.IN_PLACE, [self.half, MPI.UINT16_T], op=half_sum())
        self.traffic.collective(allreduce(self.half.nbytes, comm.Get_size(), 2))
        with timer("update"):
            self.total[:] = self.half
            obj.apply(self.total, len(idx))
