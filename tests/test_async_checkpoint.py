"""Asynchronous checkpoint saves (trainer.async_save): the state is staged at the step boundary,
written by a background thread per rank, committed at a later boundary once every rank is done.
A resume from such a save is bitwise exact; a SIGKILL during its write leaves the previous
checkpoint; a SIGTERM during it finishes it and saves at the stop; a failed write ends every rank.
The writes are held (PRETRAIN_FAULTS=slow_write@N) so that training runs on during them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import committed, damaged, find_latest, step_name
from pretrain import faults
from pretrain.checkpoint_writer import SLOW_STAGING_S, SLOW_WRITE_S, BackgroundWriter
from tests.helpers.disks import small_ext4
from tests.launch_helpers import (REPO, cpu_env, free_port, read_metrics, run_train,
                                  tiny_overrides, train_cmd)
from tests.test_checkpoint import assert_same_params, final_params, losses
from tests.test_checkpoint_safety import assert_previous_is_latest_and_loads, rank_errors
from tests.test_checkpoint_safety import overrides as safety_overrides

TOTAL = 6


def args(data: Path, run: Path, steps: int, **extra):
    return tiny_overrides(data, run, steps=steps, trainer__async_save="true",
                          schedule__total_steps=TOTAL, model__dropout=0.1, **extra)


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """An uninterrupted run of TOTAL steps per ZeRO stage (made on first use)."""
    made = {}

    def get(zero: int) -> Path:
        if zero not in made:
            run = tmp_path_factory.mktemp(f"reference_zero{zero}")
            run_train(args(tiny_dataset, run, TOTAL, parallel__zero_stage=zero), nproc=2)
            made[zero] = run
        return made[zero]
    return get


def assert_ends_like(reference: Path, run: Path) -> None:
    a, b = losses(reference), losses(run)
    assert list(a) == list(range(1, TOTAL + 1)) and list(b) == list(a)
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise, every step
    assert_same_params(final_params(reference), final_params(run))


def start(overrides, env) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(overrides, 2), cwd=REPO, env=cpu_env(env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 240) -> str:
    """The process's output up to the first line holding `text`."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.monotonic() < deadline, "".join(seen)[-4000:]
    raise AssertionError(f"ended without {text!r}:\n{''.join(seen)[-4000:]}")


def rank_pids(torchrun: int):
    return [int(p) for p in Path(f"/proc/{torchrun}/task/{torchrun}/children").read_text().split()]


# ---- the writer alone ---------------------------------------------------------------------------
def test_writer_writes_the_state_as_it_was_at_submit(tmp_path):
    w = BackgroundWriter(rank=0)
    weight = torch.arange(6.0)
    view = weight[2:4]
    for step in (1, 2):  # the second save reuses the first one's staging buffers
        w.begin(step)
        state = {"w": weight, "same": weight, "view": view, "meta": [step, ("a", 1)]}
        w.submit(state, str(tmp_path / f"s{step}.pt"))
        state["meta"].append("changed")  # objects are copied at submit
        w.start()
        w.wait_staged()  # on CPU the thread copies the tensors: training waits before updating
        weight.add_(100)  # the update, in place
        w.wait()
        assert w.error is None and w.idle()
        saved = torch.load(tmp_path / f"s{step}.pt")
        want = torch.arange(6.0) + 100 * (step - 1)
        assert torch.equal(saved["w"], want) and torch.equal(saved["view"], want[2:4])
        assert saved["same"] is saved["w"] and saved["meta"] == [step, ("a", 1)]
    w.begin(3)
    w.submit({"w": weight}, str(tmp_path / "missing" / "s3.pt"))
    w.start()
    w.wait()
    assert "does not exist" in str(w.error)  # kept for the checkpointer, not raised in the thread


def test_wait_staged_returns_only_once_the_copies_are_made(tmp_path, monkeypatch):
    """The copies held (the slow_staging drill): wait_staged waits for them, and what is saved
    is the state at submit even though the caller changes it right after wait_staged."""
    monkeypatch.setenv("PRETRAIN_FAULTS", "slow_staging@7")
    monkeypatch.setattr(faults, "_PARSED", None)
    monkeypatch.setattr(faults, "_FIRED", set())
    w = BackgroundWriter(rank=0)
    weight = torch.zeros(1000)
    w.begin(7)
    w.submit({"w": weight}, str(tmp_path / "s.pt"))
    w.start()
    t0 = time.monotonic()
    w.wait_staged()
    assert time.monotonic() - t0 >= SLOW_STAGING_S * 0.9 and w.staging_wait_seconds > 0
    weight.fill_(1.0)
    w.wait()
    assert w.error is None and torch.equal(torch.load(tmp_path / "s.pt")["w"], torch.zeros(1000))


