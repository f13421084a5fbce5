"""Run the real CLI (`python -m launch.train`, under torchrun for several ranks) in fresh
processes, and read what a run wrote. Multi-rank runs use gloo on CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from pretrain import tracking

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="1")
    env.update(extra or {})
    return env


def train_cmd(overrides: List[str], nproc: int = 1) -> List[str]:
    if nproc == 1:
        return [sys.executable, "-m", "launch.train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "launch.train", *overrides]


def run_train(overrides: List[str], nproc: int = 1, timeout: float = 300, check: bool = True,
              env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(overrides, nproc), cwd=REPO, env=cpu_env(env), timeout=timeout,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> List[dict]:
    """The records of a run that was not killed mid-write: every line is one."""
    records, bad_lines = tracking.read_metrics(run_dir)
    assert bad_lines == 0, f"{run_dir}/metrics.jsonl has {bad_lines} line(s) that are no record"
    return records


def train_records(run_dir: Path) -> List[dict]:
    """Per-step training records (validation records have no 'loss' key)."""
    return [r for r in read_metrics(run_dir) if "loss" in r]


def tiny_overrides(data: Path, run_dir: Path, steps: int = 4, **extra) -> List[str]:
    """A small, fast configuration over a dataset directory; extra: key=value overrides."""
    base = {
        "experiment": "debug", "data.path": str(data), "run.dir": str(run_dir),
        "trainer.max_steps": steps, "trainer.log_every": 1, "trainer.eval_every": 0,
        "trainer.checkpoint_every": 0, "logger.mode": "disabled", "model.num_layers": 2,
        "model.hidden_size": 64, "model.num_attention_heads": 4, "trainer.micro_batch_size": 4,
        "data.num_workers": 0, "trainer.progress_bar": "off", "schedule.warmup_steps": 2,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]
