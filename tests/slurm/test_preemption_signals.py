"""Preemption as a real Slurm does it: SIGTERM to every process of the job step, DataLoader
workers included (`scontrol requeue`, `scancel --signal=TERM --full`), or to one worker only.

Every scenario trains with data workers (data.num_workers=1), no periodic checkpoint before the
end (trainer.checkpoint_every larger than the run) and dropout, and must end with per-step losses
bitwise equal to one uninterrupted job of the same template: the stop saved at the signal's step
and the next attempt resumed from it, so no step was lost or repeated differently.

All jobs of a test run at once (the partition oversubscribes its 2 CPUs): a job spends most of
its time importing torch and DeepSpeed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest

from pretrain.checkpoint import committed
from tests.launch_helpers import tiny_overrides
from tests.slurm.test_training_jobs import JOB_TIMEOUT, TEMPLATE, losses, wait_for_step

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_TEMPLATE = REPO / "slurm" / "train_torchrun.sbatch"
STEPS = 150  # about 10 s of training: a signal after step 2 lands well before the end
COMMON = dict(steps=STEPS, schedule__total_steps=STEPS, model__dropout=0.1, data__num_workers=1,
              trainer__checkpoint_every=10_000)


def overrides(dataset: Path, run_dir: Path) -> List[str]:
    return tiny_overrides(dataset, run_dir, **COMMON)


def stopped_step(output: str, signame: str = "SIGTERM") -> int:
    found = re.findall(rf"{signame} received: saving at step (\d+)", output)
    assert found, output
    return int(found[0])


def assert_resumed_equal(reference: Path, run_dir: Path, output: str, signame: str = "SIGTERM",
                         torchrun: bool = False) -> None:
    """The run stopped once, saved at the signal's step, resumed from it and matches the reference."""
    at = stopped_step(output, signame)
    assert 2 <= at < STEPS, output
    assert "DataLoader worker" not in output and "killed by signal" not in output, output
    # torchrun itself prints the traceback of its SignalException when it gets SIGTERM.
    assert torchrun or "Traceback" not in output, output
    assert [p.name for p in committed(run_dir / "checkpoints")] == [
        f"step_{at:08d}", f"step_{STEPS:08d}"], output
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{at:08d}'} at step {at}" in output, output
    a, b = losses(reference), losses(run_dir)
    assert list(a) == list(range(1, STEPS + 1)) and sorted(b) == list(a), output
    assert [b[s] for s in a] == [a[s] for s in a], output  # bitwise, every step


