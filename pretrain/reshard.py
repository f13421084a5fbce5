"""Resume at another parallel layout (TP size, DP size, ZeRO stage) through DeepSpeed's universal
checkpoint.

Every checkpoint records the layout it was saved at (`layout.json`) and, in its client state, the
`universal_checkpoint_info` DeepSpeed's converter needs to merge megatron-core's tensor-parallel
shards. A resume compares the saved layout with its own (`prepare`):

- the same layout, or only ZeRO 1 <-> 2 (the same partitioned files): DeepSpeed loads it as saved;
- fp32 ZeRO 0 at another DP size: as saved too (its optimizer state is whole on every rank);
- anything else: rank 0 converts it once into `step_N.universal/` (a sibling; the original is
  never modified) after the process groups start, while the other ranks wait in a collective
  (within the start-up timeout, parallel.init_timeout_min), and the engine loads it with
  `"checkpoint": {"load_universal": true}`. A later resume at a new layout reuses it.
- ZeRO 3 changes DP size and merges TP shards, but loads only at TP=1: DeepSpeed's ZeRO-3
  universal loader splits TP shards only for its own AutoTP models. The ZeRO stage may change
  only between 1 and 2. Checkpointer.load repairs two faults of DeepSpeed's ZeRO-3 universal load.

DeepSpeed 0.19.8 refuses ZeRO 1/2 optimizer partitions saved at another DP size
(`ZeRORuntimeException`, `zero_optimization.elastic_checkpoint` or not), so a DP change goes
through the universal form as well. What we add for megatron-core: the merge rules from each
parameter's megatron attributes (`universal_info`), the removal of megatron's non-tensor
`*._extra_state` entries that the converter cannot read, and the vocabulary padding (below).

Vocabulary padding depends on TP (ModelConfig.padded_vocab_size) and the padding rows take part
in the softmax, so changing them changes the loss: a resumed run keeps the rows it was saved with
when the new TP divides them, and otherwise grows them to the next multiple, the new rows zero
(DeepSpeed's universal loader pads them), with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from pretrain.checkpoint import LAYOUT, MARKER, UNIVERSAL, universal_dir
from pretrain.safe_load import safe_load, weights_only_loads
from pretrain.config import ModelConfig
from pretrain.errors import CheckpointError
from pretrain.fsio import atomic_write
from pretrain.export import COLUMN, GATED, REPLICATED, ROW, read_config, tp_split
from pretrain import reshard_pipeline
from pretrain.layout import Layout

log = logging.getLogger(__name__)

_VOCABULARY = re.compile(r"(word_embeddings|output_layer)\.weight$")
_MP_FILE = re.compile(r"(?:zero_pp_rank_\d+_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def read_layout(step_dir: Path, saved_cfg: Dict[str, Any], vocab: int) -> Layout:
    """The layout a checkpoint was saved at: its layout.json, or for a checkpoint written before
    layout.json existed, what its file names and config.yaml say."""
    step_dir = Path(step_dir)
    if (step_dir / LAYOUT).exists():
        return Layout.from_file(step_dir / LAYOUT)
    # Saved before layout.json existed.
    tp_ranks = {int(m.group(1)) for f in step_dir.iterdir() if (m := _MP_FILE.match(f.name))}
    dp_ranks = {int(m.group(1)) for f in step_dir.iterdir() if (m := _OPTIM_FILE.match(f.name))}
    tp = max(tp_ranks) + 1 if tp_ranks else 1
    model = ModelConfig(**saved_cfg.get("model", {}))
    return Layout(tp, max(dp_ranks) + 1 if dp_ranks else 1,
                  int(saved_cfg.get("parallel", {}).get("zero_stage", 0)),
                  model.padded_vocab_size(tp, vocab))


# ---- what every checkpoint carries --------------------------------------------------------------
def _split_from_attributes(p: torch.nn.Parameter) -> str:
    """megatron-core marks tensor-parallel parameters with tensor_model_parallel, partition_dim
    and partition_stride (2 for SwiGLU's fc1, whose rows hold [gate_r; up_r] on each rank)."""
    if not getattr(p, "tensor_model_parallel", False):
        return REPLICATED
    if p.partition_dim == 1:
        return ROW
    stride = getattr(p, "partition_stride", 1)
    if stride not in (1, 2):
        raise CheckpointError(f"partition_stride={stride}: only SwiGLU's 2 sub-parameters "
                              f"are known to the universal checkpoint rules")
    return GATED if stride == 2 else COLUMN


def universal_info(module: torch.nn.Module, padded_vocab_size: int, swiglu: bool) -> Dict[str, Any]:
    """DeepSpeed's `universal_checkpoint_info`: how ds_to_universal merges each parameter's TP
    shards. Parameter names are the engine module's, exactly (re.match patterns)."""
    from deepspeed.checkpoint import constants as c

    rules = {REPLICATED: [], ROW: [], GATED: [], "vocabulary": []}
    for name, p in module.named_parameters():
        split = _split_from_attributes(p)
        if split != tp_split(name, swiglu):
            raise CheckpointError(
                f"{name}: megatron's attributes say {split}-parallel but pretrain.export merges it "
                f"as {tp_split(name, swiglu)}; teach export.tp_split this parameter")
        pattern = re.escape(name) + "$"
        if split != COLUMN:
            rules[split].append(pattern)
        if _VOCABULARY.search(name):
            rules["vocabulary"].append(pattern)
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: rules[REPLICATED],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: rules[ROW],
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: rules[GATED],
        # The converter cuts vocabulary tensors to this many rows and the loader zero-pads them to
        # the new layout's rows: all rows are kept (Config.layout never shrinks them).
        c.VOCABULARY_PARAMETER_PATTERNS: rules["vocabulary"],
        c.ORIGINAL_VOCAB_SIZE: padded_vocab_size,
    }


