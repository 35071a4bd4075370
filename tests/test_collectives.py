"""ppu_lab.collectives: the three sums are right under mpiexec; the alpha-beta model fits a ping-pong."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ppu_lab.collectives import AlphaBeta, fit_alpha_beta, format_table


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_sums_equal_serial_under_mpiexec(mpirun, ranks):
    proc = mpirun(ranks, "collectives_sums.py", timeout=180)
    assert f"OK sums on {ranks} ranks" in proc.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_pingpong_fit_describes_the_measurement(mpirun, ranks):
    proc = mpirun(ranks, "collectives_pingpong.py", timeout=180)  # the script asserts the fit on every rank
    assert re.search(r"OK alpha=\S+ beta=\S+ model/measured at 4 MiB=\S+", proc.stdout), proc.stdout


def test_pingpong_needs_two_ranks(mpirun):
    proc = mpirun(1, "collectives_pingpong.py", check=False, timeout=60)
    assert proc.returncode != 0 and "pingpong needs at least 2 ranks" in proc.stderr


def test_fit_recovers_known_model():
    m = np.array([8, 64, 1024, 16_384, 262_144, 4_194_304], dtype=float)
    t = 2e-6 + 2.5e-10 * m
    noisy = t * (1 + 0.02 * np.random.default_rng(0).standard_normal(m.size))
    model = fit_alpha_beta(m, noisy)
    assert model.alpha == pytest.approx(2e-6, rel=0.1)
    assert model.beta == pytest.approx(2.5e-10, rel=0.1)
    assert model.bandwidth == pytest.approx(4e9, rel=0.1)


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


def test_model_collective_costs():
    ab = AlphaBeta(alpha=1e-6, beta=1e-9)
    m = 1e6
    # two ranks: Allreduce moves m bytes in 2 steps; Scatter+Allgather of p rows moves 2 m
    assert ab.allreduce(m, 2) == pytest.approx(2e-6 + 1e-3)
    assert ab.scatter_allgather(m, 2) == pytest.approx(2e-6 + 2e-3)
    # more ranks: Allreduce's bandwidth term stays below 2 m beta, Scatter+Allgather's grows with p
    assert ab.allreduce(m, 64) < 2 * m * ab.beta + 12 * ab.alpha + 1e-12
    assert ab.scatter_allgather(m, 8) == pytest.approx(6e-6 + 14e-3)
    assert ab.allreduce(m, 1) == 0


def test_format_table_has_model_and_ratios():
    rows = [{"n": 28_938, "nbytes": 115_752, "ranks": 2, "allreduce": 70e-6, "scatter_allgather": 45e-6,
             "pickled": 370e-6}]
    text = format_table(rows, AlphaBeta(1e-6, 1e-10))
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("28,938"))
    assert "70.0" in line and "45.0" in line and "370.0" in line and "0.64" in line and "5.29" in line


def test_benchmark_script_prints_table_and_model(mpirun):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "collectives.py"
    proc = mpirun(2, str(script), "--quick", "--sizes", "8192", "28938", timeout=180)
    out = proc.stdout
    alpha, beta = map(float, re.search(r"alpha = (\S+) us, beta = (\S+) ns/B", out).groups())
    model = AlphaBeta(alpha * 1e-6, beta * 1e-9)
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("28,938"))
    values = [float(v) for v in re.findall(r"\d+\.\d+", line)]
    assert len(values) == 9  # KiB, 3 x (measured, model), 2 ratios
    kib, ar, ar_model, sa, sa_model = values[:5]
    assert kib == pytest.approx(28_938 * 4 / 1024, abs=0.05)
    # the model columns are the printed model's predictions; the ratio columns are the measured ratios
    assert ar_model == pytest.approx(1e6 * model.allreduce(28_938 * 4, 2), rel=0.02, abs=0.1)
    assert sa_model == pytest.approx(1e6 * model.scatter_allgather(28_938 * 4, 2), rel=0.02, abs=0.1)
    assert values[7] == pytest.approx(sa / ar, rel=0.02, abs=0.01)
    assert "# 28,938 float32: Allreduce" in out
