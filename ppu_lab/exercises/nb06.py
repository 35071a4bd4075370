"""Checks of notebook 06's exercise: the flat-buffer gradient Allreduce for a PyTorch model (on the engines).

``allreduce_gradients(model, comm)``: after each rank's backward pass on its shard (the mean loss of
its rows), copy every parameter's ``.grad`` into one flat buffer, one ``Allreduce``, divide by the
number of ranks, copy back. The check (``grad_report`` on every rank, ``grad_verdict``) builds a
small torch network with parameters of several shapes on the first p ranks, and compares every rank's
``.grad`` afterwards with the gradient of the mean loss over the whole batch computed serially (equal
shards: the average of the shard means), to float32 rounding; it counts the collectives (one
``Allreduce``, not one per parameter) and names the typical mistakes: the sum instead of the mean,
the buffer never copied back, ranks that disagree.
"""

from __future__ import annotations

import numpy as np

from ppu_lab.exercises.core import CommSpy, Notebook, compare, ranks_case
from ppu_lab.mpi import first_ranks

BOOK = Notebook("06_cnn_mnist")
check, require = BOOK.check, BOOK.require


def _net(seed):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 4 * 4, 3))          # 4 parameter tensors, 119 numbers


def _batch(seed, rows):
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(rows, 1, 6, 6, generator=g), torch.randint(0, 3, (rows,), generator=g)


def _grads(net, X, y):
    """Flat gradient of the mean cross-entropy of (X, y); the model's .grad set by backward."""
    import torch

    net.zero_grad()
    torch.nn.functional.cross_entropy(net(X), y).backward()
    return np.concatenate([p.grad.detach().numpy().ravel() for p in net.parameters()]).astype(float)


def grad_report(fn, p, rows, seed):
    """On every rank of COMM_WORLD (collective): backward on this rank's ``rows`` images, the student's
    ``fn(model, comm)``; returns {local, after, allreduces, calls}, or None outside the first p ranks."""
    with first_ranks(p) as sub:
        if sub is None:
            return None
        X, y = _batch(seed, rows * p)
        r, net = sub.Get_rank(), _net(seed)
        local = _grads(net, X[r * rows:(r + 1) * rows], y[r * rows:(r + 1) * rows])
        comm = CommSpy(sub)
        fn(net, comm)
        after = np.concatenate([q.grad.detach().numpy().ravel() for q in net.parameters()]).astype(float)
        return {"local": local, "after": after, "calls": comm.calls}


def grad_verdict(reports, p, rows, seed) -> str | None:
    """None when every rank holds the whole batch's gradient after one Allreduce; else what is wrong."""
    reps = [r for r in reports if r is not None]
    X, y = _batch(seed, rows * p)
    ref = _grads(_net(seed), X, y)                                   # serial: mean loss of the whole batch
    for k, r in enumerate(reps):
        msg = compare(r["after"], ref, what=f"rank {k}'s gradient after your function", rtol=1e-5,
                      atol=1e-6 * float(np.abs(ref).max()), mistakes=[
                          (p * ref, "it is the sum over the ranks: divide by comm.Get_size() to average"),
                          (r["local"], "the parameters' .grad are unchanged: copy the reduced buffer back "
                                       "into each parameter's .grad")])
        if msg:
            return f"with p = {p} ranks: {msg}"
    if any(not np.array_equal(r["after"], reps[0]["after"]) for r in reps):
        return f"with p = {p} ranks the ranks hold different gradients: every rank must apply the same update"
    colls = reps[0]["calls"]                                         # the MPI calls, in order
    if p > 1 and colls != ["Allreduce"]:
        return (f"the gradient is right, but rank 0 called {colls or 'no collective'}: the exercise is one "
                "Allreduce of one flat buffer for all parameters (one message, not one per parameter)")
    return None


flat_ex = BOOK.exercise(
    "allreduce_gradients", points=3, time_limit=40, engines=True, needs=("cl",), by_name=True,
    hint="collect every parameter's .grad into one flat float32 NumPy buffer (torch.cat of the flattened grads), "
         "Allreduce it with MPI.SUM, divide by the number of ranks, then copy each slice back into its "
         "parameter's .grad (same order, same shape).")


def on_ranks(p, *args):
    """A case on the first p ranks of the engines (None: all), images per rank, a seed."""
    return ranks_case(grad_report, grad_verdict, p, *args)


flat_ex.case("p = 2 ranks, 3 images each")(on_ranks(2, 3, 61))
flat_ex.case("p = 1 rank: the gradient stays", hidden=True)(on_ranks(1, 4, 62))
flat_ex.case("every engine, 2 images each", hidden=True)(on_ranks(None, 2, 63))
