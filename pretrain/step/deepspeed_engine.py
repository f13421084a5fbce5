"""The DeepSpeed engine from our config: the ZeRO config, the megatron mpu adapter, the version.

DEEPSPEED_VERSION is the release the step module is written against: deepspeed_step.py and
deepspeed_io.py reach into private parts of it (ZeRO's `_update_scale`, the checkpoint engine's
`load`/`save`, `_copy_recovery_script`, the ZeRO-3 universal load's optimizer state), which
change between releases. `check_version` refuses any other release, in this one place.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from pretrain.config import Config
from pretrain.errors import EnvironmentSetupError
from pretrain.layout import Layout
from pretrain.step.optim import build_optimizer, lr_lambda

DEEPSPEED_VERSION = "0.19.8"


def check_version() -> None:
    import deepspeed

    if deepspeed.__version__ != DEEPSPEED_VERSION:
        raise EnvironmentSetupError(
            f"DeepSpeed {deepspeed.__version__} is installed; pretrain.step is written against "
            f"{DEEPSPEED_VERSION} (it patches private parts of it that change between releases): "
            f"pip install deepspeed=={DEEPSPEED_VERSION}")


class MegatronMPU:
    """megatron-core's parallel_state under the names DeepSpeed asks for.

    DeepSpeed needs the model-parallel group to reduce the gradient norm across TP shards (and to
    avoid double-counting replicated parameters) and the data-parallel group for ZeRO. Without
    this adapter TP>1 runs silently with wrong gradient norms and losses (FIELD-NOTES).
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def __getattr__(self, name: str):
        # Every other getter (data-parallel group/rank/size, tensor-parallel ...) as megatron has it.
        return getattr(self._ps, name)


class PipelineMPU(MegatronMPU):
    """Under pipeline parallelism DeepSpeed's model-parallel group is TP x PP: the gradient norm
    is summed over every stage (replicated parameters counted on TP rank 0 of each stage, which
    DeepSpeed reads through get_tensor_model_parallel_rank), and each stage's TP ranks save their
    own `mp_rank_XX` model file."""

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(group=self._ps.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank(group=self._ps.get_model_parallel_group())

    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()


def deepspeed_config(cfg: Config, layout: Layout, device_type: str,
                     load_universal: bool = False) -> Dict[str, Any]:
    """The engine's config for `layout` on `device_type` (cpu | cuda); the planner calls it too."""
    precision = cfg.trainer.precision
    zero: Dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    pipeline = layout.pp > 1
    if cfg.parallel.zero_stage >= 1:
        # Overlapped, bucketed gradient reduction where the stage supports it (not where step()
        # owns the accumulation boundary: DeepSpeed allows overlap there with ZeRO-2 only).
        zero.update(overlap_comm=device_type == "cuda" and not pipeline, contiguous_gradients=True,
                    reduce_bucket_size=int(2e8), allgather_bucket_size=int(2e8))
    if cfg.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch_size,
        # DeepSpeed clips at 1.0 unless told otherwise: always set it from our config.
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # True to resume from a universal checkpoint at another layout (pretrain.reshard).
        "checkpoint": {"load_universal": load_universal},
        # Under pipeline parallelism megatron's schedule runs the backward passes; step() is then
        # the accumulation boundary: it reduces the gradients over data parallel and updates.
        "managed_gradient_accumulation": not pipeline,
    }


def partitioned_construction(cfg: Config, dist):
    """Under ZeRO-3: DeepSpeed's `zero.Init`, in which each module's parameters are partitioned
    over data parallel as soon as it is built, so a rank never holds its whole TP shard (the
    model's GPT(..., partitioned=)). None at ZeRO 0-2."""
    if dist.layout.zero_stage != 3:
        return None
    import deepspeed

    check_version()
    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, dist.layout,
                                                                    dist.device_type),
                               mpu=MegatronMPU())


def build_engine(model: nn.Module, cfg: Config, dist, load_universal: bool = False):
    """deepspeed.initialize with our optimizer, LR schedule and the megatron mpu adapter, for
    dist's layout (pretrain.dist.Dist)."""
    import deepspeed

    check_version()
    optimizer = build_optimizer(model, cfg.optimizer, dist.device_type, cfg.parallel.offload_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.schedule, cfg.trainer.max_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        mpu=PipelineMPU() if dist.layout.pp > 1 else MegatronMPU(),
        config=deepspeed_config(cfg, dist.layout, dist.device_type, load_universal),
        dist_init_required=False,
    )
    return engine
