# PPU Lab. Two commands on a fresh machine with Python >= 3.10 and pip:
#   make lab    create .venv if missing, install the lab, start JupyterLab on notebooks/
#   make test   create .venv if missing, run the whole suite (unit, MPI under mpiexec, notebooks)
#
# As root (CI), `make test` also starts a one-node Slurm for the cluster tests and stops it
# afterwards (scripts/slurm/with-slurm.sh); PPU_LAB_SLURM=0 turns that off. A second leg then runs
# tests/test_slurm_nodes.py on a two-node Slurm (network namespaces: with-slurm.sh --nodes 2).
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

.PHONY: lab test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_MPI) -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*
	@touch $@

# Jupyter refuses root unless told; containers and VMs often run as root.
LAB_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP)
	$(RUN) $(BIN)/jupyter lab $(LAB_ARGS) notebooks/

test: $(STAMP)
	$(RUN) PPU_LAB_QUICK=$${PPU_LAB_QUICK:-1} scripts/slurm/with-slurm.sh $(BIN)/python -m pytest tests notebooks \
	    --nbval-lax --nbval-current-env --ignore=tests/test_slurm_nodes.py $(PYTEST_ARGS)
# the two-node Slurm leg; no notebooks, so no nbval (its import alone takes ~6 s); exit 5: PYTEST_ARGS
# selected none of its tests
	$(RUN) PPU_LAB_QUICK=$${PPU_LAB_QUICK:-1} scripts/slurm/with-slurm.sh --nodes 2 $(BIN)/python -m pytest \
	    -p no:nbval tests/test_slurm_nodes.py $(PYTEST_ARGS) || [ $$? = 5 ]

clean-venv:
	rm -rf $(VENV)
