"""Under mpiexec: an uncaught exception on one rank, inside mpi_main, ends the whole job.

Usage: mpiexec -n N python tests/mpi/parallel_abort.py RANK
Rank RANK raises; the others wait in a Barrier that it never reaches. mpi_main must abort
the job (non-zero exit) with "rank RANK: ..." in stderr instead of hanging.
"""

import sys

from ppu_lab.mpi import mpi_main, world


def main():
    comm = world()
    if comm.Get_rank() == int(sys.argv[1]):
        raise RuntimeError("injected failure before the barrier")
    comm.Barrier()


if __name__ == "__main__":
    mpi_main(main)
