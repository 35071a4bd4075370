"""ppu_lab.experiments (the course's grid of runs) and the course's figures in ppu_lab.plotting.

MPI runs go through the ``mpirun`` fixture (``mpiexec -n N`` with a timeout). Most use a fake,
collective train function (tests/mpi/experiments_fake.py) so that they test the runner itself:
sub-communicators, resume, crash safety, errors. ``test_real_run`` trains the real models on
real MNIST under ``mpiexec -n 1`` and ``-n 2``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from conftest import MPI_SCRIPTS, ROOT

from ppu_lab import experiments as E
from ppu_lab import plotting

RECORD_FIELDS = {
    "label", "model", "hidden", "ranks", "batch_size", "batch_mode", "global_batch", "epochs", "lr", "lam",
    "design", "seed", "train_samples", "test_samples", "max_steps", "threads_per_rank", "key", "schema",
    "median_step_time", "epoch_time", "median_compute_time", "median_comm_time", "compute_time", "comm_time",
    "comm_fraction", "steps", "steps_per_epoch", "n_train", "n_test", "final_accuracy", "final_train_loss",
    "history", "summary", "wall_time", "machine", "finished",
}
MACHINE_FIELDS = {"hostname", "hosts", "cores", "world_size", "mpi_library", "mpi_standard", "python", "numpy",
                  "torch", "mpi4py", "platform"}


# --------------------------------------------------------------------------- grid
def test_expand_grid_is_the_product_in_rank_order():
    grid = E.expand_grid(["ann:10", "ann:50", "cnn"], [2, 1], [50, 100, 150, 200], ["global", "per_rank"],
                         epochs=3, train_samples=1000)
    assert len(grid) == 2 * 3 * 4 * 2
    assert len({c.key() for c in grid}) == len(grid)
    assert [c.ranks for c in grid] == [1] * 24 + [2] * 24  # one sub-communicator per rank count
    assert {(c.model, c.hidden) for c in grid} == {("ann", 10), ("ann", 50), ("cnn", None)}
    per_rank = [c for c in grid if c.batch_mode == "per_rank" and c.ranks == 2]
    assert {c.global_batch for c in per_rank} == {100, 200, 300, 400}  # per-rank batch: grows with the ranks
    assert {c.global_batch for c in grid if c.batch_mode == "global"} == {50, 100, 150, 200}
    assert all(c.epochs == 3 and c.train_samples == 1000 for c in grid)
    # the key is the configuration: equal configurations, equal keys
    assert E.RunConfig("ann", 10, 2, 50).key() == E.RunConfig("ann", 10, 2, 50).key()
    assert E.RunConfig("ann", 10, 2, 50).key() != E.RunConfig("ann", 10, 2, 50, epochs=2).key()


def test_run_key_is_the_one_earlier_results_files_hold():
    """Resume finds runs by key: the key of a configuration must not change between versions of the lab."""
    assert E.RunConfig("ann", 10, 2, 50).key() == (
        '{"batch_mode":"global","batch_size":50,"design":"allreduce","epochs":1,"hidden":10,"lam":5.0,"lr":null,'
        '"max_steps":null,"model":"ann","ranks":2,"seed":0,"test_samples":null,"threads_per_rank":1,'
        '"train_samples":null}')


def test_run_config_gives_the_training_settings():
    cfg = E.RunConfig("cnn", None, 4, 64, "per_rank", epochs=2, lr=0.1, threads_per_rank=2)
    tc = cfg.train_config(evaluate=False)
    assert (tc.model, tc.batch_size, tc.batch_mode, tc.epochs, tc.lr, tc.threads, tc.evaluate) == \
        ("cnn", 64, "per_rank", 2, 0.1, 2, False)
    assert tc.global_batch(cfg.ranks) == cfg.global_batch == 256
    with pytest.raises(E.ExperimentInputError, match="threads_per_rank must be an integer >= 1"):
        E.RunConfig("ann", 10, 1, 50, threads_per_rank=0)


def test_parse_model_and_default_ranks():
    assert E.parse_model("ann:10") == ("ann", 10)
    assert E.parse_model("ANN") == ("ann", 50)
    assert E.parse_model("cnn") == ("cnn", None)
    assert E.default_ranks(1) == [1]
    assert E.default_ranks(2) == [1, 2]
    assert E.default_ranks(6) == [1, 2, 4, 6]
    assert E.default_ranks(16) == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("kwargs, words", [
    (dict(models=["mlp"]), "unknown model 'mlp'"),
    (dict(models=["cnn:5"]), "write just 'cnn'"),
    (dict(models=["ann:x"]), "hidden size"),
    (dict(batch_sizes=[1]), "batch size 1 < 2 ranks"),
    (dict(batch_modes=["both"]), "batch_mode must be one of"),
    (dict(ranks=[0]), "ranks must be an integer >= 1"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(lr=-1.0), "lr (learning rate) must be > 0"),
    (dict(design="ring"), "design must be one of"),
    (dict(train_samples=300), "larger than train_samples=300"),
])
def test_expand_grid_rejects_bad_input_clearly(kwargs, words):
    args = dict(models=["ann:10"], ranks=[1, 2], batch_sizes=[50, 200], batch_modes=["per_rank", "global"])
    grid_args = {k: kwargs.pop(k) for k in list(kwargs) if k in args}
    with pytest.raises(E.ExperimentInputError) as info:
        E.expand_grid(**{**args, **grid_args}, **kwargs)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- results file
def _record(**fields):
    cfg = E.RunConfig(fields.pop("model", "ann"), fields.pop("hidden", 10), fields.pop("ranks", 1),
                      fields.pop("batch_size", 50), fields.pop("batch_mode", "global"))
    return {**dict(label=cfg.label, key=cfg.key(), ranks=cfg.ranks, batch_size=cfg.batch_size,
                   batch_mode=cfg.batch_mode, model=cfg.model, hidden=cfg.hidden), **fields}


def test_torn_last_line_is_ignored_then_cut_off_with_a_warning(tmp_path):
    path = tmp_path / "r.jsonl"
    good = [_record(batch_size=50), _record(batch_size=100)]
    for rec in good:
        E.append_record(path, rec)
    whole = path.read_bytes()
    assert whole.count(b"\n") == 2 and whole.endswith(b"\n")
    with open(path, "ab") as fh:  # a crash in the middle of writing the third record
        fh.write(json.dumps(_record(batch_size=150))[:37].encode())
    with pytest.warns(RuntimeWarning, match="line 3: torn last line"):
        assert E.load_results(path) == good
    assert path.read_bytes().startswith(whole) and len(path.read_bytes()) > len(whole)  # load does not modify
    with pytest.warns(RuntimeWarning, match="cut off"):
        assert E.repair_results(path) == good
    assert path.read_bytes() == whole  # the fragment is gone, the complete lines untouched
    E.append_record(path, _record(batch_size=150))
    assert [r["batch_size"] for r in E.load_results(path)] == [50, 100, 150]


def test_unreadable_middle_line_is_skipped_not_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    E.append_record(path, _record(batch_size=50))
    with open(path, "ab") as fh:
        fh.write(b"{not json}\n")
    E.append_record(path, _record(batch_size=100))
    size = path.stat().st_size
    with pytest.warns(RuntimeWarning, match="line 2: unreadable"):
        assert [r["batch_size"] for r in E.repair_results(path)] == [50, 100]
    assert path.stat().st_size == size


def test_check_writable(tmp_path):
    assert E.check_writable(tmp_path / "new" / "dir" / "r.jsonl").parent.is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(E.ExperimentInputError, match="out: cannot write results"):
        E.check_writable(tmp_path / "file" / "r.jsonl")
    with pytest.raises(E.ExperimentInputError, match="it is a directory"):
        E.check_writable(tmp_path)


# --------------------------------------------------------------------------- command line
def test_cli_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "ppu_lab.experiments", "run", "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT, check=True).stdout
    parser = E.build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    for action in run._actions:
        assert action.help and len(action.help) > 15, action.option_strings
        assert action.option_strings[-1] in out
    flat = " ".join(out.split())
    for words in ("per_rank", "global batch", "quick mode", "MNIST", "mpiexec -n N", "resumes", "--data-root"):
        assert words in flat, words
    top = subprocess.run([sys.executable, "-m", "ppu_lab.experiments", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, check=True).stdout
    assert "run" in top and "table" in top and "mpiexec -n 4" in " ".join(top.split())


@pytest.mark.parametrize("args, words", [
    (["--models", "ann:10,mlp"], "unknown model 'mlp'"),
    (["--batch-sizes", "1,50"], "batch size 1 < 2 ranks"),
    (["--ranks", "1,4"], "only 2 MPI processes"),
    (["--out", "{file}/r.jsonl"], "cannot write results"),
    (["--data-root", "{bad_mnist}"], "train-images-idx3-ubyte.gz"),  # corrupt files: named, on every rank
    (["--data-root", "{mnist}", "--train-samples", "100000"], "train_samples=100000 but the training set has only"),
])
def test_cli_bad_input_fails_on_every_rank_before_any_work(mpirun, tmp_path, mnist_root, args, words):
    (tmp_path / "file").write_text("x")
    (tmp_path / "mnist").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / "mnist" / f"{name}.gz").write_bytes(b"not a gzip file")
    args = [a.replace("{file}", str(tmp_path / "file")).replace("{bad_mnist}", str(tmp_path / "mnist"))
            .replace("{mnist}", str(mnist_root)) for a in args]
    out = ["--out", str(tmp_path / "r.jsonl")] if "--out" not in args else []
    start = time.perf_counter()
    proc = mpirun(2, "-m ppu_lab.experiments", "run", "--quick", *out, *args, timeout=90, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1 and words in proc.stderr, proc.stderr  # one message, from rank 0
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r.jsonl").exists() or (tmp_path / "r.jsonl").stat().st_size == 0
    assert time.perf_counter() - start < 60


# --------------------------------------------------------------------------- the runner under MPI (fake train)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_grid_runs_each_rank_count_on_its_own_subcommunicator(mpirun, tmp_path, n):
    out = tmp_path / "r.jsonl"
    ranks = ",".join(map(str, E.default_ranks(n)))
    proc = mpirun(n, "experiments_fake.py", out, "--ranks", ranks, timeout=120)
    records = E.load_results(out)
    # the fake train asserts that its communicator has exactly `ranks` processes
    assert len(records) == 2 * 2 * len(E.default_ranks(n)), proc.stdout
    assert sorted({r["ranks"] for r in records}) == E.default_ranks(n)
    assert len({r["key"] for r in records}) == len(records)
    assert all(r["machine"]["world_size"] == n for r in records)
    for r in records:  # the record holds what the (fake) train returned for that configuration
        hidden = r["hidden"] or 0
        expected = 0.9 - r["batch_size"] / 1000 - 0.01 * r["ranks"] + (0.05 if r["model"] == "cnn" else hidden / 1000)
        assert r["final_accuracy"] == pytest.approx(expected)
        assert r["comm_fraction"] == pytest.approx(0.2)
        assert len(r["history"]) == 2
    again = mpirun(n, "experiments_fake.py", out, "--ranks", ranks, timeout=120)
    assert "already in" in again.stdout
    assert len(E.load_results(out)) == len(records)


def test_killed_run_resumes_without_duplicates(mpiexec, tmp_path):
    """SIGKILL the job while its second run is in progress; re-run; every run exactly once."""
    out = tmp_path / "r.jsonl"
    cmd = [mpiexec, "-n", "1", sys.executable, str(MPI_SCRIPTS / "experiments_fake.py"), str(out),
           "--ranks", "1", "--hang-on", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the first run never finished"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job we started: mpiexec and its rank
        proc.wait(timeout=30)
    first = E.load_results(out)
    assert len(first) == 1  # the first run survived, the one in progress is lost
    with open(out, "ab") as fh:  # and a crash mid-write would have left a torn line
        fh.write(b'{"label": "ann:10", "ranks": 1, "bat')
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([mpiexec, "-n", "1", sys.executable, str(MPI_SCRIPTS / "experiments_fake.py"), str(out),
                           "--ranks", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "torn last line" in done.stderr and "cut off" in done.stderr
    assert "1 of 4 runs already in" in done.stdout
    records = E.load_results(out)
    assert len(records) == 4 and len({r["key"] for r in records}) == 4
    assert records[0] == first[0]  # the surviving record is untouched
    expected = {c.key() for c in E.expand_grid(["ann:10", "cnn"], [1], [50, 100], epochs=2)}
    assert {r["key"] for r in records} == expected


def test_failure_on_one_rank_ends_the_job_instead_of_hanging(mpirun, tmp_path):
    out = tmp_path / "r.jsonl"
    start = time.perf_counter()
    proc = mpirun(2, "experiments_fake.py", out, "--ranks", "1,2", "--fail-size", "2", "--fail-rank", "1",
                  "--abort-after", "2", timeout=90, check=False)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert time.perf_counter() - start < 60
    assert [r["ranks"] for r in E.load_results(out)] == [1, 1, 1, 1]  # the finished runs are kept


# --------------------------------------------------------------------------- real training, real MNIST
@pytest.mark.parametrize("n", [1, 2])
def test_real_run(mpirun, tmp_path, mnist_root, n):
    out = tmp_path / "grid.jsonl"
    proc = mpirun(n, "-m ppu_lab.experiments", "run", "--quick", "--models", "ann:10", "--batch-sizes", "50,100",
                  "--batch-mode", "global,per_rank", "--train-samples", "400", "--test-samples", "300",
                  "--epochs", "2", "--max-steps", "6", "--data-root", mnist_root, "--out", out, timeout=240)
    records = E.load_results(out)
    assert len(records) == 2 * 2 * n, proc.stdout
    for r in records:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert MACHINE_FIELDS <= set(r["machine"])
        assert r["machine"]["world_size"] == n and r["machine"]["cores"] >= 1
        assert "MPICH" in r["machine"]["mpi_library"] or "Open MPI" in r["machine"]["mpi_library"]
        assert r["label"] == "ann:10" and r["lr"] > 0 and r["n_train"] == 400 and r["n_test"] == 300
        assert r["global_batch"] == r["batch_size"] * (r["ranks"] if r["batch_mode"] == "per_rank" else 1)
        assert r["steps_per_epoch"] == -(-400 // r["global_batch"])
        assert r["steps"] == min(6, 2 * r["steps_per_epoch"])  # max_steps=6 stops runs with many steps
        assert [h["epoch"] for h in r["history"]] == list(range(1, 1 + -(-r["steps"] // r["steps_per_epoch"])))
        assert all(np.isfinite(h["train_loss"]) and 0 <= h["test_accuracy"] <= 1 for h in r["history"])
        assert 0 < r["median_step_time"] < r["wall_time"]
        assert r["median_compute_time"] > 0 and r["median_comm_time"] >= 0 and 0 <= r["comm_fraction"] < 1
        assert r["final_accuracy"] > 0.1, r  # a few steps of SGD (seeded) already beat guessing (10%)
    if n == 2:
        # global batch: the same SGD on 1 or 2 ranks (the same accuracy and loss, to rounding)
        for b in (50, 100):
            one, two = (E.select(records, ranks=p, batch_size=b, batch_mode="global")[0] for p in (1, 2))
            assert one["final_accuracy"] == two["final_accuracy"]
            assert one["final_train_loss"] == pytest.approx(two["final_train_loss"], rel=1e-9)
            assert two["comm_fraction"] > 0
    rows = E.epoch_rows(records)  # tidy: one row per (run, epoch)
    assert len(rows) == sum(len(r["history"]) for r in records)
    assert {"label", "ranks", "batch_size", "batch_mode", "epoch", "train_loss", "test_accuracy"} <= set(rows[0])
    table = subprocess.run([sys.executable, "-m", "ppu_lab.experiments", "table", str(out)], capture_output=True,
                           text=True, timeout=60, check=True, cwd=ROOT).stdout
    assert len(table.splitlines()) == 1 + len(records)


def test_launch_from_a_notebook_reports_failure(tmp_path):
    """launch() runs the command line under mpiexec and turns a failure into an exception with the output."""
    with pytest.raises(RuntimeError, match="unknown model 'mlp'"):
        E.launch(1, "--models", "mlp", "--out", tmp_path / "r.jsonl", echo=False)
    out = E.launch(1, "--models", "ann:10", "--dry-run", "--quick", "--out", tmp_path / "r.jsonl", echo=False)
    assert out.count("todo") == 4 and "ranks=1" in out


def test_launch_stops_a_silent_job_at_its_timeout(tmp_path):
    """The deadline of launch() holds though the job prints nothing; mpiexec and its rank are stopped."""
    import psutil

    out = tmp_path / "hung.jsonl"
    os.mkfifo(out)  # an --out that blocks its writer forever, like a hung file system: no output, no CPU
    with pytest.raises(TimeoutError) as info:
        E.launch(1, "--models", "ann:10", "--quick", "--out", out, timeout=5, echo=False)
    message = str(info.value)
    assert "did not finish within 5 s" in message and "stopped with all its ranks" in message
    assert "launch again with the same arguments" in message
    left = [q for q in psutil.process_iter(["pid", "cmdline"]) if str(out) in " ".join(q.info["cmdline"] or [])]
    assert left == [], [q.info for q in left]


def test_run_on_mpi_engines(tmp_path, mnist_root):
    """The same grid from a notebook's MPI engines: one engine set of 2 covers 1 and 2 ranks."""
    from ppu_lab.cluster import MPICluster

    grid = E.expand_grid(["ann:10"], [1, 2], [50], ["global"], train_samples=400, test_samples=200, max_steps=4)
    out = tmp_path / "engines.jsonl"
    with MPICluster(n=2) as cl:
        written = E.run_on_engines(cl, grid, out, data_root=str(mnist_root))
        assert E.run_on_engines(cl, grid, out, data_root=str(mnist_root)) == []  # resumed: nothing to do
    records = E.load_results(out)
    assert [r["ranks"] for r in records] == [1, 2] and [r["key"] for r in written] == [r["key"] for r in records]
    assert records[0]["final_accuracy"] == records[1]["final_accuracy"]


