"""Around DeepSpeed 0.19.8's save and load (pretrain.step.deepspeed_engine pins the version):
failures that strand no rank, the model file read once, the ZeRO-3 universal load repaired."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from pretrain.checkpoint_writer import BackgroundWriter


def repair_optimizer(optimizer: torch.optim.Optimizer, decay: List[float]) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load (harmless elsewhere): it gives
    every param group group 0's hyperparameters (biases and norms would be decayed), and one
    shared `step` tensor to every group's state, which Adam then advances once per group per
    step (wrong bias correction; the loss drifts ~1e-4 within a step)."""
    for group, wd in zip(optimizer.param_groups, decay):
        group["weight_decay"] = wd
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


@contextlib.contextmanager
def _patched(obj, name: str, value):
    """obj.name = value for the duration, as an instance attribute; then the class's attribute
    again (or the instance attribute DeepSpeed had set itself)."""
    own = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if own is None:
            delattr(obj, name)
        else:
            setattr(obj, name, own)


@contextlib.contextmanager
def model_file_read_once(engine, reuse: bool):
    """DeepSpeed's load_checkpoint reads the model-states file twice: first in
    SDLoaderBase.check_ckpt_list, only to compare its mp_world_size, then for real. On the
    tensor-parallel rank 0, whose real read is that same first file, the first read is handed back
    instead of reading it again (a resume of a large model reads gigabytes less per rank). Other
    ranks read another file for real: nothing is kept for them."""
    ce = getattr(engine, "checkpoint_engine", None)
    original = getattr(ce, "load", None)
    if not reuse or original is None:
        yield
        return
    first: Dict[str, Any] = {}
    calls = 0

    def load(path, *args, **kwargs):
        nonlocal calls
        calls += 1
        if str(path) in first:
            return first.pop(str(path))
        sd = original(path, *args, **kwargs)
        if calls == 1:  # check_ckpt_list's read
            first[str(path)] = sd
        return sd

    with _patched(ce, "load", load):
        try:
            yield
        finally:
            first.clear()


def save_engine(engine, root: Path, tag: str, client_state: Dict[str, Any],
                writer: Optional[BackgroundWriter] = None) -> None:
    """engine.save_checkpoint, where a write that fails on one rank strands no other: DeepSpeed
    0.19.8's save ends in a barrier, which a rank whose write raised (a full disk) would skip,
    leaving the others in it until the collective timeout. Its checkpoint engine's writes and rank
    0's copy of its recovery scripts record their failure instead, the save runs on to its
    barrier, and the first failure is raised after.

    With a writer, each of the checkpoint engine's writes (one per model or optimizer file) is
    staged in host memory and handed to the writer's thread instead (its failures surface later,
    through the writer); DeepSpeed's small files (its recovery script) are still written here."""
    failures: List[BaseException] = []

    def deferred(write: Callable) -> Callable:
        def call(*args, **kwargs):
            try:
                return write(*args, **kwargs)
            except Exception as e:
                failures.append(e)
        return call

    ce = engine.checkpoint_engine
    original = ce.save  # bound now: ce.save is patched below

    def staged(state_dict, path):
        writer.submit(state_dict, path)

    with _patched(ce, "save", deferred(original if writer is None else staged)), \
            _patched(engine, "_copy_recovery_script", deferred(engine._copy_recovery_script)):
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if failures:
        raise failures[0]
