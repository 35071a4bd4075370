"""``python -m ppu_lab.experiments`` (under ``mpiexec -n N`` for ``run``): see ``--help``."""

import sys

from ppu_lab.experiments.cli import build_parser, run_command
from ppu_lab.mpi import mpi_main

args = build_parser().parse_args()  # --help and usage errors before MPI starts
sys.exit(mpi_main(lambda: run_command(args)))
