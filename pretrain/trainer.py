"""The training loop. It decides *when*; the step module (pretrain.step) decides what a step is;
callbacks do everything else. Nothing here knows DeepSpeed.

Callbacks have named hooks (on_train_start, on_before_update, on_step_end, on_train_end) and,
when they hold state that must survive a restart, state_dict/load_state_dict (saved in every
checkpoint).

A skipped step: every rank has run forward and backward and knows the loss averaged over all
ranks (one collective, so every rank sees the same value); a callback vetoes the update (a
non-finite loss, a loss spike), or the engine's own check finds a non-finite gradient norm. The
update is then discarded on every rank: parameters, optimizer state and LR schedule stay as they
were, the gradients are zeroed, the data moves on, and state.skipped_steps counts the step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch

from pretrain import faults
from pretrain.layout import Layout
from pretrain.reasons import SkipReason, StopReason
from pretrain.step.base import StepModule


@dataclass
class TrainState:
    """Counters that must survive a restart."""

    step: int = 0  # optimizer steps completed (skipped ones included)
    consumed_samples: int = 0  # global samples (sequences) consumed, all ranks together
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps whose update was discarded (non-finite or spiking loss)
    epoch_seconds: float = 0.0  # training wall time accumulated over all segments of the run

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        for key, value in sd.items():
            if hasattr(self, key):
                setattr(self, key, type(getattr(self, key))(value))


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean over the step's micro-batches on this rank (not yet synchronised)
    data_seconds: float  # waiting for batches
    compute_seconds: float  # forward + backward + optimizer (host time)
    step_seconds: float
    lr: float
    samples: int  # global samples in this step
    tokens: int  # global tokens in this step
    global_loss: float = float("nan")  # the loss averaged over all ranks (same on every rank)
    skipped: Optional[SkipReason] = None  # why the update was discarded; None when it was applied
    extras: Dict[str, Any] = field(default_factory=dict)


class Callback:
    name = "callback"

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_before_update(self, trainer: "Trainer", loss: float) -> Optional[SkipReason]:
        """After backward, before the optimizer update; `loss` is the all-rank mean. A reason
        returned here discards the update on every rank, so it may depend only on values that
        are the same on every rank."""
        return None

    def on_step_end(self, trainer: "Trainer", out: StepOutput) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, sd: Dict[str, Any]) -> None: ...


class Trainer:
    def __init__(self, module: StepModule, dist, layout: Layout, max_steps: int, seq_len: int,
                 make_batches: Callable[[int], Iterable[torch.Tensor]], callbacks: List[Callback]):
        self.module = module
        self.dist = dist
        self.layout = layout
        self.max_steps = max_steps
        self.seq_len = seq_len
        self.make_batches = make_batches  # consumed_samples -> this rank's micro-batches from there
        self.callbacks = callbacks
        self.state = TrainState()
        self.stop_reason: Optional[StopReason] = None  # set by a callback: end after this step
        self._batches: Optional[Iterator[torch.Tensor]] = None

    def request_stop(self, reason: StopReason) -> None:
        self.stop_reason = self.stop_reason or reason

    def fit(self) -> TrainState:
        self._call("on_train_start")
        try:
            self.restart_data()
            while self.state.step < self.max_steps and self.stop_reason is None:
                out = self.train_step()
                self.state.step += 1
                self.state.skipped_steps += out.skipped is not None
                self.state.consumed_samples += out.samples
                self.state.tokens_seen += out.tokens
                self.state.epoch_seconds += out.step_seconds
                self._call("on_step_end", out)
            self._call("on_train_end")
        finally:
            self.close_data()  # the data workers are ours to end, whatever happened
        return self.state

    def restart_data(self) -> None:
        """Read batches from state.consumed_samples on (at the start, and after a rollback)."""
        self.close_data()
        self._batches = iter(self.make_batches(self.state.consumed_samples))

    def close_data(self) -> None:
        """End the batch iterator's workers, if it has any (pretrain.data.loader.Batches)."""
        batches, self._batches = self._batches, None
        close = getattr(batches, "close", None)
        if close is not None:
            close()

    def train_step(self) -> StepOutput:
        """One optimizer step of the step module, timed and counted."""
        step = self.state.step + 1
        faults.before_step(step, self.dist.rank)  # drills only: nothing unless PRETRAIN_FAULTS
        t_start = time.perf_counter()
        r = self.module.train_step(self._batches, step, self._veto)
        step_s = time.perf_counter() - t_start
        samples = self.layout.global_batch_size
        return StepOutput(loss=r.loss, data_seconds=r.data_seconds,
                          compute_seconds=step_s - r.data_seconds, step_seconds=step_s, lr=r.lr,
                          samples=samples, tokens=samples * self.seq_len,
                          global_loss=r.global_loss, skipped=r.skipped,
                          extras={"optimizer_seconds": r.optimizer_seconds})

    def state_dict(self) -> Dict[str, Any]:
        return {"trainer": self.state.state_dict(),
                "callbacks": {c.name: c.state_dict() for c in self.callbacks}}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.state.load_state_dict(sd.get("trainer", {}))
        for c in self.callbacks:
            if c.name in sd.get("callbacks", {}):
                c.load_state_dict(sd["callbacks"][c.name])

    def _veto(self, loss: float) -> Optional[SkipReason]:
        """The first reason a callback gives to discard this step's update, if any."""
        for c in self.callbacks:
            reason = c.on_before_update(self, loss)
            if reason:
                return reason
        return None

    def _call(self, hook: str, *args) -> None:
        for c in self.callbacks:
            getattr(c, hook)(self, *args)
