"""ppu_lab.costmodel and ppu_lab.perfmodel: the counts and times against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ppu_lab import costmodel as C
from ppu_lab.perfmodel import (StepModel, amdahl_speedup, cluster, compare, fit_batch_line, format_compare,
                               format_speedups, networks, speedup_table)

NET = C.AlphaBeta(alpha=1e-6, beta=1e-9, gamma=1e-10)
M = 1e5  # bytes


def counts(cost):
    return tuple(float(np.asarray(v)) for v in (cost.messages, cost.nbytes, cost.reduced))


@pytest.mark.parametrize("p, expect", [
    (1, (0, 0, 0)),
    (2, (2, M, M / 2)),                     # reduce-scatter + allgather: one exchange of m/2 each way
    (4, (4, 1.5 * M, 0.75 * M)),            # 2 log2 4 messages, 2 (3/4) m bytes, (3/4) m reduced
    (3, (4, 3 * M, 1.5 * M)),               # q = 2, plus a step in (m, reduce m) and out (m)
    (8, (6, 1.75 * M, 0.875 * M)),
])
def test_allreduce_counts(p, expect):
    assert counts(C.allreduce(M, p)) == pytest.approx(expect)


def test_allreduce_short_messages_use_recursive_doubling():
    assert counts(C.allreduce(8, 8)) == pytest.approx((3, 24, 24))          # 8 bytes: log2 8 full exchanges
    assert counts(C.allreduce(16, 8)) == pytest.approx((3, 48, 48))         # 4 floats < 8 ranks: doubling too
    assert counts(C.allreduce(4_000, 8)) == pytest.approx((6, 7_000, 3_500))  # 1000 floats: 2 (7/8) m


@pytest.mark.parametrize("p, m, expect", [
    (2, M, (1, M)),
    (4, M, (2, 3 * M)),                     # 4 m < 512 KiB: recursive doubling, log2 4 steps
    (4, 2e5, (3, 6e5)),                     # 4 m >= 512 KiB: ring, p - 1 steps
    (3, 1e4, (2, 2e4)),                     # not a power of 2, 3 m < 80 KiB: Bruck, ceil(log2 3) steps
    (3, M, (2, 2 * M)),                     # ring: p - 1 = 2 steps
])
def test_allgather_counts(p, m, expect):
    assert counts(C.allgather(m, p))[:2] == pytest.approx(expect)


def test_scatter_bcast_send_counts():
    assert counts(C.scatter(M, 4))[:2] == pytest.approx((2, 3 * M))        # binomial: log2 4 steps, root sends 3 m
    assert counts(C.scatterv(M, 4))[:2] == pytest.approx((3, 3 * M))       # linear: one message per other rank
    assert counts(C.bcast(M, 2))[:2] == pytest.approx((1, M))
    assert counts(C.bcast(M, 4))[:2] == pytest.approx((2, 2 * M))          # p < 8: binomial, log2 4 steps of m
    assert counts(C.bcast(M, 8))[:2] == pytest.approx((6, 1.75 * M))       # scatter + doubling allgather
    assert counts(C.bcast(1e6, 8))[:2] == pytest.approx((10, 1.75e6))      # > 512 KiB: scatter + ring allgather
    assert counts(C.send(M)) == pytest.approx((1, M, 0))


def test_design_counts_and_the_two_designs_at_two_ranks():
    B = 8e5  # bytes of the minibatch's rows
    assert counts(C.design("scatter_allgather", 2, M, B)) == pytest.approx((2, B / 2 + M, M))
    assert counts(C.design("scatter_allgather", 4, M, B)) == pytest.approx((3 + 2, 3 * B / 4 + 3 * M, 3 * M))
    assert counts(C.design("allreduce", 4, M, B)) == counts(C.allreduce(M, 4))
    # the gradient exchange alone: Allgather (p-1) m against Allreduce 2 (p-1)/p m: equal at p = 2
    ag, ar = C.COLLECTIVES["Allgather"](M, 2), C.allreduce(M, 2)
    assert float(ag.nbytes) == float(ar.nbytes) == M
    assert float(C.allgather(M, 16).nbytes) / float(C.allreduce(M, 16).nbytes) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="design must be one of"):
        C.design("ring", 2, M)


def test_alphabeta_prices_a_cost():
    assert NET.allreduce(M, 2) == pytest.approx(2e-6 + 1e-4 + 5e-6)
    assert NET.design("scatter_allgather", 2, M, 8e5) == pytest.approx(2e-6 + 5e-4 + 1e-10 * M)
    assert NET.send([10, M]) == pytest.approx([1e-6 + 1e-8, 1e-6 + 1e-4])
    assert NET.allreduce(M, 1) == 0 and NET.bandwidth == pytest.approx(1e9)
    assert "gamma = 0.1000 ns/B" in str(NET)


def test_regimes_pick_by_the_largest_message():
    r = C.Regimes(8192, C.AlphaBeta(1e-6, 1e-9), C.AlphaBeta(5e-6, 1e-10))
    assert r.send(4096) == pytest.approx(1e-6 + 4096e-9)
    assert r.send(8192) == pytest.approx(5e-6 + 8192e-10)
    # Allreduce of 12 KiB on 2 ranks sends two messages of 6 KiB: the small regime
    assert r.allreduce(12_288, 2) == pytest.approx(2e-6 + 12_288e-9)


def test_fit_recovers_known_model():
    m = np.array([8, 64, 1024, 16_384, 262_144, 4_194_304], dtype=float)
    t = 2e-6 + 2.5e-10 * m
    noisy = t * (1 + 0.02 * np.random.default_rng(0).standard_normal(m.size))
    model = C.fit_alpha_beta(m, noisy, gamma=7e-11)
    assert model.alpha == pytest.approx(2e-6, rel=0.1) and model.beta == pytest.approx(2.5e-10, rel=0.1)
    assert model.gamma == 7e-11


# --------------------------------------------------------------------------- the step-time model
MODEL = StepModel(per_row=1e-4, serial=1e-3, batch=100, grad_bytes=M)


def test_step_time_by_hand():
    assert MODEL.time(1, NET) == pytest.approx(1e-2 + 1e-3)
    assert MODEL.time(2, NET) == pytest.approx(5e-3 + 1e-3 + (2e-6 + 1e-4 + 5e-6))
    # 3 ranks: the largest shard has ceil(100 / 3) = 34 rows; Allreduce on 3 ranks: (4, 3 m, 1.5 m)
    assert MODEL.time(3, NET) == pytest.approx(3.4e-3 + 1e-3 + (4e-6 + 3e-4 + 1.5e-5))
    assert MODEL.speedup(2, NET) == pytest.approx(11e-3 / MODEL.time(2, NET))
    parts = MODEL.parts([1, 2], NET)
    assert parts["comm"][0] == 0 and parts["total"] == pytest.approx(parts["compute"] + parts["serial"] + parts["comm"])


def test_course_design_scatters_the_rows():
    m = StepModel(per_row=1e-4, serial=1e-3, batch=100, design="scatter_allgather", grad_bytes=M, row_bytes=800)
    comm = 2e-6 + (50 * 800 + M) * 1e-9 + M * 1e-10    # Scatterv of 50 rows, Allgather of m, one sum of m
    assert m.time(2, NET) == pytest.approx(5e-3 + 1e-3 + comm)


def test_per_rank_batch_is_weak_scaling():
    weak = MODEL.with_batch(100, "per_rank")
    assert weak.time(4, NET) == pytest.approx(1e-2 + 1e-3 + NET.allreduce(M, 4))
    assert weak.speedup(4, NET) == pytest.approx(4 * 11e-3 / weak.time(4, NET))
    assert weak.global_batch(4) == 400


def test_amdahl_is_the_model_without_communication():
    free = C.AlphaBeta(0.0, 0.0, 0.0)
    p = np.array([1, 2, 4, 5, 10, 20])
    assert MODEL.speedup(p, free) == pytest.approx(amdahl_speedup(p, MODEL.serial_fraction()))
    assert amdahl_speedup(1e12, 0.25) == pytest.approx(4.0)


def test_peak_where_communication_overtakes():
    slow = C.AlphaBeta(alpha=1e-3, beta=0.0)                 # 1 ms per message: 2 log2 p ms per Allreduce
    p_best, s_best = MODEL.peak(slow, p_max=100)
    s = MODEL.speedup(np.arange(1, 101), slow)
    assert s_best == pytest.approx(s.max()) and s[p_best - 1] == s.max()
    assert 1 < p_best < 100 and MODEL.speedup(100, slow) < s_best   # it rises, peaks, and falls


def test_global_batch_limits_the_ranks():
    with pytest.raises(ValueError, match="gives no row"):
        MODEL.time(101, NET)
    assert MODEL.with_batch(100, "per_rank").time(1024, NET) > 0
    with pytest.raises(ValueError, match="design must be one of"):
        StepModel(1e-4, 1e-3, 100, design="tree")


def test_fit_batch_line_and_from_parts():
    serial, per_row = fit_batch_line([25, 50, 100], [1e-3 + 25e-4, 1e-3 + 50e-4, 1e-3 + 100e-4])
    assert serial == pytest.approx(1e-3) and per_row == pytest.approx(1e-4)
    assert StepModel.from_parts(1e-2, 1e-3, 100) == StepModel(1e-4, 1e-3, 100)
    with pytest.raises(ValueError, match="two or more different batch sizes"):
        fit_batch_line([100, 100], [1.0, 1.1])


def test_networks_and_tables():
    nets = networks(NET)
    assert nets["this machine"] is NET
    ten = nets["10 Gb/s Ethernet"]
    assert ten.beta == pytest.approx(0.8e-9) and ten.gamma == NET.gamma and ten.alpha == 25e-6
    assert cluster(100, 1.5e-6).bandwidth == pytest.approx(12.5e9)
    rows = compare(MODEL, NET, {1: 0.011, 2: 2 * float(MODEL.time(2, NET))})
    assert [r["ratio"] for r in rows] == pytest.approx([1.0, 2.0])
    assert "(oversubscribed)" in format_compare(rows + [{"ranks": 3, "predicted": 1, "measured": 2, "ratio": 2}],
                                                cores=2)
    table = speedup_table({"toy": MODEL}, {"net": NET}, ranks=(2, 64, 256))
    assert set(table[0]["speedup"]) == {2, 64}                 # 256 ranks > 100 rows: not predicted
    assert "-" in format_speedups(table, ranks=(2, 64, 256)).splitlines()[-1]


# --------------------------------------------------------------------------- the figures
def test_plot_with_reference_and_predicted_speedup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ppu_lab import plotting

    ax = plotting.with_reference([1, 2], [1.0, 1.8], [1, 2, 3], [1.0, 1.6, 1.2], "ranks", "speedup",
                                 ax=plt.figure().gca())
    (ref, yours) = ax.get_lines()
    assert list(yours.get_ydata()) == [1.0, 1.8] and list(ref.get_ydata()) == [1.0, 1.6, 1.2]
    assert ref.get_label() == "reference run" and ax.get_xlabel() == "ranks"
    slow = C.AlphaBeta(alpha=1e-3, beta=0.0)
    p = np.arange(1, 101)
    s = MODEL.speedup(p, slow)
    ax = plotting.predicted_speedup(p, {"toy": s}, measured={"toy": ([1, 2], [1.0, 1.5])}, ax=plt.figure().gca())
    peak = next(ln for ln in ax.get_lines() if ln.get_marker() == "v")
    assert peak.get_xdata()[0] == MODEL.peak(slow, 100)[0] and peak.get_ydata()[0] == pytest.approx(s.max())
    plt.close("all")
