"""The lab on a Slurm cluster: MPI engines in a Slurm job, and batch scripts for the experiments.

From a notebook (on the login node, or a JupyterHub that submits to Slurm)::

    from ppu_lab.slurm import SlurmMPICluster
    with SlurmMPICluster(4, partition="short", time="00:30:00", account="myproj",
                         env_setup="module load mpich\\nsource ~/ppu-lab/.venv/bin/activate") as cl:
        cl.apply(lambda: (rank, size))        # [(0, 4), (1, 4), (2, 4), (3, 4)]

How the engines are started, and why
------------------------------------
The controller runs where the notebook runs; the ``n`` engines run in ONE Slurm job whose
batch script ends with ``srun --mpi=pmi2 python -m ipyparallel.engine ...`` (``mpi="pmi2"``,
the default). We use ipyparallel's own Slurm launcher (``sbatch`` to submit, ``scancel`` to
stop, the controller's address handed to the engines in ``$IPP_CONNECTION_INFO``) but replace
its batch script, for one reason: its default script ends with a plain ``srun``, and a plain
``srun`` starts ``n`` *independent* processes unless the site set ``MpiDefault``: with the pip
``mpich`` wheel each engine then reports rank 0 of 1. ``srun --mpi=pmi2`` gives each process
the PMI2 wire-up it needs, so the ``n`` engines form one ``MPI.COMM_WORLD``. We prefer srun over
``mpiexec`` inside the job because then Slurm itself starts, places (across nodes), tracks and
kills every rank: ``scancel`` cleans up everything, and nothing depends on an ``mpiexec``'s Slurm
integration. ``mpi="pmix"`` is the same for an Open MPI 5 built with PMIx. ``mpi="mpiexec"``
runs ``mpiexec -n N`` (mpi4py's own, or ``mpiexec=``) inside the allocation instead: the way
out on a Slurm without the pmi2 plugin (``srun --mpi=list``) or with a site MPI whose docs say
so. ``mpi="none"`` is the plain ``srun`` (ipyparallel's ``engines="slurm"``); it exists to
show the failure, which start() and :func:`preflight` detect and explain.

Engines on compute nodes must reach the controller, and nothing else should. So by default
(``ip=None``) it listens on ONE address, chosen at start by :func:`controller_ip` from the nodes
Slurm lists for the partition (``sinfo``): this machine's address on the route to their
``NodeAddr`` (a login node's address on the cluster network; the bridge address on the two-node
test cluster), or loopback when the nodes are this machine (the one-node test Slurm). Only when
no single address reaches them all (nodes behind different interfaces, names that do not
resolve here) does it listen on all interfaces (``"*"``), as it always did before; ipyparallel
signs every message with the cluster's key either way. ``cl.info["controller_ip"]`` says what
was chosen and why; ``ip=`` overrides it. (Listening on ``"*"`` is not only wider than needed:
ipyparallel then tells the engines to connect to this machine's hostname, which may resolve to
127.0.0.1, as on the test machine, and the engines never register.) The batch
script and the engines' output go to ``job_dir`` (default ``~/.cache/ppu_lab/slurm``), which
must be on a file system the compute nodes share (home usually is; ``/tmp`` is not).

Clean-up: ``stop()``, leaving a ``with`` block, interpreter exit (atexit) and even a killed
kernel (a watchdog process) cancel the job, and ``stop()`` waits until ``squeue`` no longer
lists it. A lost node: Slurm ends the job (``NODE_FAIL``, after ``SlurmdTimeout``) and kills its
ranks on the other nodes; ``cl.apply`` watches the job while it waits, so the call in progress
raises :class:`SlurmError` naming the lost node, and the cluster is stopped (see
:mod:`ppu_lab.slurm.nodes`).

Batch runs (no notebook)
------------------------
``experiments_script(...)`` (command line: ``python -m ppu_lab.slurm script``) writes an sbatch
script that runs ``python -m ppu_lab.experiments run ...`` on ``ntasks`` ranks; the committed
``scripts/slurm/experiments.sbatch`` is its default output. The runner appends one JSON line per
finished run, so a job killed at its time limit (or by ``scancel``) loses only the run in progress;
submitting the same script again resumes; a node lost under it ends it too (``--no-requeue``), and
``python -m ppu_lab.slurm wait JOBID`` (:func:`wait`) says so, naming the node. See the README,
"Running on a cluster".
"""

from ppu_lab.slurm.cli import main
from ppu_lab.slurm.commands import SlurmError, cancel, job_state, slurm_status, submit
from ppu_lab.slurm.engines import SlurmMPICluster
from ppu_lab.slurm.nodes import controller_ip, describe, job_end, wait
from ppu_lab.slurm.preflight import preflight
from ppu_lab.slurm.scripts import MPI_MODES, batch_script, experiments_script, launch_prefix

__all__ = [
    "SlurmError", "SlurmMPICluster", "slurm_status", "batch_script", "experiments_script",
    "submit", "cancel", "job_state", "preflight", "MPI_MODES", "launch_prefix", "main",
    "controller_ip", "job_end", "describe", "wait",
]
