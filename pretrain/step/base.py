"""The step module's interface: everything the loop and the callbacks may ask of a step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from pretrain.checkpoint_writer import BackgroundWriter
from pretrain.reasons import SkipReason

# The all-rank mean loss of the step -> the reason to discard its update, or None.
Veto = Callable[[float], Optional[SkipReason]]


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over the step's micro-batches on this rank (not synchronised)
    global_loss: float  # the loss averaged over all ranks (the same bits on every rank)
    lr: float  # the learning rate the update used
    data_seconds: float  # waiting for batches
    optimizer_seconds: float  # the update itself
    skipped: Optional[SkipReason] = None  # why the update was discarded; None: applied


class StepModule:
    """One implementation per way of running a step (data + tensor parallel; a pipeline
    schedule). Every method is collective over the ranks unless it says otherwise."""

    @property
    def module(self) -> torch.nn.Module:
        """The model (this rank's shard), for reading parameters: export, resharding rules."""
        raise NotImplementedError

    def train_step(self, batches: Iterator[torch.Tensor], step: int, veto: Veto) -> StepResult:
        """One optimizer step over the step's micro-batches, read from `batches` (each
        (micro, seq_len + 1) token ids). `veto(global_loss)` is asked after backward, before the
        update; a reason discards the update on every rank (parameters, optimizer state and LR
        schedule stay bit-identical, the gradients are zeroed). `step` is 1-based (fault drills)."""
        raise NotImplementedError

    def eval_loss(self, batches: Iterator[torch.Tensor]) -> float:
        """The mean loss over `batches` without gradients, averaged over all ranks."""
        raise NotImplementedError

    def grad_norm(self) -> Optional[float]:
        """The last step's global gradient norm before clipping (not collective)."""
        raise NotImplementedError

    def save(self, root: Path, tag: str, client_state: Dict[str, Any],
             writer: Optional[BackgroundWriter] = None) -> None:
        """Write this rank's share of the engine state to root/tag, with client_state; a write
        that fails on this rank raises after every rank has finished writing. With a writer
        (pretrain.checkpoint_writer), the state is staged in host memory and its files are handed
        to the writer's thread: the call returns before they are on disk, and their failures are
        the writer's to report."""
        raise NotImplementedError

    def load(self, path: Path, load_optimizer: bool = True) -> Dict[str, Any]:
        """Load the engine state saved at `path` (a step directory, or its universal form when the
        module was built to load one); returns the client state saved with it."""
        raise NotImplementedError
