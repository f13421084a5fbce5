"""Fault injection for tests and for `verify`-style drills on a new cluster.

PRETRAIN_FAULTS="kind@step[:rank],..." e.g. "crash_in_save@4:1" (rank 1 fails after writing its
part of the step-4 checkpoint), "nan_loss@3:0", "exit@5:1". Unset in normal runs: then every
check is a dictionary lookup that finds nothing.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Set, Tuple

_PARSED: Optional[Dict[str, Set[Tuple[int, Optional[int]]]]] = None


class InjectedFault(RuntimeError):
    pass


def _faults() -> Dict[str, Set[Tuple[int, Optional[int]]]]:
    global _PARSED
    if _PARSED is None:
        _PARSED = {}
        for item in filter(None, os.environ.get("PRETRAIN_FAULTS", "").split(",")):
            kind, _, where = item.strip().partition("@")
            step, _, rank = where.partition(":")
            _PARSED.setdefault(kind, set()).add((int(step), int(rank) if rank else None))
    return _PARSED


def active(kind: str, step: int, rank: int) -> bool:
    return any(s == step and r in (None, rank) for s, r in _faults().get(kind, ()))


def reset() -> None:
    global _PARSED
    _PARSED = None
