"""A step through DeepSpeed's engine: data + tensor parallel, ZeRO 0-3 (pretrain.step.StepModule).

One step: grad_accum micro-batches forward and backward (DeepSpeed reduces the gradients at the
accumulation boundary), the loss averaged over all ranks (one collective, so every rank holds the
same bits), the veto asked on it, then the optimizer update at the boundary, or its discard.

A discarded update: parameters, optimizer state and LR schedule stay as they were, the gradients
are zeroed, the engine's skipped_steps counts it (`discard_update`). DeepSpeed's own check finding
a non-finite gradient norm discards the update the same way, reported as NONFINITE_GRAD (or
FP16_OVERFLOW with fp16's loss scaling); fp32 ZeRO 0, where DeepSpeed checks nothing, is checked
here on the norm computed for the logs.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from pretrain import faults
from pretrain.checkpoint_writer import BackgroundWriter
from pretrain.errors import CheckpointError
from pretrain.reasons import SkipReason
from pretrain.safe_load import weights_only_loads
from pretrain.step.base import StepModule, StepResult, Veto
from pretrain.step.deepspeed_engine import build_engine
from pretrain.step.deepspeed_io import model_file_read_once, repair_optimizer, save_engine
from pretrain.step.sequence_parallel import sum_sequence_parallel_grads


class DeepSpeedStep(StepModule):
    def __init__(self, model: torch.nn.Module, cfg, dist, load_universal: bool = False):
        self.dist = dist
        self.grad_accum = dist.layout.grad_accum
        self.engine = build_engine(model, cfg, dist, load_universal)
        if dist.layout.sequence_parallel:
            from megatron.core import parallel_state

            sum_sequence_parallel_grads(self.engine.module,
                                        parallel_state.get_tensor_model_parallel_group())
        e = self.engine
        # DeepSpeed reports the pre-clip norm itself under ZeRO and its bf16/fp16 wrappers; fp32
        # ZeRO 0 computes it inside its clipping and drops it: computed here then, every step.
        self._own_grad_norm = not (e.zero_optimization() or e.bfloat16_enabled() or e.fp16_enabled())
        self._saving: Optional[BackgroundWriter] = None  # copying this engine's tensors, maybe
        self._grad_norm: Optional[float] = None

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def train_step(self, batches: Iterator[torch.Tensor], step: int, veto: Veto) -> StepResult:
        engine, device, rank = self.engine, self.dist.device, self.dist.rank
        lr = float(engine.get_lr()[0])
        data_s, losses = 0.0, []
        for i in range(self.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches).to(device, non_blocking=True)  # (micro, seq_len + 1)
            data_s += time.perf_counter() - t0
            loss = faults.perturb_loss(engine(batch), step, rank)
            engine.backward(loss)
            losses.append(loss.detach())
            if i + 1 < self.grad_accum:
                engine.step()  # not the accumulation boundary: DeepSpeed only counts it
        local_loss = torch.stack(losses).mean()
        global_loss = self.dist.all_reduce_mean(local_loss)
        skipped = veto(global_loss)
        if self._own_grad_norm:  # every step: a stop may make any step a log step
            self._grad_norm = grad_norm_before_clipping(engine)
            # fp32 ZeRO 0 has no overflow check of DeepSpeed's: a NaN or inf gradient would be
            # applied. The norm is taken after the gradient all-reduce and summed over the TP
            # group, so every rank holds the same verdict.
            if skipped is None and not math.isfinite(self._grad_norm):
                skipped = SkipReason.NONFINITE_GRAD
        t_opt = time.perf_counter()
        self.before_update()
        with discard_update(engine) if skipped else contextlib.nullcontext():
            engine.step()  # the boundary: the optimizer update
        opt_s = time.perf_counter() - t_opt
        if skipped is None and not engine.was_step_applied():  # DeepSpeed's own overflow check
            skipped = SkipReason.FP16_OVERFLOW if engine.fp16_enabled() else SkipReason.NONFINITE_GRAD
        return StepResult(loss=local_loss, global_loss=global_loss, lr=lr, data_seconds=data_s,
                          optimizer_seconds=opt_s, skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, batches: Iterator[torch.Tensor]) -> float:
        engine = self.engine
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64)  # (sum of batch losses, batches)
        try:
            for batch in batches:
                loss = engine(batch.to(self.dist.device))
                total += torch.tensor([float(loss), 1.0], dtype=torch.float64)
        finally:
            engine.train()
        if self.dist.world_size > 1:
            total = total.to(self.dist.comm_device())
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1])

    def grad_norm(self) -> Optional[float]:
        norm = self._grad_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def save(self, root: Path, tag: str, client_state: Dict[str, Any],
             writer: Optional[BackgroundWriter] = None) -> None:
        save_engine(self.engine, Path(root), tag, client_state, writer)
        self._saving = writer  # its thread may copy the engine's tensors until the next update

    def before_update(self) -> None:
        """The engine's tensors (weights, optimizer state) change after this: a background
        save's copies of them must be made (the forward and backward passes before it leave
        them alone, so on CPU the copies overlap those instead of stopping the loop)."""
        if self._saving is not None:
            self._saving.wait_staged()
            self._saving = None

    def load(self, path: Path, load_optimizer: bool = True) -> Dict[str, Any]:
        self.before_update()
        engine, path = self.engine, Path(path)
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer
        decay = [g["weight_decay"] for g in base.param_groups]
        try:
            # The first model file DeepSpeed reads (mp_rank_00) is model-parallel rank 0's own.
            first_file = engine.mpu is None or engine.mpu.get_model_parallel_rank() == 0
            with weights_only_loads(), model_file_read_once(engine, first_file):
                loaded, client = engine.load_checkpoint(
                    str(path.parent), tag=path.name, load_optimizer_states=load_optimizer,
                    load_lr_scheduler_states=load_optimizer, load_module_strict=True)
        except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"cannot load {path}: {e}") from e
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files in {path}")
        repair_optimizer(base, decay)
        return client or {}


def grad_norm_before_clipping(engine) -> float:
    """The global gradient norm where DeepSpeed reports none (ZeRO 0 in fp32: its clipping
    computes the norm and drops it), computed as that clipping does: after the data-parallel
    all-reduce, TP-sharded parameters on every TP rank, replicated ones on TP rank 0 only, summed
    over the TP group. Collective over the TP group."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    mpu = engine.mpu
    tp_rank = mpu.get_model_parallel_rank() if mpu is not None else 0
    squares = [p.grad.detach().float().pow(2).sum() for p in engine.module.parameters()
               if p.grad is not None and (tp_rank == 0 or is_model_parallel_parameter(p))]
    total = torch.stack(squares).sum().reshape(1) if squares else torch.zeros(1)
    if mpu is not None and mpu.get_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=mpu.get_model_parallel_group())
    return float(total.sqrt())


