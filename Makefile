# PPU Lab. Two commands on a fresh machine with Python >= 3.10 and pip:
#   make lab    create .venv if missing, install the lab, start JupyterLab on notebooks/
#   make test   create .venv if missing, run the whole suite (unit, MPI under mpiexec, notebooks)
#
# As root (CI), `make test` also starts a one-node Slurm for the cluster tests and stops it
# afterwards (scripts/slurm/with-slurm.sh); PPU_LAB_SLURM=0 turns that off.
#
# MPI=system   use an MPI you `module load` instead of the mpich wheel from PyPI
#              (mpi4py is then built against it: see README, "Using a system MPI").

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MPI    ?= wheel
ifeq ($(MPI),system)
EXTRAS := test
PIP_MPI := --no-binary mpi4py
else
EXTRAS := mpich,test
PIP_MPI :=
endif
STAMP  := $(VENV)/.installed-$(MPI)
# The venv's bin first, so that its mpiexec (mpich wheel) is the one found.
RUN    := PATH="$(abspath $(BIN)):$$PATH"
PYTEST_ARGS ?=

.PHONY: lab test venv clean-venv student grade

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
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

test: $(STAMP)
	$(RUN) PPU_LAB_QUICK=$${PPU_LAB_QUICK:-1} scripts/slurm/with-slurm.sh $(BIN)/python -m pytest tests notebooks \
	    --nbval-lax --nbval-current-env $(PYTEST_ARGS)

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
