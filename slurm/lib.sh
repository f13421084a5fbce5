# Shared by the sbatch templates in this folder (sourced, not run): run the training step so that a
# job near its time limit checkpoints, stops and requeues itself.
#
# The protocol, end to end:
#   1. `#SBATCH --signal=B:USR1@300` makes Slurm send SIGUSR1 to the batch shell (only: B:) 300 s
#      before the time limit. `scancel --signal=USR1 --batch JOBID` does the same by hand.
#   2. The batch shell forwards it to the `srun` step (`kill -USR1 <srun pid>`); srun forwards it to
#      every task on every node. (bash runs a trap only between commands, so srun runs in the
#      background and the shell sits in `wait`.)
#   3. Each training process catches SIGUSR1, saves a checkpoint and exits with PRETRAIN_STOP_EXIT
#      (3). The first rank to exit makes srun (--kill-on-bad-exit) SIGTERM the others; they ignore
#      signals once stopping, so they exit 3 too and srun returns 3.
#   4. The batch shell sees 3 (or, under torchrun, which hides its workers' codes, any failure after
#      it forwarded a stop) and runs `scontrol requeue $SLURM_JOB_ID`, at most MAX_REQUEUES times in
#      all (SLURM_RESTART_COUNT counts every requeue, Slurm's own included). The job keeps its id,
#      so run.dir stays the same and the training resumes from its latest checkpoint there.
#      Slurm holds a requeued job about 2 minutes (Reason=BeginTime) before it is eligible again.
# A SIGTERM to the batch shell (scancel, preemption, the time limit itself) also reaches every task
# from Slurm directly; the shell then waits for the step and does not requeue: a cancel means stop,
# and a preempted job is requeued by Slurm when the cluster is configured so. A SIGTERM (or SIGINT)
# to the tasks alone (`scancel --signal=TERM JOBID`) makes them save and exit 4 (saved, stopped on
# purpose): not requeued either.

PRETRAIN_STOP_EXIT=3

_pretrain_log() { echo "[$(date '+%F %T')] batch $SLURM_JOB_ID: $*"; }

# pretrain_run_step CMD...: run CMD (an `srun ...` line) as the job's step, forward SIGUSR1 to it,
# then exit the batch script: requeued after a checkpointed stop, else with the step's status.
pretrain_run_step() {
    local pid="" rc stop_requested=0 terminating=0 trapped=0
    trap 'trapped=1; stop_requested=1; _pretrain_log "SIGUSR1: asking the training to checkpoint and stop"; [[ -z $pid ]] || kill -USR1 "$pid" 2>/dev/null || true' USR1
    trap 'trapped=1; terminating=1; _pretrain_log "SIGTERM: the job is ending; waiting for the step"' TERM
    _pretrain_log "restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}: $*"
    "$@" &
    pid=$!
    while :; do
        trapped=0 rc=0
        wait "$pid" || rc=$?
        # A trapped signal interrupts `wait` with a status > 128 while the step runs on.
        if ((trapped && rc > 128)); then
            kill -0 "$pid" 2>/dev/null && continue
            rc=0; wait "$pid" || rc=$?
        fi
        break
    done
    trap '' TERM  # `scontrol requeue` below sends us SIGTERM: finish this function first
    trap - USR1
    _pretrain_log "step exited with $rc"
    local stopped=0
    ((rc == PRETRAIN_STOP_EXIT)) && stopped=1
    ((stop_requested && rc != 0)) && stopped=1
    if ((stopped && !terminating)); then
        local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-20}
        if ((restarts < max)); then
            _pretrain_log "stopped after a checkpoint: requeue $((restarts + 1)) of at most $max"
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            _pretrain_log "scontrol requeue failed: is the job --requeue and JobRequeue allowed?"
        else
            _pretrain_log "stopped after a checkpoint, but already requeued $restarts times (MAX_REQUEUES=$max): not again"
        fi
    fi
    exit "$rc"
}