# --------------------------------------------------------------------------- plots and analysis
def _synthetic_results(path, n_test=10_000):
    rng = np.random.default_rng(0)
    for mode in ("global", "per_rank"):
        for p in (1, 2, 4):
            for b in (50, 100, 150, 200):
                acc = 0.95 - b / 2000 - (0.01 * p if mode == "per_rank" else 0)
                rec = _record(ranks=p, batch_size=b, batch_mode=mode, epoch_time=float(rng.uniform(1, 10)),
                              median_step_time=float(rng.uniform(1e-3, 1e-2)), final_accuracy=acc,
                              n_test=n_test)
                E.append_record(path, rec)
    E.append_record(path, _record(model="cnn", hidden=None, epoch_time=1.0, median_step_time=0.01,
                                  final_accuracy=0.9, n_test=n_test))
    return E.load_results(path)


def _lines(ax):
    return {ln.get_label(): (ln.get_xdata(), ln.get_ydata()) for ln in ax.get_lines()}


@pytest.mark.parametrize("fn, x, group, field_, scale, legend", [
    (plotting.iteration_time_vs_nodes, "ranks", "batch_size", "epoch_time", 1, "batch {}"),
    (plotting.iteration_time_vs_batch, "batch_size", "ranks", "epoch_time", 1, "{} node(s)"),
    (plotting.accuracy_vs_batch, "batch_size", "ranks", "final_accuracy", 100, "{} node(s)"),
    (plotting.accuracy_vs_nodes, "ranks", "batch_size", "final_accuracy", 100, "batch {}"),
])
def test_course_figures_draw_the_records(tmp_path, fn, x, group, field_, scale, legend):
    records = _synthetic_results(tmp_path / "r.jsonl")
    fig, ax = plt.subplots()
    assert fn(tmp_path / "r.jsonl", ax=ax, model="ann:10", batch_mode="per_rank") is ax
    lines = _lines(ax)
    mine = E.select(records, label="ann:10", batch_mode="per_rank")
    groups = sorted({r[group] for r in mine})
    assert set(lines) == {legend.format(g) for g in groups}
    for g in groups:
        rows = sorted((r for r in mine if r[group] == g), key=lambda r: r[x])
        xs, ys = lines[legend.format(g)]
        np.testing.assert_array_equal(xs, [r[x] for r in rows])
        np.testing.assert_allclose(ys, [scale * r[field_] for r in rows])
    assert ax.get_xlabel() and ax.get_ylabel() and ("(s)" in ax.get_ylabel() or "(%)" in ax.get_ylabel())
    plt.close(fig)


