"""ppu_lab.collectives: the sums are right under mpiexec; the alpha-beta model fits a ping-pong; the
model-versus-measured table prints the model's own predictions; MPICH's switch points are read."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ppu_lab import costmodel
from ppu_lab.collectives import AlphaBeta, Regimes, fit_alpha_beta, fit_regimes, format_model_table, mpich_defaults
from ppu_lab.mpiexec import mpi4py_library, usable_cores
from ppu_lab.procs import run


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_sums_equal_serial_under_mpiexec(mpirun, ranks):
    proc = mpirun(ranks, "collectives_sums.py", timeout=180)
    assert f"OK sums on {ranks} ranks" in proc.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_pingpong_fit_describes_the_measurement(mpirun, ranks):
    proc = mpirun(ranks, "collectives_pingpong.py", timeout=180)  # the script asserts the fit on every rank
    assert re.search(r"OK alpha=\S+ beta=\S+ model/measured at 4 MiB=\S+", proc.stdout), proc.stdout
    # the timing is checked whenever the ranks have a core each, under any MPI's binding of ranks
    cores = usable_cores()
    expect = "timing checked" if ranks <= cores else "shape only"
    assert f"{ranks} ranks on {cores} cores: {expect}" in proc.stdout, proc.stdout


def test_pingpong_needs_two_ranks(mpirun):
    proc = mpirun(1, "collectives_pingpong.py", check=False, timeout=60)
    assert proc.returncode != 0 and "pingpong needs at least 2 ranks" in proc.stderr


def test_fit_keeps_parameters_positive():
    m = np.array([10.0, 100.0, 1000.0])
    flat = fit_alpha_beta(m, np.array([1e-6, 1e-6, 1e-6]))  # no size dependence seen
    steep = fit_alpha_beta(m, np.array([1e-8, 1e-7, 1e-6]))  # no latency seen
    assert min(flat.alpha, flat.beta, steep.alpha, steep.beta) > 0
    assert flat.alpha == pytest.approx(1e-6, rel=0.01) and steep.beta == pytest.approx(1e-9, rel=0.05)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        fit_alpha_beta([1, 2, 3], [1e-6, 2e-6])
    with pytest.raises(ValueError, match="positive"):
        fit_alpha_beta([1, 2], [1e-6, -1])
    with pytest.raises(ValueError, match="two different"):
        fit_alpha_beta([8, 8], [1e-6, 1e-6])


def test_fit_regimes_finds_a_known_switch():
    m = np.array([2.0**k for k in range(0, 23)])
    small, large = AlphaBeta(2e-6, 4e-10), AlphaBeta(5e-6, 1e-10)
    t = np.where(m < 8192, small.send(m), large.send(m))
    fit = fit_regimes(m, t, gamma=7e-11)
    assert fit.switch == 8192
    assert fit.small.alpha == pytest.approx(2e-6, rel=1e-6) and fit.large.beta == pytest.approx(1e-10, rel=1e-6)
    assert fit.gamma == 7e-11 and fit.send(1 << 20) == pytest.approx(large.send(1 << 20))
    with pytest.raises(ValueError, match="at least 8"):
        fit_regimes([1, 2, 3, 4, 5, 6, 7], [1e-6] * 7)


def test_model_table_prints_the_models_predictions_and_ratios():
    model = Regimes(8192, AlphaBeta(2e-6, 4e-10, 7e-11), AlphaBeta(5e-6, 1e-10, 7e-11))
    m = 4 * 28_938
    rows = [{"collective": "Allreduce", "n": 28_938, "nbytes": m, "ranks": 2, "seconds": 20e-6},
            {"collective": "Scatterv", "n": 28_938, "nbytes": m, "ranks": 2, "seconds": 60e-6}]
    text = format_model_table(rows, model)
    ar = next(ln for ln in text.splitlines() if ln.startswith("Allreduce"))
    pred = model.allreduce(m, 2)  # 2 alpha + m beta + m/2 gamma (reduce-scatter + allgather)
    assert pred == pytest.approx(2 * 5e-6 + m * 1e-10 + m / 2 * 7e-11)
    assert "reduce-scatter + allgather" in ar and f"{1e6 * pred:.1f}" in ar and f"{20e-6 / pred:.2f}" in ar
    sv = next(ln for ln in text.splitlines() if ln.startswith("Scatterv"))
    assert f"{60e-6 / float(model.time(costmodel.scatterv(m, 2))):.2f}" in sv and "outside" in sv
    assert "1 of 2 within 1.5x" in text


@pytest.mark.mpi  # asks the mpiexec found which MPI it is
def test_mpich_switch_points_are_read_from_the_library():
    from ppu_lab.mpiexec import find_mpiexec, mpi_flavor

    cvars = mpich_defaults()
    if mpi_flavor(find_mpiexec())[0] != "MPICH":
        assert cvars == {}  # other MPIs: nothing claimed
        return
    # MPICH's documented defaults (unless this environment overrides them)
    for name, default in [("MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE", 2048), ("MPIR_CVAR_BCAST_SHORT_MSG_SIZE", 12288),
                          ("MPIR_CVAR_ALLGATHER_LONG_MSG_SIZE", 524288)]:
        assert cvars[name] == int(os.environ.get(name, default)), (name, cvars)
    assert costmodel.BCAST_SHORT == cvars["MPIR_CVAR_BCAST_SHORT_MSG_SIZE"]
    assert costmodel.ALLGATHER_LONG == cvars["MPIR_CVAR_ALLGATHER_LONG_MSG_SIZE"]


def test_benchmark_script_prints_table_and_model(mpirun):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "collectives.py"
    proc = mpirun(2, str(script), "--quick", "--sizes", "8192", "28938", timeout=180)
    out = proc.stdout
    num = r"([-\d.e]+)"
    found = re.search(rf"# two regimes: below ([\d,]+) B: alpha = {num} us, beta = {num} ns/B .*?gamma = {num} "
                      rf"ns/B reduced; from there: alpha = {num} us, beta = {num} ns/B", out)
    switch, a1, b1, g, a2, b2 = found.groups()
    model = Regimes(float(switch.replace(",", "")), AlphaBeta(float(a1) * 1e-6, float(b1) * 1e-9, float(g) * 1e-9),
                    AlphaBeta(float(a2) * 1e-6, float(b2) * 1e-9, float(g) * 1e-9))
    seen = set()
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) != 3 or cells[1].startswith("measured"):
            continue
        name = line[:18].strip()
        n = int(cells[0].split()[-2].replace(",", ""))
        measured, predicted = map(float, cells[1].split())
        ratio = float(cells[2].split()[0])
        # the model column is the printed model's prediction; the ratio is measured / model
        assert predicted == pytest.approx(1e6 * float(model.time(costmodel.COLLECTIVES[name](4 * n, 2))), rel=0.02,
                                          abs=0.1), line
        assert ratio == pytest.approx(measured / predicted, rel=0.02, abs=0.01), line
        seen.add(name)
    assert seen == set(costmodel.COLLECTIVES), out
    assert "# 28,938 float32 (the CNN's gradient): Allreduce" in out


@pytest.mark.mpi
def test_benchmark_starts_itself_under_mpiexec_with_n():
    """`python benchmarks/collectives.py -n 2` (its docstring's command) starts mpiexec itself, with what
    the MPI found needs (ppu_lab.mpiexec), and rank 0 prints the table for 2 ranks and the MPI it used."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "collectives.py"
    proc = run([sys.executable, str(script), "-n", "2", "--quick", "--sizes", "28938"], timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = proc.stdout.splitlines()[0]
    assert header.startswith("# 2 ranks,") and " ".join(mpi4py_library()) in header, header
    assert "# 28,938 float32 (the CNN's gradient): Allreduce" in proc.stdout


def test_fit_regimes_at_a_given_switch():
    m = np.array([2.0**k for k in range(0, 23)])
    small, large = AlphaBeta(2e-6, 4e-10), AlphaBeta(5e-6, 1e-10)
    t = np.where(m < 8192, small.send(m), large.send(m))
    fit = fit_regimes(m, t, switch=8192)
    assert fit.switch == 8192 and fit.large.alpha == pytest.approx(5e-6, rel=1e-6)
    off = fit_regimes(m, t, switch=65_536)  # a wrong switch: the upper line no longer fits exactly
    assert off.switch == 65_536 and off.small.beta != pytest.approx(4e-10, rel=1e-3)
