"""Real training jobs on a real Slurm: the debug experiment through slurm/debug_cpu.sbatch with 2
ranks, a job stopped by Slurm's warning signal that saves, requeues itself and resumes with the
exact losses of an uninterrupted job, and sweeps through the Hydra Slurm launcher
(hydra/launcher=slurm_cpu), which also requeue and resume after the warning signal.

Tiny models (2 layers, 64 wide) on 2 CPUs shared with other work: a job spends most of its time
importing torch and DeepSpeed, so the timeouts are generous and the step counts small.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from pretrain.checkpoint import committed
from tests.launch_helpers import cpu_env, read_metrics, tiny_overrides, train_records

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "slurm" / "debug_cpu.sbatch"
JOB_TIMEOUT = 240  # one job: ~10 s of training, the rest start-up on a loaded 2-core machine


def losses(run_dir: Path) -> Dict[int, float]:
    """step -> loss; metrics.jsonl accumulates over a job's attempts, the last record of a step wins."""
    return {r["step"]: r["loss"] for r in train_records(run_dir)}


def wait_for_step(run_dir: Path, step: int, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"{run_dir}: no step {step} in metrics.jsonl after {timeout:.0f}s")


def yaml_load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def start_events(run_dir: Path) -> List[dict]:
    return [r for r in read_metrics(run_dir) if r.get("event") == "start"]


def test_debug_job_with_two_tensor_parallel_ranks_completes(slurm, pretrain_bin, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_dataset, run_dir, steps=6, parallel__tp=2, logger__mode="offline",
                               trainer__checkpoint_every=3)
    job_id, state, output = slurm.submit(TEMPLATE, overrides, cwd=tmp_path, timeout=JOB_TIMEOUT,
                                         env={"PRETRAIN_BIN": str(pretrain_bin)})
    assert state == "COMPLETED", output
    assert "step exited with 0" in output and "requeue" not in output
    assert sorted(losses(run_dir)) == list(range(1, 7)), output
    saved = yaml_load(run_dir / "config.yaml")
    assert saved["parallel"]["tp"] == 2 and saved["run"]["dir"] == str(run_dir)
    assert [p.name for p in committed(run_dir / "checkpoints")] == ["step_00000003", "step_00000006"]
    # TP=2 over the job's 2 tasks: one model-parallel file per rank.
    assert len(list((run_dir / "checkpoints" / "step_00000006").glob("mp_rank_*_model_states.pt"))) == 2
    assert list((run_dir / "wandb").glob("offline-run-*")), "logger.mode=offline wrote no W&B run"


def test_preempted_job_saves_requeues_and_resumes_with_identical_losses(
        slurm, pretrain_bin, tiny_dataset, tmp_path):
    steps = 150  # about 10 s of training: the signal lands well before the end
    common = dict(steps=steps, schedule__total_steps=steps, model__dropout=0.1, logger__mode="offline")
    env = {"PRETRAIN_BIN": str(pretrain_bin)}
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    # Both jobs at once (the partition oversubscribes): same template, same 2 data-parallel ranks.
    straight_id = slurm.sbatch(TEMPLATE, tiny_overrides(tiny_dataset, straight, **common), cwd=tmp_path, env=env)
    job_id = slurm.sbatch(TEMPLATE, tiny_overrides(tiny_dataset, pieces, **common), cwd=tmp_path, env=env)

    wait_for_step(pieces, 2)
    slurm.signal_batch(job_id, "USR1")  # what `#SBATCH --signal=B:USR1@60` does before the time limit
    (_, state, output), (_, straight_state, straight_output) = slurm.wait_all(
        [job_id, straight_id], timeout=JOB_TIMEOUT)
    assert state == "COMPLETED", output
    assert straight_state == "COMPLETED", straight_output

    # The lifecycle: signal -> agreed stop -> checkpoint -> exit 3 -> requeue -> resume -> done.
    assert "SIGUSR1 received: saving at step" in output, output
    assert "step exited with 3" in output and "requeue 1 of at most 20" in output, output
    assert "restart 1 on" in output and output.count("step exited with 0") == 1, output
    stopped_at = int(output.split("SIGUSR1 received: saving at step ")[1].split()[0])
    assert 2 <= stopped_at < steps
    assert [p.name for p in committed(pieces / "checkpoints")] == [
        f"step_{stopped_at:08d}", f"step_{steps:08d}"]
    assert f"resumed from {pieces / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in output

    a, b = losses(straight), losses(pieces)
    assert list(a) == list(range(1, steps + 1)) and sorted(b) == list(a)
    assert [b[s] for s in a] == [a[s] for s in a]  # bitwise, every step, across the requeue
    # One W&B run across both attempts of the job.
    ids = {e.get("wandb_id") for e in start_events(pieces)}
    assert len(start_events(pieces)) == 2 and ids == {(pieces / "wandb_id").read_text().strip()}


