#!/usr/bin/env bash
# Start a one-node Slurm on THIS machine, for the lab's Slurm tests (tests/test_slurm.py).
#
#   sudo scripts/slurm/setup.sh        # install (if missing), configure, start; prints the time taken
#   sudo scripts/slurm/setup.sh --nodes 2   # instead: 2 nodes, each in its own network namespace
#   scripts/slurm/teardown.sh          # stop it again (either kind; namespaces and links too)
#
# What it does, in order (every step is skipped when already done, so re-running is safe):
#   1. When slurmctld/slurmd/munged are missing: apt-get install slurm-wlm munge (root only).
#   2. Writes $PPU_LAB_SLURM_DIR/slurm.conf for one node: this hostname, `nproc` CPUs, 95% of
#      MemTotal, SlurmUser=root, select/cons_tres, one partition "debug"; state, spool, logs
#      and pid files all live under $PPU_LAB_SLURM_DIR (default /var/tmp/ppu-lab-slurm).
#      /etc/slurm/slurm.conf becomes a symlink to it (never overwritten if it is someone else's).
#   3. Starts munged, slurmctld, slurmd (unless already running) and waits (bounded) until
#      `sinfo` shows the node idle.
# With --nodes N (2..8; for tests/test_slurm_nodes.py): N nodes, each a network namespace with its
# own address and hostname on a bridge (scripts/slurm/nodes.sh), nproc/N CPUs and 95% of MemTotal/N
# each, files under $PPU_LAB_SLURM_DIR/nodes; slurmctld on the host, one slurmd per namespace, the
# one munged. Whatever an earlier (crashed) run left is removed first; a failed start removes all
# it built.
#
# Exit codes (distinct, so `make test` can report why the Slurm tests are skipped):
#   0 Slurm is up       10 not root and Slurm missing/not running   11 no apt-get / install failed
#   12 a daemon failed to start   13 node not idle in time   14 a foreign /etc/slurm/slurm.conf exists
#   15 the other kind of test Slurm (one node / N nodes) is running   16 no network namespaces here
#   17 bad arguments
# This is a TEST fixture, not a way to run a real cluster: use your site's Slurm there.
set -uo pipefail

STATE="${PPU_LAB_SLURM_DIR:-/var/tmp/ppu-lab-slurm}"
WAIT_S="${PPU_LAB_SLURM_WAIT:-60}"
MARK="# written by ppu-lab scripts/slurm/setup.sh"
t0=$(date +%s.%N)

say() { echo "slurm-setup: $*"; }
die() { local code=$1; shift; echo "slurm-setup: cannot start Slurm: $*" >&2; exit "$code"; }
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
               && command -v munged >/dev/null && command -v sinfo >/dev/null; }

NODES=1
while [ $# -gt 0 ]; do
    case $1 in
        --nodes) NODES=${2:-}; shift; [ $# -gt 0 ] && shift ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) die 17 "unknown argument '$1' (usage: setup.sh [--nodes N])" ;;
    esac
done
case $NODES in [1-8]) ;; *) die 17 "--nodes must be 1..8; got '$NODES'" ;; esac
# shellcheck source=nodes.sh
. "$(dirname "$0")/nodes.sh"
idle_nodes() { timeout 5 sinfo -h -N -o %T 2>/dev/null | grep -c '^idle$'; }

# 0. Already up and idle (someone else's or ours)? Nothing to do.
# (bounded: with no controller, sinfo retries for ~10 s before failing)
if [ "$NODES" = 1 ]; then
    nodes_ctld_alive && die 15 "a multi-node test Slurm (setup.sh --nodes) is running: scripts/slurm/teardown.sh first"
    if command -v sinfo >/dev/null && { alive "$STATE/run/slurmctld.pid" || pgrep -x slurmctld >/dev/null 2>&1; } \
       && [ "$(timeout 3 sinfo -h -o %T 2>/dev/null | head -1)" = idle ]; then
        say "Slurm already up (node idle); nothing to do [$(elapsed) s]"
        exit 0
    fi
elif nodes_ctld_alive; then
    if [ "$(idle_nodes)" = "$NODES" ]; then say "Slurm already up ($NODES nodes idle); nothing to do [$(elapsed) s]"; exit 0; fi
