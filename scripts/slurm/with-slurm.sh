#!/usr/bin/env bash
# Run a command (the test suite) with a one-node Slurm up, and stop Slurm afterwards, even on failure.
#
#   scripts/slurm/with-slurm.sh python -m pytest tests ...
#   scripts/slurm/with-slurm.sh --nodes 2 python -m pytest tests/test_slurm_nodes.py   # 2 nodes (namespaces)
#
# Sets PPU_LAB_SLURM for the command, which tests/test_slurm.py reads:
#   PPU_LAB_SLURM=1            Slurm is up: the Slurm tests must run (they FAIL if Slurm is unusable)
#   PPU_LAB_SLURM=skip:REASON  setup.sh could not start it (not root, no apt, ...): they are SKIPPED, with REASON
# Set PPU_LAB_SLURM=0 beforehand to not start Slurm at all (the tests then skip, saying so).
# With --nodes N it also sets PPU_LAB_SLURM_NODES=N (tests/test_slurm_nodes.py reads it).
# Slurm is stopped at the end only if this script started it (a Slurm that was already running stays).
here="$(cd "$(dirname "$0")" && pwd)"
nodes=1
if [ "${1:-}" = --nodes ]; then nodes=$2; shift 2; fi
export PPU_LAB_SLURM_NODES=$nodes
if [ "${PPU_LAB_SLURM:-}" = 0 ]; then
    export PPU_LAB_SLURM="skip:PPU_LAB_SLURM=0 was set (Slurm set-up turned off)"
    exec "$@"
fi
STATE="${PPU_LAB_SLURM_DIR:-/var/tmp/ppu-lab-slurm}"
[ "$nodes" = 1 ] || STATE="$STATE/nodes"
was_up=0
[ -s "$STATE/run/slurmctld.pid" ] && kill -0 "$(cat "$STATE/run/slurmctld.pid")" 2>/dev/null && was_up=1
t0=$(date +%s)
out=$("$here/setup.sh" --nodes "$nodes" 2>&1); code=$?
echo "$out"
if [ $code = 0 ]; then
    export PPU_LAB_SLURM=1
    echo "with-slurm: Slurm set-up took $(( $(date +%s) - t0 )) s"
    [ $was_up = 1 ] || trap '"$here/teardown.sh"' EXIT
else
    reason=$(echo "$out" | grep 'cannot start Slurm' | tail -1 | sed 's/^slurm-setup: cannot start Slurm: //')
    export PPU_LAB_SLURM="skip:setup.sh exit $code: ${reason:-see its output above}"
    echo "with-slurm: Slurm tests will be skipped ($PPU_LAB_SLURM)"
    "$here/teardown.sh" >/dev/null 2>&1
fi
"$@"
