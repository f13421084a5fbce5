"""Layout-independent weight initialisation: every tensor drawn from its own generator.

Each row of each weight is drawn from its own generator, seeded from (seed, the parameter's global
name, the row): the name with the stage-local layer number replaced by the global one
(`decoder.layers.3` on pipeline stage 1 of 2 with 8 layers is layer 7), and a tied output layer
named after the word embedding it copies. A rank keeps the slice of the whole tensor that
megatron-core's tensor-parallel split gives it (partition_dim, partition_stride), so any TP, PP or
DP layout starts from the same model, whatever the order in which the stages build their layers.
It draws only the rows it keeps (a row-split, column-parallel weight costs 1/TP of the whole) and
never more than one row beyond its own shard.

The distributions are megatron-core's defaults for a GPT (TransformerConfig): weights N(0, std),
the two residual-branch output projections (attention's linear_proj, the MLP's linear_fc2)
N(0, std / sqrt(2 x num_layers)), biases 0, norm weights 1 and norm biases 0.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Iterable, Tuple

import torch

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
_NORM_WEIGHT = re.compile(r"(layernorm|layer_norm)(\.weight|_weight)$")
_NORM_BIAS = re.compile(r"(layernorm|layer_norm)(\.bias|_bias)$")
_SCALED = re.compile(r"(linear_proj|linear_fc2)\.weight$")
_NORMAL = re.compile(r"(word_embeddings|position_embeddings|linear_qkv|linear_fc1|output_layer)"
                     r"\.weight$")


def global_name(name: str, layer_offset: int, tied: bool) -> str:
    """The parameter's name in the whole model (pipeline stage 0 of 1)."""
    name = _LAYER.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + layer_offset}.", name, 1)
    if tied and name.endswith("output_layer.weight"):
        return name[: -len("output_layer.weight")] + "embedding.word_embeddings.weight"
    return name


def rule(name: str, init_std: float, num_layers: int) -> Tuple[str, float]:
    """(kind, std) for a parameter: ("normal", std), ("ones", 0) or ("zeros", 0)."""
    if _NORM_WEIGHT.search(name):
        return "ones", 0.0
    if _NORM_BIAS.search(name) or name.endswith(".bias"):
        return "zeros", 0.0
    if _SCALED.search(name):
        return "normal", init_std / math.sqrt(2.0 * num_layers)
    if _NORMAL.search(name):
        return "normal", init_std
    raise ValueError(f"no initialisation rule for parameter {name!r}: add one to "
                     f"pretrain/model/init.py")


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _pieces(full: torch.Tensor, dim: int, stride: int, tp: int, tp_rank: int):
    """The views of `full` that TP rank `tp_rank` keeps, as megatron-core splits a master weight:
    `tp x stride` equal chunks along `dim`, rank r keeping chunks r, r + tp, ... (stride 2: a
    gated MLP's fc1 holds [gate_r; up_r])."""
    return torch.chunk(full, tp * stride, dim=dim)[tp_rank::tp]



@torch.no_grad()
def initialize(named_parameters: Iterable[Tuple[str, torch.nn.Parameter]], *, seed: int,
               init_std: float, num_layers: int, tp: int, tp_rank: int, layer_offset: int = 0,
               tied: bool = False) -> None:
    """Fill every parameter in place (they may be uninitialised memory, e.g. after
    `Module.to_empty`). Names are megatron GPTModel's, stage-local. A parameter partitioned by
    DeepSpeed's ZeRO-3 (`deepspeed.zero.Init`) gets only this rank's partition filled."""
    for name, p in named_parameters:
        gname = global_name(name, layer_offset, tied)
        kind, std = rule(gname, init_std, num_layers)
        partitioned = hasattr(p, "ds_tensor")
        target = p.ds_tensor if partitioned else p
        if kind in ("ones", "zeros"):
            target.fill_(1.0 if kind == "ones" else 0.0)
            continue
        shape = tuple(p.ds_shape) if partitioned else tuple(p.shape)
        sharded = bool(getattr(p, "tensor_model_parallel", False)) and tp > 1
        row = _RowDrawer(shape, seed, gname, std, tp if sharded else 1, tp_rank,
                         getattr(p, "partition_dim", 0), getattr(p, "partition_stride", 1))
        if partitioned:
            _fill_partition(p, row)
        else:
            view = p.reshape(row.rows, row.width)
            for i in range(row.rows):
                view[i].copy_(row(i))


class _RowDrawer:
    """Row i of this TP rank's slice of the whole tensor N(0, std) whose every row is drawn by
    its own generator, seeded from (seed, name, row): only the rows the rank keeps are drawn
    (each whole when the split is along columns)."""

    def __init__(self, shape: Tuple[int, ...], seed: int, gname: str, std: float, tp: int,
                 tp_rank: int, dim: int, stride: int):
        self.rows = shape[0] if len(shape) > 1 else 1
        self.width = math.prod(shape) // self.rows
        self.seed, self.gname, self.std = seed, gname, std
        self.tp, self.tp_rank, self.stride = tp, tp_rank, stride
        self.split_rows, self.split_cols = tp > 1 and dim == 0, tp > 1 and dim == 1
        full_rows = self.rows * tp if self.split_rows else self.rows
        self.keep = range(full_rows)
        if self.split_rows:
            chunk = full_rows // (tp * stride)
            self.keep = [r for c in range(tp_rank, tp * stride, tp)
                         for r in range(c * chunk, (c + 1) * chunk)]
        self.buffer = torch.empty(self.width * tp if self.split_cols else self.width)

    def __call__(self, i: int) -> torch.Tensor:
        r = self.keep[i]
        self.buffer.normal_(0.0, self.std, generator=_generator(self.seed, f"{self.gname}[{r}]"))
        if not self.split_cols:
            return self.buffer
        return torch.cat(_pieces(self.buffer, 0, self.stride, self.tp, self.tp_rank))


def _fill_partition(p: torch.nn.Parameter, row: _RowDrawer) -> None:
    """ZeRO-3: this rank's partition is elements [k x n, (k + 1) x n) of the flattened tensor
    (k: its rank in the parameter's partition group, n: the partition size, the last one padded);
    the rows that overlap it are drawn and their overlap copied."""
    import torch.distributed as dist

    flat = p.ds_tensor.view(-1)
    n = flat.numel()
    start = dist.get_rank(group=p.ds_process_group) * n
    end = min(start + n, row.rows * row.width)
    for i in range(start // row.width, (end - 1) // row.width + 1 if end > start else 0):
        lo, hi = max(start, i * row.width), min(end, (i + 1) * row.width)
        flat[lo - start:hi - start].copy_(row(i)[lo - i * row.width:hi - i * row.width])