elif alive "$STATE/run/slurmctld.pid" || [ -n "$(live $(pgrep -x slurmctld))" ]; then  # (a zombie is no controller)
    die 15 "a slurmctld is running already (the one-node test Slurm?): scripts/slurm/teardown.sh first"
fi
[ "$(id -u)" = 0 ] || die 10 "not root (uid $(id -u)): installing and starting slurmctld/slurmd/munged needs root"

# 1. Install.
if ! have_slurm; then
    command -v apt-get >/dev/null || die 11 "slurm-wlm/munge not installed and no apt-get to install them"
    say "installing slurm-wlm and munge with apt-get ..."
    ti=$(date +%s)
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
              -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
              slurm-wlm munge; } >"${TMPDIR:-/tmp}/ppu-lab-slurm-apt.log" 2>&1; then
        tail -20 "${TMPDIR:-/tmp}/ppu-lab-slurm-apt.log" >&2
        die 11 "apt-get install slurm-wlm munge failed (log: ${TMPDIR:-/tmp}/ppu-lab-slurm-apt.log)"
    fi
    have_slurm || die 11 "apt-get installed slurm-wlm/munge but slurmctld/slurmd/munged/sinfo are not on PATH"
    say "installed in $(( $(date +%s) - ti )) s"
fi

# Steps shared by the one-node and the N-node set-up.
link_conf() {  # make /etc/slurm/slurm.conf a symlink to $1 (never replacing someone else's)
    mkdir -p /etc/slurm
    if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ] \
       || head -1 /etc/slurm/slurm.conf | grep -qF "$MARK"; then
        ln -sfn "$1" /etc/slurm/slurm.conf
    else
        die 14 "/etc/slurm/slurm.conf exists and was not written by this script; not touching a real Slurm set-up"
    fi
}

start_munge() {  # key (the Debian package makes one; create it if missing), then the daemon
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    mkdir -p "$STATE/log"
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --keyfile /etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    fi
    if id munge >/dev/null 2>&1; then
        chown -R munge: /etc/munge /var/lib/munge /var/log/munge /run/munge
        chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
        runuser -u munge -- munged >>"$STATE/log/munged.out" 2>&1 \
            || munged --force >>"$STATE/log/munged.out" 2>&1
    else
        chmod 0400 /etc/munge/munge.key
        munged --force >>"$STATE/log/munged.out" 2>&1
    fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 \
        || die 12 "munged did not start: $(tail -3 "$STATE/log/munged.out" 2>/dev/null)"
}

common_conf() {  # the slurm.conf lines both test clusters share
    cat <<'CONF'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=30
SlurmctldTimeout=30
CONF
}

