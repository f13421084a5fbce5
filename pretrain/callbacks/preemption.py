"""Stop cleanly on SIGUSR1/SIGTERM (Slurm's warning before the time limit, scancel, preemption).

The handler only sets a flag; at the end of every step the ranks agree (max over all ranks) so
that all of them stop after the same step, even when only one of them got the signal. The
checkpoint callback then saves and the launcher exits with EXIT_REQUEUE so the sbatch script
requeues the job.
"""

from __future__ import annotations

import logging
import signal

from pretrain.trainer import Callback, StepOutput, Trainer

log = logging.getLogger("pretrain")

EXIT_REQUEUE = 3
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionCallback(Callback):
    name = "preemption"

    def __init__(self):
        self.received = 0
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer: Trainer) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        agreed = int(trainer.dist.all_reduce_max(float(self.received)))
        if agreed:
            if trainer.dist.is_main:
                log.warning("signal %s received: saving at step %d and stopping",
                            signal.Signals(agreed).name, trainer.state.step)
            trainer.request_stop(f"signal {signal.Signals(agreed).name}")

    def on_train_end(self, trainer: Trainer) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
