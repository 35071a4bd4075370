"""The lab on two Slurm nodes (issue 13): ranks on two hosts, engines reaching the controller, MPI over a
network, the α-β model across nodes, batch runs, and losing a node.

The cluster is ``scripts/slurm/setup.sh --nodes 2``: two ``slurmd``, each in its own network namespace
(nodes ``ppulab-n1``, ``ppulab-n2``, one CPU each, addresses on a bridge whose host side is the
submit host), ``slurmctld`` on this machine. ``make test`` starts it for this file only, as root
(``scripts/slurm/with-slurm.sh --nodes 2``, which sets ``PPU_LAB_SLURM=1`` and ``PPU_LAB_SLURM_NODES=2``):

- set-up succeeded: every test here must run, and an unusable cluster FAILS them;
- otherwise (not root, no network namespaces, the one-node Slurm instead): skipped, with the reason.

Losing a node: ``scripts/slurm/nodes.sh cut 2`` takes node 2's link down mid-run (no packet, no
reset: what a power loss looks like from the other node). The stated bound for the run to end on the
other node, with an error naming the lost node, is ``LOSS_BOUND_S`` below, from the cluster's own
settings: Slurm declares a silent node DOWN after ``SlurmdTimeout`` (pinging every third of it),
then kills the job everywhere (``KillWait``), each step bounded by ``MessageTimeout``; plus 10 s
for the lab's polling and a loaded machine. Measured here, bound 33 s: 15-19 s for the batch grid,
21-26 s for ``cl.apply`` (which also stops the cluster before raising).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ppu_lab import collectives, ridge, slurm
from ppu_lab.cluster import _rank_info
from ppu_lab.data import load_mnist, make_ridge_data
from ppu_lab.parallel import sgd_allreduce
from ppu_lab.procs import run
from ppu_lab.train import train

ROOT = Path(__file__).resolve().parents[1]
NODES_SH = ROOT / "scripts" / "slurm" / "nodes.sh"
NODES = ["ppulab-n1", "ppulab-n2"]
BRIDGE = "ppulab-br"
SIZES = [2**k for k in range(0, 23, 2)]  # notebook 03's ping-pong: 1 B ... 4 MiB
REPEAT = 25  # its rounds per size outside quick mode: the best of more rounds escapes the machine's load
CNN_RTOL = 1e-4  # as tests/test_train.py: float32 rounding after a few steps, far below a changed step
_FLAG = os.environ.get("PPU_LAB_SLURM", "")


def _why_not() -> str | None:
    """None when the two-node test cluster is up; else why not."""
    reason = slurm.slurm_status()
    if reason:
        return reason
    up = run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=30).stdout.split()
    nodes = dict(zip(up[::2], up[1::2]))
    if sorted(nodes) != NODES:
        return f"the running Slurm has nodes {sorted(nodes)}, not the two-node test cluster {NODES}"
    netns = run(["ip", "netns", "list"], timeout=10).stdout if os.geteuid() == 0 else ""
    if not all(n in netns for n in NODES):
        return "the nodes' network namespaces are not visible here (not root?)"
    return None


@pytest.fixture(scope="module")
def two_nodes():
    reason = _why_not()
    if reason is not None:
        if _FLAG == "1" and os.environ.get("PPU_LAB_SLURM_NODES") == "2":
            pytest.fail(f"with-slurm.sh --nodes 2 started the two-node Slurm, but it is not usable: {reason}")
        why = _FLAG[5:] if _FLAG.startswith("skip:") else (
            "run `make test` as root, or "
            "scripts/slurm/with-slurm.sh --nodes 2 python -m pytest tests/test_slurm_nodes.py")
        pytest.skip(f"no two-node test Slurm ({reason}); {why}")
    return NODES


@pytest.fixture
def nodes(two_nodes, tmp_path, monkeypatch):
    """The two nodes, both idle; jobs' files in tmp_path; afterwards no job left and node 2 back."""
    monkeypatch.setenv("PPU_LAB_SLURM_JOBS", str(tmp_path / "jobs"))
    yield two_nodes
    leaked = _jobs()
    for job in leaked:
        slurm.cancel(job)
    assert not leaked, f"jobs left in squeue: {leaked}"