# ---- the CLI, 2 ranks ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 3])
def test_resume_from_a_background_save_is_bitwise_exact(tiny_dataset, tmp_path, reference, zero):
    run = tmp_path / "run"
    first = run_train(args(tiny_dataset, run, 5, parallel__zero_stage=zero,
                           trainer__checkpoint_every=1),
                      nproc=2, env={"PRETRAIN_FAULTS": "slow_staging@3,slow_write@3"})
    # Step 3's copies were held in the writers: step 4's update waited for them (without that
    # wait the checkpoint would hold step 4's weights and the resume below would differ). Its
    # files were then held while step 4 updated the state in place; step 4's save waited.
    assert "step_00000004 is due while step_00000003 is still being written" in first.stdout
    saves = {r["checkpoint_step"]: r for r in read_metrics(run) if "checkpoint_step" in r}
    assert sorted(saves) == [1, 2, 3, 4, 5]
    assert saves[3]["checkpoint_write_s"] >= SLOW_WRITE_S and saves[4]["checkpoint_wait_s"] > 1
    assert SLOW_STAGING_S * 0.9 <= saves[3]["checkpoint_block_s"] < SLOW_STAGING_S + SLOW_WRITE_S
    step3 = run / "checkpoints" / step_name(3)
    second = run_train(args(tiny_dataset, run, TOTAL, parallel__zero_stage=zero,
                            trainer__resume_from=step3), nproc=2)
    assert f"resumed from {step3} at step 3" in second.stdout
    assert_ends_like(reference(zero), run)


@pytest.mark.slow
def test_sigkill_during_a_background_write_keeps_the_previous_checkpoint(tiny_dataset, tmp_path,
                                                                         reference):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = args(tiny_dataset, run, TOTAL, trainer__checkpoint_every=2)
    proc = start(overrides, {"PRETRAIN_FAULTS": "slow_write@4"})
    try:
        wait_for(proc, "holds its step-4 write")
        for pid in rank_pids(proc.pid):  # torchrun starts each rank in a session of its own
            os.kill(pid, signal.SIGKILL)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert find_latest(root).name == step_name(2) and (root / "latest").read_text() == step_name(2)
    assert (root / "step_00000004.tmp").exists() and not (root / step_name(4)).exists()
    again = run_train(overrides, nproc=2)
    assert f"resumed from {root / step_name(2)} at step 2" in again.stdout
    assert_ends_like(reference(1), run)


