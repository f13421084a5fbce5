"""Read the process's place in the job from whichever launcher started it.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; `srun` (one task per GPU) sets
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST; a plain `python` or `pretrain-train`
is a world of one. This is the only module that reads those variables (through `pretrain.dist`).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import List, Mapping

from pretrain.errors import EnvironmentSetupError


@dataclass(frozen=True)
class ProcessEnv:
    launcher: str  # torchrun | slurm | single
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand Slurm's compressed host list: 'gpu[01-03,07],login1' -> gpu01, gpu02, gpu03, gpu07, login1."""
    hosts: List[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain.strip())
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{i:0{width}d}")
            else:
                hosts.append(f"{prefix}{part}")
    return [h for h in hosts if h]


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise EnvironmentSetupError(f"{key}={env.get(key)!r}: expected an integer from the launcher")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_process_env(env: Mapping[str, str]) -> ProcessEnv:
    """torchrun's variables win over Slurm's (torchrun inside an sbatch job); then srun; then single."""
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher = "torchrun"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        if not nodes:
            raise EnvironmentSetupError(
                "SLURM_JOB_NODELIST is empty: run the training under `srun` inside an allocation")
        addr = env.get("MASTER_ADDR", nodes[0])
        # One port per job, the same on every task, below the ephemeral range (32768+).
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 10000 + job % 20000
    else:
        return ProcessEnv("single", 0, 1, 0, "127.0.0.1", _free_port())
    if not 0 <= rank < world:
        raise EnvironmentSetupError(f"rank {rank} is outside the world of {world} ({launcher} variables)")
    if not 0 <= local < world:
        raise EnvironmentSetupError(f"local rank {local} is inconsistent with world {world}")
    return ProcessEnv(launcher, rank, world, local, addr, port)
