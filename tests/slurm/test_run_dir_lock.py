"""Two Slurm jobs on one run directory (a resubmitted job, a sweep reusing a directory): the
second refuses at once, naming the first; the first trains on undisturbed."""

from __future__ import annotations

import pytest

from tests.launch_helpers import read_metrics, tiny_overrides
from tests.slurm.test_training_jobs import JOB_TIMEOUT, TEMPLATE, wait_for_step

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_a_second_job_on_the_same_run_dir_refuses_naming_the_first(slurm, pretrain_bin, tiny_dataset,
                                                                   tmp_path):
    run_dir, steps = tmp_path / "shared", 2000  # longer than the second job's start
    args = tiny_overrides(tiny_dataset, run_dir, steps=steps, schedule__total_steps=steps)
    env = {"PRETRAIN_BIN": str(pretrain_bin)}
    first = slurm.sbatch(TEMPLATE, args, cwd=tmp_path, env=env)
    wait_for_step(run_dir, 2)
    _, state, output = slurm.submit(TEMPLATE, args, cwd=tmp_path, env=env, timeout=JOB_TIMEOUT)
    # Every rank exits 2; the first to exit makes srun (--kill-on-bad-exit) end the others, which
    # may still be closing their process group: the step's status is then 143, the task's is 2.
    assert state == "FAILED" and "Exited with exit code 2" in output, output
    assert f"run.dir={run_dir} is in use by another job" in output and f"Slurm job {first}" in output, output
    assert "requeue" not in output, output
    wait_for_step(run_dir, max(r["step"] for r in read_metrics(run_dir) if "loss" in r) + 2)
    slurm.cancel(first)  # it still trains: enough seen
    steps_logged = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps_logged == list(range(1, len(steps_logged) + 1))  # each step once: nobody else wrote here
