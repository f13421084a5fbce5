"""Save on a schedule (steps and wall-clock minutes), when the run is asked to stop, and at the end."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from pretrain.checkpoint import Checkpointer
from pretrain.client_state import ClientState
from pretrain.trainer import Callback, StepOutput, Trainer

log = logging.getLogger("pretrain")


class CheckpointCallback(Callback):
    name = "checkpoint"

    def __init__(self, checkpointer: Checkpointer, every_steps: int, every_minutes: float,
                 client_state: Callable[[Trainer], ClientState], extra_files: Dict[str, Path]):
        self.checkpointer = checkpointer
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.client_state = client_state
        self.extra_files = extra_files
        self.last_saved_step: Optional[int] = None
        self._last_time = time.monotonic()

    def on_train_start(self, trainer: Trainer) -> None:
        self._last_time = time.monotonic()
        # A resumed run already has a checkpoint at its starting step.
        self.last_saved_step = trainer.state.step if trainer.state.step > 0 else None

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        step = trainer.state.step
        due = bool(self.every_steps) and step % self.every_steps == 0
        if self.every_minutes:
            # Rank 0's clock decides, so that every rank saves at the same step.
            elapsed = time.monotonic() - self._last_time
            due = due or trainer.dist.broadcast_object(elapsed >= 60 * self.every_minutes)
        if due or trainer.stop_reason is not None:
            self.save(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.last_saved_step != trainer.state.step:
            self.save(trainer)

    def save(self, trainer: Trainer) -> Path:
        t0 = time.perf_counter()
        path = self.checkpointer.save(trainer.module, trainer.state.step, self.client_state(trainer),
                                      self.extra_files)
        self.last_saved_step = trainer.state.step
        self._last_time = time.monotonic()
        if trainer.dist.is_main:
            log.info("saved checkpoint %s in %.1fs", path, time.perf_counter() - t0)
        return path
