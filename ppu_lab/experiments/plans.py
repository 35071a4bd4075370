"""The grids the notebooks run, defined once: notebook 05's course grid (``"ann"``) and notebook 07's
test of the course's four conclusions (``"conclusions"``). The notebooks, the command line
(``python -m ppu_lab.experiments run --plan conclusions``) and ``benchmarks/record_references.py``
all take them from here, so that a reference run is the run a notebook makes.

``conclusions``, full mode (81 runs of the ANN with h = 50, 3 seeds, 3 epochs each; cost: see
``results/reference/07_conclusions.json``):

- nodes x batch, for conclusions (2)-(4): 1, 2 and 4 nodes x batch 50, 100, 200, 400 x both batch
  modes (one node is one run for both modes), fixed learning rate;
- batch sweep, for conclusion (1): one node, batch 50, 100, 150, 200 (the course's table), 400 and 800,
  at a fixed learning rate and with Goyal et al.'s linear scaling and one epoch of warm-up.

Quick mode (20 runs, seconds): 2 seeds, 2 epochs on 4,000 images (1,000 test images), 1-2 nodes, batch
50 and 200 (sweep: 50, 200, 800).
"""

from __future__ import annotations

from ppu_lab.config import quick_mode
from ppu_lab.experiments.grid import expand_grid, merge_grids

__all__ = ["PLANS", "plan", "plan_ranks", "conclusions_grid", "ann_grid", "gradient_variance",
           "CONCLUSIONS_MODEL"]

CONCLUSIONS_MODEL = "ann:50"


def _quick(quick):
    return quick_mode() if quick is None else quick


def conclusions_grid(quick=None) -> list:
    """The runs that test the course's four conclusions (notebook 07; see the module docstring)."""
    q = _quick(quick)

    def choose(full, small):
        return small if q else full

    common = {"epochs": choose(3, 2), "train_samples": choose(None, 4000), "test_samples": choose(None, 1000),
              "seeds": choose([0, 1, 2], [0, 1])}
    model = [CONCLUSIONS_MODEL]
    nodes, batches = choose([2, 4], [2]), choose([50, 100, 200, 400], [50, 200])
    sweep = choose([50, 100, 150, 200, 400, 800], [50, 200, 800])
    base = 100  # DEFAULT_LR is tuned for batch 100: linear scaling at 100 is the fixed-lr run
    return merge_grids(
        expand_grid(model, [1], batches, ["global"], **common),
        expand_grid(model, nodes, batches, ["global", "per_rank"], **common),
        expand_grid(model, [1], sweep, ["global"], **common),
        expand_grid(model, [1], [b for b in sweep if b != base], ["global"], lr_scaling="linear",
                    base_batch=base, warmup_epochs=1.0, **common))


def ann_grid(quick=None) -> list:
    """Notebook 05's course grid: ANN h = 10 and 50 x 1, 2 (, 4) nodes x batch 50-200 x both modes."""
    q = _quick(quick)
    return expand_grid(["ann:10", "ann:50"], ranks=[1, 2] if q else [1, 2, 4], batch_sizes=[50, 100, 150, 200],
                       batch_modes=["global", "per_rank"], epochs=2 if q else 3)


PLANS = {"conclusions": conclusions_grid, "ann": ann_grid}


def plan(name: str, quick=None) -> list:
    """The grid of plan ``name`` (``PLANS``), quick or full (None: ``PPU_LAB_QUICK``)."""
    if name not in PLANS:
        raise ValueError(f"plan: unknown plan {name!r}; the plans are {sorted(PLANS)}")
    return PLANS[name](quick)


def plan_ranks(name: str, quick=None) -> int:
    """The MPI processes a plan needs (its largest node count): ``mpiexec -n`` this."""
    return max(c.ranks for c in plan(name, quick))


def gradient_variance(data, quick=None, seed: int = 0) -> list[dict]:
    """Conclusion (1)'s gradient noise: ``measures.gradient_noise`` of the ANN (h = 50) at the weights
    after one epoch at batch 100 (a point on the training path), for the batch sizes of the sweep."""
    from ppu_lab.experiments.measures import gradient_noise
    from ppu_lab.train import train

    q = _quick(quick)
    if q:
        data = (data[0][:4000], data[1][:4000], data[2][:100], data[3][:100])
    start = train("ann", data, hidden=50, batch_size=100, epochs=1, seed=seed, progress=False, evaluate=False)
    sizes = [50, 200, 800] if q else [50, 100, 150, 200, 400, 800]
    return gradient_noise("ann", data, sizes, params=start.params, draws=10 if q else 30, seed=seed)
