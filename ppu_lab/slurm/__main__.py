"""``python -m ppu_lab.slurm script|check ...`` (see ``ppu_lab.slurm.cli``)."""

import sys

from ppu_lab.slurm.cli import main

sys.exit(main())
