"""Faults do not cost a run. Each test is a drill through the real CLI in fresh processes (2 gloo
ranks on CPU) with a fault injected by PRETRAIN_FAULTS (pretrain/faults.py):

- a NaN loss or NaN gradients on one rank, or a loss spike: every rank discards the same update
  (parameters, optimizer state and LR schedule bit-identical to before it), the skip counter
  counts it and survives a restart;
- a streak of bad steps: rollback to the checkpoint before it, then a clear stop;
- a rank that hangs: the job exits non-zero within a bound, with every rank's stacks;
- a rank that dies under torchrun --max-restarts=1: the job restarts, resumes and ends with the
  parameters of an uninterrupted run;
- a truncated checkpoint file: resume falls back to the previous intact checkpoint;
- pretrain-verify: PASS when resume is exact.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import find_latest, step_name
from pretrain.config import Config
from pretrain.errors import CheckpointError
from pretrain.run import find_resume_point
from pretrain.safe_load import safe_load
from tests.launch_helpers import REPO, cpu_env, run_train, tiny_overrides, train_records
from tests.test_checkpoint import assert_same_params, final_params, losses

pytestmark = pytest.mark.slow
TIMEOUT = 300  # per run: start-up alone takes 10 s on an idle 2-core machine, minutes on a busy one


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / step_name(step)


def update_state(path: Path) -> dict:
    """What an optimizer update changes, as each ZeRO stage saves it: the weights (the module; at
    ZeRO 3 only each rank's fp32 partition holds them), the optimizer (Adam's moments and step: in
    the model file at ZeRO 0, in each rank's partition at ZeRO 1-3, with its fp32 master weights at
    ZeRO 1-2) and the LR schedule. Not the overflow flags and counters that record a skip."""
    state = {"weights": [], "optimizer": [], "lr_schedule": []}
    for f in sorted(path.glob("*model_states.pt")):
        sd = safe_load(f)
        state["lr_schedule"].append(sd["lr_scheduler"])
        if sd["optimizer"] is not None:  # ZeRO 0
            state["optimizer"].append(sd["optimizer"])
        if sd["ds_config"]["zero_optimization"]["stage"] < 3:  # ZeRO 3's module: placeholders
            state["weights"].append(sd["module"])
    for f in sorted(path.glob("zero_pp_rank_*_optim_states.pt")):
        sd = safe_load(f)["optimizer_state_dict"]
        if "fp32_flat_groups" in sd:  # ZeRO 3
            state["weights"].append(sd["fp32_flat_groups"])
            state["optimizer"].append(sd["optimizer_state_dict"])
        else:
            state["optimizer"].append([sd["base_optimizer_state"],
                                       sd["single_partition_of_fp32_groups"]])
    return state


def numel(x) -> int:
    if torch.is_tensor(x):
        return x.numel()
    if isinstance(x, dict):
        return sum(numel(v) for v in x.values())
    return sum(numel(v) for v in x) if isinstance(x, (list, tuple)) else 0


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def skipped(run_dir: Path) -> dict:
    return {r["step"]: r["skipped_steps"] for r in train_records(run_dir)}


# nan_loss on rank 1 only and a spike on rank 0 only are vetoed on the all-rank loss; nan_grad on
# rank 0 only (finite loss) is caught by DeepSpeed's own overflow check.
BAD_STEPS = {2: "nan_loss@2:1", 5: "spike@5:0", 6: "nan_grad@6:0"}
SPIKE = dict(stability__spike_std=6, stability__spike_window=3, stability__spike_warmup=0)


# fp32 ZeRO 0 has no overflow check of DeepSpeed's: the step module checks the gradient norm it
# computes there (without that, step 6's NaN gradients were applied and the weights became NaN).
@pytest.mark.parametrize("zero,segments", [(0, [7]), (1, [7]), (2, [5, 7]), (3, [7])],
                         ids=["zero0", "zero1", "zero2_resumed", "zero3"])
def test_bad_step_on_one_rank_is_skipped_by_every_rank(tiny_dataset, tmp_path, zero, segments):
    env = {"PRETRAIN_FAULTS": ",".join(BAD_STEPS.values())}
    for end in segments:  # zero2: a new set of processes resumes after the spike
        run_train(tiny_overrides(tiny_dataset, tmp_path, steps=end, parallel__zero_stage=zero,
                                 trainer__checkpoint_every=1, trainer__keep_last=10, **SPIKE),
                  nproc=2, timeout=TIMEOUT, env=env)
    for step in BAD_STEPS:
        assert same(update_state(ckpt(tmp_path, step - 1)), update_state(ckpt(tmp_path, step))), \
            f"step {step}'s update was applied"
    # An applied update changes each part compared, and the moments of every weight are in it.
    before, after = update_state(ckpt(tmp_path, 3)), update_state(ckpt(tmp_path, 4))
    assert [part for part in before if same(before[part], after[part])] == []
    assert numel(before["optimizer"]) >= 2 * numel(before["weights"]) > 0
    assert skipped(tmp_path) == {1: 0, 2: 1, 3: 1, 4: 1, 5: 2, 6: 3, 7: 3}
    trainer_json = json.loads((ckpt(tmp_path, 7) / "trainer.json").read_text())
    assert trainer_json["trainer"]["skipped_steps"] == 3
    assert len(trainer_json["callbacks"]["stability"]["losses"]) == 3  # the spike window resumed


def test_bad_steps_on_either_pipeline_stage_are_skipped_by_both(tiny_dataset, tmp_path):
    """PP=2 (rank 0 the first stage, rank 1 the last): a NaN loss and a spike on the last stage are
    vetoed on the loss both stages agree on; NaN gradients made on the first stage are found by
    DeepSpeed's overflow check over the model-parallel group (TP x PP), so the last stage
    discards its update too."""
    faults = {2: "nan_loss@2:1", 5: "spike@5:1", 6: "nan_grad@6:0"}
    run_train(tiny_overrides(tiny_dataset, tmp_path, steps=7, parallel__pp=2,
                             parallel__zero_stage=1, trainer__checkpoint_every=1,
                             trainer__keep_last=10, **SPIKE),
              nproc=2, timeout=TIMEOUT, env={"PRETRAIN_FAULTS": ",".join(faults.values())})
    for step in faults:
        assert same(update_state(ckpt(tmp_path, step - 1)), update_state(ckpt(tmp_path, step))), \
            f"step {step}'s update was applied"
    before, after = update_state(ckpt(tmp_path, 3)), update_state(ckpt(tmp_path, 4))
    assert [part for part in before if same(before[part], after[part])] == []
    assert skipped(tmp_path) == {1: 0, 2: 1, 3: 1, 4: 1, 5: 2, 6: 3, 7: 3}


def test_streak_of_bad_steps_rolls_back_then_stops(tiny_dataset, tmp_path):
    # Steps 3 and 4 bad (on different ranks): back to step 2, the data continuing after step 4's.
    # Steps 5 and 6 bad too: no rollback left (max_rollbacks=1), so the run stops with an error.
    faults = "nan_loss@3:0,nan_loss@4:1,nan_loss@5:1,nan_loss@6"
    proc = run_train(tiny_overrides(tiny_dataset, tmp_path, steps=8, trainer__checkpoint_every=2,
                                    stability__max_bad_steps=2, stability__max_rollbacks=1),
                     nproc=2, timeout=TIMEOUT, check=False, env={"PRETRAIN_FAULTS": faults})
    assert "rolled back to step_00000002" in proc.stdout
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert proc.returncode != 0  # torchrun's own status; each rank exited with 2
    assert "TrainingUnstableError: 2 consecutive steps (5..6) were skipped" in proc.stderr
    assert "stability.max_rollbacks=1 rollbacks were already done" in proc.stderr

    def saved(step):
        return json.loads((ckpt(tmp_path, step) / "trainer.json").read_text())["trainer"]

    # Saved again right after the rollback: a crash then would not replay the bad data.
    assert saved(2)["consumed_samples"] == 4 * 8 and saved(2)["skipped_steps"] == 2
    assert saved(4)["consumed_samples"] == 6 * 8  # steps 3 and 4's first samples never trained on
    assert find_latest(tmp_path / "checkpoints").name == step_name(4)


def test_hung_rank_ends_the_job_with_stacks(tiny_dataset, tmp_path):
    # Rank 1 sleeps at step 3; rank 0 waits for it in the gradient all-reduce. The steady-state
    # collective timeout (6 s) ends rank 0, the watchdog (15 s) ends rank 1 with its stacks.
    proc = run_train(tiny_overrides(tiny_dataset, tmp_path, steps=6, trainer__watchdog_min=0.25,
                                    parallel__timeout_min=0.1),
                     nproc=2, timeout=TIMEOUT, check=False, env={"PRETRAIN_FAULTS": "hang@3:1"})
    ended = time.time()
    assert proc.returncode != 0
    hung = float(re.search(r"rank 1 hangs at step 3 \(unix time ([\d.]+)\)", proc.stdout).group(1))
    assert ended - hung < 60, f"the job ended {ended - hung:.0f}s after the rank hung"
    stacks = (tmp_path / "stacks" / "rank00001.txt").read_text()
    assert "watchdog: rank 1 finished no step" in stacks and "before_step" in stacks  # the sleep
    assert "watchdog: rank 1 finished no step" in proc.stderr
    assert "Timed out" in proc.stderr  # rank 0: the steady-state timeout, not the 30 min start-up one
    assert max(r["step"] for r in train_records(tmp_path)) == 2


@pytest.fixture(scope="module")
def clean_run(tiny_dataset, tmp_path_factory) -> Path:
    """6 uninterrupted steps, a checkpoint every 2."""
    run = tmp_path_factory.mktemp("clean")
    run_train(tiny_overrides(tiny_dataset, run, steps=6, trainer__checkpoint_every=2), nproc=2,
              timeout=TIMEOUT)
    return run


def test_dead_rank_restarts_and_ends_like_a_clean_run(tiny_dataset, tmp_path, clean_run):
    # Restarts need a rendezvous store of their own per attempt (pytorch#135712): c10d
    # rendezvous (--standalone here) with the shared store turned off.
    args = tiny_overrides(tiny_dataset, tmp_path, steps=6, trainer__checkpoint_every=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "launch.train", *args]
    env = cpu_env({"PRETRAIN_FAULTS": "exit@5:1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[fault] rank 1 exits at step 5" in proc.stdout
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    assert losses(tmp_path)[6] == losses(clean_run)[6]
    assert_same_params(final_params(tmp_path), final_params(clean_run))


def test_truncated_checkpoint_falls_back_to_the_previous_one(tiny_dataset, tmp_path, clean_run):
    run = tmp_path / "run"
    shutil.copytree(clean_run, run)
    shard = ckpt(run, 6) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    # Naming the damaged checkpoint is an error that says what to do; the latest is the one before.
    cfg = Config()
    cfg.trainer.resume_from = str(ckpt(run, 6))
    with pytest.raises(CheckpointError, match=r"damaged \(zero_pp_rank_1_mp_rank_00_optim_states"
                                              r".pt has \d+ bytes, \d+ were saved\); pick another"):
        find_resume_point(cfg, run / "checkpoints")
    assert find_latest(run / "checkpoints") == ckpt(run, 4)

    # The latest one: a warning, then steps 5 and 6 again from step 4, as in the clean run.
    proc = run_train(tiny_overrides(tiny_dataset, run, steps=6, trainer__checkpoint_every=2),
                     nproc=2, timeout=TIMEOUT)
    assert "step_00000006 is damaged" in proc.stdout and "resumed from" in proc.stdout
    assert_same_params(final_params(run), final_params(clean_run))


def test_verify_reports_exact_resume(tiny_dataset, tmp_path):
    args = tiny_overrides(tiny_dataset, tmp_path / "unused", steps=4, model__dropout=0.1)
    proc = subprocess.run([sys.executable, "-m", "launch.verify", "--steps", "4",
                           "--workdir", str(tmp_path), *args],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS: resume at step 2 of 4: steps 3..4: losses bitwise identical" in proc.stdout


def test_verify_names_the_first_difference():
    from launch.verify import compare

    ok, detail = compare({3: 2.5, 4: 2.25}, {3: 2.5, 4: 2.2500001}, range(3, 5))
    assert not ok and detail.startswith("step 4: straight 2.25 != resumed 2.2500001")
    ok, detail = compare({3: 2.5, 4: 2.25}, {3: 2.5}, range(3, 5))
    assert not ok and detail == "step 4 has no loss in the resumed run"
