#!/usr/bin/env bash
# shellcheck shell=bash
# A multi-node test Slurm on ONE machine: sourced by setup.sh (--nodes N) and teardown.sh.
#
# Each node is a network namespace (its own network stack, address and port 6818) with its own
# UTS namespace (its own hostname) and IPC namespace, joined to the host by a veth pair on a bridge:
#
#     host: slurmctld, munged, sbatch/squeue, the notebook's controller   ppulab-br  $NET.1/24
#       ppulab-v1 ==veth== eth0 in netns ppulab-n1 (hostname ppulab-n1)  $NET.11    slurmd -N ppulab-n1
#       ppulab-v2 ==veth== eth0 in netns ppulab-n2 (hostname ppulab-n2)  $NET.12    slurmd -N ppulab-n2
#
# The nodes share the host's file systems (like a cluster's shared home) and its munged socket.
# They have no default route and the host does not forward, so a node can reach only the bridge's
# addresses: the host's $NET.1 and the other nodes. /etc/hosts gets one line per node, marked
# "$NODES_MARK", removed again by nodes_down. slurmd runs under `nsenter --net --uts --ipc` (not
# `ip netns exec`, which remounts /sys and slurmd then fails on cgroups). The IPC namespace matters
# for MPI: UCX (the pip mpich's transport) uses shared memory between processes with the same
# boot id and IPC namespace, so without it two "nodes" would talk through memory, not the network.
#
# Variables: STATE (setup.sh's state folder); PPU_LAB_SLURM_NET (default 10.213.13: a /24 prefix in
# a private range).
#
# Run directly, it changes one node of a running cluster (the node-loss tests, tests/test_slurm_nodes.py):
#   scripts/slurm/nodes.sh cut I      node I's link goes down: it vanishes from the network, as on a
#                                     power loss seen from the other nodes (no packet, no reset)
#   scripts/slurm/nodes.sh crash I    every process on node I is killed (slurmd, job steps, ranks);
#                                     its network stays, so its peers see their connections reset
#   scripts/slurm/nodes.sh revive I   "reboot" node I: kill what is left on it, link up, start slurmd,
#                                     wait (bounded) until Slurm lists it idle again

STATE="${STATE:-${PPU_LAB_SLURM_DIR:-/var/tmp/ppu-lab-slurm}}"
NODES_DIR="$STATE/nodes"                   # slurm.conf, state, spool, logs, pid files of this cluster
NODES_NET="${PPU_LAB_SLURM_NET:-10.213.13}"
NODES_BRIDGE=ppulab-br
NODES_PREFIX=ppulab-n                      # node i: netns and hostname ppulab-n<i>, host veth ppulab-v<i>
NODES_NS=/run/ppu-lab-slurm-ns             # bind mounts that keep the UTS and IPC namespaces alive
NODES_MARK="# ppu-lab-slurm-nodes"

nodes_addr() { echo "$NODES_NET.$((10 + $1))"; }   # node i's address
live() { local p; for p in "$@"; do ps -o stat= -p "$p" 2>/dev/null | grep -qv '^Z' && echo "$p"; done; }  # not zombies
nodes_in() {  # i command...: run a command inside node i (network and hostname)
    local i=$1; shift
    nsenter --net="/run/netns/$NODES_PREFIX$i" --uts="$NODES_NS/uts-$NODES_PREFIX$i" \
            --ipc="$NODES_NS/ipc-$NODES_PREFIX$i" "$@"
}

# Why this machine cannot host the namespace cluster (empty when it can).
nodes_unsupported() {
    [ "$(id -u)" = 0 ] || { echo "not root (uid $(id -u)): network namespaces need root"; return; }
    local c
    for c in ip nsenter unshare; do
        command -v "$c" >/dev/null || { echo "'$c' not found (iproute2 / util-linux)"; return; }
    done
    if ! ip netns add ppulab-probe 2>/dev/null; then echo "'ip netns add' fails here (no network namespaces)"; return; fi
    ip netns del ppulab-probe 2>/dev/null
    ip link add ppulab-probe type bridge 2>/dev/null || { echo "cannot create a bridge (ip link add type bridge)"; return; }
    ip link del ppulab-probe 2>/dev/null
    local used
    used=$(ip -4 route show | grep -F "$NODES_NET." | grep -vF "dev $NODES_BRIDGE" | head -1)
    [ -z "$used" ] || echo "$NODES_NET.0/24 is already routed here ($used): set PPU_LAB_SLURM_NET to a free /24 prefix"
}

# Bridge, namespaces, veth pairs, hostnames and /etc/hosts lines for nodes 1..$1 (from scratch).
nodes_net_up() {
    local n=$1 i ns
    ip link add "$NODES_BRIDGE" type bridge || return 1
    ip addr add "$NODES_NET.1/24" dev "$NODES_BRIDGE" && ip link set "$NODES_BRIDGE" up || return 1
    mkdir -p "$NODES_NS"
    for i in $(seq "$n"); do
        ns=$NODES_PREFIX$i
        ip netns add "$ns" || return 1
        ip link add "ppulab-v$i" type veth peer name eth0 netns "$ns" || return 1
        ip link set "ppulab-v$i" master "$NODES_BRIDGE" up || return 1
        ip -n "$ns" addr add "$(nodes_addr "$i")/24" dev eth0 || return 1
        ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up || return 1
        touch "$NODES_NS/uts-$ns" "$NODES_NS/ipc-$ns" || return 1
        unshare --uts="$NODES_NS/uts-$ns" hostname "$ns" && unshare --ipc="$NODES_NS/ipc-$ns" true || return 1
        echo "$(nodes_addr "$i") $ns $NODES_MARK" >>/etc/hosts
    done
}