@contextlib.contextmanager
def discard_update(engine):
    """Make the engine's next boundary step() discard its update through DeepSpeed's own
    overflow path: parameters, optimizer state and LR schedule unchanged, gradients zeroed, the
    engine's skipped_steps counts it.

    The ZeRO optimizers (stages 1-3, every precision) find an overflow in step() and pass it to
    _update_scale() before acting on it: forcing the flag there reuses their clean-up of the
    gradient buffers. A genuine overflow still updates the fp16 loss scale; a vetoed finite step
    leaves it alone. Without ZeRO (a torch optimizer, or DeepSpeed's fp16/bf16 wrappers, whose
    step() does not work that way) step() becomes a no-op and `overflow` is set, which the engine
    reads after stepping before it zeroes the gradients.
    """
    opt = engine.optimizer
    if engine.zero_optimization_stage() >= 1:
        update_scale = opt._update_scale

        def forced(has_overflow=False, *args, **kwargs):
            if has_overflow:
                update_scale(has_overflow, *args, **kwargs)
            opt.overflow = True

        opt._update_scale = forced
        try:
            yield
        finally:
            del opt._update_scale  # the class's method again
    else:
        had = dict(vars(opt))
        opt.step = lambda *args, **kwargs: None
        opt.overflow = True
        try:
            yield
        finally:
            for name in ("step", "overflow"):
                if name in had:
                    setattr(opt, name, had[name])
                else:
                    delattr(opt, name)
