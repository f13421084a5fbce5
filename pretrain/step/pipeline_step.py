"""A step through megatron-core's pipeline schedule (1F1B) with DeepSpeed's engine doing the
reduction and the update (pretrain.step.StepModule).

Each rank holds one pipeline stage of the GPT (pretrain.model.gpt.GPT with pp > 1). One step:
every stage reads the step's micro-batches (the first stage embeds their tokens, the last one
takes its labels from them), megatron's `forward_backward_pipelining_without_interleaving` runs
the forward and backward passes, sending activations and their gradients between neighbouring
stages, then:
  1. the tied embedding's gradient is summed over the first and last stage (each holds a copy;
     the last one's is marked `ds_pipe_replicated`, so the gradient norm counts it once);
  2. the loss, known on the last stage, is averaged over the data-parallel ranks and given to
     every rank (one all-reduce), and the veto is asked on it;
  3. the engine's step() reduces the gradients over data parallel (ZeRO-1), clips by the norm over
     all stages (the mpu's model-parallel group is TP x PP) and updates, or discards the update.

The engine runs with `managed_gradient_accumulation=false`: the schedule, not engine.backward,
runs the backward passes, and step() is the accumulation boundary. The loss of a micro-batch is
divided by the number of micro-batches by the schedule, as DeepSpeed's backward would.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch

from pretrain import faults
from pretrain.cpu_shims import cuda_tensors_on_cpu
from pretrain.reasons import SkipReason
from pretrain.step.base import StepResult, Veto
from pretrain.step.deepspeed_step import DeepSpeedStep, discard_update


class PipelineStep(DeepSpeedStep):
    """save/load/grad_norm/module are DeepSpeedStep's: the same engine, whose mpu names each
    stage's files."""

    def __init__(self, model: torch.nn.Module, cfg, dist, load_universal: bool = False):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        super().__init__(model, cfg, dist, load_universal)
        self._ps = ps
        self._schedule = get_forward_backward_func()
        self.is_last_stage = ps.is_pipeline_last_stage()
        # The model-parallel copies of the loss: every TP rank of the last stage holds it.
        self._loss_copies = dist.world_size // dist.layout.pp

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self, batches: Iterator[torch.Tensor], step: int, veto: Veto) -> StepResult:
        engine = self.engine
        lr = float(engine.get_lr()[0])
        t0 = time.perf_counter()
        micro = [next(batches).to(self.dist.device, non_blocking=True)  # each (micro, seq + 1)
                 for _ in range(self.grad_accum)]
        data_s = time.perf_counter() - t0
        losses = self._run(micro, step, forward_only=False)
        self._sum_tied_embedding_grads()
        local_loss = torch.stack(losses).mean() if losses else torch.zeros(())
        global_loss = self._loss_over_ranks(local_loss.reshape(1))
        skipped = veto(global_loss)
        t_opt = time.perf_counter()
        self.before_update()
        with discard_update(engine) if skipped else contextlib.nullcontext():
            engine.step()  # the boundary: data-parallel reduction, clipping, the update
        opt_s = time.perf_counter() - t_opt
        if skipped is None and not engine.was_step_applied():  # DeepSpeed's own overflow check
            skipped = SkipReason.NONFINITE_GRAD
        if not self.is_last_stage:
            local_loss = torch.tensor(global_loss)
        return StepResult(loss=local_loss, global_loss=global_loss, lr=lr, data_seconds=data_s,
                          optimizer_seconds=opt_s, skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, batches: Iterator[torch.Tensor]) -> float:
        micro = [b.to(self.dist.device) for b in batches]
        self.module.eval()
        try:
            losses = self._run(micro, step=0, forward_only=True) if micro else []
        finally:
            self.module.train()
        total = torch.stack(losses).sum().reshape(1) if losses else torch.zeros(1)
        count = float(len(losses)) if self.is_last_stage else 0.0
        t = torch.cat([total.double().cpu(), torch.tensor([count], dtype=torch.float64)])
        t = t.to(self.dist.comm_device())
        torch.distributed.all_reduce(t)
        return float(t[0] / t[1]) if t[1] > 0 else math.nan

    def load(self, path: Path, load_optimizer: bool = True) -> Dict[str, Any]:
        """A universal checkpoint (another layout's, pretrain.reshard) names every parameter as
        the whole model does: this stage's are looked up under their global names."""
        self.before_update()
        if not self.engine.load_universal_checkpoint():
            return super().load(path, load_optimizer)
        from pretrain.reshard_pipeline import global_names

        optimizer = self.engine.optimizer
        names = global_names(self.module, self.module.cfg.tie_embeddings)
        local = dict(optimizer.param_names)
        optimizer.param_names = {p: names.get(id(p), n) for p, n in local.items()}
        try:
            return super().load(path, load_optimizer)
        finally:
            optimizer.param_names = local

    # ---- parts ---------------------------------------------------------------------------------
    def _run(self, micro: List[torch.Tensor], step: int, forward_only: bool) -> List[torch.Tensor]:
        """The schedule over `micro`; the micro-batches' losses on the last stage, [] elsewhere."""
        rank = self.dist.rank

        def forward_step(data_iterator, model):
            out = model(next(data_iterator))
            if not forward_only:  # drills: the loss on the last stage, activations before it
                out = faults.perturb_loss(out, step, rank)
            return out, _report

        with cuda_tensors_on_cpu(self.dist.device_type):
            store = self._schedule(
                forward_step_func=forward_step, data_iterator=iter(micro), model=self.module,
                num_microbatches=len(micro), seq_length=micro[0].shape[1] - 1,
                micro_batch_size=micro[0].shape[0], forward_only=forward_only)
        return [d["loss"] for d in store] if self.is_last_stage else []

    def _sum_tied_embedding_grads(self) -> None:
        """Add up the gradients of the tied embedding's two copies (first and last stage)."""
        if not self.module.cfg.tie_embeddings or not self._ps.is_rank_in_embedding_group():
            return
        weight = self.module.gpt.shared_embedding_or_output_weight()
        if weight is not None and weight.grad is not None:
            torch.distributed.all_reduce(weight.grad, group=self._ps.get_embedding_group())

    def _loss_over_ranks(self, local: torch.Tensor) -> float:
        """The mean over data-parallel ranks of the last stage's `local` (every rank gets the same
        bits: one all-reduce, the other stages adding zeros)."""
        t = (local.detach().float().clone() if self.is_last_stage
             else torch.zeros(1)).to(self.dist.comm_device())
        torch.distributed.all_reduce(t)
        return float(t.item()) / self._loss_copies


def _report(loss: torch.Tensor):
    """megatron's loss function: the loss to back-propagate (which the schedule divides by the
    number of micro-batches in place) and a copy for the logs."""
    return loss, {"loss": loss.detach().clone()}
