"""The training loop. It decides *when*; the engine does a step; callbacks do everything else.

Callbacks have named hooks (on_train_start, on_step_end, on_train_end) and, when they hold
state that must survive a restart, state_dict/load_state_dict (saved in every checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch


@dataclass
class TrainState:
    """Counters that must survive a restart."""

    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # global samples (sequences) consumed, all ranks together
    tokens_seen: int = 0
    skipped_steps: int = 0
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
    extras: Dict[str, Any] = field(default_factory=dict)


class Callback:
    name = "callback"

    def on_train_start(self, trainer: "Trainer") -> None: ...

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
        self._batches = iter(self.make_batches(self.state.consumed_samples))
        while self.state.step < self.max_steps and self.stop_reason is None:
            out = self.train_step()
            self.state.step += 1
            self.state.consumed_samples += out.samples
            self.state.tokens_seen += out.tokens
            self.state.epoch_seconds += out.step_seconds
            self._call("on_step_end", out)
        self._call("on_train_end")
        return self.state

    def train_step(self) -> StepOutput:
        """One optimizer step: grad_accum micro-batches through the DeepSpeed engine."""
        engine, device = self.engine, self.dist.device
        lr = float(engine.get_lr()[0])
        t_start = time.perf_counter()
        data_s, losses = 0.0, []
        for _ in range(self.grad_accum):
            t0 = time.perf_counter()
            batch = next(self._batches).to(device, non_blocking=True)  # (micro, seq_len + 1)
            data_s += time.perf_counter() - t0
            loss = engine(batch)
            engine.backward(loss)
            engine.step()  # steps the optimizer only at the accumulation boundary
            losses.append(loss.detach())
        step_s = time.perf_counter() - t_start
        samples = self.global_batch
        return StepOutput(loss=torch.stack(losses).mean(), data_seconds=data_s,
                          compute_seconds=step_s - data_s, step_seconds=step_s, lr=lr,
                          samples=samples, tokens=samples * self.seq_len)

    def state_dict(self) -> Dict[str, Any]:
        return {"trainer": self.state.state_dict(),
                "callbacks": {c.name: c.state_dict() for c in self.callbacks}}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.state.load_state_dict(sd.get("trainer", {}))
        for c in self.callbacks:
            if c.name in sd.get("callbacks", {}):
                c.load_state_dict(sd["callbacks"][c.name])

    def _call(self, hook: str, *args) -> None:
        for c in self.callbacks:
            getattr(c, hook)(self, *args)