# ---- at resume ---------------------------------------------------------------------------------
def is_universal(path: Optional[Path]) -> bool:
    return path is not None and path.name.endswith(UNIVERSAL)


def needs_universal(step_dir: Path, saved: Layout, current: Layout) -> bool:
    """Whether DeepSpeed must load the universal form; CheckpointError where no form fits."""
    same_stage = saved.zero_stage == current.zero_stage
    if not (same_stage or {saved.zero_stage, current.zero_stage} <= {1, 2}):
        # ZeRO 3 and ZeRO 0 save and convert to other formats; 1 and 2 share theirs.
        raise CheckpointError(f"{step_dir} was saved with parallel.zero_stage={saved.zero_stage}: "
                              f"resume it with that stage (only 1 <-> 2 may change)")
    if current.same_shards(saved):
        return False
    keep = (f"resume at parallel.tp={saved.tp} with {saved.tp * saved.dp} processes "
            f"(data-parallel size {saved.dp})")
    if not any(_OPTIM_FILE.match(f.name) for f in step_dir.iterdir()):
        # fp32 ZeRO 0: the optimizer state sits whole in each TP rank's model file.
        if (saved.tp, saved.padded_vocab_size) == (current.tp, current.padded_vocab_size):
            return False
        raise CheckpointError(f"{step_dir} was saved with fp32 ZeRO 0, which DeepSpeed cannot "
                              f"convert to another tensor-parallel size; {keep}")
    if current.zero_stage == 3 and current.tp > 1:
        raise CheckpointError(
            f"{step_dir} ({saved}) cannot be resumed at {current}: DeepSpeed's ZeRO-3 universal "
            f"loader splits tensor-parallel shards only for its own AutoTP models; resume at "
            f"parallel.tp=1, or {keep}")
    return True


