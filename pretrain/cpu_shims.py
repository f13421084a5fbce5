"""megatron-core on CPU: redirect its CUDA assumptions. Applied only when the device is CPU.

1. `torch.cuda.current_device()` is used by megatron-core (rotary embeddings, the global memory
   buffer, ...) as the device for new tensors; on CPU it must name the CPU.
2. The tensor-parallel RNG tracker saves and restores CUDA generator states; on CPU it must fork
   the CPU generator instead, so that dropout inside tensor-parallel regions stays reproducible.
3. Activation recompute (`tensor_parallel.checkpoint`, `CheckpointWithoutOutput`) saves the CPU
   generator, the CUDA generator (`random._get_cuda_rng_state`) and the tracker before the
   forward, and restores all three for the recomputation, so that it draws the same dropout
   masks. On CPU there is no CUDA generator: both calls go to the CPU generator, which the save
   and restore then simply cover twice.
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class CPURNGStatesTracker:
    """Same contract as megatron's CudaRNGStatesTracker (add / fork / get_states / set_states)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"rng state {name} / seed {seed} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def apply() -> None:
    """Idempotent. Call before building any megatron-core module on CPU."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_shims.apply() on a CUDA machine: the shims are for CPU runs only")
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    from megatron.core.tensor_parallel import random as mp_random

    # random.py looks these two up as module globals at each call (no other module imports them).
    mp_random._get_cuda_rng_state = _get_cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    _APPLIED = True


def _get_cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()  # always a fresh tensor: clone is moot


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def seed_tensor_parallel_rng(seed: int, tp_rank: int) -> None:
    """CPU counterpart of megatron's model_parallel_cuda_manual_seed, with the same seed offsets."""
    from megatron.core.tensor_parallel import random as mp_random

    tracker = CPURNGStatesTracker()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Inside megatron's pipeline schedule: tensors it creates with device="cuda" (its token
    counters) are made on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def cuda_tensors_on_cpu(device_type: str):
    """A context in which device="cuda" means the CPU, on CPU runs; nothing on GPU runs."""
    return _CudaToCpu() if device_type == "cpu" else contextlib.nullcontext()
