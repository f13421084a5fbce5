"""Why a step's update was discarded, and why a run stopped early: typed, not parsed from text.

Both print as the words the logs, metrics and tests have always shown ("loss_spike",
"signal SIGUSR1"), and SkipReason compares equal to those words.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

EXIT_REQUEUE = 3  # saved after SIGUSR1/SIGUSR2: requeue me
EXIT_STOPPED = 4  # saved after SIGTERM/SIGINT: stopped on purpose, do not requeue


class SkipReason(str, enum.Enum):
    """Why an optimizer update was discarded on every rank (pretrain.trainer)."""

    NONFINITE_LOSS = "nonfinite_loss"  # a callback's veto: the all-rank loss is NaN or inf
    LOSS_SPIKE = "loss_spike"  # a callback's veto: far above the recent losses
    NONFINITE_GRAD = "nonfinite_grad"  # DeepSpeed's own check: a NaN or inf gradient norm
    FP16_OVERFLOW = "fp16_overflow"  # fp16's loss scale finding its level (routine)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class StopReason:
    """Why the run stops before trainer.max_steps, and so what the launcher does next."""

    requeue: bool  # True: come back (the job is requeued); False: stay stopped
    cause: str  # what asked, e.g. "SIGUSR1"

    @classmethod
    def signal(cls, name: str, requeue: bool) -> "StopReason":
        return cls(requeue, name)

    @property
    def exit_code(self) -> int:
        return EXIT_REQUEUE if self.requeue else EXIT_STOPPED

    def __str__(self) -> str:
        return f"signal {self.cause}"
