"""PPU Lab: parallel parameter updates for neural networks, taught in notebooks.

Modules, and the notebook that explains each:

- ``ppu_lab.config``       quick mode for tests (``PPU_LAB_QUICK``), ``limit_threads`` (torch/BLAS threads)
- ``ppu_lab.timing``       the one timer helper used everywhere
- ``ppu_lab.checks``       argument checks that name the argument and what to pass
- ``ppu_lab.procs``        subprocesses with deadlines, stopped with their whole group; the watchdog
- ``ppu_lab.mpiexec``      which mpiexec and MPI, its command line, the preflight checks    (00)
- ``ppu_lab.mpi``          generic MPI helpers: shards, collective checks, barriers, aborts (03-08)
- ``ppu_lab.envcheck``     environment report with fixes                      (00)
- ``ppu_lab.data``         MNIST loader/downloader, synthetic ridge problems  (01, 05-07)
- ``ppu_lab.ridge``        ridge objective, gradient, serial minibatch SGD    (01)
- ``ppu_lab.threads``      Method 1: threads, the GIL, Hogwild!               (02)
- ``ppu_lab.cluster``      ipyparallel MPI engines that start, fail clearly, never hang, clean up (00, 03-07)
- ``ppu_lab.hangs``        the hang report: where each rank is                 (03)
- ``ppu_lab.waits``        deadlines on every wait, refusing new work while engines are stuck (03)
- ``ppu_lab.collectives``  ping-pong, gamma, protocol switch; every collective measured beside the model (03)
- ``ppu_lab.costmodel``    the alpha-beta-gamma cost of every collective and of both designs, derived once (03, 04)
- ``ppu_lab.perfmodel``    the step-time model T(p) = T_compute/p + T_serial + T_comm(p); speedups past this machine (04, 06, 07)
- ``ppu_lab.parallel``     Method 2: MPI data-parallel ridge SGD, two designs  (04)
- ``ppu_lab.timeline``     per-rank timelines: compute, communication, waiting; Gantt and Perfetto (04, 06, 08)
- ``ppu_lab.models``       the ANN (NumPy, hand backprop) and the CNN (PyTorch) (05, 06)
- ``ppu_lab.train``        data-parallel training of both models over MPI      (05, 06)
- ``ppu_lab.trainconfig``  ``TrainConfig``: the settings of a training run    (05-07)
- ``ppu_lab.steplog``      ``StepLog``: epochs, step count, timings, history of a run (05, 06)
- ``ppu_lab.ddp``          PyTorch DistributedDataParallel for comparison      (06)
- ``ppu_lab.experiments``  the course's experiment grid, resumable results, the course's four
                           conclusions tested with their noise (05, 07)
- ``ppu_lab.designs``      beyond the course: parameter server, local SGD, compression, overlap (08)
- ``ppu_lab.slurm``        the same engines and experiments through Slurm (a package) (README, "Running on a cluster")
- ``ppu_lab.reference``    the committed reference runs the notebooks quote (``results/reference/``)
- ``ppu_lab.plotting``     figures (take and return a matplotlib Axes)
- ``ppu_lab.conclusion_plots``  the figures of the four conclusions, yours beside a reference (07)
- ``ppu_lab.exercises``    graded exercises: checks with feedback, the student edition, the grader (docs/instructor.md)

Submodules are imported on demand (``from ppu_lab import ridge``), so importing the
package does not load MPI or PyTorch.
"""

from ppu_lab.config import quick_mode

__version__ = "0.1.0"
__all__ = ["quick_mode", "__version__"]
