"""Periodic validation: loss and perplexity on the held-out split, the same samples every time."""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import torch

from pretrain.trainer import Callback, StepOutput, Trainer

log = logging.getLogger("pretrain")


class EvalCallback(Callback):
    name = "eval"

    def __init__(self, every: int, make_val_batches: Callable[[], Iterable[torch.Tensor]], tracker):
        self.every = every
        self.make_val_batches = make_val_batches
        self.tracker = tracker

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        if self.every and trainer.state.step % self.every == 0:
            self.evaluate(trainer)

    def evaluate(self, trainer: Trainer) -> float:
        val = trainer.module.eval_loss(iter(self.make_val_batches()))  # collective
        if trainer.dist.is_main:
            self.tracker.log({"step": trainer.state.step, "tokens_seen": trainer.state.tokens_seen,
                              "val_loss": val, "val_ppl": math.exp(min(val, 50.0))},
                             {"val_loss": "val/loss", "val_ppl": "val/perplexity",
                              "tokens_seen": "train/tokens_seen"})
            log.info("step %d val_loss %.4f val_ppl %.2f", trainer.state.step, val, math.exp(min(val, 50)))
        return val
