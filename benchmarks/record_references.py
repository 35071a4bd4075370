"""Record the reference runs that notebooks 02 to 07 quote and draw (results/reference/*.json).

    python benchmarks/record_references.py               # every notebook's (about 20 min on 2 quiet cores)
    python benchmarks/record_references.py --only 07     # one notebook's: 02-07 (repeatable)
    python benchmarks/record_references.py --list        # what each one runs

Run it on a quiet machine: each file records the machine and its load average when it started
(``ppu_lab.reference.machine``), and the notebooks print that line (``reference.describe``) beside the
numbers they quote. Every job is a benchmark of ``benchmarks/`` with ``--save-reference`` (for
notebook 06 also the notebook's course grid, run by ``python -m ppu_lab.experiments``, as ``cnn_grid``;
for notebooks 05 and 07 their grid of ``ppu_lab.experiments.plans``, as ``05_ann`` and ``07_conclusions``,
with what it cost, the load average before and after, and for 07 the gradient noise and the verdicts of
``experiments.check_conclusions``), then the notebook itself in full mode (``jupyter nbconvert
--execute``, ``PPU_LAB_QUICK`` unset), whose wall time goes to ``notebook_runs``. Each step has a
deadline (``--timeout``) and is stopped with its process group when it passes it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOTEBOOKS = {"02": "02_threads", "03": "03_mpi_collectives", "04": "04_mpi_sgd_ridge", "05": "05_ann_mnist",
             "06": "06_cnn_mnist", "07": "07_results_and_conclusions"}
#: notebook -> benchmark runs (ranks or None for a plain process, script and arguments)
BENCHMARKS = {
    "02": [(None, "threads.py", "--save-reference")],
    "03": [(2, "collectives.py", "--save-reference")],
    "04": [(3, "perfmodel.py", "--save-reference")],
    "06": [(None, "dp_step.py", "--ranks", "1", "2", "--save-reference")],
    "05": [], "07": [],
}
#: notebooks 05 and 07: the reference name of the notebook's grid (``ppu_lab.experiments.plans``) and the plan
PLAN_GRIDS = {"05": ("05_ann", "ann"), "07": ("07_conclusions", "conclusions")}
#: notebook 06's grid in full mode (section 6): 4 engines, ranks 1, 2, 4, both batch modes, 1 epoch
CNN_GRID = ["--models", "cnn", "--ranks", "1,2,4", "--batch-sizes", "50,100,150,200", "--batch-mode",
            "global,per_rank", "--epochs", "1"]


def _run(cmd, timeout, env=None, cwd=ROOT):
    from ppu_lab.procs import run

    print("$", " ".join(map(str, cmd)), flush=True)
    start = time.perf_counter()
    proc = run([str(c) for c in cmd], timeout, env=env, cwd=cwd)
    print(proc.stdout[-4000:], end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def benchmark(ranks, script, *args, timeout):
    from ppu_lab.mpiexec import mpiexec_command

    program = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    if ranks is None:
        return _run(program, timeout, env=_full_mode())
    launch = mpiexec_command(ranks, *program)
    return _run(launch.cmd, timeout, env=launch.environ(_full_mode()))


def _full_mode(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PPU_LAB_QUICK"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's mpiexec
    return {**env, **extra}


def cnn_grid(timeout):
    """Notebook 06's course grid, as the notebook runs it in full mode, saved as ``cnn_grid``."""
    from ppu_lab import reference
    from ppu_lab.experiments import load_results
    from ppu_lab.mpiexec import mpiexec_command

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "06_cnn.jsonl"
        launch = mpiexec_command(4, sys.executable, "-m", "ppu_lab.experiments", "run", *CNN_GRID, "--out", str(out))
        _run(launch.cmd, timeout, env=launch.environ(_full_mode()))
        command = "mpiexec -n 4 python -m ppu_lab.experiments run " + " ".join(CNN_GRID)
        print("saved", reference.save("cnn_grid", load_results(out), command=command))


