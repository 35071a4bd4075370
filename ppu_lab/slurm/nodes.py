"""The cluster's nodes, as the lab needs them: where the controller listens, and what a job lost.

- ``controller_ip(partition)``: the address of this machine that the compute nodes reach (the
  engines of :class:`~ppu_lab.slurm.SlurmMPICluster` connect to it), and why it was chosen.
- ``job_end(job, timeout)``: wait until a job has left the queue; how it ended (Slurm's state, exit
  code, nodes), with the nodes Slurm lost (DOWN, not responding) named.
- ``wait(job, timeout)``: the same for a batch job that should complete; ``SlurmError`` otherwise,
  whose message says how it ended (for a lost node: which one, and what Slurm said about it).

What happens when a node is lost, measured on the two-node test cluster (``scripts/slurm/setup.sh
--nodes 2``; tests/test_slurm_nodes.py): a node whose network goes away (or whose processes all die)
stops answering the controller; after ``SlurmdTimeout`` (plus up to a third of it until the next
ping) Slurm marks it DOWN, ends its jobs with state ``NODE_FAIL`` and kills their processes on the
other nodes; MPI ranks blocked in a collective with the dead peer go with them, so nothing waits
forever. The lab's batch scripts say ``--no-requeue``: otherwise Slurm puts such a job back in the
queue, where it waits for the lost node and later starts again unasked.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from pathlib import Path

from ppu_lab.slurm.commands import SlurmError, _run, job_state

# States of a job that has ended (squeue no longer lists it, scontrol still knows it for a while).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE")
_JOB = re.compile(r"\d+(_\d+)?")  # a job id (or array task): nothing else reaches squeue/scontrol
# More distinct addresses than this are sampled, evenly, when choosing the controller's address.
MAX_PROBED = 64


# --------------------------------------------------------------------------- the controller's address


def _fields(line: str) -> dict:
    """``Key=Value Key2=Value with spaces`` (one line of ``scontrol show -o``) as a dict."""
    return dict(re.findall(r"(\S+?)=(.*?)(?=\s+[A-Za-z/:]+=|\s*$)", line.strip()))


def node_addresses(partition: str | None = None) -> dict[str, str]:
    """``{node name: NodeAddr}`` of the partition's nodes (all nodes when ``partition`` is None)."""
    proc = _run(["sinfo", "-h", "-N", "-o", "%N %o", *(["-p", partition] if partition else [])])
    if proc.returncode != 0:
        raise SlurmError(f"sinfo could not list the nodes: {(proc.stderr + proc.stdout).strip()}")
    return dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)


def _local_ipv4() -> set[str]:
    import psutil

    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}


