"""Settings of the lab's processes, in one place: quick mode, and how many threads compute.

``PPU_LAB_QUICK=1`` turns on *quick mode*: notebooks and experiments shrink their
problem sizes and epochs so the whole test suite runs in minutes on two cores.
``make test`` and ``.ci/run`` set it; ``make lab`` does not.

``limit_threads(n)`` runs a block with at most ``n`` threads in PyTorch and in the BLAS/OpenMP
libraries (NumPy's matrix products) and restores the previous settings afterwards: used by
``train``, ``ddp.train_ddp`` and the thread experiments of ``ppu_lab.threads``.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

_TRUE = {"1", "true", "yes", "on"}


def quick_mode() -> bool:
    """True when ``PPU_LAB_QUICK`` is set to 1/true/yes/on (tests, CI)."""
    return os.environ.get("PPU_LAB_QUICK", "").strip().lower() in _TRUE


def pick(full, quick):
    """Return ``quick`` in quick mode, else ``full``: ``epochs = pick(20, 2)``."""
    return quick if quick_mode() else full


@contextmanager
def limit_threads(n: int | None, *, import_torch: bool = False):
    """Context: at most ``n`` threads in torch and in BLAS/OpenMP inside the block, restored on exit.

    Under MPI each rank owns one core: a library's default of one thread per core in every rank
    runs ranks x cores threads on the cores, and the ranks slow each other down. ``n`` None changes
    nothing. torch is limited only when it is already imported, or with ``import_torch=True`` (code
    about to build a torch model); the lab never imports torch just to limit it.
    """
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    from ppu_lab.checks import integer

    n = integer("threads", n, 1)
    torch = sys.modules.get("torch")
    if torch is None and import_torch:
        import torch
    old = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(old)
