"""Under mpiexec: a failure on one rank reaches every rank as an exception, never a hang.

Usage: mpiexec -n P python tests/mpi/ridge_errors.py MODE [uncaught]
MODE: small_batch (batch_size < P), nan_data (NaN in rank 1's copy of X; in rank 0's for the
scatter design, where only rank 0's data is read), bad_arg (lr differs
on rank 1), diverge (lr far too large: J explodes within an epoch), overflow (lr so large
that gradients overflow mid-epoch), nan_step (rank 1's shard gradient becomes NaN at step 3), raise_step (rank 1's
gradient raises at step 3). Each design must raise the expected error on EVERY rank with a
message naming the cause; rank 0 prints "caught <design>: <message>". With "uncaught" the
error is left to mpi_main, which must end the job with the message in stderr.
"""

import sys

import numpy as np

from ppu_lab import ridge
from ppu_lab.data import make_ridge_data
from ppu_lab.mpi import RankError, mpi_main, world
from ppu_lab.parallel import DESIGNS

FAULTY = 1  # the rank that misbehaves


def inject(kind):
    """Make this rank's shard gradient fail from its 3rd call on (NaN or an exception)."""
    kernel, calls = ridge.data_gradient, [0]

    def faulty(w, X, y):
        calls[0] += 1
        if calls[0] >= 3:
            if kind == "raise_step":
                raise RuntimeError("injected failure in the shard gradient")
            return np.full(w.shape, np.nan)
        return kernel(w, X, y)

    ridge.data_gradient = faulty
    return lambda: setattr(ridge, "data_gradient", kernel)


EXPECTED = {  # mode -> (exception type, text in its message)
    "small_batch": (ValueError, "batch_size=1 is smaller than the number of ranks"),
    "nan_data": (ValueError, "X contains NaN"),
    "bad_arg": (ValueError, f"rank {FAULTY}: lr=0.002 differs from rank 0's lr=0.001"),
    "diverge": (ridge.DivergenceError, "SGD diverged at epoch 1"),
    "overflow": (ridge.DivergenceError, "SGD is diverging: choose a smaller lr"),
    "nan_step": (RankError, f"rank {FAULTY}: the gradient of this rank's shard"),
    "raise_step": (RankError, f"rank {FAULTY}: RuntimeError: injected failure in the shard gradient"),
}


def main():
    mode, uncaught = sys.argv[1], "uncaught" in sys.argv[2:]
    comm = world()
    rank = comm.Get_rank()
    X, y, _ = make_ridge_data(200, 5, seed=0)
    lr, batch = 0.001, 10
    if mode == "small_batch":
        batch = 1
    elif mode == "bad_arg" and rank == FAULTY:
        lr = 0.002
    elif mode in ("diverge", "overflow"):
        lr = (50.0 if mode == "diverge" else 1e30) / ridge.lipschitz(X, 0.1)
    for name, sgd in DESIGNS.items():
        bad_data = 0 if name == "scatter_allgather" else FAULTY   # the rank whose data has a NaN
        if mode == "nan_data":
            X, y, _ = make_ridge_data(200, 5, seed=0)
            if rank == bad_data:
                X[7, 2] = np.nan
        restore = inject(mode) if mode.endswith("_step") and rank == FAULTY else (lambda: None)
        mine = (X, y) if name == "allreduce" or rank == 0 else (None, None)
        if uncaught:
            sgd(*mine, 0.1, lr, batch, 2, comm=comm)
        kind, text = EXPECTED[mode]
        try:
            sgd(*mine, 0.1, lr, batch, 2, comm=comm)
        except kind as exc:
            assert text in str(exc), f"rank {rank}, {name}: expected {text!r} in {exc}"
            if mode == "nan_data":
                assert f"rank {bad_data}: X contains NaN" in str(exc), str(exc)
            if rank == 0:
                print(f"caught {name}: {type(exc).__name__}: {exc}")
        else:
            raise AssertionError(f"rank {rank}, {name}: no {kind.__name__} for mode {mode}")
        finally:
            restore()
        comm.Barrier()  # every rank got here: nobody is left waiting in a collective


if __name__ == "__main__":
    mpi_main(main)
