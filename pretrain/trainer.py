"""The training loop. It decides *when*; the engine does a step; callbacks do everything else.

Callbacks have named hooks (on_train_start, on_before_update, on_step_end, on_train_end) and,
when they hold state that must survive a restart, state_dict/load_state_dict (saved in every
checkpoint).

A skipped step: every rank has run forward and backward and knows the loss averaged over all
ranks (one collective, so every rank sees the same value); a callback vetoes the update (a
non-finite loss, a loss spike), or DeepSpeed's own check finds a non-finite gradient norm. The
update is then discarded on every rank: parameters, optimizer state and LR schedule stay as they
were, the gradients are zeroed, the data moves on, and state.skipped_steps counts the step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch

from pretrain import faults


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
    skipped: Optional[str] = None  # why the update was discarded; None when it was applied
    extras: Dict[str, Any] = field(default_factory=dict)


class Callback:
    name = "callback"

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_before_update(self, trainer: "Trainer", loss: float) -> Optional[str]:
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
    def __init__(self, engine, dist, max_steps: int, micro_batch_size: int, grad_accum: int,
                 seq_len: int, make_batches: Callable[[int], Iterable[torch.Tensor]],
                 callbacks: List[Callback]):
        self.engine = engine
        self.dist = dist
        self.max_steps = max_steps
        self.micro = micro_batch_size
        self.grad_accum = grad_accum
        self.seq_len = seq_len
        self.make_batches = make_batches  # consumed_samples -> this rank's micro-batches from there
        self.callbacks = callbacks
        self.state = TrainState()
        self.stop_reason: Optional[str] = None  # set by a callback to end the run after this step
        self._batches: Optional[Iterator[torch.Tensor]] = None

    @property
    def global_batch(self) -> int:
        return self.micro * self.dist.dp * self.grad_accum

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def callback(self, name: str) -> Optional[Callback]:
        return next((c for c in self.callbacks if c.name == name), None)

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
        """One optimizer step: grad_accum micro-batches through the DeepSpeed engine."""
        engine, device, rank = self.engine, self.dist.device, self.dist.rank
        step = self.state.step + 1
        faults.before_step(step, rank)  # drills only: nothing happens unless PRETRAIN_FAULTS is set
        lr = float(engine.get_lr()[0])
        t_start = time.perf_counter()
        data_s, losses = 0.0, []
        for i in range(self.grad_accum):
            t0 = time.perf_counter()
            batch = next(self._batches).to(device, non_blocking=True)  # (micro, seq_len + 1)
            data_s += time.perf_counter() - t0
            loss = faults.perturb_loss(engine(batch), step, rank)
            engine.backward(loss)
            losses.append(loss.detach())
            if i + 1 < self.grad_accum:
                engine.step()  # not the accumulation boundary: DeepSpeed only counts it
        local_loss = torch.stack(losses).mean()
        global_loss = self.dist.all_reduce_mean(local_loss)
        skipped = self._veto(global_loss)
        t_opt = time.perf_counter()
        with discard_update(engine) if skipped else contextlib.nullcontext():
            engine.step()  # the boundary: the optimizer update
        opt_s = time.perf_counter() - t_opt
        if skipped is None and not engine.was_step_applied():  # DeepSpeed's own overflow check
            skipped = "fp16_overflow" if engine.fp16_enabled() else "nonfinite_grad"
        step_s = time.perf_counter() - t_start
        samples = self.global_batch
        return StepOutput(loss=local_loss, data_seconds=data_s, compute_seconds=step_s - data_s,
                          step_seconds=step_s, lr=lr, samples=samples,
                          tokens=samples * self.seq_len, global_loss=global_loss, skipped=skipped,
                          extras={"optimizer_seconds": opt_s})

    def state_dict(self) -> Dict[str, Any]:
        return {"trainer": self.state.state_dict(),
                "callbacks": {c.name: c.state_dict() for c in self.callbacks}}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.state.load_state_dict(sd.get("trainer", {}))
        for c in self.callbacks:
            if c.name in sd.get("callbacks", {}):
                c.load_state_dict(sd["callbacks"][c.name])

    def _veto(self, loss: float) -> Optional[str]:
        """The first reason a callback gives to discard this step's update, if any."""
        for c in self.callbacks:
            reason = c.on_before_update(self, loss)
            if reason:
                return reason
        return None

    def _call(self, hook: str, *args) -> None:
        for c in self.callbacks:
            getattr(c, hook)(self, *args)


@contextlib.contextmanager
def discard_update(engine):
    """Make the engine's next boundary step() discard its update through DeepSpeed's own
    overflow path: parameters, optimizer state and LR schedule unchanged, gradients zeroed, the
    engine's skipped_steps counts it.

    The ZeRO optimizers (stages 1-3, every precision) find an overflow in step() and pass it to
    _update_scale() before acting on it: forcing the flag there reuses their clean-up of the
    gradient buffers. A genuine overflow still updates the fp16 loss scale; a vetoed finite step
    leaves it alone. Without ZeRO (a torch optimizer, or DeepSpeed's fp16/bf16 wrappers, whose
    step() does not work that way) step() becomes a no-op and `overflow` is set, which the engine
    reads after stepping before it zeroes the gradients.
    """
    opt = engine.optimizer
    if engine.zero_optimization_stage() >= 1:
        update_scale = opt._update_scale

        def forced(has_overflow=False, *args, **kwargs):
            if has_overflow:
                update_scale(has_overflow, *args, **kwargs)
            opt.overflow = True

        opt._update_scale = forced
        try:
            yield
        finally:
            del opt._update_scale  # the class's method again
    else:
        had = dict(vars(opt))
        opt.step = lambda *args, **kwargs: None
        opt.overflow = True
        try:
            yield
        finally:
            for name in ("step", "overflow"):
                if name in had:
                    setattr(opt, name, had[name])
                else:
                    delattr(opt, name)
