"""Every collective the lab calls, measured beside the alpha-beta-gamma model of ppu_lab.costmodel (notebook 03).

    mpiexec -n 2 python benchmarks/collectives.py            # about 30 s
    mpiexec -n 2 python benchmarks/collectives.py --quick    # a few seconds (PPU_LAB_QUICK=1 too)
    mpiexec -n 2 python benchmarks/collectives.py --save-reference   # and results/reference/*.json

Rank 0 prints the ping-pong between ranks 0 and 1, the alpha-beta line fitted to all of it and the
two lines of ``fit_regimes`` (split where the MPI library switches protocol: MPICH's documented
switch, and where this ping-pong bends most), gamma (the library's
own reduction, ``MPI_Reduce_local``), MPICH's switch points (``mpivars``), then for every collective
and message size (float32, 8k to 1M floats per rank) the measured time, the model's and their ratio.
The model is the two-line (regimes) fit with gamma.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ppu_lab import collectives as C  # noqa: E402
from ppu_lab.config import quick_mode  # noqa: E402
from ppu_lab.mpi import mpi_main  # noqa: E402

PINGPONG_SIZES = [2**k for k in range(0, 23)]  # 1 B ... 4 MiB, every power of 2 (the switch is between two)
REFERENCE = "collectives"


def measure(comm, sizes, repeat):
    """Ping-pong, the fits, gamma and every collective: one dict, the same on every rank."""
    nbytes, secs = C.pingpong(sizes=PINGPONG_SIZES, comm=comm, repeat=repeat)
    gamma, switch = comm.bcast((C.measure_gamma(), C.protocol_switch()) if comm.Get_rank() == 0 else None, root=0)
    line = C.fit_alpha_beta(nbytes, secs, gamma)
    regimes = C.fit_regimes(nbytes, secs, gamma, switch=switch)  # at MPICH's documented switch, if known
    bend = C.fit_regimes(nbytes, secs, gamma).switch             # where this ping-pong bends most
    rows = C.compare_collectives(sizes, comm=comm, repeat=repeat)
    bcast = C.compare_bcast([10, 1_000, 100_000], comm=comm, repeat=repeat)
    return {"pingpong": (nbytes.tolist(), secs.tolist()), "line": line, "regimes": regimes, "rows": rows,
            "bcast": bcast, "bend": bend}


def report(result, p, cores, lib, quick, cvars) -> str:
    nbytes, secs = result["pingpong"]
    out = [f"# {p} ranks, {cores} cores, {lib}{', QUICK' if quick else ''}"]
    if p > cores:
        out.append(f"# WARNING: {p} ranks on {cores} cores share cores (oversubscribed): these times are meaningless")
    out.append("# ping-pong (one way): " + ", ".join(f"{m} B {1e6 * t:.2f} us" for m, t in zip(nbytes, secs)))
    out.append(f"# fitted model: {result['line']}")
    out.append(f"# two regimes: {result['regimes']}")
    out.append(f"# the ping-pong bends most at {result['bend']:,.0f} B (two lines fitted at every split)")
    if cvars:
        out.append("# MPICH switch points (mpivars): " + ", ".join(f"{k[10:]}={v}" for k, v in cvars.items()))
    out.append(C.format_model_table(result["rows"], result["regimes"]))
    for r in result["rows"]:
        if r["n"] == 28_938 and r["collective"] in ("Allreduce", "Allgather + sum", "pickled allreduce"):
            out.append(f"# 28,938 float32 (the CNN's gradient): {r['collective']} {1e6 * r['seconds']:.0f} us")
    return "\n".join(out)


def save_reference(result, argv, cvars):
    """results/reference/{collectives, pingpong, bcast}.json: what notebook 03 quotes and draws."""
    from ppu_lab import reference

    regimes, line = result["regimes"], result["line"]
    notes = {"alpha": line.alpha, "beta": line.beta, "gamma": line.gamma, "switch": regimes.switch,
             "bend": result["bend"],
             "small": [regimes.small.alpha, regimes.small.beta], "large": [regimes.large.alpha, regimes.large.beta],
             "mpich_cvars": cvars}
    command = "mpiexec -n 2 python benchmarks/collectives.py " + " ".join(argv)
    nbytes, secs = result["pingpong"]
    saved = [reference.save(REFERENCE, C.model_rows(result["rows"], regimes), command=command, notes=notes),
             reference.save("pingpong", [{"nbytes": int(m), "seconds": t} for m, t in zip(nbytes, secs)],
                            command=command, notes=notes),
             reference.save("bcast", result["bcast"], command=command)]
    return ", ".join(map(str, saved))


def main(argv=None):
    from mpi4py import MPI

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(C.GRADIENT_SIZES), help="floats per rank")
    ap.add_argument("--repeat", type=int, default=25, help="timing rounds (the best is reported)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and sizes (also PPU_LAB_QUICK=1)")
    ap.add_argument("--save-reference", action="store_true", help=f"write results/reference/{REFERENCE}.json")
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    quick = args.quick or quick_mode()
    repeat = 7 if quick else args.repeat
    sizes = [8_192, 28_938, 262_144] if quick and args.sizes == list(C.GRADIENT_SIZES) else args.sizes
    if p < 2:
        raise SystemExit("run with at least 2 ranks: mpiexec -n 2 python benchmarks/collectives.py")
    result = measure(comm, sizes, repeat)
    if rank == 0:
        lib = " ".join(MPI.Get_library_version().splitlines()[0].split())
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        cvars = C.mpich_defaults()
        print(report(result, p, cores, lib, quick, cvars), flush=True)
        if args.save_reference:
            print(f"# saved {save_reference(result, argv, cvars)}")
    return result


if __name__ == "__main__":
    mpi_main(main)
