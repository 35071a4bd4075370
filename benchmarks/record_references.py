"""Record the reference runs that notebooks 05 and 07 quote and draw (``results/reference/``), in one command.

    python benchmarks/record_references.py              # 05 and 07
    python benchmarks/record_references.py --only 07    # just one

Each reference is the notebook's own full-mode grid (``ppu_lab.experiments.plans``), run under
``mpiexec`` into a fresh results file and saved with ``ppu_lab.reference.save``: the records, the
machine (with its load average when the run started), this command, and a summary with what the run
cost (wall seconds, load average before and after) and, for 07, the verdicts of
``experiments.check_conclusions``. It prints what it saves.

Timings depend on what else runs: record on a quiet machine (load average well below the cores). A
run recorded under load is marked *provisional* in its notes, and the notebooks say so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from ppu_lab import experiments as E
from ppu_lab import reference
from ppu_lab.data import load_mnist
from ppu_lab.experiments import plans

NOTEBOOKS = {"05": ("05_ann", "ann"), "07": ("07_conclusions", "conclusions")}
TIMEOUT = 3600.0


def run_plan(plan: str, out: Path) -> dict:
    """Run ``plan`` in full mode under mpiexec into ``out``; return its cost."""
    n = plans.plan_ranks(plan, quick=False)
    load0, start = os.getloadavg(), time.perf_counter()
    E.launch(n, "--plan", plan, "--out", out, timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    return {"runs": len(plans.plan(plan, quick=False)), "mpi_processes": n, "wall_seconds": round(seconds, 1),
            "load_average_before": list(load0), "load_average_after": list(os.getloadavg()),
            "cores": os.cpu_count()}


def notes(cost: dict) -> str:
    load = max(cost["load_average_before"][0], cost["load_average_after"][0])
    quiet = load < 0.5 * cost["cores"]
    state = "a quiet machine" if quiet else (
        f"PROVISIONAL: a shared machine (load average {load:.1f} on {cost['cores']} cores); timings are "
        "slower and noisier than on a quiet one. Re-record with `python benchmarks/record_references.py`")
    return f"Full-mode grid of the notebook, recorded on {state}."


def record(key: str, workdir: Path) -> None:
    name, plan = NOTEBOOKS[key]
    command = f"python benchmarks/record_references.py --only {key}"
    out = workdir / f"{name}.jsonl"
    cost = run_plan(plan, out)
    records = E.load_results(out)
    summary = {"cost": cost}
    if key == "07":
        rows = plans.gradient_variance(load_mnist(), quick=False)
        reference.save("07_gradient_variance", rows, command=command, notes="gradient noise of conclusion (1)",
                       summary={"model": plans.CONCLUSIONS_MODEL})
        checks = E.check_conclusions(records, plans.CONCLUSIONS_MODEL, rows)
        summary["verdicts"] = E.verdict_table(checks)
        print(E.format_conclusions(checks))
    path = reference.save(name, records, command=command, notes=notes(cost), summary=summary)
    print(f"saved {path}: {len(records)} runs in {cost['wall_seconds']:.0f} s, load average "
          f"{cost['load_average_before'][0]:.1f} -> {cost['load_average_after'][0]:.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="05,07", help="comma-separated notebooks to record: 05, 07 (default both)")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(NOTEBOOKS))
    if unknown:
        ap.error(f"--only: unknown notebook(s) {unknown}; choose from {sorted(NOTEBOOKS)}")
    if os.environ.pop("PPU_LAB_QUICK", None):
        print("note: PPU_LAB_QUICK ignored: references are full-mode runs", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ppu-lab-reference-") as tmp:
        for key in keys:
            record(key, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
