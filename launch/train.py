"""`pretrain-train`: the Hydra training app. Overrides like `experiment=debug run.dir=PATH`.

A sweep (`-m`): job N trains in RUN_DIR/N (hydra.sweep.dir/subdir), so the points of a sweep never
share checkpoints, and a requeued job finds its own directory again. A job's error is raised to
Hydra, which reports it as that job's failure (under submitit: in the job's result).

Under `-m hydra/launcher=slurm` (hydra-submitit-launcher) every Slurm task runs `_app` itself, and
this module, not submitit, requeues a job that stopped for Slurm's warning signal: submitit's own
handler would requeue at once, without the agreed checkpoint. After a SIGUSR1/SIGUSR2 stop (its
checkpoint saved), rank 0 runs `scontrol requeue` at most hydra.launcher.max_num_timeout times per
job (SLURM_RESTART_COUNT), and every rank exits 3 without a result, so the waiting `pretrain-train
-m` gets the requeued run's result instead. After a SIGTERM stop (scancel, preemption) nothing is
requeued here: a cancel means stop, and a preempted job is requeued by Slurm when so configured.
"""

from __future__ import annotations

import os
import subprocess
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from launch.config import check_overrides, fail, register, to_config
from pretrain.errors import PretrainError
from pretrain.model.fallbacks import silence_library_warnings


class RequeueError(PretrainError, RuntimeError):
    """A job that stopped to be requeued could not be (the bound is reached, or scontrol failed)."""


@hydra.main(config_path="pkg://hydra_conf", config_name="config", version_base=None)
def _app(cfg: DictConfig) -> int:
    # Here, not in main: a Slurm task under submitit runs _app alone. Before megatron-core's import.
    silence_library_warnings()
    from pretrain.run import train

    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        config = to_config(cfg)
        if sweep:
            config.run.dir = hydra_cfg.runtime.output_dir  # RUN_DIR/<job num>, absolute
        result = train(config)
    except PretrainError as e:
        if sweep:
            raise
        fail(e)
    if result.exit_code and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        _requeue_submitit_job(result, int(hydra_cfg.launcher.get("max_num_timeout") or 0))
    if result.exit_code:
        sys.exit(result.exit_code)
    return 0


def _requeue_submitit_job(result, max_requeues: int) -> None:
    """Requeue this Slurm job (rank 0) after a stop that asks to continue; raise when it cannot."""
    from pretrain.callbacks.preemption import wants_requeue
    from pretrain.launcher_env import read_process_env

    if not wants_requeue(result.stop_reason):
        return
    job, restarts = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        raise RequeueError(
            f"job {job} stopped after saving at step {result.state['step']} "
            f"({result.stop_reason}) but was already requeued {restarts} times "
            f"(hydra.launcher.max_num_timeout={max_requeues}); run it again with the same run.dir "
            f"({result.run_dir}) to continue")
    if read_process_env(os.environ).rank == 0:
        print(f"job {job}: {result.stop_reason}, saved at step {result.state['step']}: "
              f"requeue {restarts + 1} of at most {max_requeues}", flush=True)
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RequeueError(f"scontrol requeue {job} failed ({done.stderr.strip()}); is "
                               f"JobRequeue allowed on this cluster? Run it again with the same "
                               f"run.dir ({result.run_dir}) to continue")


def main() -> None:
    register()
    try:
        check_overrides(sys.argv[1:])
    except PretrainError as e:
        fail(e)
    _app()


if __name__ == "__main__":
    main()
