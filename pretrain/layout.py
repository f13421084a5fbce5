"""The parallel layout of a run: every degree and batch size, computed and validated once.

One frozen object holds what decides how a run is split over its processes: the tensor-,
pipeline- and data-parallel degrees, sequence parallelism, the ZeRO stage, the micro-batch and
gradient accumulation (hence the global batch) and the embedding rows (the vocabulary padded to a
multiple of the TP degree). `Config.layout(world_size, vocab)` builds it from the settings; the
process groups (pretrain.dist), the DeepSpeed config (pretrain.step), the data sharding, the
checkpoint's `layout.json`, resharding (pretrain.reshard) and the planner (pretrain.plan) all read
this one object, so a new degree is added here and nowhere else.

Rank order is megatron-core's default: TP varies fastest, then DP, then PP:
    rank = tp_rank + tp * (dp_rank + dp * pp_rank)
With world 4 and tp 2 the TP groups are {0,1},{2,3} and the DP groups {0,2},{1,3}.

A checkpoint's layout.json is this object as JSON (`to_json`). Files written before version 2 hold
only tp, dp, zero_stage and padded_vocab_size; the rest reads as not recorded (pp 1, no sequence
parallelism, micro_batch_size and grad_accum 0).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional

from pretrain.errors import CheckpointError, ConfigError

log = logging.getLogger("pretrain")

VERSION = 2  # of layout.json; 1 (no "version" key): tp, dp, zero_stage, padded_vocab_size only


@dataclass(frozen=True)
class Layout:
    tp: int
    dp: int
    zero_stage: int
    padded_vocab_size: int = 0  # embedding rows; 0 while the vocabulary is not known yet
    pp: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 0  # sequences per rank per forward; 0: not recorded (old layout.json)
    grad_accum: int = 0  # micro-batches per optimizer step; 0: not recorded

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, world_size: int, tp: int, zero_stage: int, micro_batch_size: int,
              global_batch_size: Optional[int], pp: int = 1, sequence_parallel: bool = False,
              vocab_size: Optional[int] = None, vocab_multiple: int = 128,
              saved: Optional["Layout"] = None) -> "Layout":
        """The layout of `world_size` processes; ConfigError naming the setting when it cannot be.
        `saved`: the layout of the checkpoint being resumed, whose embedding rows are kept where
        this TP degree divides them (pretrain.reshard explains why)."""
        _check(tp >= 1 and pp >= 1, "parallel.tp", f"tp={tp}, pp={pp}: degrees must be >= 1")
        model_parallel = tp * pp
        _check(world_size % model_parallel == 0, "parallel.tp",
               f"tp={tp} does not divide the world size {world_size}; launch a multiple of tp ranks"
               if pp == 1 else f"tp x pp = {tp} x {pp} does not divide the world size {world_size}")
        dp = world_size // model_parallel
        micro = micro_batch_size
        gbs = global_batch_size or micro * dp
        _check(gbs % (micro * dp) == 0, "trainer.global_batch_size",
               f"{gbs} is not divisible by micro_batch_size x data-parallel size = {micro} x {dp}; "
               f"use a multiple of {micro * dp}")
        padded = 0
        if vocab_size is not None:
            padded = _padded_rows(vocab_size, vocab_multiple, tp, saved)
        return cls(tp=tp, dp=dp, zero_stage=zero_stage, padded_vocab_size=padded, pp=pp,
                   sequence_parallel=sequence_parallel, micro_batch_size=micro,
                   grad_accum=gbs // (micro * dp))

    # ---- arithmetic ---------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step, all data-parallel ranks together."""
        return self.micro_batch_size * self.dp * self.grad_accum

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp % self.dp

    def pp_rank(self, rank: int) -> int:
        return rank // (self.tp * self.dp)

    def batch_sizes(self) -> Dict[str, int]:
        """The degrees and batch sizes as plain numbers (the tracker's config, the plan's table)."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp,
                "micro_batch_size": self.micro_batch_size,
                "global_batch_size": self.global_batch_size, "grad_accum": self.grad_accum}

    def same_shards(self, other: "Layout") -> bool:
        """Whether a checkpoint saved at `other` splits its tensors as this layout does (the ZeRO
        stage aside, which pretrain.reshard judges itself)."""
        return ((self.tp, self.pp, self.dp, self.padded_vocab_size)
                == (other.tp, other.pp, other.dp, other.padded_vocab_size))

    def __str__(self) -> str:
        pp = f" x PP={self.pp}" if self.pp > 1 else ""
        sp = " (sequence parallel)" if self.sequence_parallel else ""
        return (f"TP={self.tp}{pp} x DP={self.dp}{sp}, ZeRO {self.zero_stage}, "
                f"{self.padded_vocab_size} vocabulary rows")

    # ---- layout.json --------------------------------------------------------------------------
    def to_json(self) -> Dict[str, Any]:
        return {"version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, raw: Any, where: str = "layout.json") -> "Layout":
        """A layout.json's object (any version); CheckpointError when it is not one."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where} holds {raw!r:.200}, not a parallel layout")
        defaults = {"padded_vocab_size": None, "pp": 1, "sequence_parallel": False,
                    "micro_batch_size": 0, "grad_accum": 0}
        values = {f.name: raw.get(f.name, defaults.get(f.name)) for f in fields(cls)}
        least = {"zero_stage": 0, "micro_batch_size": 0, "grad_accum": 0}
        ints_ok = all(type(v) is int and v >= least.get(k, 1)
                      for k, v in values.items() if k != "sequence_parallel")
        if not (ints_ok and type(values["sequence_parallel"]) is bool):
            raise CheckpointError(f"{where} is not a parallel layout: it holds {raw!r:.200}, not "
                                  f"integers tp, dp, zero_stage, padded_vocab_size (the "
                                  f"checkpoint is damaged)")
        return cls(**values)

    @classmethod
    def from_file(cls, path: Path) -> "Layout":
        try:
            raw = json.loads(Path(path).read_bytes())
        except ValueError as e:  # invalid JSON, or bytes that are not text at all
            raise CheckpointError(f"{path} is not valid JSON ({e})") from e
        return cls.from_json(raw, str(path))


def _padded_rows(vocab: int, multiple: int, tp: int, saved: Optional[Layout]) -> int:
    """The vocabulary rounded up to a multiple of `multiple` x TP; a resume keeps the saved rows
    when TP divides them, and otherwise grows them to the next multiple (never shrinks them)."""
    step = multiple * tp
    padded = int(math.ceil(vocab / step) * step)
    if saved is None or saved.padded_vocab_size in (0, padded):
        return padded
    if saved.padded_vocab_size % tp == 0:
        return saved.padded_vocab_size
    grown = int(math.ceil(saved.padded_vocab_size / step) * step)
    log.warning("the checkpoint's %d vocabulary rows do not split over tp=%d: growing them to %d "
                "with zero rows; the padding rows take part in the softmax, so the loss moves "
                "slightly", saved.padded_vocab_size, tp, grown)
    return grown


def _check(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{setting}: {message}")