def sweep(slurm, tiny_dataset, sweep_dir: Path, name: str, *overrides: str, steps: int = 4,
          timeout: float = 400, on_start=None) -> subprocess.CompletedProcess:
    """`pretrain-train -m hydra/launcher=slurm_cpu ...` from tmp; cancels its jobs if it fails."""
    cmd = [sys.executable, "-m", "launch.train", "-m", "hydra/launcher=slurm_cpu",
           f"hydra.launcher.name={name}",
           *tiny_overrides(tiny_dataset, sweep_dir, steps=steps), *overrides]
    proc = subprocess.Popen(cmd, cwd=sweep_dir.parent, env=slurm.env(cpu_env()), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if on_start is not None:
            on_start()
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        slurm.cancel_named(name)
        raise
    finally:
        if proc.returncode != 0:
            slurm.cancel_named(name)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def test_hydra_slurm_launcher_runs_a_two_point_sweep(slurm, tiny_dataset, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = sweep(slurm, tiny_dataset, sweep_dir, f"sweep-{uuid.uuid4().hex[:8]}", "optimizer.lr=1e-3,2e-3")
    assert proc.returncode == 0, proc.stdout[-6000:]
    # Job N of the sweep trains in RUN_DIR/N, with its own point of the sweep.
    for num, lr in enumerate([1e-3, 2e-3]):
        run_dir = sweep_dir / str(num)
        assert sorted(losses(run_dir)) == [1, 2, 3, 4], proc.stdout[-6000:]
        saved = yaml_load(run_dir / "config.yaml")
        assert saved["optimizer"]["lr"] == lr and saved["run"]["dir"] == str(run_dir)
        assert [p.name for p in committed(run_dir / "checkpoints")] == ["step_00000004"]
    assert losses(sweep_dir / "0") != losses(sweep_dir / "1")
    # One array element per point, each with 2 tasks (ranks), logs under RUN_DIR/.submitit/.
    logs = sorted(p.name for p in sweep_dir.glob(".submitit/*_*/*_log.out"))
    assert len(logs) == 4 and {n.rsplit("_", 2)[1] for n in logs} == {"0", "1"}, logs


def test_hydra_slurm_launcher_job_requeues_itself_after_the_warning_signal(slurm, tiny_dataset, tmp_path):
    sweep_dir, steps = tmp_path / "sweep", 150
    name = f"preempt-{uuid.uuid4().hex[:8]}"
    run_dir = sweep_dir / "0"
    released = []

    def preempt_and_release() -> None:
        wait_for_step(run_dir, 2)
        # One point: submitit submits a plain job, not an array; its folder is named by its id.
        job = next(p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir())
        # What `#SBATCH --signal=USR2@<signal_delay_s>` does: USR2 to every task of the job.
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=15)
        # The requeued job: Slurm holds it ~2 minutes; wait() releases it sooner.
        released.append(slurm.wait(_raw_job_id(job), timeout=JOB_TIMEOUT))

    proc = sweep(slurm, tiny_dataset, sweep_dir, name, f"schedule.total_steps={steps}",
                 steps=steps, on_start=preempt_and_release)
    assert proc.returncode == 0, proc.stdout[-6000:]
    log = next(sweep_dir.glob(".submitit/*/*_0_log.out")).read_text()  # rank 0's
    assert "SIGUSR2 received: saving at step" in log and "requeue 1 of at most 20" in log, log
    stopped_at = int(log.split("SIGUSR2 received: saving at step ")[1].split()[0])
    assert 2 <= stopped_at < steps
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
    assert [p.name for p in committed(run_dir / "checkpoints")] == [
        f"step_{stopped_at:08d}", f"step_{steps:08d}"]
    assert len(start_events(run_dir)) == 2


def _raw_job_id(job: str) -> int:
    """The id of a job or of an array element (<array id>_<index>), as scontrol knows it."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%A"], capture_output=True, text=True,
                         timeout=15)
    return int(out.stdout.split()[0])
