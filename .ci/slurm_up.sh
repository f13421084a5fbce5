#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine, for the tests under tests/slurm.
#
# Run as root on a Debian/Ubuntu machine without systemd (a CI container). Idempotent: a second run
# finds the daemons alive with the same config and returns at once. Steps:
#   1. apt-get install slurm-wlm + munge when `sbatch` is missing (about 10-20 s);
#   2. write /etc/slurm/slurm.conf: one node = this host, its real CPUs and memory, one partition
#      `debug` that lets jobs share CPUs (OverSubscribe=FORCE) so that tests run beside each other;
#   3. start munged (as user munge), slurmctld and slurmd by hand, record their PIDs in $PIDFILE;
#   4. wait until `sinfo` shows the node usable (at most $SLURM_UP_TIMEOUT s), else print the logs.
# .ci/slurm_down.sh stops what this started.
set -euo pipefail

PIDFILE=/run/pretrain-slurm.pids
CONF=/etc/slurm/slurm.conf
STATE=/var/lib/slurm
LOGS=/var/log/slurm
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
NODE=$(hostname -s)

log() { echo "slurm_up: $*" >&2; }
die() { log "$*"; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons)"

install_packages() {
    local pkgs=(slurm-wlm munge)
    export DEBIAN_FRONTEND=noninteractive
    # Package lists can be stale on a fresh image: update only when the plain install fails.
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null; }
}

write_conf() {
    local cpus mem_mb real_mb
    cpus=$(nproc)
    mem_mb=$(free -m | awk '/^Mem:/ {print $2}')
    # slurmd refuses a node whose RealMemory exceeds what it measures; leave 5% slack.
    real_mb=$(( mem_mb * 95 / 100 ))
    mkdir -p /etc/slurm
    cat >"$CONF.new" <<EOF
# Written by .ci/slurm_up.sh: a one-node test cluster. Edits are overwritten on the next run.
ClusterName=pretrain-ci
SlurmctldHost=$NODE
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd, no cgroup delegation in a container: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# CR_CPU: a task takes CPUs, not whole cores, and memory is not a consumable (no --mem needed).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# No slurmdbd here: accounting and job completion records are off (sacct does not work).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# Jobs may be requeued (scontrol requeue, or the sbatch templates after a checkpointed stop).
JobRequeue=1
# Between SIGTERM and SIGKILL at the end of a job: time for a checkpoint to finish.
KillWait=30
# A finished job stays visible to scontrol for this many seconds (no sacct without slurmdbd).
MinJobAge=60
ReturnToService=2
InactiveLimit=0
SlurmdTimeout=300
NodeName=$NODE CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
# OverSubscribe=FORCE:4: up to 4 jobs share each CPU, so tests that run at the same time on a
# 2-core machine do not queue behind each other. A single job still gets at most nproc tasks unless
# it asks for --overcommit.
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

# Alive and not a zombie: PID 1 in a container may never reap the daemons' exited processes.
alive() {
    local _pid _comm state
    [[ -n ${1:-} && -r /proc/$1/stat ]] || return 1
    read -r _pid _comm state _ <"/proc/$1/stat" 2>/dev/null || return 1
    [[ $state != Z ]]
}
pid_of() { if [[ -s $1 ]]; then cat "$1"; fi; }

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true; }

all_alive() {
    [[ -s $PIDFILE ]] || return 1
    local name pid
    while read -r name pid; do alive "$pid" || return 1; done <"$PIDFILE"
}

start_munge() {
    local key=/etc/munge/munge.key
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s $key ]]; then
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$key"
    chmod 0400 "$key"
    local pid
    pid=$(pid_of /run/munge/munged.pid)
    if ! alive "$pid"; then
        runuser -u munge -- /usr/sbin/munged
        pid=$(pid_of /run/munge/munged.pid)
    fi
    munge -n | unmunge >/dev/null || die "munge does not work: see /var/log/munge/munged.log"
    echo "munged $pid"
}

start_daemon() {  # name pidfile
    local name=$1 pidfile=$2 pid
    pid=$(pid_of "$pidfile")
    if ! alive "$pid"; then
        "/usr/sbin/$name"
        for _ in $(seq 50); do pid=$(pid_of "$pidfile"); alive "$pid" && break; sleep 0.1; done
        alive "$pid" || { print_logs; die "$name did not start"; }
    fi
    echo "$name $pid"
}

print_logs() {
    local f
    for f in "$LOGS/slurmctld.log" "$LOGS/slurmd.log" /var/log/munge/munged.log; do
        [[ -f $f ]] && { log "---- last lines of $f"; tail -n 30 "$f" >&2; }
    done
    return 0
}

wait_usable() {
    local state deadline=$((SECONDS + TIMEOUT))
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
            idle|mixed|allocated|completing) log "node $NODE is $state"; return 0 ;;
            down*|drain*|fail*)
                # Left down by an earlier run (e.g. "Node unexpectedly rebooted"): put it back.
                scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    log "node $NODE not usable after ${TIMEOUT}s (state: '${state:-none}')"
    sinfo -N -l >&2 || true
    print_logs
    return 1
}

main() {
    local t0=$SECONDS
    if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        log "installing slurm-wlm and munge"
        install_packages || die "apt-get install slurm-wlm munge failed"
    fi
    id slurm >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin slurm
    write_conf
    if all_alive && cmp -s "$CONF" "$CONF.new" && wait_usable; then
        rm -f "$CONF.new"
        log "already running ($(paste -sd' ' "$PIDFILE"))"
        return 0
    fi
    # A changed config or a dead daemon: restart Slurm's daemons (munged can stay).
    if [[ -s $PIDFILE ]]; then "$(dirname "$0")/slurm_down.sh" --keep-munge; fi
    mv "$CONF.new" "$CONF"
    install -d -o slurm -g slurm -m 0755 "$STATE" "$STATE/slurmctld" "$STATE/slurmd" "$LOGS" /run/slurm
    {
        start_munge
        start_daemon slurmctld /run/slurm/slurmctld.pid
        start_daemon slurmd /run/slurm/slurmd.pid
    } >"$PIDFILE.new"
    mv "$PIDFILE.new" "$PIDFILE"
    wait_usable || exit 1
    log "up in $((SECONDS - t0))s: $(paste -sd' ' "$PIDFILE")"
}

main "$@"
