"""Stop cleanly on a signal: Slurm's warning before the time limit, scancel, preemption.

The handler only sets a flag; at the end of every step the ranks agree (max over all ranks) so
that all of them stop after the same step, even when only one of them got the signal. The
checkpoint callback then saves and the launcher exits with EXIT_REQUEUE (a USR signal: come back)
or EXIT_STOPPED (TERM, INT: stay stopped), so that the sbatch templates requeue only the former.

Which signal tells what comes next (`wants_requeue`):
    SIGUSR1, SIGUSR2  "save and come back": the warning before the time limit (the sbatch
                      templates' `--signal=B:USR1@...`, forwarded to every task; the Hydra Slurm
                      launcher's `--signal=USR2@signal_delay_s`, sent to every task). Whoever
                      started the step requeues the job after the exit (slurm/lib.sh, or
                      launch/train.py under hydra/launcher=slurm).
    SIGTERM, SIGINT   "save and go": scancel, the time limit itself, a preemption, `scontrol
                      requeue`, a node drain (after which Slurm itself requeues the job when the
                      cluster is set up to), or Ctrl-C in a terminal.
Slurm signals every process of the step, DataLoader workers included: the workers ignore the stop
signals (pretrain.data.loader), the trainer saves and then ends them. A signal to any one process
of any one rank is enough: the ranks agree at the end of every step.
A signal may come more than once (torchrun forwarding what Slurm also sent, a second scancel):
the flag only remembers the strongest one, and once the stop is under way the signals are ignored
until the process exits, so that no rank dies by a signal between its save and its exit code.
A signal that lands at the last step stops nothing: the run is complete, and exits 0.
"""

from __future__ import annotations

import logging
import signal
from typing import Optional

from pretrain.reasons import EXIT_REQUEUE, EXIT_STOPPED, StopReason
from pretrain.trainer import Callback, StepOutput, Trainer

log = logging.getLogger("pretrain")

__all__ = ["EXIT_REQUEUE", "EXIT_STOPPED", "PreemptionCallback", "exit_code", "stop_for_signal",
           "wants_requeue"]
# Weakest first: the ranks agree on the strongest signal any of them got (a cancel after a warning
# is a cancel), by its position here.
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def stop_for_signal(name: str) -> StopReason:
    """The stop a signal asks for: USR1/USR2 come back (requeue), TERM/INT stay stopped."""
    return StopReason.signal(name, requeue=name in {s.name for s in REQUEUE_SIGNALS})


def exit_code(stop_reason: Optional[StopReason]) -> int:
    """The process's exit status after a run that stopped for `stop_reason` (None: finished)."""
    return stop_reason.exit_code if stop_reason is not None else 0


def wants_requeue(stop_reason: Optional[StopReason]) -> bool:
    """True when the run stopped for a signal that asks to continue later (see the module doc)."""
    return stop_reason is not None and stop_reason.requeue


class PreemptionCallback(Callback):
    name = "preemption"

    def __init__(self):
        self.received = 0  # 1 + the position in SIGNALS of the strongest signal received, 0: none
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.received = max(self.received, 1 + SIGNALS.index(signum))

    def on_train_start(self, trainer: Trainer) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        agreed = int(trainer.dist.all_reduce_max(float(self.received)))
        if not agreed or trainer.stop_reason is not None:
            return
        name = SIGNALS[agreed - 1].name
        if trainer.state.step >= trainer.max_steps:
            if trainer.dist.is_main:
                log.info("%s received at the last step: the run is complete", name)
            return
        if trainer.dist.is_main:
            log.warning("%s received: saving at step %d and stopping", name, trainer.state.step)
        trainer.request_stop(stop_for_signal(name))

    def on_train_end(self, trainer: Trainer) -> None:
        for sig, prev in self._previous.items():
            # After a stop, ignore the signals until the process exits: a late copy, or the
            # SIGTERM with which srun --kill-on-bad-exit ends the step once the first rank has
            # exited, must not turn this rank's exit status into a death by signal. SIG_IGN, not a
            # Python handler: the interpreter resets those to the default while it shuts down.
            signal.signal(sig, signal.SIG_IGN if self.received else prev)
        self._previous.clear()
