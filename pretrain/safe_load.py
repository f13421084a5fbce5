"""Reading checkpoint `.pt` files as data, never as code.

torch.load unpickles: a planted file can run anything while it loads. Everything that reads a
checkpoint (resume, reshard, export, verify) goes through `safe_load`, torch's weights-only
unpickler with exactly the few DeepSpeed classes its files hold, or inside `weights_only_loads()`,
which makes DeepSpeed's own loaders do the same. A file that needs more is a CheckpointError
naming the file and what it asked for.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch

from pretrain.errors import CheckpointError


def _deepspeed_classes() -> List[type]:
    """What DeepSpeed 0.19.8's checkpoint files hold besides tensors, containers and primitives,
    as torch.serialization.get_unsafe_globals_in_checkpoint lists it for saves at ZeRO 0-3, fp32
    and bf16, and their universal forms: the loss scaler, the ZeRO stage, fragment addresses.
    DynamicLossScaler is fp16's (GPU only): from DeepSpeed's code, not seen. Another DeepSpeed
    version may save more: its files are refused, naming the class, until it is listed here."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def numpy_array_classes() -> List[Any]:
    """What numpy arrays of numbers need: RNG files written before their state was tensors."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct]


def _load_weights_only(load: Callable, f, map_location, mmap, classes: Sequence[Any]):
    """load(f) (torch.load or a stand-in for it) with torch's weights-only unpickler, which builds
    tensors, containers, primitives and `classes` only; anything else is a CheckpointError naming
    the file and what it asked for."""
    try:
        with torch.serialization.safe_globals(list(classes)):
            return load(f, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        asked = re.search(r"(GLOBAL \S+)|(Unsupported operand \d+)|got (<class '[^']+'>)", str(e))
        what = next(g for g in asked.groups() if g) if asked else "an object it cannot build"
        name = getattr(f, "name", f)
        raise CheckpointError(
            f"{name}: refused to unpickle {what}: checkpoint files hold tensors, containers and "
            f"the few classes DeepSpeed 0.19.8 saves, nothing that runs code when loaded. This one "
            f"was not written by this trainer, or by another DeepSpeed version (pretrain."
            f"safe_load._deepspeed_classes lists what is allowed); restore the checkpoint from a "
            f"trusted copy or resume from another one (trainer.resume_from)") from None


def safe_load(path, map_location="cpu", classes: Optional[Sequence[Any]] = None, mmap=None):
    """torch.load for checkpoint files: weights only, plus DeepSpeed's classes (or `classes`)."""
    return _load_weights_only(torch.serialization.load, path, map_location, mmap,
                              _deepspeed_classes() if classes is None else classes)


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every torch.load is a safe_load. DeepSpeed 0.19.8 unpickles everything with
    torch.load(..., weights_only=False): its checkpoint engine (load_checkpoint, also universal
    and ZeRO-3 loads), ds_to_universal and zero_to_fp32 all look `torch.load` up when they call it,
    so replacing that one attribute for the duration covers them. For the main thread of a load
    (another thread's torch.load inside would be weights-only too)."""
    previous = torch.load
    classes = _deepspeed_classes()

    def load(f, map_location=None, *args, mmap=None, **kwargs):  # weights_only etc.: overridden
        return _load_weights_only(previous, f, map_location, mmap, classes)

    torch.load = load
    try:
        yield
    finally:
        torch.load = previous