def prepare(step_dir: Path, saved: Layout, current: Layout, dist) -> Path:
    """Collective. The checkpoint to load at the current layout: `step_dir` itself, or its
    universal form, converted once by rank 0 while the other ranks wait."""
    if not needs_universal(step_dir, saved, current):
        return step_dir
    target = universal_dir(step_dir)
    error: Optional[BaseException] = None
    if dist.is_main:
        try:
            if _source_id(step_dir) == _read_marker(target):
                log.info("resharding %s (%s) to %s: reusing %s", step_dir.name, saved, current,
                         target)
            else:
                log.info("resharding %s (%s) to %s: converting to a universal checkpoint in %s",
                         step_dir.name, saved, current, target)
                convert(step_dir, target)
        except Exception as e:  # agreed on below: no rank waits for a conversion that failed
            error = e
    if dist.all_reduce_max(1.0 if error else 0.0) > 0:
        raise CheckpointError(f"converting {step_dir} to a universal checkpoint failed "
                              f"({error or 'on rank 0'}); resume at its saved layout: {saved}"
                              ) from error
    return target


def _source_id(step_dir: Path) -> str:
    """Names the save a universal form was made from: a re-saved step gets a new marker."""
    return f"{step_dir.name} {(step_dir / MARKER).stat().st_mtime_ns}"


def _read_marker(path: Path) -> Optional[str]:
    return (path / MARKER).read_text() if (path / MARKER).exists() else None


def convert(step_dir: Path, target: Path) -> None:
    """Write the universal form of step_dir to target (through target.tmp, committed by rename).
    A pipeline-parallel checkpoint is converted stage by stage (pretrain.reshard_pipeline)."""
    scratch = target.with_name(target.name + ".tmp")  # removed at start-up if a conversion dies
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    saved = Layout.from_file(step_dir / LAYOUT) if (step_dir / LAYOUT).exists() else None
    if saved is not None and saved.pp > 1:
        model = read_config(step_dir).model
        sources = reshard_pipeline.stage_sources(step_dir, saved, model.num_layers // saved.pp,
                                                 scratch / "sources")
        outs = [_run_converter(src, scratch / f"out{i}" / step_dir.name, step_dir)
                for i, src in enumerate(sources)]
        out = scratch / step_dir.name
        reshard_pipeline.merge_stages(outs, out, model.tie_embeddings)
    else:
        source = scratch / "source"
        _plain_source(step_dir, source)
        out = _run_converter(source, scratch / step_dir.name, step_dir)
    atomic_write(out / MARKER, _source_id(step_dir))
    os.replace(out, target)
    shutil.rmtree(scratch, ignore_errors=True)


def _plain_source(step_dir: Path, source: Path) -> None:
    """The converter's input: the optimizer files as they are, the model files without
    megatron's non-tensor `*._extra_state` entries (the converter fails on them)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    source.mkdir(parents=True)
    for f in step_dir.iterdir():
        if f.name.endswith("_optim_states.pt"):
            (source / f.name).symlink_to(f.resolve())
        elif f.name.endswith("_model_states.pt"):
            state = safe_load(f)
            if UNIVERSAL_CHECKPOINT_INFO not in state:
                raise CheckpointError(f"{f} carries no {UNIVERSAL_CHECKPOINT_INFO}: it was saved "
                                      f"before resharding was supported")
            if state.get("module") is not None:
                state["module"] = {k: v for k, v in state["module"].items()
                                   if not k.endswith("._extra_state")}
            torch.save(state, source / f.name)


def _run_converter(source: Path, out: Path, step_dir: Path) -> Path:
    """DeepSpeed's ds_to_universal from `source` into `out` (which it also gives a sibling
    latest_universal file); returns out."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(source), output_folder=str(out),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=False)
    chatter = io.StringIO()  # progress bars and summaries
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), \
                weights_only_loads():
            ds_to_universal.main(args)
    except (AssertionError, ValueError, RuntimeError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"ds_to_universal failed on {step_dir}: {e!r}\n"
                              f"{chatter.getvalue()[-2000:]}") from e
    return out