# One node's link down or up (the node-loss test): nodes_link i down|up.
nodes_link() { ip link set "ppulab-v$1" "$2"; }

# Stop everything nodes_net_up and the daemons made; safe when any part is missing.
nodes_down() {
    local i p ns pids
    if [ -s "$NODES_DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$NODES_DIR/run/slurmctld.pid")" 2>/dev/null; then
        timeout 10 scancel --full --quiet -u root 2>/dev/null
    fi
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NODES_PREFIX[0-9]*$"); do
        # slurmd, slurmstepd and the job's processes: everything that runs in the node's namespace
        pids=$(ip netns pids "$ns" 2>/dev/null)
        [ -n "$pids" ] && kill -TERM $pids 2>/dev/null
    done
    for p in "$NODES_DIR"/run/*.pid; do
        [ -s "$p" ] && kill -TERM "$(cat "$p")" 2>/dev/null
    done
    local k
    for k in $(seq 50); do
        pids=""
        for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NODES_PREFIX[0-9]*$"); do
            pids="$pids $(ip netns pids "$ns" 2>/dev/null)"
        done
        for p in "$NODES_DIR"/run/*.pid; do [ -s "$p" ] && pids="$pids $(cat "$p")"; done
        pids=$(live $pids)
        [ -z "$pids" ] && break
        [ "$k" = 30 ] && kill -KILL $pids 2>/dev/null
        sleep 0.1
    done
    rm -f "$NODES_DIR"/run/*.pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NODES_PREFIX[0-9]*$"); do
        i=${ns#"$NODES_PREFIX"}
        ip link del "ppulab-v$i" 2>/dev/null   # deletes the pair, eth0 inside too
        ip netns del "$ns"
    done
    ip link show "$NODES_BRIDGE" >/dev/null 2>&1 && ip link del "$NODES_BRIDGE"
    if [ -d "$NODES_NS" ]; then
        for p in "$NODES_NS"/*; do [ -e "$p" ] && { umount "$p" 2>/dev/null; rm -f "$p"; }; done
        rmdir "$NODES_NS" 2>/dev/null
    fi
    if grep -qF "$NODES_MARK" /etc/hosts; then  # rewrite in place: /etc/hosts may be a bind mount
        local kept; kept=$(grep -vF "$NODES_MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
    rm -rf "$NODES_DIR/ctld" "$NODES_DIR/spool"   # no jobs or node states carried into the next start
    # /etc/slurm/slurm.conf pointed at this cluster: back to the one-node one (or none).
    if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$NODES_DIR/slurm.conf" ]; then
        if [ -f "$STATE/slurm.conf" ]; then ln -sfn "$STATE/slurm.conf" /etc/slurm/slurm.conf
        else rm -f /etc/slurm/slurm.conf; fi
    fi
    return 0
}

# Is the node cluster's controller running (started by setup.sh --nodes)?
nodes_ctld_alive() { [ -s "$NODES_DIR/run/slurmctld.pid" ] && [ -n "$(live "$(cat "$NODES_DIR/run/slurmctld.pid")")" ]; }

nodes_kill_all() {  # i: SIGKILL every process in node i's namespaces, wait until they are gone
    local ns=$NODES_PREFIX$1 pids k
    for k in $(seq 50); do
        pids=$(live $(ip netns pids "$ns" 2>/dev/null))
        [ -z "$pids" ] && return 0
        kill -KILL $pids 2>/dev/null
        sleep 0.1
    done
    echo "nodes.sh: processes still in $ns: $pids" >&2; return 1
}

nodes_revive() {  # i: a clean "reboot" of node i, back to idle within PPU_LAB_SLURM_WAIT s
    local i=$1 name=$NODES_PREFIX$1 k state
    nodes_kill_all "$i" || return 1
    nodes_link "$i" up || return 1
    nodes_in "$i" slurmd -N "$name" >>"$NODES_DIR/log/slurmd-$name.out" 2>&1 || return 1
    for k in $(seq $(( ${PPU_LAB_SLURM_WAIT:-60} * 4 ))); do
        state=$(timeout 5 sinfo -h -n "$name" -o %T 2>/dev/null)
        [ "$state" = idle ] && return 0
        case $state in down*|drain*|fail*) [ $((k % 8)) = 1 ] && scontrol update nodename="$name" state=resume 2>/dev/null ;; esac
        sleep 0.25
    done
    echo "nodes.sh: $name not idle after ${PPU_LAB_SLURM_WAIT:-60} s (state '$state')" >&2; return 1
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced
    set -uo pipefail
    case "${1:-} ${2:-}" in
        "cut "[1-8]) ip link show "ppulab-v$2" >/dev/null && nodes_link "$2" down ;;
        "crash "[1-8]) ip netns pids "$NODES_PREFIX$2" >/dev/null && nodes_kill_all "$2" ;;
        "revive "[1-8]) ip link show "ppulab-v$2" >/dev/null && nodes_revive "$2" ;;
        *) echo "usage: $0 cut|crash|revive NODE   (NODE: 1..8, a node of setup.sh --nodes)" >&2; exit 2 ;;
    esac
fi
