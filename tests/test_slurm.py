"""The lab on a real Slurm (issue 6): engines through Slurm, batch runs, clean-up, clear errors.

These tests submit real jobs to the Slurm that ``scripts/slurm/setup.sh`` starts (``make test`` runs
the suite through ``scripts/slurm/with-slurm.sh``, which sets ``PPU_LAB_SLURM``):

- ``PPU_LAB_SLURM=1``: Slurm was started, so every test here must run; an unusable Slurm FAILS them.
- ``PPU_LAB_SLURM=skip:REASON`` or unset: when ``sinfo`` shows no usable node the tests are skipped
  with the reason (``pytest -rs`` prints it); never passed without running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ppu_lab import ridge, slurm
from ppu_lab.cluster import ClusterTimeout, _rank_info
from ppu_lab.mpiexec import transient_mpi_init_failure
from ppu_lab.parallel import sgd_allreduce
from ppu_lab.data import make_ridge_data

ROOT = Path(__file__).resolve().parents[1]
_FLAG = os.environ.get("PPU_LAB_SLURM", "")
_REASON = slurm.slurm_status()


@pytest.fixture
def live_slurm(tmp_path, monkeypatch):
    """Skip (with the reason) or fail when Slurm is not usable; jobs' files go to tmp_path."""
    if _REASON is not None:
        if _FLAG == "1":
            pytest.fail(f"PPU_LAB_SLURM=1 (set-up succeeded) but Slurm is not usable: {_REASON}")
        why = _FLAG[5:] if _FLAG.startswith("skip:") else "run the suite with `make test` as root, or start it with scripts/slurm/setup.sh"
        pytest.skip(f"no running Slurm ({_REASON}); {why}")
    monkeypatch.setenv("PPU_LAB_SLURM_JOBS", str(tmp_path / "jobs"))
    before = _my_jobs()
    yield tmp_path
    leaked = _my_jobs() - before
    for job in leaked:
        slurm.cancel(job)
    assert not leaked, f"jobs left in squeue: {leaked}"


def _my_jobs() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-u", str(os.getuid()), "-o", "%i"], capture_output=True, text=True)
    return set(out.stdout.split())


# --------------------------------------------------------------------------- engines in a Slurm job


def _rank1_waits_alone():
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 1:
        MPI.COMM_WORLD.Barrier()  # rank 0 never calls it


_rank1_waits_alone.__module__ = "__main__"  # sent by value: engines cannot import this test module


@pytest.mark.timeout(300)
def test_slurm_engines_are_one_communicator_and_match_serial_sgd(live_slurm):
    X, y, _ = make_ridge_data(300, 5, seed=3)
    args = dict(lam=0.1, lr=0.001, batch_size=16, epochs=3, seed=7)
    serial = ridge.sgd(X, y, **args).w
    with slurm.SlurmMPICluster(2, time="00:10:00") as cl:  # srun --mpi=pmi2
        job = cl.job_id
        assert slurm.job_state(job) == "RUNNING"
        # (functions sent to engines must be importable there: package functions, not test ones)
        assert cl.apply(_rank_info) == [(0, 2), (1, 2)]
        ws = [res.w for res in cl.apply(sgd_allreduce, X, y, **args)]
        # A hang in a Slurm job: reported like a local one; restart replaces the job.
        with pytest.raises(ClusterTimeout, match=r"rank 0: idle\s+rank 1: in `MPI.COMM_WORLD.Barrier\(\)`"):
            cl.apply(_rank1_waits_alone, timeout=3)
        cl.restart()
        assert slurm.job_state(job) is None and cl.job_id != job
        assert cl.apply(_rank_info) == [(0, 2), (1, 2)]
        job = cl.job_id
    np.testing.assert_allclose(ws[0], ws[1], rtol=0, atol=0)
    np.testing.assert_allclose(ws[0], serial, rtol=1e-12, atol=1e-12)
    assert slurm.job_state(job) is None, "stop() must leave no job in squeue"


@pytest.mark.timeout(300)
@pytest.mark.mpi  # mpiexec inside the allocation (and asks mpiexec which MPI it is)
def test_plain_srun_rank0_of_1_is_detected_with_advice(live_slurm):
    with pytest.raises(slurm.SlurmError, match=r"rank 0 of 1[\s\S]*mpi='pmi2' \(srun --mpi=pmi2"):
        slurm.SlurmMPICluster(2, mpi="none", time="00:10:00").start()
    with pytest.raises(slurm.SlurmError, match="rank 0 of 1"):
        slurm.preflight(2, mpi="none", time="00:05:00")
    # The two launch paths that work: srun --mpi=pmi2, and mpiexec inside the allocation.
    assert slurm.preflight(2, time="00:05:00")["ranks"] == [(0, 2), (1, 2)]
    assert slurm.preflight(2, mpi="mpiexec", time="00:05:00")["ranks"] == [(0, 2), (1, 2)]


