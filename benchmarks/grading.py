"""What grading one submission costs, against simply running the same notebook (docs/instructor.md).

    python benchmarks/grading.py                 # notebooks 00, 01, 05, twice each, about 3 minutes
    python benchmarks/grading.py --notebooks 01_serial_sgd_ridge --repeat 3

For each notebook with graded exercises, the untouched student edition is (a) executed top to bottom
in a fresh kernel by nbclient, as Run All does, and (b) graded by the grader, alternately, in quick
mode. It prints the median seconds of each and their ratio: what the grader adds (its own checks with
the hidden cases, the kernel and engines it starts and kills). Timings on a shared machine are noisy:
read the ratio, and repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ppu_lab.exercises import CHECKS  # noqa: E402
from ppu_lab.exercises.edition import student_notebook, write_notebook  # noqa: E402
from ppu_lab.exercises.grading import grade_notebook  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_all(path: Path) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebooks", nargs="+", default=sorted(CHECKS))
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("PPU_LAB_QUICK", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    print(f"{'notebook':28s} {'run all (s)':>12s} {'grade (s)':>10s} {'ratio':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.notebooks:
            path = Path(tmp) / f"{name}.ipynb"
            write_notebook(student_notebook(json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text()), name), path)
            plain, graded = [], []
            for _ in range(args.repeat):
                plain.append(run_all(path))
                start = time.perf_counter()
                grade_notebook(path)
                graded.append(time.perf_counter() - start)
            a, b = statistics.median(plain), statistics.median(graded)
            print(f"{name:28s} {a:12.1f} {b:10.1f} {b / a:6.2f}", flush=True)


if __name__ == "__main__":
    main()
