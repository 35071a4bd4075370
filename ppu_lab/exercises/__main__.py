"""``python -m ppu_lab.exercises student | grade DIR``: the student edition, and grading (docs/instructor.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppu_lab.exercises", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("student", help="write the student edition: solutions stubbed, hidden tests removed")
    st.add_argument("--src", type=Path, default=ROOT / "notebooks", help="instructor notebooks (default: notebooks/)")
    st.add_argument("--out", type=Path, default=ROOT / "dist" / "student",
                    help="where to write (default: dist/student/)")
    gr = sub.add_parser("grade", help="grade SUBMISSIONS/<student>/*.ipynb; write grades.csv and feedback/")
    gr.add_argument("submissions", type=Path)
    gr.add_argument("--out", type=Path, default=None, help="where to write (default: SUBMISSIONS/grades/)")
    gr.add_argument("--time-limit", type=float, default=None,
                    help="cap every exercise's time limit at this many seconds (default: each exercise's own)")
    args = parser.parse_args(argv)
    if args.command == "student":
        from ppu_lab.exercises.edition import MarkerError, build

        try:
            lines = build(args.src, args.out)
        except MarkerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print("\n".join(lines))
        print(f"student edition written to {args.out}")
        return 0
    from ppu_lab.exercises.grading import grade_folder

    if not args.submissions.is_dir():
        print(f"error: {args.submissions} is not a folder of <student>/<notebook>.ipynb", file=sys.stderr)
        return 2
    if args.time_limit is not None:
        os.environ["PPU_LAB_EXERCISE_TIMEOUT"] = str(args.time_limit)   # the kernels inherit it
    grade_folder(args.submissions, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