def test_speedup_and_efficiency_vs_nodes(tmp_path):
    records = _synthetic_results(tmp_path / "r.jsonl")
    fig, (a1, a2) = plt.subplots(1, 2)
    plotting.speedup_vs_nodes(records, ax=a1, model="ann:10", batch_mode="global")
    plotting.efficiency_vs_nodes(records, ax=a2, model="ann:10", batch_mode="global")
    s, e = _lines(a1), _lines(a2)
    np.testing.assert_array_equal(s["ideal"][1], [1, 2, 4])
    for b in (50, 100, 150, 200):
        t = [E.select(records, label="ann:10", batch_mode="global", ranks=p, batch_size=b)[0]["epoch_time"]
             for p in (1, 2, 4)]
        np.testing.assert_allclose(s[f"batch {b}"][1], t[0] / np.array(t))
        np.testing.assert_allclose(e[f"batch {b}"][1], t[0] / (np.array([1, 2, 4]) * t))
    assert any(ln.get_ydata()[0] == 1.0 and ln.get_linestyle() == "--" for ln in a2.get_lines())  # ideal line
    plt.close(fig)


def test_figures_ask_which_model_when_several(tmp_path):
    _synthetic_results(tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match="model: the results hold several"):
        plotting.accuracy_vs_nodes(tmp_path / "r.jsonl", batch_mode="global")
    with pytest.raises(ValueError, match="batch_mode: the results hold several"):
        plotting.accuracy_vs_nodes(tmp_path / "r.jsonl", model="ann:10")


