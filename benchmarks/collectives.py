"""What summing a gradient costs: Allreduce vs Scatter+Allgather vs pickled allreduce (notebook 03).

    python benchmarks/collectives.py -n 2              # starts mpiexec -n 2 itself; about 20 s
    python benchmarks/collectives.py -n 2 --quick      # a few seconds (PPU_LAB_QUICK=1 too)
    mpiexec -n 2 python benchmarks/collectives.py      # the same under an mpiexec you start yourself

With ``-n`` the script starts itself under ``mpiexec`` through ``ppu_lab.mpiexec``, which adds what
the MPI found needs (Open MPI: ``--oversubscribe`` beyond the cores, its root variables as root);
the last form is for a plain MPICH, or a cluster's ``srun``.

Rank 0 prints the alpha-beta model fitted from a ping-pong between ranks 0 and 1, then, for
gradient-sized messages (float32), the measured time of each sum with the model's prediction
beside it, and the ratios to Allreduce measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ppu_lab import collectives as C  # noqa: E402
from ppu_lab.config import quick_mode  # noqa: E402
from ppu_lab.mpi import mpi_main, node_ranks_and_cores  # noqa: E402
from ppu_lab.mpiexec import mpi_name  # noqa: E402


def launch(args):
    """Run this script on ``args.ranks`` ranks under mpiexec (its output streamed); exit with its code."""
    from ppu_lab.mpiexec import mpiexec_command
    from ppu_lab.procs import stream

    worker = ["--sizes", *args.sizes, "--repeat", args.repeat] + ["--quick"] * args.quick
    job = mpiexec_command(args.ranks, sys.executable, os.path.abspath(__file__), *worker)
    code, _ = stream(job.cmd, args.timeout, on_line=lambda line: print(line, end="", flush=True),
                     env=job.environ({**os.environ, "PYTHONUNBUFFERED": "1"}))
    raise SystemExit(code)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--ranks", type=int, default=None,
                    help="start this many ranks with mpiexec (leave out when started under mpiexec)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for the whole job with -n")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(C.GRADIENT_SIZES), help="floats per rank")
    ap.add_argument("--repeat", type=int, default=25, help="timing rounds (the best is reported)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and sizes (also PPU_LAB_QUICK=1)")
    args = ap.parse_args(argv)
    if args.ranks is not None:  # before MPI starts in this process: mpiexec is started from a plain one
        launch(args)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    quick = args.quick or quick_mode()
    repeat = 7 if quick else args.repeat
    sizes = [8_192, 28_938, 262_144] if quick and args.sizes == list(C.GRADIENT_SIZES) else args.sizes
    if p < 2:
        raise SystemExit("run with at least 2 ranks: python benchmarks/collectives.py -n 2")

    nbytes, secs = C.pingpong(sizes=[2**k for k in range(0, 23, 2)], comm=comm, repeat=repeat)
    model = C.fit_alpha_beta(nbytes, secs)
    rows = C.compare_sums(sizes, comm=comm, repeat=repeat)
    on_node, cores = node_ranks_and_cores(comm)  # Open MPI binds each rank to a core: not this rank's affinity
    if rank == 0:
        lib = " ".join(mpi_name(MPI.Get_library_version()))  # e.g. "Open MPI 5.0.11"
        print(f"# {p} ranks, {cores} cores, {lib}{', QUICK' if quick else ''}")
        if on_node > cores:
            print(f"# WARNING: {on_node} ranks on {cores} cores share cores (oversubscribed): these times are "
                  "meaningless")
        print("# ping-pong (one way):", ", ".join(f"{m} B {1e6 * t:.2f} us" for m, t in zip(nbytes, secs)))
        print(f"# fitted model: {model}")
        print(C.format_table(rows, model))
        for r in rows:
            if r["n"] == 28_938:
                print(f"# 28,938 float32: Allreduce {1e6 * r['allreduce']:.0f} us, Scatter+Allgather "
                      f"{1e6 * r['scatter_allgather']:.0f} us, pickled {1e6 * r['pickled']:.0f} us")
    return rows


if __name__ == "__main__":
    mpi_main(main)
