"""ppu_lab.designs (notebook 08): the pure kernels without MPI, then every design under mpiexec on 2 and 3 ranks
(tests/mpi/designs_exact.py: exact where it should be, the asynchronous server converges)."""

import numpy as np
import pytest

from ppu_lab import costmodel, ridge
from ppu_lab.data import load_mnist, make_ridge_data
from ppu_lab.designs import DesignResult, label, make_objective
from ppu_lab.designs.compress import sparse_sum, topk_with_feedback
from ppu_lab.designs.overlap import bucket_plan
from ppu_lab.designs.paramserver import StalenessGate
from ppu_lab.designs.runner import Traffic
from ppu_lab.models import CNN_NUM_PARAMS, make_cnn
from ppu_lab.train import train


# --------------------------------------------------------------------------- compression kernels
def test_topk_with_all_coordinates_sends_the_gradient_and_keeps_nothing():
    g = np.random.default_rng(0).standard_normal(50)
    residual, idx, val = np.zeros(50), np.empty(50, np.int32), np.empty(50)
    topk_with_feedback(residual, g, 50, idx, val)
    dense = np.zeros(50)
    sparse_sum(idx[None], val[None], dense)
    assert np.array_equal(dense, g) and not residual.any()


def test_topk_sends_the_largest_and_error_feedback_loses_nothing():
    rng = np.random.default_rng(1)
    residual, idx, val = np.zeros(100), np.empty(5, np.int32), np.empty(5)
    sent, seen = np.zeros(100), np.zeros(100)
    for _ in range(20):
        g = rng.standard_normal(100)
        before = residual + g
        topk_with_feedback(residual, g, 5, idx, val)
        assert set(idx) == set(np.argsort(-np.abs(before))[:5])        # the 5 largest in magnitude
        assert np.array_equal(val, before[idx]) and not residual[idx].any()
        sparse_sum(idx[None], val[None], np.empty(100))
        np.add.at(sent, idx, val)
        seen += g
    np.testing.assert_allclose(sent + residual, seen, atol=1e-12)       # only delayed, never dropped


def test_sparse_sum_adds_every_rank_in_order():
    rng = np.random.default_rng(2)
    indices = np.array([rng.permutation(30)[:7] for _ in range(3)], dtype=np.int32)
    values = rng.standard_normal((3, 7))
    dense = np.zeros((3, 30))
    for r in range(3):
        dense[r, indices[r]] = values[r]
    out = np.full(30, 99.0)
    sparse_sum(indices, values, out)
    np.testing.assert_allclose(out, dense.sum(axis=0), atol=1e-15)


# --------------------------------------------------------------------------- overlap: buckets
@pytest.mark.parametrize("bucket_bytes", [1, 32 * 1024, 10**9])
def test_buckets_cover_the_buffer_once_in_backward_order(bucket_bytes):
    sizes = [p.numel() for p in make_cnn(seed=0).parameters()]
    plan = bucket_plan(sizes, 4, bucket_bytes)
    spans = sorted((b["lo"], b["hi"]) for b in plan)
    assert spans[0][0] == 0 and spans[-1][1] == CNN_NUM_PARAMS + 1          # the loss slot too
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))              # contiguous, no overlap
    order = [i for b in plan for i in b["params"]]
    assert order == list(range(len(sizes)))[::-1]                           # last layer first
    assert len(plan) == {1: len(sizes), 32 * 1024: 3, 10**9: 1}[bucket_bytes]


def test_the_wide_model_has_the_parameters_the_notebook_quotes():
    from ppu_lab.designs.overlap import WIDE_MLP_PARAMS, wide_mlp

    assert sum(p.numel() for p in wide_mlp().parameters()) == WIDE_MLP_PARAMS


