#!/usr/bin/env bash
# Stop the daemons .ci/slurm_up.sh started (by the PIDs it recorded), slurmd first, munged last.
# --keep-munge: leave munged running (slurm_up.sh uses it to restart Slurm after a config change).
# Jobs still running are left to their slurmstepd; the installed packages and state stay.
set -euo pipefail

PIDFILE=/run/pretrain-slurm.pids
keep_munge=0
[[ ${1:-} == --keep-munge ]] && keep_munge=1

[[ -s $PIDFILE ]] || { echo "slurm_down: nothing recorded in $PIDFILE" >&2; exit 0; }

# Alive and not a zombie: PID 1 in a container may never reap the daemons' exited processes.
alive() {
    local _pid _comm state
    [[ -r /proc/$1/stat ]] || return 1
    read -r _pid _comm state _ <"/proc/$1/stat" 2>/dev/null || return 1
    [[ $state != Z ]]
}

stop() {  # name pid
    local name=$1 pid=$2
    alive "$pid" || return 0
    kill -TERM "$pid"
    for _ in $(seq 100); do alive "$pid" || return 0; sleep 0.1; done
    echo "slurm_down: $name ($pid) ignored SIGTERM for 10 s: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

kept=""
for name in slurmd slurmctld munged; do
    pid=$(awk -v n="$name" '$1 == n {print $2}' "$PIDFILE")
    [[ -n $pid ]] || continue
    if [[ $name == munged && $keep_munge == 1 ]]; then kept="munged $pid"; continue; fi
    stop "$name" "$pid"
done

if [[ -n $kept ]]; then echo "$kept" >"$PIDFILE"; else rm -f "$PIDFILE"; fi