def _jobs() -> list[str]:
    return run(["squeue", "-h", "-o", "%i"], timeout=30).stdout.split()


def _node_processes(node: str) -> list[str]:
    """Commands of the processes on a node (in its namespace), slurmd itself excepted."""
    pids = run(["ip", "netns", "pids", node], timeout=10).stdout.split()
    cmds = [run(["ps", "-o", "args=", "-p", p], timeout=10).stdout.strip() for p in pids]
    return [c for c in cmds if c and not c.startswith("slurmd")]


def _slurm_config(key: str) -> float:
    out = run(["scontrol", "show", "config"], timeout=30).stdout
    return float(re.search(rf"^{key}\s*=\s*(\d+)", out, re.M).group(1))


def _loss_bound() -> float:
    timeout = _slurm_config("SlurmdTimeout")
    return timeout + timeout / 3 + _slurm_config("MessageTimeout") + _slurm_config("KillWait") + 10


def _node_cmd(action: str, node: int) -> None:
    proc = run([str(NODES_SH), action, str(node)], timeout=120)
    assert proc.returncode == 0, f"nodes.sh {action} {node}: {proc.stdout}{proc.stderr}"


def _bridge_address() -> str:
    out = run(["ip", "-4", "-o", "addr", "show", BRIDGE], timeout=10).stdout
    return re.search(r"inet (\S+)/", out).group(1)


# --------------------------------------------------------------------------- without a cluster


