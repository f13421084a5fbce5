"""A run directory belongs to one job at a time: `RUN_DIR/.lock`, held by rank 0 of that job.

Two jobs writing one run directory (a resubmitted job, a sweep reusing a directory) log the same
steps twice and save checkpoints whose config does not match their weights. So the first thing a
run does with its directory (after checking that it can write there at all) is take the lock; a
second job refuses at once, naming the holder.

The lock must work on shared filesystems (NFS, Lustre), where flock may be local to a node or
missing, and must not outlive a holder that died without a word (SIGKILL, a lost node, a requeue):
    - it is created with os.link from a complete temporary file, which is atomic and fails when
      the lock exists, on NFS too; so a lock is never seen half-written;
    - it records who holds it: host, pid and that process's start time, Slurm job id and restart
      count, and a random token;
    - the holder touches it every HEARTBEAT_S seconds (a thread);
    - a lock is stale, and is taken over with a warning, when its holder is provably gone: an
      earlier attempt of this same Slurm job (requeued), a process on this host that no longer
      exists, a Slurm job that is no longer running, or no heartbeat for STALE_AFTER_S;
    - taking over is itself exclusive (a `.lock.break` file created with O_EXCL), so two jobs
      that both find a stale lock do not both win.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from pretrain.errors import ConfigError

log = logging.getLogger("pretrain")

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # no heartbeat for this long: the holder is gone (a lost node, no Slurm)
_BREAK_STALE_S = 60.0  # a `.lock.break` older than this was left by a process that died in it
_LIVE_SLURM_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING",
                      "SIGNALING", "STAGE_OUT"}


class RunDirBusy(ConfigError):
    """Another job holds the run directory."""


def check_writable(run_dir: Path) -> None:
    """Create run_dir if needed and prove that this process can write in it (a probe file), before
    any process group starts. Every rank checks: nodes may mount the directory differently."""
    probe = run_dir / f".probe-{socket.gethostname()}-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"run.dir={run_dir}: this process cannot write there ({e.strerror or e}); point "
            f"run.dir at a writable directory (checkpoints and metrics go there)") from e


def _proc_start(pid: int) -> Optional[str]:
    """The start time of a process on this host (clock ticks since boot), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def identity(env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    env = os.environ if env is None else env
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
            "slurm_job_id": env.get("SLURM_JOB_ID"),
            "slurm_restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            "since": time.time(), "token": uuid.uuid4().hex}


def describe(holder: Mapping[str, Any]) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {since}"


def _slurm_state(job_id: str) -> Optional[str]:
    """The job's state as slurmctld knows it; "GONE" when it forgot the job; None when unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "GONE" if "Invalid job id" in out.stderr else None
    for word in out.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return None


def gone(holder: Mapping[str, Any], me: Mapping[str, Any], heartbeat_age: float) -> Optional[str]:
    """Why the lock's holder provably no longer holds the run, or None while it may."""
    job = holder.get("slurm_job_id")
    if job and job == me.get("slurm_job_id") and int(holder.get("slurm_restart", 0)) < me["slurm_restart"]:
        return f"it was held by an earlier attempt of this job (restart {holder.get('slurm_restart')})"
    if holder.get("host") == me["host"]:
        try:
            pid = int(holder.get("pid"))
        except (TypeError, ValueError):
            pid = -1
        start = _proc_start(pid) if pid > 0 else None
        if start is None or (holder.get("proc_start") and start != holder.get("proc_start")):
            return f"process {holder.get('pid')} on this host no longer exists"
    if job and job != me.get("slurm_job_id"):
        state = _slurm_state(job)
        if state is not None and state.split("+")[0] not in _LIVE_SLURM_STATES:
            return f"Slurm job {job} is not running (state {state})"
    if heartbeat_age > STALE_AFTER_S:
        return f"no heartbeat for {heartbeat_age:.0f}s"
    return None


class RunDirLock:
    """Held by one process (rank 0) of the job that trains in run_dir."""

    def __init__(self, run_dir: Path, env: Optional[Mapping[str, str]] = None):
        self.path = Path(run_dir) / LOCK
        self.me = identity(env)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Take the lock, or raise RunDirBusy naming the holder. A stale lock is taken over."""
        for _ in range(20):
            if self._create():
                self._start_heartbeat()
                return
            holder, age = self._read()
            if holder == {}:  # released meanwhile
                continue
            if holder is None:  # unreadable: garbage, or a holder that is just taking it over
                if age < _BREAK_STALE_S:
                    time.sleep(0.5)
                    continue
                reason = "it is unreadable"
            else:
                reason = gone(holder, self.me, age)
                if reason is None:
                    raise RunDirBusy(
                        f"run.dir={self.path.parent} is in use by another job ({describe(holder)}, "
                        f"last heartbeat {age:.0f}s ago). Wait for it to end, or use another "
                        f"run.dir. If that job is dead, its lock expires {STALE_AFTER_S:.0f}s "
                        f"after its last heartbeat; or delete {self.path}")
            self._break(holder, reason)
        raise RunDirBusy(f"could not take {self.path}: other jobs keep taking it; use another run.dir")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        tmp = self.path.with_name(f"{LOCK}.{self.me['token']}")
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self):
        """(holder record or None if unreadable, {} if there is no lock, seconds since its last
        heartbeat)."""
        age = 0.0
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text())
            return (holder if isinstance(holder, dict) else None), age
        except FileNotFoundError:
            return {}, 0.0  # released meanwhile: nothing to break, create again
        except (OSError, ValueError):
            return None, age

    def _break(self, holder: Optional[Dict[str, Any]], reason: str) -> None:
        """Remove a stale lock, exclusively, and only if it is still the one judged stale."""
        breaker = self.path.with_name(LOCK + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - breaker.stat().st_mtime > _BREAK_STALE_S:
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.5)
            return
        os.close(fd)
        try:
            now, _ = self._read()
            if now == holder:  # still the lock judged stale (or still unreadable)
                log.warning("taking over %s from %s: %s", self.path,
                            describe(holder) if holder else "an unreadable lock", reason)
                self.path.unlink(missing_ok=True)
        finally:
            breaker.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                holder, _ = self._read()
                if not holder or holder.get("token") != self.me["token"]:
                    log.error("%s was taken over by another job (%s): two jobs now write this "
                              "run directory", self.path, describe(holder) if holder else "?")
                    return
                try:
                    os.utime(self.path)
                except OSError as e:
                    log.warning("cannot refresh %s: %s", self.path, e)

        self._thread = threading.Thread(target=beat, name="run-dir-lock", daemon=True)
        self._thread.start()
