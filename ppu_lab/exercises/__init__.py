"""Graded exercises: checks with feedback, the student edition, the grader (docs/instructor.md).

- ``ppu_lab.exercises.core``      the check framework: ``Exercise``, ``Notebook``, ``Feedback``, ``compare``
- ``ppu_lab.exercises.nb00`` ...  the checks of each notebook's exercises; a notebook imports
  ``from ppu_lab.exercises.nb01 import check`` and calls ``check(its_function)`` in its check cells
- ``ppu_lab.exercises.edition``   solution markers, and the student edition built from the notebooks
- ``ppu_lab.exercises.grading``   the grader: every submission in a fresh kernel, per-exercise limits

``python -m ppu_lab.exercises student`` writes the student edition to ``dist/student/``;
``python -m ppu_lab.exercises grade DIR`` grades the notebooks under ``DIR/<student>/``.
"""

import importlib

# notebook file stem -> the module that holds the checks of its exercises
CHECKS = {"00_setup": "nb00", "01_serial_sgd_ridge": "nb01", "02_threads": "nb02", "03_mpi_collectives": "nb03",
          "04_mpi_sgd_ridge": "nb04", "05_ann_mnist": "nb05", "06_cnn_mnist": "nb06",
          "07_results_and_conclusions": "nb07"}


def book(notebook: str):
    """The ``Notebook`` of exercises of a notebook, or None. ``notebook`` is its file stem
    (``"01_serial_sgd_ridge"``); a renamed copy that keeps the number (``"01_mine (1)"``) is found too."""
    stem = notebook if notebook in CHECKS else next((s for s in CHECKS if notebook[:3] == s[:3]), None)
    return None if stem is None else importlib.import_module(f"ppu_lab.exercises.{CHECKS[stem]}").BOOK
