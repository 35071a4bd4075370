"""The course's experiments: time and accuracy over a grid of ranks x batch sizes x models (notebook 07).

One **run** trains one model (``ann:10``, ``ann:50``, ``cnn``) with one batch size, batch mode and
number of MPI ranks through ``ppu_lab.train.train``. A grid of runs is executed by
``run_grid`` on the ranks of one communicator: for each rank count p the first p ranks form a
sub-communicator (``comm.Split``) and train while the others wait (sleeping, not spinning). So one
``mpiexec -n 4`` job, or one set of ipyparallel MPI engines, covers p = 1, 2, 4.

Results file (JSON lines, one record per completed run)
-------------------------------------------------------
Rank 0 alone appends one JSON object per line, written with a single ``write`` and then
``flush`` + ``fsync``: a crash loses at most the run in progress. A torn last line (a crash in
the middle of a write) is detected, reported with a warning and cut off before new records are
appended; ``load_results`` ignores it. Re-running the same command skips runs already in the
file: a run is identified by ``key`` (its configuration as asked for, see ``RunConfig.key``; an
``lr`` of None there means train()'s default, and the record's ``lr`` field holds the value used),
not by the machine. Each record holds:

- configuration: ``label`` (``ann:10``), ``model``, ``hidden``, ``ranks``, ``batch_size``,
  ``batch_mode`` (``global``: ``batch_size`` is split over the ranks; ``per_rank``: each rank
  takes ``batch_size``, so the global batch is ``ranks * batch_size``), ``global_batch``,
  ``epochs``, ``lr``, ``lam``, ``design``, ``seed``, ``train_samples``, ``test_samples``,
  ``max_steps``, ``threads_per_rank``, ``key``;
- timings (seconds): ``median_step_time``, ``epoch_time`` (the course's "time per iteration"),
  ``median_compute_time`` / ``median_comm_time`` per step, ``compute_time`` / ``comm_time``
  (totals), ``comm_fraction``, ``steps``, ``wall_time`` (the whole run, evaluation included);
- accuracy: ``final_accuracy``, ``final_train_loss`` and ``history``, a list of per-epoch
  ``{"epoch", "train_loss", "test_accuracy", "epoch_time"}`` (``epoch_rows`` flattens it);
- the machine: ``machine`` = hostname(s), cores, MPI library and versions of Python, NumPy,
  torch and mpi4py; ``finished`` (UTC time).

Command line (``python -m ppu_lab.experiments --help``)::

    mpiexec -n 4 python -m ppu_lab.experiments run --models ann:10,ann:50,cnn \\
        --batch-sizes 50,100,150,200 --epochs 1 --out results/grid.jsonl

From a notebook: ``launch(n, ...)`` starts that command with ``mpiexec`` and streams its output
(with a deadline); ``run_on_engines(cluster, ...)`` runs the same grid on running ipyparallel MPI engines.

Modules: ``grid`` (``RunConfig``, ``expand_grid``), ``results`` (the file), ``runner`` (``run_grid``
under MPI), ``analysis`` (selecting records, the course's table and conclusions), ``cli`` (the
command line and ``launch``). Everything is importable from ``ppu_lab.experiments`` itself.
"""

from ppu_lab.experiments.analysis import (COURSE_ITERATION_TIMES, check_conclusions, course_table, epoch_rows,
                                          format_conclusions, format_course_table, format_table, group_by, select)
from ppu_lab.experiments.cli import LAUNCH_TIMEOUT, build_parser, grid_from_args, launch, main, run_command
from ppu_lab.experiments.grid import (BATCH_MODES, COURSE_BATCH_SIZES, DESIGNS, FULL_EPOCHS, MODELS, QUICK,
                                      ExperimentInputError, RunConfig, default_ranks, expand_grid, parse_model)
from ppu_lab.experiments.results import (SCHEMA, append_record, check_writable, default_out, load_results,
                                         make_record, repair_results)
from ppu_lab.experiments.runner import machine_info, run_grid, run_on_engines

__all__ = [
    "COURSE_ITERATION_TIMES", "check_conclusions", "course_table", "epoch_rows", "format_conclusions",
    "format_course_table", "format_table", "group_by", "select",
    "LAUNCH_TIMEOUT", "build_parser", "grid_from_args", "launch", "main", "run_command",
    "BATCH_MODES", "COURSE_BATCH_SIZES", "DESIGNS", "FULL_EPOCHS", "MODELS", "QUICK", "ExperimentInputError",
    "RunConfig", "default_ranks", "expand_grid", "parse_model",
    "SCHEMA", "append_record", "check_writable", "default_out", "load_results", "make_record", "repair_results",
    "machine_info", "run_grid", "run_on_engines",
]