def children(pid: int) -> List[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def rank_processes(run_dir: Path) -> List[int]:
    """PIDs of the training processes of the job that trains in run_dir (not their workers)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    ranks = [p for p in pids if "launch.train" in cmdline(p) and f"run.dir={run_dir} " in cmdline(p) + " "]
    return [p for p in ranks if _ppid(p) not in ranks]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def data_worker_of(run_dir: Path, timeout: float = 60) -> int:
    """The PID of a DataLoader worker of one rank of the job training in run_dir."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rank in sorted(rank_processes(run_dir)):
            workers = [c for c in children(rank) if "launch.train" in cmdline(c)]
            if workers:
                return workers[0]
        time.sleep(0.2)
    raise AssertionError(f"no DataLoader worker found for {run_dir}")


@pytest.fixture(scope="module")
def reference(slurm, pretrain_bin, tiny_dataset, tmp_path_factory) -> Dict[str, object]:
    """One uninterrupted job, submitted first; tests wait for it when they compare."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir = tmp / "straight"
    job = slurm.sbatch(TEMPLATE, overrides(tiny_dataset, run_dir), cwd=tmp,
                       env={"PRETRAIN_BIN": str(pretrain_bin)})
    return {"job": job, "run_dir": run_dir, "done": None}


def reference_done(slurm, reference) -> Path:
    if reference["done"] is None:
        _, state, output = slurm.wait(reference["job"], timeout=2 * JOB_TIMEOUT)
        assert state == "COMPLETED", output
        reference["done"] = output
    return reference["run_dir"]


def test_scontrol_requeue_saves_at_the_signal_and_the_requeued_job_resumes(
        slurm, pretrain_bin, tiny_dataset, tmp_path, reference):
    run_dir = tmp_path / "requeued"
    job = slurm.sbatch(TEMPLATE, overrides(tiny_dataset, run_dir), cwd=tmp_path,
                       env={"PRETRAIN_BIN": str(pretrain_bin)})
    wait_for_step(run_dir, 2)
    # What Slurm does on preemption (PreemptMode=REQUEUE), a node drain, or by hand: SIGTERM to
    # every process of the step, the DataLoader workers too, then the job goes back to the queue.
    subprocess.run(["scontrol", "requeue", str(job)], check=True, timeout=15)
    _, state, output = slurm.wait(job, timeout=2 * JOB_TIMEOUT)
    assert state == "COMPLETED", output
    # Saved after a SIGTERM: exit 4 ("stopped on purpose"); Slurm, not the batch script, requeues.
    assert "restart 1 on" in output and output.count("step exited with 4") == 1, output
    assert_resumed_equal(reference_done(slurm, reference), run_dir, output)


def test_scancel_term_full_keeps_the_last_checkpoint_and_a_rerun_resumes(
        slurm, pretrain_bin, tiny_dataset, tmp_path, reference):
    """`scancel --signal=TERM --full` also signals srun, which (Slurm's own rule) answers a
    SIGTERM by SIGKILLing its tasks at once: no rank can save. What must hold is the rest:
    the last periodic checkpoint stays intact, and running the job again resumes from it and
    ends equal to the uninterrupted job."""
    run_dir = tmp_path / "cancelled"
    env = {"PRETRAIN_BIN": str(pretrain_bin)}
    args = overrides(tiny_dataset, run_dir) + ["trainer.checkpoint_every=20"]
    job = slurm.sbatch(TEMPLATE, args, cwd=tmp_path, env=env)
    wait_for_step(run_dir, 25)
    subprocess.run(["scancel", "--signal=TERM", "--full", str(job)], check=True, timeout=15)
    _, state, first = slurm.wait(job, timeout=JOB_TIMEOUT)
    assert "srun: forcing job termination" in first, first
    saved = [p.name for p in committed(run_dir / "checkpoints")]
    assert saved and saved[-1] < f"step_{STEPS:08d}", first
    # The user submits the same command again.
    _, state, second = slurm.submit(TEMPLATE, args, cwd=tmp_path, env=env, timeout=JOB_TIMEOUT)
    assert state == "COMPLETED", second
    assert f"resumed from {run_dir / 'checkpoints' / saved[-1]}" in second, second
    a, b = losses(reference_done(slurm, reference)), losses(run_dir)
    assert b == a  # bitwise, every step


def test_scancel_term_to_the_steps_saves_at_the_signal(slurm, pretrain_bin, tiny_dataset, tmp_path,
                                                      reference):
    """`scancel --signal=TERM JOBID` signals every process of the job's steps (ranks and their
    data workers), not the batch shell nor srun: every rank saves at one step and exits 4, which
    the batch script does not requeue (a TERM means stop; USR1 would have asked to come back)."""
    run_dir = tmp_path / "stepsignal"
    env = {"PRETRAIN_BIN": str(pretrain_bin)}
    job = slurm.sbatch(TEMPLATE, overrides(tiny_dataset, run_dir), cwd=tmp_path, env=env)
    wait_for_step(run_dir, 2)
    subprocess.run(["scancel", "--signal=TERM", str(job)], check=True, timeout=15)
    _, state, first = slurm.wait(job, timeout=JOB_TIMEOUT)
    at = stopped_step(first)
    assert "step exited with 4" in first and state == "FAILED" and "requeue" not in first, first
    assert [p.name for p in committed(run_dir / "checkpoints")] == [f"step_{at:08d}"], first
    _, state, second = slurm.submit(TEMPLATE, overrides(tiny_dataset, run_dir), cwd=tmp_path,
                                    env=env, timeout=JOB_TIMEOUT)
    assert state == "COMPLETED", second
    assert_resumed_equal(reference_done(slurm, reference), run_dir, first + second)


def test_sigterm_to_one_data_worker_stops_nothing(slurm, pretrain_bin, tiny_dataset, tmp_path,
                                                  reference):
    run_dir = tmp_path / "worker"
    job = slurm.sbatch(TEMPLATE, overrides(tiny_dataset, run_dir), cwd=tmp_path,
                       env={"PRETRAIN_BIN": str(pretrain_bin)})
    wait_for_step(run_dir, 2)
    worker = data_worker_of(run_dir)
    os.kill(worker, signal.SIGTERM)  # a worker never decides: it ignores the stop signals
    _, state, output = slurm.wait(job, timeout=JOB_TIMEOUT)
    assert state == "COMPLETED", output
    assert "received" not in output and "DataLoader worker" not in output, output
    assert "step exited with 0" in output and "requeue" not in output, output
    a, b = losses(reference_done(slurm, reference)), losses(run_dir)
    assert b == a  # bitwise, every step


def test_torchrun_template_requeued_by_slurm_resumes(slurm, pretrain_bin, tiny_dataset, tmp_path,
                                                      reference):
    """torchrun forwards the SIGTERM to its workers, which also get it from Slurm directly."""
    run_dir = tmp_path / "torchrun"
    job = slurm.sbatch(TORCHRUN_TEMPLATE, overrides(tiny_dataset, run_dir), cwd=tmp_path,
                       sbatch_args=["--gpus-per-node=0", "--cpus-per-task=2", "--time=00:30:00"],
                       env={"PRETRAIN_BIN": str(pretrain_bin), "NPROC_PER_NODE": "2",
                            "SHUTDOWN_TIMEOUT": "60"})
    wait_for_step(run_dir, 2)
    subprocess.run(["scontrol", "requeue", str(job)], check=True, timeout=15)
    _, state, output = slurm.wait(job, timeout=2 * JOB_TIMEOUT)
    assert state == "COMPLETED", output
    assert "restart 1 on" in output and "Sending process" in output, output  # torchrun forwarded it
    assert_resumed_equal(reference_done(slurm, reference), run_dir, output, torchrun=True)