# --------------------------------------------------------------------------- parameter server: the gate
def test_staleness_gate_bound_zero_is_lockstep():
    gate = StalenessGate(workers=3, steps=4, bound=0)
    gate.pushed(0)
    assert gate.release() == []                  # worker 0 is one push ahead of 1 and 2: held
    gate.pushed(2)
    assert gate.release() == []
    gate.pushed(1)
    assert sorted(gate.release()) == [0, 1, 2]   # all at 1 push: everyone continues


def test_staleness_gate_unbounded_answers_at_once_and_never_answers_a_last_push():
    gate = StalenessGate(workers=2, steps=2, bound=None)
    gate.pushed(0)
    assert gate.release() == [0]
    gate.pushed(0)                               # worker 0's last push: it waits for nothing
    assert gate.release() == []


def test_staleness_gate_holds_a_worker_too_far_ahead_until_the_slowest_catches_up():
    gate = StalenessGate(workers=2, steps=10, bound=1)
    gate.pushed(0)
    assert gate.release() == [0]                 # 1 push ahead of worker 1: within the bound
    gate.pushed(0)
    assert gate.release() == [] and gate.held == [0]   # 2 ahead: held
    gate.pushed(1)
    assert sorted(gate.release()) == [0, 1]      # the slowest is always answered; worker 0 is 1 ahead again
    with pytest.raises(ValueError, match="waiting"):
        gate.pushed(1)
        gate.pushed(1)                           # a held worker cannot push: it waits for its weights


# --------------------------------------------------------------------------- bookkeeping
def test_traffic_counts_with_the_cost_model():
    t = Traffic()
    t.collective(costmodel.allreduce(4000, 4))
    t.send(100)
    t.receive(50)
    assert t.sent == pytest.approx(2 * 3 / 4 * 4000 + 100)
    assert float(t.cost.nbytes) == pytest.approx(6000 + 150) and float(t.cost.messages) == 4 + 2


def test_time_to_target_is_the_first_crossing():
    res = DesignResult("x", 2, np.zeros(1), {"step": [10, 20, 30], "seconds": [1.0, 2.0, 3.0],
                                             "score": [0.5, 0.96, 0.94]})
    assert res.time_to(0.95) == 2.0 and res.steps_to(0.95) == 20 and np.isnan(res.time_to(0.99))
    assert res.time_to(0.95, higher=False) == 1.0


def test_the_table_takes_medians_and_counts_the_repeats_that_reached_the_target():
    from ppu_lab.designs.compare import format_table, table

    def run(times, scores, ms):
        return DesignResult("async", 3, np.zeros(1), {"step": [10, 20], "seconds": times, "score": scores},
                            step_times=np.full(20, ms / 1e3))

    rounds = [[run([1.0, 2.0], [0.9, 0.96], 10)], [run([1.5, 3.0], [0.5, 0.13], 30)], [run([1.0, 4.0], [0.97, 0.98], 20)]]
    row = table(rounds, 0.95)[0]
    assert row["reached"] == 2 and row["repeats"] == 3
    assert row["time_to_target"] == pytest.approx(1.5) and row["steps_to_target"] == 15  # (2 + 1) / 2, (20 + 10) / 2
    assert row["final_score"] == 0.96 and row["ms_per_step"] == pytest.approx(20)
    assert "1.5 s 2/3" in format_table([row], 0.95)


def test_labels_name_the_options():
    assert label("local_sgd", period=4) == "local SGD, H=4"
    assert label("topk", ratio=0.01) == "top-k + error feedback, k/m=0.01"


# --------------------------------------------------------------------------- objectives against serial code
def test_ridge_objective_step_is_ridge_sgd_step():
    X, y, _ = make_ridge_data(200, 5, seed=3)
    obj = make_objective("ridge", (X, y), lam=2.0, lr=1e-3, max_rows=20)
    obj.theta[:] = np.linspace(-1, 1, 5)
    rows = np.arange(20, 40)
    expect = ridge.sgd_step(obj.theta, ridge.combine(obj.theta, ridge.data_gradient(obj.theta, X[rows], y[rows]),
                                                     2.0, 200, 20), 1e-3)
    obj.shard_gradient(rows)
    assert obj.grad[-1] == pytest.approx(0.5 * np.sum((y[rows] - X[rows] @ obj.theta) ** 2))
    obj.apply(obj.grad[:-1], 20)
    np.testing.assert_allclose(obj.theta, expect, rtol=1e-14, atol=1e-14)


