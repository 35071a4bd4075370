"""The course's four conclusions (ppu_lab.experiments.conclusions) on synthetic records built so that
each verdict -- holds, does not hold, within noise -- is known in advance, for both batch modes; the
noise rule (paired test-set error, seeds), the roughness of a loss curve and the gradient noise."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ppu_lab import experiments as E

N_TEST, STEPS = 1000, 60
SEEDS, BATCHES = (0, 1, 2), (50, 200)
SLIDES = Path(__file__).resolve().parents[1].parent / "shared" / "seed" / "000_8fff0842b5e2e3a8.txt"


def _correct(acc, seed):
    """Nested per-image results: within a seed, a higher accuracy is right on a superset of images."""
    v = np.zeros(N_TEST, dtype=bool)
    v[:round(acc * N_TEST)] = True
    return np.roll(v, 37 * seed)


def _record(p, b, mode, seed, *, acc, time=1.0, share=0.0, rough=0.05, shift=0.0, scaling="none"):
    noise = np.random.default_rng(100 + seed).standard_normal(STEPS)  # one pattern per seed
    loss = 1.0 / np.arange(1, STEPS + 1) + 0.3 + rough * noise + shift
    return {"label": "ann:50", "ranks": p, "batch_size": b, "batch_mode": mode, "seed": seed, "lr_scaling": scaling,
            "epochs": 3, "epoch_time": time * (1 + 0.002 * seed), "median_step_time": time / 20,
            "median_comm_time": share * time / 20, "comm_fraction": share,
            "final_accuracy": round(acc * N_TEST) / N_TEST,
            "test_correct": E.pack_correct(_correct(acc, seed)), "n_test": N_TEST,
            "final_train_loss": float(loss[-20:].mean()), "step_loss": loss.tolist(), "steps_per_epoch": STEPS // 3,
            "global_batch": b * (p if mode == "per_rank" else 1), "machine": {"cores_available": 2}}


def synthetic(acc1=lambda b: 0.90, gain=lambda mode, p, b: 0.0, speed=lambda mode, p, b: 1.5,
              share=lambda mode, p, b: 0.3, rough=lambda mode, p: 0.05, shift=lambda mode, p: 0.01,
              one_node_mode="global", modes=E.MODES, nodes=(2,), share1=0.001):
    """Records of a grid: one node at BATCHES (filed under ``one_node_mode``), and ``nodes`` in ``modes``."""
    recs = [_record(1, b, one_node_mode, s, acc=acc1(b), share=share1) for b in BATCHES for s in SEEDS]
    for mode in modes:
        for p in nodes:
            recs += [_record(p, b, mode, s, acc=acc1(b) + gain(mode, p, b), time=1 / speed(mode, p, b),
                             share=share(mode, p, b), rough=rough(mode, p), shift=shift(mode, p))
                     for b in BATCHES for s in SEEDS]
    return recs


def rows(records, number, gradient_variance=None):
    check = E.check_conclusions(records, "ann:50", gradient_variance)[number - 1]
    return {(r["mode"], r["sense"].split(" after")[0].split(",")[0]): r["verdict"] for r in check["rows"]}


# ------------------------------------------------------------------ the course's words
def test_the_four_conclusions_are_the_courses_words_in_its_order():
    if not SLIDES.exists():
        pytest.skip(f"the course's slides are not beside this checkout ({SLIDES})")
    text = " ".join(SLIDES.read_text().split())
    positions = [text.find(c) for c in E.COURSE_CONCLUSIONS]
    assert all(k >= 0 for k in positions), [c for c, k in zip(E.COURSE_CONCLUSIONS, positions) if k < 0]
    assert positions == sorted(positions)
    out = E.format_conclusions(E.check_conclusions(synthetic(), "ann:50"))
    assert all(f'"{c}"' in out for c in E.COURSE_CONCLUSIONS)


# ------------------------------------------------------------------ (1) larger batch, better training
@pytest.mark.parametrize("one_node_mode", ["global", "per_rank"])  # one node: the two modes are one run
@pytest.mark.parametrize("acc1, verdict", [
    (lambda b: 0.85 + b / 4000, "holds"),  # +3.75 points from batch 50 to 200
    (lambda b: 0.95 - b / 4000, "does not hold"),
    (lambda b: 0.90 + (b == 200) * 0.001, "within noise"),  # one image of 1,000
])
def test_conclusion_1_accuracy_against_batch(acc1, verdict, one_node_mode):
    got = rows(synthetic(acc1=acc1, one_node_mode=one_node_mode), 1)
    assert got["1 node", "test accuracy"] == verdict


def test_conclusion_1_per_step_loss_and_gradient_variance():
    recs = synthetic()
    for r in recs:  # the batch-200 runs: a lower loss at every step
        if r["ranks"] == 1 and r["batch_size"] == 200:
            r["step_loss"] = (np.array(r["step_loss"]) - 0.1).tolist()
    variance = [{"batch_size": 50, "variance": 4.0, "se": 0.1, "expected": 4.0, "draws": 30},
                {"batch_size": 200, "variance": 1.0, "se": 0.05, "expected": 1.0, "draws": 30}]
    got = rows(recs, 1, variance)
    assert got["1 node", "training loss per step"] == "holds"
    assert got["1 node", "variance of the minibatch gradient"] == "holds"
    variance[1]["variance"] = 4.02  # no less noisy: within the draws' noise
    assert rows(recs, 1, variance)["1 node", "variance of the minibatch gradient"] == "within noise"


# ------------------------------------------------------------------ (2) large batch: few benefits
@pytest.mark.parametrize("mode", E.MODES)
@pytest.mark.parametrize("speed, verdict", [
    (lambda b: 1.8 if b == 50 else 1.1, "holds"),  # the speedup falls with the batch
    (lambda b: 0.8 if b == 50 else 1.6, "does not hold"),
    (lambda b: 1.5, "within noise"),
])
def test_conclusion_2_time(mode, speed, verdict):
    got = rows(synthetic(speed=lambda m, p, b: speed(b) if m == mode else 1.5), 2)
    assert got[mode, "time"] == verdict
    assert got[[m for m in E.MODES if m != mode][0], "time"] == "within noise"


@pytest.mark.parametrize("mode", E.MODES)
@pytest.mark.parametrize("gain, verdict", [
    (lambda b: 0.02 if b == 50 else -0.03, "holds"),  # nodes help at batch 50, hurt at 200
    (lambda b: -0.03 if b == 50 else 0.02, "does not hold"),
    (lambda b: 0.01, "within noise"),
])
def test_conclusion_2_training(mode, gain, verdict):
    got = rows(synthetic(gain=lambda m, p, b: gain(b) if m == mode else 0.0), 2)
    assert got[mode, "training"] == verdict


# ------------------------------------------------------------------ (3) small batch: some good, more overhead
@pytest.mark.parametrize("mode", E.MODES)
@pytest.mark.parametrize("speed, gain, share, verdict", [
    (1.6, 0.02, 0.4, "holds"),
    (0.6, -0.02, 0.0, "does not hold"),  # slower, worse, and less communication than on one node (5%)
    (1.01, 0.001, 0.055, "within noise"),
])
def test_conclusion_3(mode, speed, gain, share, verdict):
    recs = synthetic(speed=lambda m, p, b: speed if m == mode else 1.5,
                     gain=lambda m, p, b: gain if m == mode else 0.0,
                     share=lambda m, p, b: share if m == mode else 0.3, share1=0.05)
    got = rows(recs, 3)
    assert (got[mode, "time"], got[mode, "training"], got[mode, "overhead"]) == (verdict,) * 3


def test_conclusion_3_time_rows_need_a_run_within_the_cores():
    recs = synthetic()
    for r in recs:
        r["machine"] = {"cores_available": 1}  # two nodes on one core: oversubscribed, no timing
    got = rows(recs, 3)
    assert got["global", "time"] == got["global", "overhead"] == "not measured"
    assert got["global", "training"] in E.VERDICTS


# ------------------------------------------------------------------ (4) more nodes smooth SGD
@pytest.mark.parametrize("mode", E.MODES)
@pytest.mark.parametrize("rough, verdict", [
    (0.02, "holds"),  # 2.5 times less step-to-step noise on two nodes
    (0.10, "does not hold"),
    (0.05, "within noise"),  # the same noise (shifted: not the same run)
])
def test_conclusion_4(mode, rough, verdict):
    got = rows(synthetic(rough=lambda m, p: rough if m == mode else 0.05), 4)
    assert got[mode, "loss roughness"] == verdict


# ------------------------------------------------------------------ identical runs (a global batch)
def test_identical_runs_on_more_nodes_refute_the_training_readings():
    """With a global batch p nodes train exactly as one: no benefit, no smoothing, at any batch size."""
    recs = synthetic(shift=lambda m, p: 0.0 if m == "global" else 0.01)
    r2, r3, r4 = rows(recs, 2), rows(recs, 3), rows(recs, 4)
    assert r2["global", "training"] == r3["global", "training"] == r4["global", "loss roughness"] == "does not hold"
    assert r4["per_rank", "loss roughness"] == "within noise"
    text = E.format_conclusions(E.check_conclusions(recs, "ann:50"))
    assert "identical runs" in text and "identical curves" in text


def test_check_conclusions_needs_runs_on_more_than_one_node():
    with pytest.raises(ValueError, match="more than one node"):
        E.check_conclusions([r for r in synthetic() if r["ranks"] == 1], "ann:50")
    with pytest.raises(ValueError, match="no records of 'cnn'"):
        E.check_conclusions(synthetic(), "cnn")


def test_verdict_table_lists_every_reading():
    checks = E.check_conclusions(synthetic(), "ann:50")
    table = E.verdict_table(checks)
    assert len(table) == sum(len(c["rows"]) for c in checks)
    assert set(table.values()) <= set(E.VERDICTS)


# ------------------------------------------------------------------ the noise rule and the measures
def test_paired_error_is_mcnemars():
    """Runs right on 900 and 915 nested images of 1,000: b = 0, c = 15 disagreements."""
    a, b = ({0: _record(1, 50, "global", 0, acc=x)} for x in (0.900, 0.915))
    c = E.accuracy_contrast([(-1, a), (1, b)])
    assert c["effect"] == pytest.approx(0.015)
    assert c["se_images"] == pytest.approx(math.sqrt(15 - 15 ** 2 / N_TEST) / N_TEST, rel=2e-3)
    assert c["disagreements"] == 15 and c["noise"] == pytest.approx(2 * c["se_images"])
    unpaired = 2 * math.sqrt(2 * 0.9 * 0.1 / N_TEST)  # what a binomial error would call noise: 2.7 points
    assert c["noise"] < c["effect"] < unpaired
    same = E.accuracy_contrast([(-1, a), (1, a)])
    assert same["effect"] == 0 and same["noise"] == 0 and same["disagreements"] == 0


def test_seed_effect_and_floor():
    c = E.seed_effect({0: 1.0, 1: 2.0, 2: 3.0})
    assert c["effect"] == 2.0 and c["se_seeds"] == pytest.approx(1 / math.sqrt(3))
    assert c["noise"] == pytest.approx(4.303 / math.sqrt(3))  # 95%: Student's t with 2 degrees of freedom
    assert E.seed_effect({0: 1.0, 1: 1.0}, floor=0.05)["noise"] == 0.05
    assert E.seed_effect({0: 1.0}, floor=0.05)["noise"] == 0.05  # one seed: the floor alone


def test_roughness_estimates_the_step_noise():
    rng = np.random.default_rng(0)
    trend = np.linspace(2.0, 0.3, 4000)
    assert E.roughness(trend + 0.1 * rng.standard_normal(4000)) == pytest.approx(0.01, rel=0.08)
    assert E.roughness(trend) < 1e-6
    with pytest.raises(ValueError, match="at least 3 steps"):
        E.roughness([1.0, 0.9])


def test_gradient_noise_falls_as_one_over_the_batch(mnist_root):
    from ppu_lab.data import load_mnist

    x, y, xt, yt = load_mnist(mnist_root, download=False)
    data = (x[:1000], y[:1000], xt[:10], yt[:10])
    rows_ = E.gradient_noise("ann", data, [25, 200, 1000], draws=30, hidden=10)
    var = {r["batch_size"]: r["variance"] for r in rows_}
    assert var[1000] < 1e-20 * var[25]  # the whole training set: the full gradient, no noise
    assert 0.5 < (var[200] / var[25]) / (25 / 200 * (1000 - 200) / (1000 - 25)) < 2.0  # sampling theory


# ------------------------------------------------------------------ (2), (3): the threshold and the step model
def _timed(p, b, mode, seed, step, comm):
    """A run whose median step takes ``step`` s (``comm`` of it communicating) and whose epoch is its steps."""
    r = _record(p, b, mode, seed, acc=0.9, share=comm / step if step else 0.0)
    steps = math.ceil(8000 / (b * (p if mode == "per_rank" else 1)))
    r.update(median_step_time=step, median_comm_time=comm, epoch_time=steps * step)
    return r


def test_step_model_is_fitted_to_one_node_and_predicts_the_speedup():
    """T(1, B) = 1 ms + 10 us * B; on 2 nodes the Allreduce takes 2 ms: the model is perfmodel's
    T(p) = T_compute/p + T_serial + T_comm(p), and 2 nodes pay from the batch where it reaches 1."""
    from ppu_lab.costmodel import AlphaBeta, allreduce
    from ppu_lab.experiments import threshold as T

    serial, per_row, comm = 1e-3, 1e-5, 2e-3
    recs = [_timed(1, b, "global", s, serial + per_row * b, 0.0) for b in (50, 200, 800) for s in SEEDS]
    recs += [_timed(2, b, "global", s, serial + per_row * b / 2 + comm, comm) for b in (50, 200, 800) for s in SEEDS]
    model = T.step_model(recs, "ann:50")
    net = AlphaBeta(0.0, comm / allreduce(T.gradient_bytes("ann:50"), 2).nbytes)  # its Allreduce: 2 ms
    assert model.serial == pytest.approx(serial) and model.per_row == pytest.approx(per_row)
    assert T.gradient_bytes("ann:50") == (795 * 50 + 10 + 1) * 8 and T.gradient_bytes("cnn") == (28_938 + 1) * 4
    curve = T.predicted(recs, "ann:50", "global", 2, [50, 200, 800], net)
    by_hand = [(serial + per_row * b) / (serial + per_row * b / 2 + comm) for b in (50, 200, 800)]
    np.testing.assert_allclose(curve["speedup"], by_hand)
    np.testing.assert_allclose(curve["share"], [comm / (serial + per_row * b / 2 + comm) for b in (50, 200, 800)])
    assert T.time_threshold(curve) == 800  # 0.43 at 50, 0.86 at 200, 1.38 at 800
    rows = T.benefits(recs, "ann:50", "global", 2)
    np.testing.assert_allclose([r["speedup"] for r in rows], by_hand)  # the measured points: the same here
    assert rows[0]["gain"] == 0.0 and rows[0]["gain_noise"] == 0.0


def test_threshold_figure_draws_the_benefits_with_labelled_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ppu_lab import conclusion_plots as CP
    from ppu_lab.experiments import threshold as T

    recs = synthetic(speed=lambda m, p, b: 1.8 if b == 50 else 1.1, gain=lambda m, p, b: -0.01 * (m == "per_rank"))
    axes = CP.threshold(recs, "ann:50", p=2, model=False)
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel()
    drawn = {c.get_label(): c for c in axes[0].containers}
    for mode in E.MODES:
        ys = drawn[f"{mode.replace('_', '-')} batch"].lines[0].get_ydata()
        np.testing.assert_allclose(ys, [r["speedup"] for r in T.benefits(recs, "ann:50", mode, 2)])
    plt.close("all")


def test_network_here_is_notebook_03s_fit_of_the_reference_machine():
    from ppu_lab import reference
    from ppu_lab.costmodel import allreduce
    from ppu_lab.experiments import threshold as T

    fit = reference.load("pingpong")["notes"]
    net = T.network_here()
    assert (net.switch, net.large.alpha, net.large.beta, net.gamma) == (fit["switch"], *fit["large"], fit["gamma"])
    cost = allreduce(T.gradient_bytes("ann:50"), 2)  # 318 KB: above the switch, the large-message line
    assert net.time(cost) == pytest.approx(net.large.time(cost)) and net.time(cost) > 0