LOG="$STATE/log"
start() {  # name pidfile [command ...] (default: the command is name); output in $LOG/name.out
    local name=$1 pid=$2; shift 2
    [ $# -gt 0 ] || set -- "$name"
    if alive "$pid"; then say "$name already running (pid $(cat "$pid"))"; return; fi
    "$@" >>"$LOG/$name.out" 2>&1 || die 12 "$name failed: $(tail -5 "$LOG/$name.out" "$LOG/$name.log" 2>/dev/null)"
    for _ in $(seq 50); do alive "$pid" && return; sleep 0.1; done
    die 12 "$name exited after start: $(tail -5 "$LOG/$name.log" 2>/dev/null)"
}

# slurm.conf for n nodes of c CPUs and m MB each, controller on the host's bridge address.
nodes_conf() {
    local n=$1 c=$2 m=$3 host=$4 i
    cat <<CONF
# $n nodes ($NODES_PREFIX[1-$n], $c CPUs and $m MB each), each a network namespace on this machine
# (scripts/slurm/nodes.sh); controller on the host ($host, $NODES_NET.1); for tests only.
ClusterName=ppulab
SlurmctldHost=$host($NODES_NET.1)
$(common_conf)
# A node that does not answer for SlurmdTimeout s is DOWN and its jobs end (NODE_FAIL); the
# node-loss tests' time bound is computed from these two and KillWait.
SlurmdTimeout=10
MessageTimeout=5
StateSaveLocation=$NODES_DIR/ctld
SlurmdSpoolDir=$NODES_DIR/spool/%n
SlurmctldPidFile=$NODES_DIR/run/slurmctld.pid
SlurmdPidFile=$NODES_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$NODES_DIR/log/slurmctld.log
SlurmdLogFile=$NODES_DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
CONF
    for i in $(seq "$n"); do
        echo "NodeName=$NODES_PREFIX$i NodeAddr=$(nodes_addr "$i") CPUs=$c RealMemory=$m State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$NODES_PREFIX[1-$n] Default=YES MaxTime=INFINITE State=UP"
}

# Steps 2-4 for N nodes (scripts/slurm/nodes.sh has the network part).
setup_nodes() {
    local why i cpus mem_mb
    why=$(nodes_unsupported)
    [ -z "$why" ] || die 16 "$why"
    nodes_down >/dev/null 2>&1  # whatever an earlier run left behind
    trap 'code=$?; if [ $code != 0 ]; then say "start failed: removing the namespaces and daemons"; nodes_down >/dev/null 2>&1; fi' EXIT
    mkdir -p "$NODES_DIR"/{ctld,spool,log,run}
    nodes_net_up "$NODES" >"$NODES_DIR/log/net.out" 2>&1 \
        || die 16 "could not build the node namespaces: $(tail -3 "$NODES_DIR/log/net.out")"
    cpus=$(( $(nproc) / NODES )); [ "$cpus" -ge 1 ] || cpus=1
    mem_mb=$(awk -v n="$NODES" '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95 / n}' /proc/meminfo)
    { echo "$MARK"; nodes_conf "$NODES" "$cpus" "$mem_mb" "$(hostname -s)"; } >"$NODES_DIR/slurm.conf"
    link_conf "$NODES_DIR/slurm.conf"
    start_munge
    LOG="$NODES_DIR/log"
    start slurmctld "$NODES_DIR/run/slurmctld.pid"
    for i in $(seq "$NODES"); do
        start "slurmd-$NODES_PREFIX$i" "$NODES_DIR/run/slurmd-$NODES_PREFIX$i.pid" nodes_in "$i" slurmd -N "$NODES_PREFIX$i"
    done
    for i in $(seq $(( WAIT_S * 2 ))); do
        if [ "$(idle_nodes)" = "$NODES" ]; then
            say "Slurm up: $NODES nodes $NODES_PREFIX[1-$NODES] idle ($NODES_NET.11-$((10 + NODES)) on bridge" \
                "$NODES_BRIDGE, host $NODES_NET.1), $cpus CPUs and $mem_mb MB each, partition debug [$(elapsed) s]"
            return 0
        fi
        sleep 0.5
    done
    die 13 "not all $NODES nodes idle after ${WAIT_S} s: $(timeout 5 sinfo -h -N -o '%N %T %E' | tr '\n' ';'); logs in $LOG"
}

[ "$NODES" = 1 ] || { setup_nodes; exit $?; }

# 2. Configure.
mkdir -p "$STATE"/{ctld,spool,log,run}
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
conf="$STATE/slurm.conf"
cat >"$conf.new" <<CONF
$MARK
# One node ($host, $cpus CPUs, $mem_mb MB), root runs everything; for tests only.
ClusterName=ppulab
SlurmctldHost=$host
$(common_conf)
SlurmdTimeout=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
mv "$conf.new" "$conf"
link_conf "$conf"

# 3a. munge
start_munge

# 3b. slurmctld and slurmd.
start slurmctld "$STATE/run/slurmctld.pid"
start slurmd "$STATE/run/slurmd.pid"

# 4. Wait until the node is idle (resume it if an earlier run left it down/drained).
state=""
for i in $(seq $(( WAIT_S * 2 ))); do
    state=$(timeout 5 sinfo -h -n "$host" -o %T 2>/dev/null | head -1)
    case "$state" in
        idle) say "Slurm up: node $host idle, $cpus CPUs, ${mem_mb} MB, partition debug [$(elapsed) s]"; exit 0 ;;
        down*|drain*|fail*) [ $((i % 10)) = 1 ] && scontrol update nodename="$host" state=resume >/dev/null 2>&1 ;;
    esac
    sleep 0.5
done
die 13 "node $host not idle after ${WAIT_S} s (state '${state}'; reason: $(sinfo -h -R -o %E 2>/dev/null)); logs in $STATE/log"
