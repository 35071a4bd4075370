#!/usr/bin/env bash
# Stop the one-node Slurm that scripts/slurm/setup.sh started: cancel the jobs, stop slurmd,
# slurmctld and munged (only the daemons whose pid files setup.sh owns, plus munged if setup
# started it). Safe to run when nothing is running. Set PPU_LAB_SLURM_PURGE=1 to also delete
# the state directory and the /etc/slurm/slurm.conf symlink.
# The multi-node Slurm of `setup.sh --nodes N` goes first, completely: its jobs, every process in
# its network namespaces, its slurmctld, the namespaces, links, bridge and /etc/hosts lines
# (scripts/slurm/nodes.sh: nodes_down), also when a crash left only parts of it.
set -uo pipefail
STATE="${PPU_LAB_SLURM_DIR:-/var/tmp/ppu-lab-slurm}"
say() { echo "slurm-teardown: $*"; }

# shellcheck source=nodes.sh
. "$(dirname "$0")/nodes.sh"
if nodes_ctld_alive || [ -n "$(ip netns list 2>/dev/null | grep "^$NODES_PREFIX[0-9]")" ] \
   || ip link show "$NODES_BRIDGE" >/dev/null 2>&1 || grep -qF "$NODES_MARK" /etc/hosts 2>/dev/null; then
    nodes_down && say "stopped the multi-node Slurm (namespaces, links, bridge, /etc/hosts lines removed)"
elif [ -d "$NODES_DIR" ]; then
    nodes_down  # only files left: the state folders and the slurm.conf symlink
fi
[ -d "$STATE" ] || { say "nothing to stop ($STATE missing)"; exit 0; }
command -v scancel >/dev/null && [ -s "$STATE/run/slurmctld.pid" ] && scancel --full --quiet -u root 2>/dev/null || true

stop() {  # name pidfile
    local name=$1 pid=$2 p
    [ -s "$pid" ] || return 0
    p=$(cat "$pid")
    if kill -0 "$p" 2>/dev/null; then
        kill -TERM "$p"
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$p" 2>/dev/null && kill -KILL "$p"
        say "stopped $name (pid $p)"
    fi
    rm -f "$pid"
}
stop slurmd "$STATE/run/slurmd.pid"
stop slurmctld "$STATE/run/slurmctld.pid"
# munged: its pid file is the Debian default; stop it only if setup.sh started it (munged.out exists).
if [ -f "$STATE/log/munged.out" ]; then
    for f in /run/munge/munged.pid /var/run/munge/munged.pid; do [ -s "$f" ] && { stop munged "$f"; break; }; done
fi
if [ "${PPU_LAB_SLURM_PURGE:-0}" = 1 ]; then
    [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$STATE/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
    rm -rf "$STATE"; say "purged $STATE"
fi
exit 0