@pytest.mark.timeout(120)
def test_rejected_job_raises_with_slurms_message(live_slurm):
    cl = slurm.SlurmMPICluster(2, partition="no-such-partition")
    with pytest.raises(slurm.SlurmError, match=r"rejected[\s\S]*invalid partition"):
        cl.start()
    assert not cl.running
    assert list((live_slurm / "jobs").iterdir()) == []  # no job folder left behind
    with pytest.raises(slurm.SlurmError, match="invalid partition"):
        slurm.preflight(2, partition="no-such-partition")


@pytest.mark.timeout(120)
def test_job_failing_on_the_node_reports_its_output(live_slurm):
    cl = slurm.SlurmMPICluster(2, time="00:05:00", env_setup="echo loading modules\nmodule load no-such-mpi")
    with pytest.raises(slurm.SlurmError, match=r"job \d+ ended[\s\S]*loading modules[\s\S]*module"):
        cl.start()
    assert not cl.running


_KERNEL = """
import sys, time
from ppu_lab.slurm import SlurmMPICluster
cl = SlurmMPICluster(2, time="00:10:00").start()
print("JOB", cl.job_id, flush=True)
if sys.argv[1] == "hang":
    time.sleep(600)
"""  # "exit": leaves without stop(), like a kernel shut down with a running cluster


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_kernel_exit_or_kill_cancels_the_job(live_slurm, how):
    proc = subprocess.Popen([sys.executable, "-c", _KERNEL, "hang" if how == "sigkill" else "exit"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    job = None
    for line in proc.stdout:
        if line.startswith("JOB "):
            job = line.split()[1]
            break
    assert job, f"the cluster did not start: {proc.stderr.read() if proc.poll() is not None else ''}"
    if how == "sigkill":
        assert slurm.job_state(job) == "RUNNING"
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    deadline = time.monotonic() + 30
    while slurm.job_state(job) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm.job_state(job) is None, f"job {job} still in squeue after the kernel's {how}"


def test_missing_sbatch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without the Slurm commands
    with pytest.raises(slurm.SlurmError, match="sbatch.*not found.*login node"):
        slurm.SlurmMPICluster(2).start()
    assert slurm.slurm_status().startswith("sbatch")


def test_bad_options_are_value_errors():
    for kw, name in [({"time": "half an hour"}, "time"), ({"partition": "a b"}, "partition"),
                     ({"mpi": "openmpi"}, "mpi"), ({"nodes": 3}, "nodes"), ({"extra": "--mem=1G"}, "extra")]:
        with pytest.raises(ValueError, match=name):
            slurm.SlurmMPICluster(2, **kw)


def test_no_value_can_inject_lines_into_the_batch_script(capsys):
    """A newline in any value would start a new line of the script (an #SBATCH option or a command)."""
    evil = "\n#SBATCH --qos=free\nrm -rf ~"
    cases = [({"extra": ["--qos=debug" + evil]}, "extra"), ({"job_name": "grid" + evil}, "job_name"),
             ({"output": "out.txt" + evil}, "output"), ({"partition": "short\n"}, "partition"),
             ({"account": "proj\n"}, "account"), ({"time": "30\n"}, "time"),
             ({"env_setup": "module load mpich\r\x1b[2J"}, "env_setup"),
             ({"mpi": "mpiexec", "mpiexec": "/usr/bin/mpiexec" + evil}, "mpiexec")]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            slurm.batch_script("true", 2, **kw)
    with pytest.raises(ValueError, match="extra entry"):  # the cluster checks at construction
        slurm.SlurmMPICluster(2, extra=["--mem=1G\nhostname"])
    with pytest.raises(ValueError, match="env_setup"):
        slurm.SlurmMPICluster(2, env_setup="module load mpich\x00")
    with pytest.raises(ValueError, match="default argument"):
        slurm.experiments_script(2, default_args=["--out", "x.jsonl\nrm -rf ~"])
    assert slurm.main(["script", "-n", "2", "--extra", "--qos=a\nrm -rf ~"]) == 2
    assert "newlines" in capsys.readouterr().err

    # Free text is quoted the way sbatch reads #SBATCH lines (quotes group, backslash escapes, # is
    # a comment outside quotes); env_setup keeps its lines, after the #SBATCH block.
    text = slurm.batch_script("true", 2, job_name="my grid #1", output='/scratch/a "b"/out-%j.txt',
                              env_setup="module load mpich\nsource .venv/bin/activate")
    sbatch = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert sbatch == ['#SBATCH --job-name="my grid #1"', "#SBATCH --ntasks=2", "#SBATCH --cpus-per-task=1",
                      "#SBATCH --no-requeue", "#SBATCH --time=00:30:00", '#SBATCH --output="/scratch/a \\"b\\"/out-%j.txt"']
    lines = text.splitlines()
    assert lines.index("module load mpich") > lines.index("set -e")
    assert "source .venv/bin/activate" in lines


def test_a_slurm_command_that_hangs_is_stopped_with_advice(tmp_path, monkeypatch):
    """squeue that never answers (a controller that is down): SlurmError within the timeout, nothing left."""
    import psutil

    from ppu_lab.slurm import commands

    pids = tmp_path / "pids"
    for name in ("squeue", "sbatch", "scancel", "sinfo"):
        fake = tmp_path / name
        fake.write_text(f"#!/bin/sh\necho $$ >> {pids}\nsleep 300 &\necho $! >> {pids}\nwait\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(commands, "TIMEOUT", 1.0)
    with pytest.raises(slurm.SlurmError, match=r"did not answer `squeue -h -j 42 -o %T` within 1 s[\s\S]*sinfo"):
        slurm.job_state("42")
    with pytest.raises(slurm.SlurmError, match="did not answer `sbatch"):
        slurm.submit(tmp_path / "job.sbatch")
    assert "did not answer" in slurm.slurm_status()
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 6  # squeue, sbatch, sinfo: each a shell and its sleep
    assert [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []


# --------------------------------------------------------------------------- batch runs


def test_committed_sbatch_template_is_the_generated_one():
    committed = (ROOT / "scripts" / "slurm" / "experiments.sbatch").read_text()
    assert committed == slurm.experiments_script(), (
        "scripts/slurm/experiments.sbatch is out of date: python -m ppu_lab.slurm script -o scripts/slurm/experiments.sbatch")


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _wait_gone(job, timeout):
    deadline = time.monotonic() + timeout
    while slurm.job_state(job) is not None:
        assert time.monotonic() < deadline, f"job {job} still {slurm.job_state(job)} after {timeout} s"
        time.sleep(0.2)


@pytest.mark.timeout(400)
def test_sbatch_experiment_grid_resumes_after_scancel(live_slurm, mnist_root):
    tmp = live_slurm
    out = tmp / "grid.jsonl"
    script = tmp / "grid.sbatch"
    script.write_text(slurm.experiments_script(2, time="00:10:00", output=str(tmp / "job-%j.out"),
                                               python=sys.executable, env_setup=None))
    args = ["--models", "cnn", "--ranks", "1,2", "--batch-sizes", "50,100", "--epochs", "1", "--quick",
            "--data-root", str(mnist_root), "--out", str(out)]
    logs = lambda: "\n".join(p.read_text() for p in sorted(tmp.glob("job-*.out")))  # noqa: E731

    def died_of_known_mpi_flake(job):  # MPICH/UCX start-up failure, not ours: one resubmission allowed
        log = tmp / f"job-{job}.out"
        return slurm.job_state(job) is None and log.exists() and transient_mpi_init_failure(log.read_text())

    first, retried = slurm.submit(script, *args, cwd=ROOT), False
    deadline = time.monotonic() + 180
    while not _records(out):  # cancel as soon as the first run is written
        if not retried and died_of_known_mpi_flake(first):
            first, retried = slurm.submit(script, *args, cwd=ROOT), True
        assert slurm.job_state(first) is not None, f"the job ended before writing a run:\n{logs()}"
        assert time.monotonic() < deadline, f"no run finished in 180 s:\n{logs()}"
        time.sleep(0.1)
    slurm.cancel(first)
    done = _records(out)
    assert 1 <= len(done) < 4, f"cancelled part-way, expected 1-3 finished runs, got {len(done)}"

    second = slurm.submit(script, *args, cwd=ROOT)
    _wait_gone(second, 300)
    if len(_records(out)) < 4 and not retried and died_of_known_mpi_flake(second):
        second = slurm.submit(script, *args, cwd=ROOT)
        _wait_gone(second, 300)
    final = _records(out)
    keys = [json.dumps(r["key"], sort_keys=True) for r in final]
    assert len(final) == 4 and len(set(keys)) == 4, f"expected the 4 runs once each:\n{keys}\n{logs()}"
    assert final[: len(done)] == done, "the resumed job must keep the first job's records as they were"
    assert {(r["ranks"], r["batch_size"]) for r in final} == {(1, 50), (1, 100), (2, 50), (2, 100)}
    assert all(r["final_accuracy"] > 0.3 for r in final), [r["final_accuracy"] for r in final]