def _fake_sinfo(tmp_path, monkeypatch, lines: str, code: int = 0):
    fake = tmp_path / "sinfo"
    fake.write_text(f"#!/bin/sh\nprintf '%s' '{lines}'\nexit {code}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_controller_ip_is_loopback_one_address_or_all_interfaces(tmp_path, monkeypatch):
    from ppu_lab.slurm import nodes as slurm_nodes

    _fake_sinfo(tmp_path, monkeypatch, "vm 127.0.0.1\nvm2 localhost\n")  # the one-node test Slurm
    assert slurm.controller_ip() == ("127.0.0.1", "loopback: the nodes (vm, vm2) are this machine")
    _fake_sinfo(tmp_path, monkeypatch, "n1 10.0.0.11\nn2 10.0.0.12\nn3 10.1.0.13\n")
    routes = {"10.0.0.11": "10.0.0.1", "10.0.0.12": "10.0.0.1", "10.1.0.13": "10.1.0.1"}  # two networks
    monkeypatch.setattr(slurm_nodes, "_source_address", routes.__getitem__)
    ip, why = slurm.controller_ip()
    assert ip == "*" and "10.0.0.1 for n1, n2; 10.1.0.1 for n3" in why
    _fake_sinfo(tmp_path, monkeypatch, "n1 10.0.0.11\nn2 10.0.0.12\n")  # one network: its address
    assert slurm.controller_ip()[0] == "10.0.0.1"
    _fake_sinfo(tmp_path, monkeypatch, "n1 no-such-host.invalid\n")
    assert slurm.controller_ip()[0] == "*"
    _fake_sinfo(tmp_path, monkeypatch, "slurm_load_partitions: Unable to contact slurm controller", code=1)
    ip, why = slurm.controller_ip()
    assert ip == "*" and "Unable to contact" in why


def test_scontrol_records_are_read_with_spaces_in_values():
    from ppu_lab.slurm.nodes import _fields

    line = ("NodeName=ppulab-n2 Arch=x86_64 OS=Linux 6.1 #1 SMP  RealMemory=11449 State=DOWN+NOT_RESPONDING "
            "ReqB:S:C:T=0:0:*:* CPUs/Task=1 Reason=Not responding [root@2026-12-02T23:59:51]")
    f = _fields(line)
    assert (f["NodeName"], f["State"], f["Reason"]) == ("ppulab-n2", "DOWN+NOT_RESPONDING",
                                                       "Not responding [root@2026-12-02T23:59:51]")
    assert (f["OS"], f["ReqB:S:C:T"], f["CPUs/Task"]) == ("Linux 6.1 #1 SMP", "0:0:*:*", "1")


def test_wait_refuses_what_is_not_a_job_id(capsys):
    assert slurm.main(["wait", "12; scancel -u root"]) == 2
    assert "job must be a Slurm job id" in capsys.readouterr().err


# --------------------------------------------------------------------------- one communicator on two hosts


@pytest.mark.timeout(120)
def test_check_reports_one_communicator_on_two_hosts(nodes):
    proc = run([sys.executable, "-m", "ppu_lab.slurm", "check", "-n", "2", "--nodes", "2"], timeout=100, cwd=ROOT)
    print(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ranks [(0, 2), (1, 2)]) on 2 host(s): rank 0 on ppulab-n1, rank 1 on ppulab-n2" in proc.stdout


# --------------------------------------------------------------------------- engines on both nodes


def _pingpong_within_one_node() -> collectives.AlphaBeta:
    """Notebook 03's ping-pong and fit, both ranks on node 1 (a one-node job beside no other)."""
    code = ("import json, platform; from mpi4py import MPI; from ppu_lab import collectives\n"
            f"nb, s = collectives.pingpong({SIZES}, repeat={REPEAT})\n"
            "hosts = MPI.COMM_WORLD.gather(platform.node())\n"
            "if MPI.COMM_WORLD.rank == 0: print('PINGPONG', json.dumps([hosts, nb.tolist(), s.tolist()]))\n")
    cmd = ["srun", "-N1", "-n2", "--overcommit", "--mpi=pmi2", "--time=5", "-w", NODES[0], sys.executable, "-c", code]
    proc = run(cmd, timeout=120, cwd=ROOT)
    line = re.search(r"^PINGPONG (.*)$", proc.stdout, re.M)
    assert proc.returncode == 0 and line, proc.stdout + proc.stderr
    hosts, nbytes, secs = json.loads(line.group(1))
    assert hosts == [NODES[0], NODES[0]]
    return collectives.fit_alpha_beta(nbytes, secs)


@pytest.fixture(scope="class")
def within_node(two_nodes):
    return _pingpong_within_one_node()  # before the engines take both nodes' CPUs


@pytest.fixture(scope="class")
def cluster(two_nodes, within_node, tmp_path_factory):
    """One SlurmMPICluster on both nodes for the class (a start costs ~10 s); stopped after it."""
    os.environ["PPU_LAB_SLURM_JOBS"] = str(tmp_path_factory.mktemp("engine-jobs"))
    cl = slurm.SlurmMPICluster(2, nodes=2, time="00:10:00")
    try:
        yield cl
    finally:
        cl.stop()
        os.environ.pop("PPU_LAB_SLURM_JOBS", None)


@pytest.fixture
def engines(cluster):
    return cluster if cluster.running else cluster.start()


@pytest.mark.timeout(300)
class TestEnginesOnTwoNodes:
    def test_controller_listens_on_the_address_the_nodes_reach(self, engines):
        ip, why = engines.info["controller_ip"]
        assert ip == _bridge_address(), (ip, why)  # not "*": one interface, the one the nodes route to
        assert engines.apply(_rank_info) == [(0, 2), (1, 2)]  # one communicator ...
        assert engines.apply(platform.node) == NODES  # ... rank r on node r+1

    def test_ridge_sgd_across_nodes_equals_serial(self, engines):
        X, y, _ = make_ridge_data(300, 5, seed=3)
        args = dict(lam=0.1, lr=0.001, batch_size=16, epochs=3, seed=7)
        serial = ridge.sgd(X, y, **args).w
        ws = [res.w for res in engines.apply(sgd_allreduce, X, y, **args)]
        np.testing.assert_allclose(ws[0], ws[1], rtol=0, atol=0)
        np.testing.assert_allclose(ws[0], serial, rtol=1e-12, atol=1e-12)

    def test_cnn_steps_across_nodes_equal_serial(self, engines, mnist_root):
        from ipyparallel import Reference

        x_tr, y_tr, x_te, y_te = load_mnist(mnist_root, download=False)
        data = (x_tr[:640], y_tr[:640], x_te[:100], y_te[:100])
        cfg = dict(batch_size=64, max_steps=5, progress=False, evaluate=False)
        serial = train("cnn", data, **cfg).params
        got = [r.params for r in engines.apply(train, "cnn", data, comm=Reference("comm"), **cfg)]
        np.testing.assert_array_equal(got[0], got[1])  # both ranks hold the same parameters
        np.testing.assert_allclose(got[0], serial, rtol=0, atol=CNN_RTOL * np.abs(serial).max())

    def test_alpha_beta_across_nodes_differs_from_within_a_node(self, engines, within_node):
        nbytes, secs = engines.apply(collectives.pingpong, SIZES, repeat=REPEAT)[0]
        across = collectives.fit_alpha_beta(nbytes, secs)
        rows = [("within ppulab-n1 (shared memory)", within_node), ("across ppulab-n1/n2 (TCP, bridge)", across)]
        print("\nalpha-beta fit of notebook 03 (pingpong + fit_alpha_beta), 2 ranks:")
        print(f"{'':36} {'alpha (us)':>10} {'beta (ns/B)':>11} {'GB/s':>6} {'1 MiB (us)':>10}")
        for name, m in rows:
            print(f"{name:36} {m.alpha * 1e6:>10.2f} {m.beta * 1e9:>11.4f} {m.bandwidth / 1e9:>6.2f} "
                  f"{m.send(2**20) * 1e6:>10.1f}")
        # Measured here: time per byte 7-9x higher across nodes, latency 1.5-6x (within a node it varies
        # most with the machine's load: two ranks polling shared memory need a core each). The factor 2
        # on beta leaves room for noise and still fails if both pairs talk the same way (e.g. through
        # shared memory across "nodes", as UCX does unless each node has its own IPC namespace).
        assert across.beta > 2 * within_node.beta, rows
        assert across.alpha > within_node.alpha, rows

    # Last in the class (it ends the cluster; `engines` starts it again for any test after it).
    def test_losing_a_node_under_cl_apply_raises_naming_it(self, engines):
        import psutil

        bound = _loss_bound()
        X, y, _ = make_ridge_data(300, 5, seed=3)
        cl, started = engines, []
        try:
            host_pids = list(cl._pids) + [cl._watchdog.pid]

            def cut():
                started.append(time.monotonic())
                _node_cmd("cut", 2)

            timer = threading.Timer(1.0, cut)  # the training below runs for hours unless interrupted
            timer.start()
            with pytest.raises(slurm.SlurmError) as err:
                cl.apply(sgd_allreduce, X, y, lam=0.1, lr=1e-6, batch_size=16, epochs=10**7)
            took = time.monotonic() - started[0]
            timer.join()
            print(f"\nnode 2 cut during cl.apply(sgd_allreduce); SlurmError after {took:.1f} s (bound {bound:.0f} s):"
                  f"\n{err.value}")
            lost = r"ended while cl.apply\(sgd_allreduce\) ran[\s\S]*NODE_FAIL: Slurm lost node\(s\) ppulab-n2"
            assert re.search(lost, str(err.value)), err.value
            assert took < bound, f"the error came {took:.0f} s after the cut; the stated bound is {bound:.0f} s"
            assert not cl.running and _jobs() == []
            assert _node_processes(NODES[0]) == []
            assert [p for p in host_pids if p and psutil.pid_exists(p) and
                    psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []  # controller, watchdog
        finally:
            cl.stop()
            _node_cmd("revive", 2)
        assert _node_processes(NODES[1]) == []


# --------------------------------------------------------------------------- batch runs on two nodes


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _grid_job(tmp: Path, mnist_root, *grid: str):
    """(submit(), results path, job logs): the committed script's generator, on both nodes."""
    out, script = tmp / "grid.jsonl", tmp / "grid.sbatch"
    script.write_text(slurm.experiments_script(2, nodes=2, time="00:10:00", output=str(tmp / "job-%j.out"),
                                               python=sys.executable, env_setup=None))
    args = [*grid, "--quick", "--data-root", str(mnist_root), "--out", str(out)]
    logs = lambda: "\n".join(p.read_text() for p in sorted(tmp.glob("job-*.out")))  # noqa: E731
    return (lambda: slurm.submit(script, *args, cwd=ROOT)), out, logs


def _wait_for_records(out: Path, job: str, logs, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not _records(out):
        assert slurm.job_state(job) is not None, f"the job ended before writing a run:\n{logs()}"
        assert time.monotonic() < deadline, f"no run finished in {timeout} s:\n{logs()}"
        time.sleep(0.1)
    return _records(out)


@pytest.mark.timeout(300)
def test_sbatch_grid_on_two_nodes_resumes_after_scancel(nodes, tmp_path, mnist_root):
    submit, out, logs = _grid_job(tmp_path, mnist_root, "--models", "ann:10", "--ranks", "1,2",
                                  "--batch-sizes", "50,100", "--epochs", "1")
    first = submit()
    _wait_for_records(out, first, logs)
    slurm.cancel(first)
    done = _records(out)
    assert 1 <= len(done) < 4, f"cancelled part-way, expected 1-3 finished runs, got {len(done)}"
    second = submit()
    end = slurm.wait(second, timeout=180)  # SlurmError (how it ended, its output) unless COMPLETED
    assert end["nodes"] == "ppulab-n[1-2]", end
    final = _records(out)
    keys = [json.dumps(r["key"], sort_keys=True) for r in final]
    assert len(final) == 4 and len(set(keys)) == 4, f"expected the 4 runs once each:\n{keys}\n{logs()}"
    assert final[: len(done)] == done, "the resumed job must keep the first job's records as they were"
    two_rank_hosts = {tuple(r["machine"]["hosts"]) for r in final if r["ranks"] == 2}
    assert two_rank_hosts == {tuple(NODES)}, two_rank_hosts  # the 2-rank runs ran across both nodes
    assert all(r["final_accuracy"] > 0.3 for r in final), [r["final_accuracy"] for r in final]


# --------------------------------------------------------------------------- losing a node


@pytest.mark.timeout(300)
def test_losing_a_node_ends_the_batch_grid_naming_it_and_keeps_finished_runs(nodes, tmp_path, mnist_root):
    bound = _loss_bound()
    submit, out, logs = _grid_job(tmp_path, mnist_root, "--models", "ann:10", "--ranks", "2",
                                  "--batch-sizes", ",".join(str(b) for b in range(10, 210, 10)), "--epochs", "3")
    job = submit()
    _wait_for_records(out, job, logs)
    try:
        _node_cmd("cut", 2)
        t0 = time.monotonic()
        time.sleep(1)  # a record being written at the cut is complete by now; no run can finish after it
        before = _records(out)
        proc = run([sys.executable, "-m", "ppu_lab.slurm", "wait", job, "--timeout", str(bound)],
                   timeout=bound + 60, cwd=ROOT)
        took = time.monotonic() - t0
        print(f"\nnode 2 cut; `wait` returned after {took:.1f} s (bound {bound:.0f} s):\n{proc.stderr}")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert re.search(r"job \d+ ended NODE_FAIL: Slurm lost node\(s\) ppulab-n2 \(ppulab-n2: DOWN", proc.stderr), \
            proc.stderr
        assert "Node failure on ppulab-n2" in proc.stderr  # srun's own words, from the job's output
        assert _jobs() == []
        assert _node_processes(NODES[0]) == []  # the surviving node: nothing left but slurmd
        after = _records(out)
        assert after[: len(before)] == before and len(after) == len(before), "every finished run is kept, whole"
        assert 1 <= len(before) < 20
    finally:
        _node_cmd("revive", 2)  # a "reboot": whatever was left on the lost node dies, slurmd returns
    assert _node_processes(NODES[1]) == []
