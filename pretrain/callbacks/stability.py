"""Bad steps: skip a non-finite or spiking loss, and after a streak of them roll back or stop.

Every decision here is taken on the loss averaged over all ranks, which every rank holds bit for
bit (pretrain.trainer), so every rank skips, rolls back or stops at the same step without a
further collective.

Rollback: after `max_bad_steps` skipped steps in a row, load the newest intact checkpoint saved
before the streak began (model, optimizer, LR schedule, RNG, trainer counters) and carry on from
there with the data position where it is now: the samples read since that checkpoint, the ones
that led to the streak among them, are not trained on. skipped_steps keeps counting across it.
This callback runs before the checkpoint callback, so a checkpoint holds the window of losses up
to its own step, and the rolled-back state is saved again at once when a save is due at that step.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path
from typing import Any, Dict, Optional

from pretrain.checkpoint import Checkpointer, damaged, committed, step_of
from pretrain.config import StabilityConfig
from pretrain.errors import PretrainError
from pretrain.reasons import SkipReason
from pretrain.trainer import Callback, StepOutput, Trainer

log = logging.getLogger("pretrain")


class TrainingUnstableError(PretrainError):
    """Too many consecutive bad steps, and no (further) rollback allowed or possible."""


class SpikeDetector:
    """loss > mean + k * std of the last `window` good losses, once the window is full."""

    def __init__(self, k: float, window: int, warmup: int):
        self.k = k
        self.warmup = warmup
        self.losses: deque = deque(maxlen=window)

    def is_spike(self, step: int, loss: float) -> bool:
        if not self.k or step <= self.warmup or len(self.losses) < self.losses.maxlen:
            return False
        mean = sum(self.losses) / len(self.losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        return loss > mean + self.k * std

    def add(self, loss: float) -> None:
        self.losses.append(loss)


class StabilityCallback(Callback):
    name = "stability"

    def __init__(self, cfg: StabilityConfig, checkpointer: Checkpointer):
        self.cfg = cfg
        self.checkpointer = checkpointer
        self.spikes = SpikeDetector(cfg.spike_std, cfg.spike_window, cfg.spike_warmup)
        self.streak = 0  # consecutive skipped steps
        self.rollbacks = 0

    def on_before_update(self, trainer: Trainer, loss: float) -> Optional[SkipReason]:
        if not math.isfinite(loss):
            return SkipReason.NONFINITE_LOSS if self.cfg.skip_nonfinite else None
        if self.spikes.is_spike(trainer.state.step + 1, loss):
            return SkipReason.LOSS_SPIKE
        return None

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        step = trainer.state.step
        if out.skipped == SkipReason.FP16_OVERFLOW:
            return  # fp16's loss scale finding its level: routine, not a streak
        if out.skipped is None:
            self.streak = 0
            self.spikes.add(out.global_loss)
            return
        self.streak += 1
        if trainer.dist.is_main:
            log.warning("step %d skipped (%s, loss %.4g): %d in a row, %d in this run", step,
                        out.skipped, out.global_loss, self.streak, trainer.state.skipped_steps)
        if self.streak < self.cfg.max_bad_steps:
            return
        first_bad = step - self.streak + 1
        self.checkpointer.finish()  # a background save from before the streak is a candidate too
        target = self._rollback_target(first_bad)
        what = (f"{self.streak} consecutive steps ({first_bad}..{step}) were skipped, the last "
                f"for {out.skipped}")
        exhausted = self.rollbacks >= self.cfg.max_rollbacks
        if self.cfg.on_bad_steps == "stop" or target is None or exhausted:
            why = ("stability.on_bad_steps=stop" if self.cfg.on_bad_steps == "stop" else
                   "no intact checkpoint from before them" if target is None else
                   f"stability.max_rollbacks={self.cfg.max_rollbacks} rollbacks were already done")
            raise TrainingUnstableError(
                f"{what}; stopping ({why}). Lower optimizer.lr or tighten optimizer.grad_clip, or "
                f"raise stability.max_bad_steps / stability.max_rollbacks; a plain restart resumes "
                f"from the latest checkpoint in {self.checkpointer.root} and reads the same data")
        self.rollback(trainer, target, what)

    def _rollback_target(self, first_bad: int) -> Optional[Path]:
        for path in reversed(committed(self.checkpointer.root)):
            if step_of(path) < first_bad and damaged(path) is None:
                return path
        return None

    def rollback(self, trainer: Trainer, path: Path, what: str) -> None:
        """Collective. Back to `path`'s weights and counters, the data position kept."""
        kept = ("consumed_samples", "skipped_steps", "epoch_seconds")
        keep = {k: getattr(trainer.state, k) for k in kept}
        rollbacks = self.rollbacks + 1
        client = self.checkpointer.load(trainer.module, path)
        trainer.load_state_dict(client.trainer)  # this callback's state too
        for k, v in keep.items():
            setattr(trainer.state, k, v)
        self.rollbacks, self.streak = rollbacks, 0
        trainer.restart_data()
        if trainer.dist.is_main:
            log.warning("%s: rolled back to %s (step %d); the data continues at sample %d "
                        "(rollback %d of at most %d)", what, path.name, trainer.state.step,
                        trainer.state.consumed_samples, rollbacks, self.cfg.max_rollbacks)

    def state_dict(self) -> Dict[str, Any]:
        return {"losses": list(self.spikes.losses), "streak": self.streak, "rollbacks": self.rollbacks}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.spikes.losses.clear()
        self.spikes.losses.extend(sd.get("losses", []))
        self.streak = sd.get("streak", 0)
        self.rollbacks = sd.get("rollbacks", 0)