@pytest.mark.slow
def test_sigterm_during_a_background_write_finishes_it_and_saves_at_the_stop(tiny_dataset,
                                                                             tmp_path):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = tiny_overrides(tiny_dataset, run, steps=40, trainer__async_save="true",
                               trainer__checkpoint_every=4, trainer__keep_last=10)
    proc = start(overrides, {"PRETRAIN_FAULTS": "slow_write@4"})
    try:
        wait_for(proc, "holds its step-4 write")
        for pid in rank_pids(proc.pid):
            os.kill(pid, signal.SIGTERM)
        out = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            for pid in rank_pids(proc.pid):
                os.kill(pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stop = int(out.split("SIGTERM received: saving at step ")[1].split()[0])
    assert 4 < stop < 40, out[-3000:]
    steps = [int(p.name[5:]) for p in committed(root)]
    assert steps[0] == 4 and steps[-1] == stop and (root / "latest").read_text() == step_name(stop)
    assert not list(root.glob("*.tmp")), out[-3000:]
    # The rerun, with max_steps that may change on a resume: one more step.
    shorter = [f"trainer.max_steps={stop + 1}" if o.startswith("trainer.max_steps=") else o
               for o in overrides]
    again = run_train(shorter, nproc=2)
    assert f"resumed from {root / step_name(stop)} at step {stop}" in again.stdout


@pytest.mark.slow
def test_full_disk_in_a_background_write_ends_every_rank(tiny_dataset, tmp_path):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = run_train(tiny_overrides(tiny_dataset, run, steps=4, trainer__async_save="true",
                                    trainer__checkpoint_every=1, parallel__timeout_min=5),
                     nproc=2, check=False, env={"PRETRAIN_FAULTS": "enospc_in_write@2:1"})
    assert proc.returncode != 0
    ended = rank_errors(proc.stderr)
    assert len(ended) == 2, proc.stderr[-4000:]  # every rank, not only the one whose write failed
    for text in ended:
        assert text.startswith("saving step_00000002 failed on rank 1: no space left on the "
                               f"device of {root} ("), text
        assert "step_00000001 stays the latest checkpoint" in text
    assert (root / "latest").read_text() == step_name(1) and find_latest(root).name == step_name(1)
    assert damaged(root / step_name(1)) is None and (root / "step_00000002.tmp").exists()
    assert "step 3/4" in proc.stdout and "step 4/4" not in proc.stdout  # the next boundary


@pytest.mark.slow
def test_a_disk_that_fills_during_background_writes_ends_every_rank(tiny_dataset, tmp_path):
    """A real full disk, no injected fault: the checkpoints on a 4 MiB ext4 (which takes the
    writer's O_DIRECT writes, as the disks checkpoints go to do), room for one save of the tiny
    model (about 2.1 MB) but not for two."""
    run = tmp_path / "run"
    with small_ext4(run / "checkpoints", mib=4) as root:
        proc = run_train(safety_overrides(tiny_dataset, run, 4, trainer__async_save="true",
                                          parallel__timeout_min=5),
                         nproc=2, check=False, timeout=300)
        assert proc.returncode != 0
        assert "saved checkpoint" in proc.stdout + proc.stderr  # step 1's, in the background
        ended = rank_errors(proc.stderr)
        assert len(ended) == 2, proc.stderr[-4000:]
        for text in ended:
            assert text.startswith("saving step_00000002 failed on rank "), text
            assert f"no space left on the device of {root} (" in text, text
            assert "step_00000001 stays the latest checkpoint" in text
        assert_previous_is_latest_and_loads(tiny_dataset, run, nproc=2)


@pytest.mark.slow
def test_a_rollback_waits_for_the_save_in_flight_and_returns_to_it(tiny_dataset, tmp_path):
    """Steps 3 and 4 bad while step 2's save is still being written (held): the rollback first
    finishes that save, then returns to it; without the wait no checkpoint from before the streak
    would be committed yet and the run would stop."""
    run = tmp_path / "run"
    faults = "slow_write@2,nan_loss@3:0,nan_loss@4:1"
    proc = run_train(tiny_overrides(tiny_dataset, run, steps=6, trainer__async_save="true",
                                    trainer__checkpoint_every=2, stability__max_bad_steps=2),
                     nproc=2, env={"PRETRAIN_FAULTS": faults})
    assert "rolled back to step_00000002" in proc.stdout, proc.stdout[-3000:]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 3, 4, 5, 6]


def test_async_bench_times_both_saves(dist, tmp_path):
    from bench import bench_checkpoint as bc

    res = bc.run_async(bc.ASYNC_SHAPES["test"], rounds=1, workdir=str(tmp_path))
    for seconds in (res.blocked, res.durable, res.step_after, {"copying": res.copying}):
        assert all(len(v) == 1 and v[0] > 0 for v in seconds.values()), seconds
    assert len(res.waiting) == 1 and len(res.rows()) == 5 and res.megabytes > 0 and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_readme_two_rank_bench_command_runs(tmp_path):
    """README's `torchrun --nproc_per_node 2 -m bench.bench_checkpoint --only-async ...`, on the
    test model: both ranks save, rank 0 prints the table."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",  # = torchrun
           "--master-port", str(free_port()), "-m", "bench.bench_checkpoint", "--only-async",
           "--async-shape", "test", "--async-rounds", "1", "--workdir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, env=cpu_env({}), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("trainer.async_save,") == 1 and "2 ranks (ZeRO-1)" in out.stdout
    assert "loop blocked by a save" in out.stdout and list(tmp_path.iterdir()) == []
