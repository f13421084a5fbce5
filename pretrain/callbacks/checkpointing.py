"""Save on a schedule (steps and wall-clock minutes), when the run is asked to stop, and at the end.

With trainer.async_save the scheduled saves are background saves (pretrain.checkpoint): the loop
is blocked only while the state is staged; at every later step end the ranks agree whether every
writer is done, and the save is committed then. The save at a stop (a signal) and at the last
step is synchronous, after the one in flight is finished and committed. Each committed save is
logged (rank 0, metrics.jsonl and W&B): checkpoint_step, checkpoint_block_s (the loop blocked by
it, including any wait for the save before it), checkpoint_write_s (writing its files: in the
background, or the whole synchronous save), checkpoint_wait_s.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from pretrain.callbacks.metrics import WANDB_NAMES
from pretrain.checkpoint import Checkpointer
from pretrain.client_state import ClientState
from pretrain.trainer import Callback, StepOutput, Trainer

log = logging.getLogger("pretrain")


class CheckpointCallback(Callback):
    name = "checkpoint"

    def __init__(self, checkpointer: Checkpointer, every_steps: int, every_minutes: float,
                 client_state: Callable[[Trainer], ClientState], extra_files: Dict[str, Path],
                 background: bool = False, tracker=None):
        self.checkpointer = checkpointer
        self.background = background  # scheduled saves are written in the background
        self.tracker = tracker  # pretrain.tracking.Tracker: one record per committed save
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
        final = trainer.stop_reason is not None or step >= trainer.max_steps
        self.checkpointer.poll()  # collective while a save is in flight: committed once all are done
        if due or final:
            self.save(trainer, background=self.background and not final)
        self._report(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self.checkpointer.finish()
        if self.last_saved_step != trainer.state.step:
            self.save(trainer)
        self._report(trainer)
        self.checkpointer.close()

    def save(self, trainer: Trainer, background: bool = False) -> Optional[Path]:
        path = self.checkpointer.save(trainer.module, trainer.state.step, self.client_state(trainer),
                                      self.extra_files, background=background)
        self.last_saved_step = trainer.state.step
        self._last_time = time.monotonic()
        return path

    def _report(self, trainer: Trainer) -> None:
        """Log the saves committed since the last call (by a save, a poll, a finish or a load)."""
        reports = self.checkpointer.take_reports()
        if not trainer.dist.is_main:
            return
        for r in reports:
            how = (f"the loop blocked {r.block_seconds:.2f}s (waiting {r.wait_seconds:.2f}s for "
                   f"the save before), written in the background in {r.write_seconds:.2f}s"
                   if r.background else f"in {r.block_seconds:.1f}s")
            log.info("saved checkpoint %s %s", r.path, how)
            if self.tracker is not None:
                self.tracker.log({"step": trainer.state.step,
                                  "tokens_seen": trainer.state.tokens_seen,
                                  "checkpoint_step": r.step, "checkpoint_block_s": r.block_seconds,
                                  "checkpoint_write_s": r.write_seconds,
                                  "checkpoint_wait_s": r.wait_seconds}, WANDB_NAMES)
