"""Settings read from the environment, in one place.

``PPU_LAB_QUICK=1`` turns on *quick mode*: notebooks and experiments shrink their
problem sizes and epochs so the whole test suite runs in minutes on two cores.
``make test`` and ``.ci/run`` set it; ``make lab`` does not.
"""

from __future__ import annotations

import os

_TRUE = {"1", "true", "yes", "on"}


def quick_mode() -> bool:
    """True when ``PPU_LAB_QUICK`` is set to 1/true/yes/on (tests, CI)."""
    return os.environ.get("PPU_LAB_QUICK", "").strip().lower() in _TRUE


def pick(full, quick):
    """Return ``quick`` in quick mode, else ``full``: ``epochs = pick(20, 2)``."""
    return quick if quick_mode() else full