def test_conclusions_and_course_table(tmp_path):
    records = _synthetic_results(tmp_path / "r.jsonl")
    checks = {c["claim"][:3]: c for c in E.check_conclusions(records, "ann:10")}
    assert checks["(3)"]["verdict"] == "holds"  # accuracy falls with the batch in the synthetic data
    assert checks["(4)"]["verdict"] == "holds only with per-rank batch"  # ... and with ranks only per rank
    rows = E.course_table(records, "ann:10")
    assert [r["course_s"] for r in rows] == [9.18, 11.95, 12.99, 11.69]
    assert rows[0]["ours_relative"] == 1.0
    assert rows[2]["ours_s"] == E.select(records, label="ann:10", ranks=1, batch_size=150,
                                         batch_mode="global")[0]["epoch_time"]


def test_accuracy_differences_within_test_set_noise_are_no_evidence(tmp_path):
    # The same accuracies measured on 300 test images: the per-rank drops (1-3 points) are smaller
    # than what another draw of 300 images could give (about 6 points), the batch effect (7.5) is not.
    records = _synthetic_results(tmp_path / "r.jsonl", n_test=300)
    checks = {c["claim"][:3]: c for c in E.check_conclusions(records, "ann:10")}
    assert checks["(3)"]["verdict"] == "holds"
    assert checks["(4)"]["verdict"] == "does not hold"
    assert "noise level of" in checks["(3)"]["evidence"] and "noise level" in checks["(4)"]["evidence"]