def plan_grid(key, timeout):
    """Notebook 05's or 07's grid (``plans``) in full mode, saved with its cost (and 07's verdicts)."""
    from ppu_lab import experiments as E
    from ppu_lab import reference
    from ppu_lab.data import load_mnist
    from ppu_lab.experiments import plans
    from ppu_lab.mpiexec import mpiexec_command

    name, plan = PLAN_GRIDS[key]
    n = plans.plan_ranks(plan, quick=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.jsonl"
        launch = mpiexec_command(n, sys.executable, "-m", "ppu_lab.experiments", "run", "--plan", plan, "--out", out)
        load0 = os.getloadavg()
        seconds = _run(launch.cmd, timeout, env=launch.environ(_full_mode()))
        records = E.load_results(out)
    cost = {"runs": len(records), "mpi_processes": n, "wall_seconds": round(seconds, 1), "cores": os.cpu_count(),
            "load_average_before": list(load0), "load_average_after": list(os.getloadavg())}
    summary = {"cost": cost}
    command = f"python benchmarks/record_references.py --only {key}"
    if key == "07":
        rows = plans.gradient_variance(load_mnist(), quick=False)
        print("saved", reference.save("07_gradient_variance", rows, command=command,
                                      notes="the gradient noise of conclusion (1)"))
        checks = E.check_conclusions(records, plans.CONCLUSIONS_MODEL, rows)
        summary["verdicts"] = E.verdict_table(checks)
        print(E.format_conclusions(checks))
    print("saved", reference.save(name, records, command=command, notes=_notes(cost), summary=summary))


#: the 1-minute load average when this recording began: what the machine carried before our own jobs
START_LOAD = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _notes(cost) -> str:
    """Quiet or provisional, judged by the load before the recording began: the averages around a grid
    (``cost``) include the recording's own MPI processes, a load of 2 or more on 2 cores by themselves."""
    if START_LOAD < 0.5 * cost["cores"]:
        return (f"Full-mode grid of the notebook, recorded on a quiet machine (load average {START_LOAD:.1f} on "
                f"{cost['cores']} cores before the recording began; the averages around the grid include its "
                "own MPI processes).")
    return (f"Full-mode grid of the notebook, PROVISIONAL: recorded on a shared machine (load average "
            f"{START_LOAD:.1f} on {cost['cores']} cores before the recording began), so its timings are slower "
            "and noisier than on a quiet one. Re-record with `python benchmarks/record_references.py --only 05 "
            "--only 07` on a quiet machine.")


def notebook(key, timeout):
    """Run the notebook in full mode (Restart & Run All) and record its wall time in ``notebook_runs``."""
    from ppu_lab import reference

    name = NOTEBOOKS[key]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [Path(sys.executable).parent / "jupyter", "nbconvert", "--to", "notebook", "--execute",
               f"--ExecutePreprocessor.timeout={int(timeout)}", "--output-dir", tmp, f"notebooks/{name}.ipynb"]
        seconds = _run(cmd, timeout + 60, env=_full_mode(PPU_LAB_RESULTS=tmp, MPLBACKEND="Agg"))
    rows = [r for r in _records("notebook_runs") if r["notebook"] != name]
    rows.append({"notebook": name, "seconds": seconds, "quick": False})
    print("saved", reference.save("notebook_runs", sorted(rows, key=lambda r: r["notebook"]),
                                  command="python benchmarks/record_references.py (Restart & Run All in full mode, "
                                          "timed by jupyter nbconvert --execute)"))


def _records(name):
    from ppu_lab import reference

    try:
        return reference.records(name)
    except FileNotFoundError:
        return []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(NOTEBOOKS), help="record this notebook's only")
    ap.add_argument("--list", action="store_true", help="print what each notebook's recording runs")
    ap.add_argument("--no-notebooks", action="store_true", help="the benchmarks only, not the notebooks' run times")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per step (default 1800)")
    args = ap.parse_args(argv)
    keys = args.only or sorted(NOTEBOOKS)
    if args.list:
        for k in keys:
            runs = [f"{'mpiexec -n ' + str(r) + ' ' if r else ''}python benchmarks/{' '.join(a)}" for r, *a in
                    BENCHMARKS[k]]
            grid = ["mpiexec -n 4 python -m ppu_lab.experiments run " + " ".join(CNN_GRID)] if k == "06" else []
            if k in PLAN_GRIDS:
                plan = PLAN_GRIDS[k][1]
                grid = [f"mpiexec -n N python -m ppu_lab.experiments run --plan {plan} (saved as {PLAN_GRIDS[k][0]})"]
            print(f"{k}: " + "; ".join(runs + grid) + f"; notebooks/{NOTEBOOKS[k]}.ipynb in full mode")
        return
    for k in keys:
        for ranks, script, *extra in BENCHMARKS[k]:
            benchmark(ranks, script, *extra, timeout=args.timeout)
        if k == "06":
            cnn_grid(args.timeout)
        if k in PLAN_GRIDS:
            plan_grid(k, args.timeout)
        if not args.no_notebooks:
            notebook(k, args.timeout)


if __name__ == "__main__":
    main()
