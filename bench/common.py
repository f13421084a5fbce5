"""Shared bench machinery: interleaved timing against a peer, paired ratios, one table format.

Machines here are shared and noisy (BENCHMARKS.md): a figure counts only as a ratio against a
peer measured in the same run. `interleave` runs the variants A B C A B C ..., drops the first
`warmup` rounds and keeps one time per variant per round; `paired_ratio` divides the two sides
round by round (a burst of load from another process hits both sides of a round alike) and
reports the median with its spread.
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence


@dataclass
class Timing:
    """Seconds per repetition of one variant, one entry per kept round."""

    seconds: List[float]  # wall
    cpu_seconds: List[float]  # CPU time of this process (all threads): blind to being descheduled

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median over the kept rounds: how noisy this side was."""
        return (max(self.seconds) - min(self.seconds)) / self.median

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds)

    def rate(self, units: float) -> float:
        """units per second at the median time (e.g. tokens/s for `units` tokens per repetition)."""
        return units / self.median


@dataclass
class Ratio:
    """ours/peer speed (>1: ours faster), per round; median and the range over rounds."""

    per_round: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.per_round)

    @property
    def low(self) -> float:
        return min(self.per_round)

    @property
    def high(self) -> float:
        return max(self.per_round)

    def __str__(self) -> str:
        return f"{self.median:.2f}x [{self.low:.2f}-{self.high:.2f}]"


def interleave(variants: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
               repeat: int = 1, setup: Optional[Dict[str, Callable[[], object]]] = None
               ) -> Dict[str, Timing]:
    """Time each variant once per round, in order, for warmup + rounds rounds; the warm-up rounds
    are dropped. A variant's time is the mean of `repeat` back-to-back calls (a step is short next
    to the scheduling noise of a shared machine). Garbage is collected between calls, outside
    the timed region, so that one side's garbage is not paid by the other; `setup[name]`, when
    given, runs there too (e.g. deleting the previous round's output)."""
    wall: Dict[str, List[float]] = {name: [] for name in variants}
    cpu: Dict[str, List[float]] = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            if setup and name in setup:
                setup[name]()
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(repeat):
                fn()
            dt, dc = (time.perf_counter() - t0) / repeat, (time.process_time() - c0) / repeat
            if r >= warmup:
                wall[name].append(dt)
                cpu[name].append(dc)
    return {name: Timing(wall[name], cpu[name]) for name in variants}


def paired_ratio(ours: Timing, peer: Timing, cpu: bool = False, ours_units: float = 1.0,
                 peer_units: float = 1.0) -> Ratio:
    """Speed of ours over peer, round by round: (ours_units / our time) / (peer_units / peer
    time), on wall time or CPU time. With equal units it is peer time / our time."""
    a, b = (ours.cpu_seconds, peer.cpu_seconds) if cpu else (ours.seconds, peer.seconds)
    return Ratio([(ours_units / o) / (peer_units / p) for o, p in zip(a, b)])


def table(headers: Sequence[str], rows: Sequence[Sequence[object]],
          title: Optional[str] = None) -> str:
    """A markdown table; numbers right-aligned, text left-aligned."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False
               for i in range(len(headers))]

    def line(values):
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(out) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w
                             for w, num in zip(widths, numeric)) + " |"
    text = [line(headers), rule] + [line(r) for r in cells]
    if title:
        text.insert(0, f"\n{title}\n")
    return "\n".join(text)


_DIST = None


def cpu_dist(seed: int = 1234):
    """Gloo with megatron's parallel state (TP=1), started once per process and reseeded on every
    call: one rank, or under torchrun the ranks it started (data parallel)."""
    global _DIST
    if _DIST is None:
        from pretrain.config import ParallelConfig
        from pretrain.dist import Dist

        env = dict(os.environ) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
        _DIST = Dist.from_env(ParallelConfig(tp=1, device="cpu"), env=env).initialize(seed)
    _DIST.seed(seed)
    return _DIST


def quiet() -> None:
    """DeepSpeed's and transformers' info logging off, and the libraries' expected warnings (as
    pretrain-train filters them): the table is the output."""
    from pretrain.model.fallbacks import silence_library_warnings

    silence_library_warnings()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def machine() -> str:
    """One line about where the numbers come from (the load says how shared the machine was)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores, load average {load:.1f}"


def human(x: float) -> str:
    """3 significant figures with K/M/G suffixes: 471000 -> '471K'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1000 else human(c)
    return str(c)


def _is_number(c: object) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool)