def _source_address(ip: str) -> str:
    """The address of this machine that packets to ``ip`` leave from (a UDP "connect" sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))
        return s.getsockname()[0]


def controller_ip(partition: str | None = None) -> tuple[str, str]:
    """``(ip, why)``: where the controller should listen so that the partition's nodes reach it.

    - every node is this machine (``NodeAddr`` loopback or one of its addresses, as on a one-node
      test Slurm): ``127.0.0.1``, reachable from nothing else;
    - every node is reached through the same address of this machine (the route to each
      ``NodeAddr``: on a cluster, the login node's address on the cluster network): that address;
    - otherwise (the nodes cannot be listed or resolved, or sit behind different interfaces):
      ``"*"``, all interfaces, the only choice that works for every node.
    """
    try:
        nodes = node_addresses(partition)
    except SlurmError as exc:
        return "*", f"all interfaces: {exc}"
    by_addr = {}
    for name, addr in nodes.items():
        by_addr.setdefault(addr, name)
    addrs = sorted(by_addr)
    if len(addrs) > MAX_PROBED:
        addrs = [addrs[i * len(addrs) // MAX_PROBED] for i in range(MAX_PROBED)]
    if not addrs:
        return "*", "all interfaces: sinfo lists no node"
    local, sources = _local_ipv4(), {}
    for addr in addrs:
        try:
            ip = socket.gethostbyname(addr)
            local_node = ipaddress.ip_address(ip).is_loopback or ip in local
            sources.setdefault("127.0.0.1" if local_node else _source_address(ip), []).append(by_addr[addr])
        except OSError as exc:
            return "*", f"all interfaces: node {by_addr[addr]}'s address {addr} does not resolve or route here ({exc})"
    if len(sources) == 1:
        (ip, names), = sources.items()
        if ip == "127.0.0.1":
            return ip, f"loopback: the nodes ({', '.join(names)}) are this machine"
        more = " ..." if len(names) > 4 else ""
        return ip, f"this machine's address on the route to the nodes ({', '.join(names[:4])}{more})"
    seen = "; ".join(f"{ip} for {', '.join(n[:3])}" for ip, n in sources.items())
    return "*", f"all interfaces: the nodes are reached through different addresses of this machine ({seen})"


# --------------------------------------------------------------------------- how a job ended


def job_record(job: str) -> dict | None:
    """``scontrol show job`` as a dict (``JobState``, ``NodeList``, ``StdOut`` ...); None once Slurm forgot it."""
    proc = _run(["scontrol", "show", "job", "-o", str(job)])
    return _fields(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None


def lost_nodes(nodelist: str) -> dict[str, str]:
    """``{node: "State (Reason)"}`` for the nodes of ``nodelist`` (e.g. ``n[1-2]``) that Slurm lost."""
    if not nodelist or nodelist == "(null)":
        return {}
    proc = _run(["scontrol", "show", "node", "-o", nodelist])
    lost = {}
    for line in proc.stdout.splitlines():
        f = _fields(line)
        state = f.get("State", "")
        if re.search(r"DOWN|FAIL|NOT_RESPONDING|POWER", state):
            lost[f.get("NodeName", "?")] = state + (f" (reason: {f['Reason']})" if f.get("Reason") else "")
    return lost


def job_end(job: str, timeout: float, poll: float = 1.0) -> dict:
    """Wait (up to ``timeout`` s) until ``job`` has left the queue; return how it ended.

    Keys: ``job``, ``state`` (``COMPLETED``, ``NODE_FAIL``, ...; ``None`` when Slurm no longer
    knows), ``exit_code``, ``nodes`` (the job's node list), ``lost`` (``{node: state}`` of those
    Slurm lost), ``output`` (path of the job's output file, or None). Raises ``SlurmError`` if the
    job is still queued or running after ``timeout`` s (it is left running: ``scancel`` it).
    """
    if not _JOB.fullmatch(str(job)):
        raise ValueError(f"job must be a Slurm job id such as '1234'; got {job!r}")
    deadline = time.monotonic() + timeout
    while (state := job_state(job)) is not None:
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job} is still {state} after {timeout:.0f} s. It keeps running: wait longer, "
                             f"or cancel it with `scancel {job}`.")
        time.sleep(poll)
    rec = job_record(job) or {}
    end = {"job": str(job), "state": rec.get("JobState"), "exit_code": rec.get("ExitCode"),
           "nodes": rec.get("NodeList"), "output": rec.get("StdOut")}
    end["lost"] = lost_nodes(end["nodes"]) if end["state"] == "NODE_FAIL" else {}
    return end


def describe(end: dict, tail: int = 15) -> str:
    """How a job ended, in words, with the last ``tail`` lines of its output."""
    job, state = end["job"], end["state"]
    if state is None:
        text = f"job {job} has ended; Slurm no longer knows how (`sacct -j {job}` may)"
    elif state == "NODE_FAIL":
        lost = "; ".join(f"{n}: {s}" for n, s in end["lost"].items()) or "none of its nodes is down any more"
        text = (f"job {job} ended NODE_FAIL: Slurm lost node(s) {', '.join(end['lost']) or '?'} ({lost}) and "
                f"stopped the job's processes on its other nodes ({end['nodes']}). What the job wrote before "
                f"is kept; submit it again to continue (`--exclude={','.join(end['lost'])}` keeps it off "
                "the lost node)")
    else:
        text = f"job {job} ended {state} (exit code {end['exit_code']}, nodes {end['nodes']})"
    out = Path(end["output"]) if end.get("output") and end["output"] != "(null)" else None
    if out is not None and out.is_file():
        lines = out.read_text(errors="replace").splitlines()[-tail:]
        text += f"\n--- last lines of {out}\n" + "\n".join(lines)
    return text


def wait(job: str, timeout: float, poll: float = 1.0) -> dict:
    """Wait for a batch job to end; return :func:`job_end`'s record if it COMPLETED, else raise SlurmError."""
    end = job_end(job, timeout, poll)
    if end["state"] != "COMPLETED":
        raise SlurmError(describe(end))
    return end
