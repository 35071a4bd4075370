"""Method 1 benchmark: what threads buy for the ridge gradient on this machine (notebook 02).

Measures, in ONE run (so the ratios share the machine's load):

1. seconds per data gradient with 1, 2, 4 threads, BLAS pinned to 1 thread per worker, for
   the pure-Python loop, ``ridge.data_gradient`` (NumPy, ``np.dot``) and
   ``data_gradient_matmul`` (the same maths with ``@``); then the NumPy gradients with BLAS's
   own threads left on as well (Python threads x BLAS threads: oversubscription);
2. how much of each call leaves the GIL free (``threads.gil_free_fraction``);
3. the break-even minibatch size: one gradient step in the calling thread vs 2 threads.

Not a test: it prints a table. Example::

    python benchmarks/threads.py                 # 10-20 s on 2 cores
    python benchmarks/threads.py --batch 100000,200000 --repeat 5
    python benchmarks/threads.py --save-reference   # also write results/reference/threads_*.json (notebook 02)
"""

from __future__ import annotations

import argparse

import numpy as np

from ppu_lab import ridge, threads

REFERENCES = ("threads_scaling", "threads_gil", "threads_break_even")


def _row(cells, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def scaling_table(args):
    rng = np.random.default_rng(0)
    cases = [("pure Python", threads.data_gradient_python, args.py_batch, args.py_d, 1)]
    for blas in (1, None):
        for b in args.batch:
            cases += [("np.dot (ridge)", ridge.data_gradient, b, args.d, blas),
                      ("NumPy @", threads.data_gradient_matmul, b, args.d, blas)]
    widths = (16, 14, 5, 8, 12, 9)
    print(_row(("gradient", "batch x d", "BLAS", "threads", "ms/gradient", "speedup"), widths))
    data, records = {}, []
    for name, fn, b, d, blas in cases:
        if (b, d) not in data:
            data[b, d] = rng.standard_normal((b, d)), rng.standard_normal(b), rng.standard_normal(d)
        X, y, w = data[b, d]
        t = threads.time_threads(fn, w, X, y, threads=args.threads, repeat=args.repeat, blas_threads=blas)
        for k, tk in zip(args.threads, t):
            print(_row((name, f"{b} x {d}", blas or "all", k, f"{1e3 * tk:.3f}", f"{t[0] / tk:.2f}x"), widths))
            records.append({"gradient": name, "rows": b, "d": d, "blas": blas or "all", "threads": k,
                            "seconds": float(tk), "speedup": float(t[0] / tk)})
    print("speedup = T(1 thread) / T(k threads), same BLAS setting, medians of interleaved rounds")
    return records


def gil_table(args):
    rng = np.random.default_rng(1)
    X, y, w = rng.standard_normal((args.batch[-1] // 2, args.d)), rng.standard_normal(args.batch[-1] // 2), \
        rng.standard_normal(args.d)
    r = y - X @ w
    Xp, yp, wp = rng.standard_normal((args.py_batch, args.py_d)), rng.standard_normal(args.py_batch), \
        rng.standard_normal(args.py_d)
    calls = [("pure-Python gradient", threads.data_gradient_python, (wp, Xp, yp)),
             ("X @ w", np.matmul, (X, w)), ("np.dot(X, w)", np.dot, (X, w)),
             ("X.T @ r", np.matmul, (X.T, r)), ("np.dot(X.T, r)", np.dot, (X.T, r)),
             ("ridge.data_gradient", ridge.data_gradient, (w, X, y)),
             ("data_gradient_matmul", threads.data_gradient_matmul, (w, X, y))]
    print(f"GIL left free during the call (1 = free, 0 = held; {args.batch[-1] // 2} x {args.d}, BLAS=1):")
    records = []
    for name, fn, a in calls:
        free = threads.gil_free_fraction(fn, *a, repeat=args.repeat)
        print(f"  {name:22s} {free:5.2f}")
        records.append({"call": name, "free": float(free)})
    return records


def break_even_table(args):
    runs = {name: threads.break_even(args.sizes, d=args.d, n_threads=2, repeat=args.repeat, grad_fn=fn)
            for name, fn in (("np.dot", ridge.data_gradient), ("@", threads.data_gradient_matmul))}
    widths = (9, 11, 11, 8, 11, 11, 8)
    print(_row(("batch", "dot serial", "dot 2 thr", "ratio", "@ serial", "@ 2 thr", "ratio"), widths))
    dot, at = runs["np.dot"], runs["@"]
    for i, b in enumerate(dot.batch_sizes):
        print(_row((b, *(f"{1e3 * x:.4f}" if j % 3 < 2 else f"{x:.2f}x"
                         for j, x in enumerate((dot.serial[i], dot.threaded[i], dot.serial[i] / dot.threaded[i],
                                                at.serial[i], at.threaded[i], at.serial[i] / at.threaded[i])))),
                   widths))
    print(f"times in ms per gradient (d={args.d}, BLAS=1); ratio = serial / 2 threads")
    print(f"break-even batch (2 threads faster from there on): np.dot (ridge) {dot.batch}, @ {at.batch}")
    return [{"gradient": name, "batch": int(b), "serial": float(run.serial[i]), "threaded": float(run.threaded[i])}
            for name, run in (("np.dot (ridge)", dot), ("NumPy @", at)) for i, b in enumerate(run.batch_sizes)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=lambda s: [int(v) for v in s.split(",")], default=[100_000, 400_000],
                   help="rows of the large NumPy batches, comma-separated")
    p.add_argument("--d", type=int, default=50, help="features")
    p.add_argument("--py-batch", type=int, default=4000, help="rows for the pure-Python gradient")
    p.add_argument("--py-d", type=int, default=20, help="features for the pure-Python gradient")
    p.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4])
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")],
                   default=[256, 1024, 4096, 16384, 32768, 65536, 131072, 262144],
                   help="batch sizes for the break-even")
    p.add_argument("--repeat", type=int, default=9, help="timed rounds per setting (median)")
    p.add_argument("--save-reference", action="store_true", help="write results/reference/threads_*.json")
    args = p.parse_args(argv)
    if args.threads[0] != 1:
        p.error("--threads must start with 1 (the baseline)")
    rep = threads.gil_report()
    print("interpreter: Python {python}, free-threaded build: {free_threaded_build}, GIL enabled: {gil_enabled}; "
          "CPUs: {cpus}; BLAS: {blas}".format(**rep))
    print()
    tables = [scaling_table(args)]
    print()
    tables.append(gil_table(args))
    print()
    tables.append(break_even_table(args))
    if args.save_reference:
        import sys

        from ppu_lab import reference

        notes = {**rep, "switch_interval": sys.getswitchinterval(), "numpy": np.__version__}
        command = "python benchmarks/threads.py " + " ".join(argv if argv is not None else sys.argv[1:])
        for name, records in zip(REFERENCES, tables):
            print(f"saved {reference.save(name, records, command=command, notes=notes)}")


if __name__ == "__main__":
    main()
