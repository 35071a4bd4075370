"""Data-parallel training of notebooks 05-07: accuracy on real MNIST, the update rule, parallel equals
serial under mpiexec with 1, 2 and 3 ranks, divergence stopping every rank."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from ppu_lab.data import load_mnist
from ppu_lab.models import AnnModel, ann_loss_grad, combine
from ppu_lab.ridge import DivergenceError
from ppu_lab.train import TrainConfig, train

spec = importlib.util.spec_from_file_location("train_equivalence",
                                              Path(__file__).parent / "mpi" / "train_equivalence.py")
EQ = importlib.util.module_from_spec(spec)
spec.loader.exec_module(EQ)

# CNN parameters after training on p ranks agree with serial training to this fraction of the largest
# parameter. Why it is not 0: float32 sums of per-sample gradients grouped differently (one shard per
# rank, then the Allreduce) round differently, by ~1e-7 relative per sum, and each SGD step feeds the
# rounding of the previous ones back in; measured after 5-10 steps: <= 2e-5. (After ~20 steps a ReLU or
# max-pool decision flips somewhere and the trajectories separate to ~1e-3: the runs here stay at 5-10
# steps, where "equal up to float32 rounding" is what is measurable.) Why it is tight enough: one
# SGD step moves the parameters by ~1e-2 of the largest, so a lost shard, a wrong scale or a stale buffer
# breaks it by orders of magnitude (test_cnn_tolerance_catches_a_changed_step checks that).
CNN_RTOL = 1e-4


@pytest.fixture(scope="module")
def mnist(mnist_root):
    return load_mnist(mnist_root, download=False)


def test_quick_run_ann_h50_reaches_85_percent(mnist):
    res = train("ann", mnist, hidden=50, epochs=2, progress=False)
    assert res.history[-1]["test_accuracy"] >= 0.85, res.history


def test_quick_run_cnn_reaches_90_percent(mnist):
    res = train("cnn", mnist, epochs=1, progress=False)
    assert res.history[-1]["test_accuracy"] >= 0.90, res.history
    s = res.summary()
    assert s["steps"] == 80 and s["global_batch"] == 100 and s["ranks"] == 1
    assert s["compute_time"] > 0 and s["comm_time"] < s["compute_time"]  # serial: no communication


def test_one_step_is_sgd_on_the_mean_objective(mnist):
    """theta <- theta - (lr/N) * ((N/|B|) sum_B grad CE + lam mask theta), batches from ridge.minibatches."""
    from ppu_lab.ridge import minibatches

    x, y = mnist[0][:500], mnist[1][:500]
    lr, lam, h, B = 0.5, 5.0, 10, 100
    res = train("ann", (x, y, x[:50], y[:50]), hidden=h, lam=lam, lr=lr, batch_size=B, max_steps=3, progress=False)
    m = AnnModel(h)
    theta, X = m.theta.copy(), x.reshape(500, -1).astype(np.float64)
    for idx in minibatches(500, B, 0, 1)[:3]:
        g = combine(theta, ann_loss_grad(theta, X[idx], y[idx], h)[1], lam, m.mask, 500, len(idx))
        theta = theta - lr / 500 * g
    np.testing.assert_allclose(res.params, theta, rtol=0, atol=1e-12)
    assert len(res.step_times["total"]) == 3 and len(res.history) == 1


@pytest.fixture(scope="module")
def serial_runs(mnist):
    """Serial training with the settings of tests/mpi/train_equivalence.py (per-rank batch as global)."""
    x_tr, y_tr, x_te, y_te = mnist
    out = {}
    for name, cfg in EQ.RUNS.items():
        cfg = dict(cfg)
        n = cfg.pop("n")
        cfg.pop("design", None)
        for p in (1, 2, 3):
            c = dict(cfg)
            if c.pop("batch_mode", "global") == "per_rank":
                c["batch_size"] *= p
            out[name, p] = train(data=(x_tr[:n], y_tr[:n], x_te[:300], y_te[:300]), progress=False, **c)
    return out


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_parameters_do_not_depend_on_the_number_of_ranks(ranks, mpirun, mnist_root, serial_runs, tmp_path):
    out = tmp_path / "params.npz"
    mpirun(ranks, "train_equivalence.py", mnist_root, out, timeout=300)
    got = np.load(out)
    for name in EQ.RUNS:
        ref = serial_runs[name, ranks]
        scale = np.abs(ref.params).max()
        if name.startswith("ann"):  # float64
            np.testing.assert_allclose(got[name], ref.params, rtol=0, atol=1e-9, err_msg=name)
        else:  # float32: see CNN_RTOL
            np.testing.assert_allclose(got[name], ref.params, rtol=0, atol=CNN_RTOL * scale, err_msg=name)
        np.testing.assert_allclose(got[name + "_acc"], [h["test_accuracy"] for h in ref.history],
                                   atol=1 / 300 + 1e-12, err_msg=name)  # at most one image classified differently
    assert int(got["ann_per_rank_global_batch"]) == 50 * ranks  # per-rank batch: the global batch grows


def test_cnn_tolerance_catches_a_changed_step(serial_runs, mnist):
    """The CNN tolerance is far below what a real change (here: one step with a 1% larger lr) makes."""
    x_tr, y_tr, x_te, y_te = mnist
    ref = serial_runs["cnn_allreduce", 1]
    other = train("cnn", (x_tr[:640], y_tr[:640], x_te[:300], y_te[:300]), batch_size=64, lr=0.202, progress=False)
    assert np.abs(other.params - ref.params).max() > 10 * CNN_RTOL * np.abs(ref.params).max()


@pytest.mark.parametrize("ranks", [2, 3])
def test_nan_on_one_rank_stops_every_rank(ranks, mpirun, mnist_root):
    proc = mpirun(ranks, "train_divergence.py", mnist_root, timeout=120)
    for r in range(ranks):
        assert f"rank {r} caught nan_one_rank: training stopped at epoch 1, step 1" in proc.stdout, proc.stdout
        assert f"rank {r} caught lr_too_large: training diverged" in proc.stdout, proc.stdout
    assert "Check the input data for NaN" in proc.stdout


def test_serial_divergence_message_names_lr(mnist):
    x, y = mnist[0][:300], mnist[1][:300]
    with pytest.raises(DivergenceError, match=r"lr=10000 .*Lower lr"):
        train("ann", (x, y, x, y), lr=1e4, batch_size=30, progress=False)


def test_history_and_summary_fields(mnist):
    x, y = mnist[0][:400], mnist[1][:400]
    res = train("ann", (x, y, x[:100], y[:100]), hidden=10, epochs=2, batch_size=100, progress=False)
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert {"epoch", "train_loss", "test_accuracy", "epoch_time"} <= set(res.history[0])
    assert res.history[1]["train_loss"] < res.history[0]["train_loss"]
    assert set(res.summary()) == {"median_step_time", "epoch_time", "compute_time", "comm_time",
                                  "final_accuracy", "steps", "global_batch", "ranks"}
    assert res.summary()["steps"] == 8


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="mlp"), "model must be"),
    (dict(batch_mode="total"), "batch_mode"),
    (dict(design="ring"), "design"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=10_000), "larger than the training set"),
    (dict(lr=-1.0), "lr"),
    (dict(epochs=0), "epochs"),
    (dict(lam=-1.0), "lam"),
])
def test_bad_arguments_raise_valueerror(mnist, kwargs, match):
    x, y = mnist[0][:200], mnist[1][:200]
    with pytest.raises(ValueError, match=match):
        train(data=(x, y, x, y), progress=False, **{"model": "ann", **kwargs})


def test_bad_data_and_batch_smaller_than_ranks_raise_valueerror(mnist):
    x, y = mnist[0][:200], mnist[1][:200]
    with pytest.raises(ValueError, match="x_train must have shape"):
        train("ann", (x.reshape(200, -1), y, x, y), progress=False)
    with pytest.raises(ValueError, match="data must be"):
        train("ann", (x, y), progress=False)
    with pytest.raises(ValueError, match="smaller than the number of ranks"):
        TrainConfig(batch_size=2).check_data((x, y, x, y), ranks=4)
    assert TrainConfig(batch_size=2, batch_mode="per_rank").check_data((x, y, x, y), ranks=4) == 8


def test_config_and_keywords_are_the_same_run(mnist):
    """train(model, data, config, **settings): keywords override the config; unknown names are refused."""
    x, y = mnist[0][:300], mnist[1][:300]
    data = (x, y, x[:50], y[:50])
    cfg = TrainConfig(model="ann", hidden=10, batch_size=50, lr=0.5, max_steps=4)
    by_config = train(data=data, config=cfg, progress=False)
    by_keywords = train("ann", data, hidden=10, batch_size=50, lr=0.5, max_steps=4, progress=False)
    np.testing.assert_array_equal(by_config.params, by_keywords.params)
    assert by_config.config["lr"] == 0.5 and by_config.config["hidden"] == 10
    other = train(data=data, config=cfg, batch_size=100, progress=False)  # a keyword overrides the config
    assert other.config["batch_size"] == 100 and other.summary()["steps"] == 3
    with pytest.raises(TypeError, match="unknown training setting.*'hiden'"):
        train("ann", data, hiden=10, progress=False)


@pytest.mark.parametrize("model", ["ann", "cnn"])
def test_train_leaves_the_global_random_generators_alone(mnist, model):
    """Initial weights come from ``seed`` through local generators: the caller's np.random and torch
    streams are the same after train() as before, and train() gives the same result whatever they hold."""
    import torch

    x, y = mnist[0][:200], mnist[1][:200]
    data = (x, y, x[:50], y[:50])
    np.random.seed(123)
    torch.manual_seed(456)
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    first = train(model, data, hidden=10, batch_size=50, max_steps=2, progress=False)
    after_np, after_torch = np.random.get_state(), torch.get_rng_state()
    assert all(np.array_equal(a, b) for a, b in zip(np_state, after_np))
    assert torch.equal(torch_state, after_torch)
    np.random.seed(7)  # other global states: the same training
    torch.manual_seed(8)
    again = train(model, data, hidden=10, batch_size=50, max_steps=2, progress=False)
    np.testing.assert_array_equal(first.params, again.params)


def test_ddp_trains_the_same_model_batch_and_step(mpirun, mnist_root):
    """The DDP comparison of notebook 06 and benchmarks/dp_step.py is fair: same mathematics (2 ranks)."""
    proc = mpirun(2, "train_ddp.py", mnist_root, timeout=180)
    diff = float(proc.stdout.split("ddp max relative difference")[1].split()[0])
    assert diff <= CNN_RTOL, proc.stdout