def test_model_objective_step_is_trains_step(mnist_root):
    x, y, xt, yt = load_mnist(mnist_root, download=False)
    data = (x[:300], y[:300], xt[:50], yt[:50])
    ref = train("ann", data, hidden=10, batch_size=50, max_steps=2, evaluate=False, progress=False)
    obj = make_objective("ann", data, hidden=10, max_rows=50)
    for idx in ridge.minibatches(300, 50, 0, 1)[:2]:
        obj.shard_gradient(idx)
        obj.apply(obj.grad[:-1], len(idx))
    np.testing.assert_array_equal(obj.theta, ref.params)


# --------------------------------------------------------------------------- under mpiexec
@pytest.mark.parametrize("n", [2, 3])
def test_designs_exact_under_mpiexec(mpirun, mnist_root, n):
    """H = 1 local SGD, top-k with k = all, the synchronous server and the overlapped Allreduce equal the
    synchronous baseline; the asynchronous server reaches the closed form (tests/mpi/designs_exact.py)."""
    proc = mpirun(n, "designs_exact.py", mnist_root, timeout=300)
    assert f"designs exact on {n} ranks" in proc.stdout


# --------------------------------------------------------------------------- the cost model of the closing table
def test_predictions_add_the_cost_models_communication_to_the_step_model():
    from ppu_lab.designs.compare import design_cost, predict
    from ppu_lab.perfmodel import StepModel, cluster

    net = cluster(10, 25e-6)
    kw = dict(per_row=2e-4, serial=1e-3, batch=100, n_params=CNN_NUM_PARAMS)
    one = predict("allreduce", 1, net, **kw)
    assert one["comm"] == 0 and one["total"] == pytest.approx(2e-4 * 100 + 1e-3)
    p64 = predict("allreduce", 64, net, **kw)
    compute = StepModel(2e-4, 1e-3, 100).parts(64, net)
    allreduce = float(net.allreduce(4 * (CNN_NUM_PARAMS + 1), 64))
    assert p64["total"] == pytest.approx(float(compute["compute"] + compute["serial"]) + allreduce)
    assert predict("local_sgd", 64, net, period=4, **kw)["comm"] == pytest.approx(
        float(net.allreduce(4 * CNN_NUM_PARAMS, 64)) / 4)
    saved = allreduce - predict("float16", 64, net, **kw)["comm"]                # half the bytes, same latency
    assert saved == pytest.approx(0.5 * net.beta * float(costmodel.allreduce(4 * CNN_NUM_PARAMS, 64).nbytes), rel=1e-3)
    assert predict("overlap", 64, net, **kw)["comm"] == pytest.approx(
        max(0.0, allreduce - 2 / 3 * float(compute["compute"])))
    sync_ps, async_ps = predict("ps_sync", 64, net, **kw), predict("ps_async", 64, net, **kw)
    assert sync_ps["compute"] == pytest.approx(p64["compute"])                  # 64 workers, and a server
    assert sync_ps["comm"] > 2 * 64 * float(net.send(4 * CNN_NUM_PARAMS))       # it serves 64 workers in turn
    # asynchronous: workers and server overlap, but the server applies every worker's gradient separately
    assert async_ps["total"] == pytest.approx(max(async_ps["compute"], async_ps["comm"] + 64 * 1e-3))
    k = round(0.01 * CNN_NUM_PARAMS)
    assert float(design_cost("topk", 64, CNN_NUM_PARAMS, ratio=0.01).nbytes) == 63 * 8 * k   # grows with p
    assert predict("ps_sync", 1, net, **kw)["comm"] > 0                        # one worker still talks to the server
