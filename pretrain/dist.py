"""The one object that knows this process's place in the run: rank, world, device, groups.

`Dist.from_env(parallel_cfg)` only reads and checks (no process group), so a bad layout fails
before anything starts. `dist.initialize()` then starts torch.distributed (through DeepSpeed),
megatron's parallel_state with the layout's degrees, and the seeds.

The degrees and the rank arithmetic are the layout's (pretrain.layout.Layout, megatron's order:
TP groups are consecutive ranks); `with_layout` gives a Dist the run's full layout once the
dataset's vocabulary is known.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import numpy as np
import torch

from pretrain.config import ParallelConfig
from pretrain.errors import ConfigError, EnvironmentSetupError
from pretrain.layout import Layout
from pretrain.launcher_env import ProcessEnv, read_process_env

log = logging.getLogger("pretrain")


@dataclass
class Dist:
    env: ProcessEnv
    layout: Layout
    device_type: str  # cpu | cuda
    backend: str  # gloo | nccl
    init_timeout: timedelta = timedelta(minutes=30)
    initialized: bool = False

    # ---- construction (no side effects) -------------------------------------------------------
    @classmethod
    def from_env(cls, parallel: ParallelConfig, env: Optional[Mapping[str, str]] = None,
                 layout: Optional[Layout] = None) -> "Dist":
        """layout: the run's (Config.layout); by default the degrees of `parallel` alone."""
        penv = read_process_env(os.environ if env is None else env)
        if layout is None:
            layout = Layout.build(penv.world_size, tp=parallel.tp, zero_stage=parallel.zero_stage,
                                  micro_batch_size=1, global_batch_size=None, pp=parallel.pp,
                                  sequence_parallel=parallel.sequence_parallel)
        if layout.world_size != penv.world_size:
            raise ConfigError(f"parallel.tp: the layout ({layout}) needs {layout.world_size} "
                              f"processes but {penv.world_size} were launched")
        device = parallel.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise EnvironmentSetupError(
                "parallel.device=cuda but no GPU is visible (torch.cuda.is_available() is False); "
                "use parallel.device=cpu or run on a GPU node")
        backend = parallel.backend
        if backend == "auto":
            backend = "nccl" if device == "cuda" else "gloo"
        if backend == "nccl" and device != "cuda":
            raise ConfigError("parallel.backend: nccl needs parallel.device=cuda; use gloo on CPU")
        return cls(penv, layout, device, backend, timedelta(minutes=parallel.init_timeout_min))

    def with_layout(self, layout: Layout) -> "Dist":
        """This Dist with the run's full layout (before initialize: the degrees must not change)."""
        if self.initialized and (layout.tp, layout.pp) != (self.layout.tp, self.layout.pp):
            raise ConfigError("the parallel degrees cannot change once the process groups exist")
        if layout.world_size != self.world_size:
            raise ConfigError(f"parallel.tp: the layout ({layout}) needs {layout.world_size} "
                              f"processes but {self.world_size} were launched")
        return dataclasses.replace(self, layout=layout)

    # ---- layout arithmetic --------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")

    # ---- side effects ------------------------------------------------------------------------
    def initialize(self, seed: int) -> "Dist":
        """Start the process group, megatron's parallel state, and seed every generator."""
        if self.device_type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            from pretrain import cpu_shims

            cpu_shims.apply()
        else:
            torch.cuda.set_device(self.device)
        # DeepSpeed and torch read the rendezvous from the environment: hand them our reading.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK=str(self.local_rank), MASTER_ADDR=self.env.master_addr,
                          MASTER_PORT=str(self.env.master_port))
        import deepspeed
        from megatron.core import parallel_state

        if (self.is_main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0):
            log.warning(
                "torchrun --max-restarts with a rendezvous store shared with the workers: restarted "
                "workers can read the previous attempt's addresses and fail to connect "
                "(pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and launch with "
                "--rdzv-backend=c10d (or --standalone on one node)")
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=self.backend, timeout=self.init_timeout,
                                       auto_mpi_discovery=False, verbose=False)
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.layout.tp,
                                                     pipeline_model_parallel_size=self.layout.pp)
        self.initialized = True
        self.seed(seed)
        return self

    def seed(self, seed: int) -> None:
        """Same seed on every rank for python/numpy/torch (identical init of replicated weights);
        megatron's tracker gives each TP rank its own stream for tensor-parallel regions."""
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.device_type == "cpu":
            from pretrain import cpu_shims

            cpu_shims.seed_tensor_parallel_rng(seed, self.tp_rank)
        else:
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(seed)

    def barrier(self) -> None:
        if self.initialized and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_reduce_max(self, value: float) -> float:
        """Max over all ranks (one collective); used for agreed decisions (stop, skip)."""
        if not (self.initialized and torch.distributed.is_initialized()) or self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        """Mean over all ranks of a scalar (one collective). Every rank gets the same bits (the
        reduced value is computed once and distributed), so decisions taken on it agree; a NaN or
        inf on any rank makes it non-finite everywhere."""
        if not (self.initialized and torch.distributed.is_initialized()) or self.world_size == 1:
            return float(value)
        t = value.detach().float().reshape(1).to(self.comm_device(), copy=True)  # not in place
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size

    def set_collective_timeout(self, timeout: timedelta) -> None:
        """Change the timeout of every process group this rank is in (the default one and those
        megatron and DeepSpeed created), e.g. from the start-up timeout to the steady-state one."""
        if not (self.initialized and torch.distributed.is_initialized()):
            return
        from torch.distributed import distributed_c10d as c10d

        for group in list(c10d._world.pg_map):
            try:
                c10d._set_pg_timeout(timeout, group)
            except (ValueError, AssertionError, RuntimeError):  # not a member, or no such backend
                pass

    def broadcast_object(self, obj, src: int = 0):
        """Rank src's obj on every rank (pickled: for small, trusted values only)."""
        if not (self.initialized and torch.distributed.is_initialized()) or self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def shutdown(self) -> None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.initialized = False
