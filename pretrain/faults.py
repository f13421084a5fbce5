"""Fault injection for tests and for drills on a new cluster.

PRETRAIN_FAULTS="kind@step[:rank],..." e.g. "nan_loss@3:1,exit@5:1". Unset in normal runs: then
every check is a dictionary lookup that finds nothing. Steps are 1-based, as in metrics.jsonl:
`nan_loss@3` poisons the step logged as step 3.

    exit        the rank dies (os._exit(1)) as step k begins
    hang        the rank sleeps forever as step k begins (a lost node, a stuck collective)
    nan_loss    the rank's loss in step k is NaN (and so are its gradients)
    nan_grad    the rank's loss in step k is finite, its gradients are NaN
    spike       the rank's loss in step k is multiplied by 1000
    crash_in_save  the rank fails after writing its part of the step-k checkpoint
    enospc_in_commit  rank 0's commit of the step-k checkpoint (after FILES, before the marker)
                   fails as on a full disk (OSError ENOSPC)
    slow_write  the rank's background writer (trainer.async_save) holds the step-k checkpoint's
                first file for a few seconds before writing it (pretrain.checkpoint_writer)
    slow_staging  the rank's background writer holds the copies of the step-k checkpoint's
                tensors for a few seconds (the next optimizer update must wait for them)
    enospc_in_write  the rank's background write of the step-k checkpoint fails as on a full
                disk (OSError ENOSPC)

Faults model transient failures: each fires at most once per process, and never in a worker that
torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0), so that a drill's restart or rollback
finishes instead of meeting the same fault again.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Optional, Set, Tuple

import torch

_PARSED: Optional[Dict[str, Set[Tuple[int, Optional[int]]]]] = None
_FIRED: Set[Tuple[str, int]] = set()
SPIKE_FACTOR = 1000.0


class InjectedFault(RuntimeError):
    pass


def _faults() -> Dict[str, Set[Tuple[int, Optional[int]]]]:
    global _PARSED
    if _PARSED is None:
        _PARSED = {}
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
            return _PARSED
        for item in filter(None, os.environ.get("PRETRAIN_FAULTS", "").split(",")):
            kind, _, where = item.strip().partition("@")
            step, _, rank = where.partition(":")
            _PARSED.setdefault(kind, set()).add((int(step), int(rank) if rank else None))
    return _PARSED


def active(kind: str, step: int, rank: int) -> bool:
    """True the first time this process reaches (kind, step) on a rank the fault names."""
    if not any(s == step and r in (None, rank) for s, r in _faults().get(kind, ())):
        return False
    if (kind, step) in _FIRED:
        return False
    _FIRED.add((kind, step))
    return True


def before_step(step: int, rank: int) -> None:
    """Process-level faults, as step `step` begins."""
    if active("exit", step, rank):
        print(f"[fault] rank {rank} exits at step {step}", flush=True)
        os._exit(1)
    if active("hang", step, rank):
        print(f"[fault] rank {rank} hangs at step {step} (unix time {time.time():.1f})", flush=True)
        while True:
            time.sleep(3600)


def perturb_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Numerical faults, applied to one micro-batch's loss of step `step` before backward."""
    if active("nan_loss", step, rank):
        return loss * float("nan")
    if active("nan_grad", step, rank):
        return _NanGrad.apply(loss)
    if active("spike", step, rank):
        return loss * SPIKE_FACTOR
    return loss


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradients backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def reset() -> None:
    global _PARSED
    _PARSED = None
    _FIRED.clear()
