"""One job at a time in a run directory, and a run directory that can be written at all.

The lock files planted here are what another job, on this host or another, live or dead, would
have left: the lock must refuse the live ones and take over from the dead ones.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.errors import ConfigError
from pretrain.rundir import LOCK, STALE_AFTER_S, RunDirBusy, RunDirLock, _proc_start, check_writable
from tests.launch_helpers import REPO, cpu_env, tiny_overrides, train_cmd, train_records


def plant(run_dir: Path, age_s: float = 0.0, **holder) -> Path:
    record = {"host": "node-17", "pid": 4242, "proc_start": "123", "slurm_job_id": None,
              "slurm_restart": 0, "since": time.time() - age_s, "token": "other"}
    record.update(holder)
    path = run_dir / LOCK
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_live_holder_on_another_host_is_refused_naming_it(tmp_path):
    plant(tmp_path, age_s=5, slurm_job_id=None)
    with pytest.raises(RunDirBusy, match=r"in use by another job \(host node-17, pid 4242"):
        RunDirLock(tmp_path, env={}).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "other"  # untouched


def test_a_holder_without_heartbeat_is_taken_over(tmp_path, caplog):
    plant(tmp_path, age_s=STALE_AFTER_S + 60)
    lock = RunDirLock(tmp_path, env={})
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.me["token"]
    assert "no heartbeat" in caplog.text
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_dead_process_on_this_host_does_not_block(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free now
    plant(tmp_path, host=socket.gethostname(), pid=dead.pid)
    lock = RunDirLock(tmp_path, env={})
    lock.acquire()
    lock.release()


def test_a_live_process_on_this_host_blocks_and_a_reused_pid_does_not(tmp_path):
    ppid = os.getppid()
    plant(tmp_path, host=socket.gethostname(), pid=ppid, proc_start=_proc_start(ppid))
    with pytest.raises(RunDirBusy, match=f"pid {ppid}"):
        RunDirLock(tmp_path, env={}).acquire()
    # The same pid, but another process (its start time differs): the holder is gone.
    plant(tmp_path, host=socket.gethostname(), pid=ppid, proc_start="1")
    lock = RunDirLock(tmp_path, env={})
    lock.acquire()
    lock.release()


def test_an_earlier_attempt_of_the_same_slurm_job_does_not_block_the_requeued_one(tmp_path):
    plant(tmp_path, slurm_job_id="981", slurm_restart=0)  # on another node, heartbeat fresh
    lock = RunDirLock(tmp_path, env={"SLURM_JOB_ID": "981", "SLURM_RESTART_COUNT": "1"})
    lock.acquire()
    lock.release()


def _slurm() -> bool:
    from tests.slurm.conftest import why_no_slurm

    return why_no_slurm() is None


def test_a_slurm_job_that_is_no_longer_running_does_not_block(tmp_path):
    if not _slurm():
        pytest.skip("needs a real Slurm (scontrol): .ci/slurm_up.sh")
    plant(tmp_path, slurm_job_id="999999")  # slurmctld does not know it: ended long ago
    lock = RunDirLock(tmp_path, env={"SLURM_JOB_ID": "5"})
    lock.acquire()
    lock.release()


def test_an_unreadable_old_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK).write_bytes(b"\x00\xff garbage")
    os.utime(tmp_path / LOCK, (time.time() - 120, time.time() - 120))
    lock = RunDirLock(tmp_path, env={})
    lock.acquire()
    lock.release()


def _read_only_dir(path: Path) -> bool:
    """A directory no one can write in: a read-only tmpfs as root, else no write permission."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode == 0:
        return True
    path.chmod(0o555)
    return False


def _undo(path: Path, mounted: bool) -> None:
    if mounted:
        subprocess.run(["umount", str(path)], check=True)
    else:
        path.chmod(0o755)


def test_a_run_dir_that_cannot_be_written_is_a_config_error(tmp_path):
    ro = tmp_path / "ro"
    mounted = _read_only_dir(ro)
    try:
        for run_dir in (ro, ro / "run"):
            with pytest.raises(ConfigError, match=r"run.dir=.*cannot write there"):
                check_writable(run_dir)
    finally:
        _undo(ro, mounted)


def test_run_dir_checked_before_process_groups(tiny_dataset, tmp_path):
    ro = tmp_path / "ro"
    mounted = _read_only_dir(ro)
    try:
        proc = subprocess.run(train_cmd(tiny_overrides(tiny_dataset, ro / "run"), nproc=2), cwd=REPO,
                              env=cpu_env(), capture_output=True, text=True, timeout=180)
    finally:
        _undo(ro, mounted)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("cannot write there") >= 2, out[-4000:]  # every rank says it
    assert "Traceback" not in proc.stdout and "step 1" not in out, out[-4000:]


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in train_records(run_dir)):
            return
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {run_dir} after {timeout}s")


@pytest.mark.slow
def test_a_second_job_on_a_busy_run_dir_refuses_and_a_killed_holder_blocks_nothing(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_dataset, run_dir, steps=400, trainer__checkpoint_every=5,
                          schedule__total_steps=400)
    first = subprocess.Popen(train_cmd(args), cwd=REPO, env=cpu_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for_step(run_dir, 6, first)
        second = subprocess.run(train_cmd(args), cwd=REPO, env=cpu_env(), capture_output=True,
                                text=True, timeout=180)
        assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
        assert f"run.dir={run_dir} is in use by another job (host {socket.gethostname()}, pid {first.pid}" \
               in second.stderr, second.stderr[-3000:]
        assert first.poll() is None  # the holder trains on, undisturbed
        first.send_signal(signal.SIGKILL)  # dies without releasing: a lost node, an OOM kill
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert (run_dir / LOCK).exists()
    killed_at = max(r["step"] for r in train_records(run_dir))
    # The same command again (with a nearer end, to keep the test short) takes over and resumes.
    third = subprocess.run(train_cmd(args + [f"trainer.max_steps={killed_at + 3}"]), cwd=REPO,
                           env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "taking over" in third.stdout and "no longer exists" in third.stdout, third.stdout[-3000:]
    assert "resumed from" in third.stdout, third.stdout[-3000:]
    assert not (run_dir / LOCK).exists()  # released at the end
    assert max(r["step"] for r in train_records(run_dir)) == killed_at + 3
