"""The one object that knows the parallel layout: world, ranks, TP/DP degrees, device, groups.

`Dist.from_env(parallel_cfg)` only reads and checks (no process group), so a bad layout fails
before anything starts. `dist.initialize()` then starts torch.distributed (through DeepSpeed),
megatron's parallel_state with the TP degree, and the seeds.

Rank layout (megatron's): TP groups are consecutive ranks, so tp_rank = rank % tp and
dp_rank = rank // tp; with world 4 and tp 2 the TP groups are {0,1},{2,3}, DP groups {0,2},{1,3}.
"""

from __future__ import annotations

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
from pretrain.launcher_env import ProcessEnv, read_process_env

log = logging.getLogger("pretrain")


@dataclass
class Dist:
    env: ProcessEnv
    tp: int
    device_type: str  # cpu | cuda
    backend: str  # gloo | nccl
    init_timeout: timedelta = timedelta(minutes=30)
    initialized: bool = False

    # ---- construction (no side effects) -------------------------------------------------------
    @classmethod
    def from_env(cls, parallel: ParallelConfig, env: Optional[Mapping[str, str]] = None) -> "Dist":
        penv = read_process_env(os.environ if env is None else env)
        if penv.world_size % parallel.tp != 0:
            raise ConfigError(
                f"parallel.tp: tp={parallel.tp} does not divide the world size {penv.world_size}; "
                f"launch a multiple of {parallel.tp} processes or change parallel.tp")
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
        return cls(penv, parallel.tp, device, backend, timedelta(minutes=parallel.init_timeout_min))

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
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

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
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.tp)
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
