"""The universal form of a pipeline-parallel checkpoint (pretrain.reshard), and loading any
universal form into a pipeline stage.

A PP checkpoint's model-parallel rank `tp_rank + tp x stage` holds one stage, its layers numbered
from 0 (`decoder.layers.0` on every stage), so DeepSpeed's converter, which reads every
`mp_rank_XX` file as a tensor-parallel slice of one model, cannot take it whole. Each stage is
converted on its own instead, from a copy of its files whose parameter names are made global
(`decoder.layers.{offset + i}`: the model file's weights, shapes and merge rules, the optimizer
files' fragment maps), and the stages' `zero/<name>/` directories are merged into one universal
checkpoint. With tied embeddings the last stage's copy of the word table (`output_layer.weight`)
is left out: the first stage's is the same tensor.

A stage of a run with pp > 1 loads a universal checkpoint under the global names of its
parameters (`global_names`), its tied output layer from the word table.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List

import torch

from pretrain.errors import CheckpointError
from pretrain.layout import Layout
from pretrain.model.init import global_name
from pretrain.safe_load import safe_load

_MODEL = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_OPTIM = re.compile(r"^((?:bf16_)?zero_pp_rank_\d+_)mp_rank_(\d+)(_optim_states\.pt)$")
TIED_COPY = "gpt.output_layer.weight"


def stage_sources(step_dir: Path, saved: Layout, per_stage: int, scratch: Path) -> List[Path]:
    """One converter input directory per stage (of `per_stage` layers), its names global;
    returns them in stage order."""
    tp = saved.tp
    sources = []
    for stage in range(saved.pp):
        src = scratch / f"stage{stage}"
        src.mkdir(parents=True)
        offset = stage * per_stage

        def rename(name: str, offset: int = offset) -> str:
            return global_name(name, offset, tied=False)

        for f in step_dir.iterdir():
            m, o = _MODEL.match(f.name), _OPTIM.match(f.name)
            mp = int(m.group(1)) if m else int(o.group(2)) if o else None
            if mp is None or mp // tp != stage:
                continue
            r = mp % tp
            if m:
                _save(_renamed_model_state(safe_load(f), rename, tp),
                      src / f"mp_rank_{r:02d}_model_states.pt")
            else:
                _save(_renamed_optim_state(safe_load(f), rename),
                      src / f"{o.group(1)}mp_rank_{r:02d}{o.group(3)}")
        sources.append(src)
    return sources


def merge_stages(outputs: List[Path], target: Path, tied: bool) -> None:
    """One universal checkpoint in `target` from the stages' converted outputs (in order)."""
    target.mkdir(parents=True)
    zero = target / "zero"
    zero.mkdir()
    last = len(outputs) - 1
    for stage, out in enumerate(outputs):
        for entry in (out / "zero").iterdir():
            if entry.name == "optimizer_state.pt":
                if stage == 0:
                    shutil.copy2(entry, zero / entry.name)
                continue
            if tied and stage == last and entry.name == TIED_COPY:
                continue
            if (zero / entry.name).exists():
                raise CheckpointError(f"{entry.name} is on two pipeline stages; the checkpoint "
                                      f"does not match its layout.json")
            shutil.move(str(entry), zero / entry.name)
    for f in outputs[0].iterdir():  # the model files: metadata and client state only
        if f.is_file():
            shutil.copy2(f, target / f.name)


def global_names(module: torch.nn.Module, tied: bool) -> Dict[int, str]:
    """id(parameter) -> the name it has in the whole model (this stage's layers renumbered, a
    tied output layer named after the word table it copies)."""
    return {id(p): global_name(name, module.layer_offset, tied)
            for name, p in module.named_parameters()}


def _renamed_model_state(state: dict, rename: Callable[[str], str], tp: int) -> dict:
    from deepspeed.checkpoint.constants import (CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_PP_DEGREE,
                                                CHECKPOINT_TP_DEGREE, UNIVERSAL_CHECKPOINT_INFO)

    if UNIVERSAL_CHECKPOINT_INFO not in state:
        raise CheckpointError(f"a model file carries no {UNIVERSAL_CHECKPOINT_INFO}: it was saved "
                              f"before resharding was supported")
    state["module"] = {rename(k): v for k, v in (state.get("module") or {}).items()
                       if not k.endswith("._extra_state")}
    state["param_shapes"] = [type(g)((rename(k), v) for k, v in g.items())
                             for g in state.get("param_shapes") or []]
    info = dict(state[UNIVERSAL_CHECKPOINT_INFO])
    for key, value in info.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            info[key] = [_renamed_pattern(v, rename) for v in value]
    state[UNIVERSAL_CHECKPOINT_INFO] = info
    # The stage's files alone: one pipeline stage of `tp` tensor-parallel ranks.
    state["mp_world_size"] = tp
    state[CHECKPOINT_PARALLEL_DIMS] = {CHECKPOINT_PP_DEGREE: 1, CHECKPOINT_TP_DEGREE: tp}
    return state


def _renamed_pattern(pattern: str, rename: Callable[[str], str]) -> str:
    """pretrain.reshard.universal_info's patterns are re.escape(name) + "$"."""
    if not pattern.endswith("$"):
        return pattern
    name = pattern[:-1].replace("\\.", ".")
    return re.escape(rename(name)) + "$"


def _renamed_optim_state(state: dict, rename: Callable[[str], str]) -> dict:
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS

    optim = state[OPTIMIZER_STATE_DICT]
    optim[PARAM_SLICE_MAPPINGS] = [type(g)((rename(k), v) for k, v in g.items())
                                   for g in optim[PARAM_SLICE_MAPPINGS]]
    return state


def _save(state: dict, path: Path) -> None:
    torch.save(state, path)
