"""A real Slurm for tests: the `slurm` fixture and its `submit` helper.

The cluster is the one-node cluster that `.ci/slurm_up.sh` starts (`make test` under `.ci/run`).
Without it the tests that ask for `slurm` skip and say why. There is no slurmdbd, so no sacct:
a job's state comes from `scontrol show job`, which keeps a finished job for MinJobAge (60 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Mapping, NamedTuple, Optional, Union

import pytest

REPO = Path(__file__).resolve().parents[2]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
USABLE_NODE_STATES = {"idle", "mix", "alloc"}  # the partition oversubscribes: busy still runs jobs
# Slurm holds a requeued job ~2 minutes (Reason=BeginTime). Releasing it sooner than a few seconds
# after the requeue makes slurmd refuse the launch ("Job credential revoked"): wait this long.
REQUEUE_SETTLE_S = 3.0


class JobResult(NamedTuple):
    job_id: int
    state: str  # the final JobState: COMPLETED, FAILED, CANCELLED, ...
    output: str  # the text of the job's --output file (every attempt, with --open-mode=append)


def _run(*cmd: str, timeout: float = 15, env: Optional[Mapping[str, str]] = None,
         cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def job_info(job_id: int) -> Dict[str, str]:
    """`scontrol show job` as a dict of the fields without spaces; {} once Slurm forgot the job."""
    out = _run("scontrol", "show", "job", "-o", str(job_id))
    if out.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def why_no_slurm() -> Optional[str]:
    """None when jobs can run here, else the reason to skip."""
    if shutil.which("sbatch") is None:
        return "no Slurm: sbatch is not on PATH (.ci/slurm_up.sh, as root, installs and starts one)"
    try:
        out = _run("sinfo", "-h", "-N", "-o", "%N %t")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo did not answer ({e}): is slurmctld running? .ci/slurm_up.sh starts it"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}; .ci/slurm_up.sh starts slurmctld and slurmd"
    nodes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if not any(state.rstrip("*~#") in USABLE_NODE_STATES for _, state in nodes):
        return f"no usable Slurm node (sinfo: {nodes}); see /var/log/slurm/slurmd.log"
    return None


class Slurm:
    """Submit batch jobs to the local cluster and wait for them."""

    def env(self, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """The environment a job gets (sbatch exports it): this venv first on PATH, the repo importable."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env.update(extra or {})
        return env

    def sbatch(self, script: Union[str, Path], args: Iterable[str] = (), cwd: Optional[Path] = None,
               sbatch_args: Iterable[str] = (), env: Optional[Mapping[str, str]] = None) -> int:
        """Submit; `script` is a path, or the text of a script (it starts with '#!'). Returns the job id."""
        cwd = Path(cwd or os.getcwd())
        if isinstance(script, str) and script.startswith("#!"):
            path = cwd / f"job-{time.monotonic_ns()}.sbatch"
            path.write_text(script)
            script = path
        out = _run("sbatch", "--parsable", *sbatch_args, str(script), *args, cwd=cwd, env=self.env(env))
        if out.returncode != 0:
            raise AssertionError(f"sbatch {script} failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def output_path(self, job_id: int) -> Path:
        return Path(job_info(job_id)["StdOut"])

    def wait(self, job_id: int, timeout: float = 30, release_requeued: bool = True) -> JobResult:
        """Poll until the job reaches a final state; read its output file.

        release_requeued: start a requeued job as soon as Slurm can, not after its ~2 minute hold.
        """
        info = job_info(job_id)
        out_path = Path(info["StdOut"])  # learn it now: Slurm forgets the job MinJobAge after the end
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = job_info(job_id) or info
            state = info.get("JobState", "UNKNOWN")
            if state in FINAL_STATES:
                return JobResult(job_id, state, out_path.read_text() if out_path.exists() else "")
            if release_requeued and state == "PENDING" and info.get("Reason") == "BeginTime" \
                    and int(info.get("Restarts", "0")) > 0 and self._requeued_for(info) > REQUEUE_SETTLE_S:
                _run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            time.sleep(0.25)
        _run("scancel", str(job_id))
        text = out_path.read_text() if out_path.exists() else "(no output file)"
        raise AssertionError(f"job {job_id} not done after {timeout:.0f}s (state {info.get('JobState')}, "
                             f"reason {info.get('Reason')}); cancelled. Output:\n{text}")

    @staticmethod
    def _requeued_for(info: Mapping[str, str]) -> float:
        # A requeue resets SubmitTime to the moment of the requeue.
        submitted = time.mktime(time.strptime(info["SubmitTime"], "%Y-%m-%dT%H:%M:%S"))
        return time.time() - submitted

    def wait_for_output(self, job_id: int, pattern: str, count: int = 1, timeout: float = 30) -> str:
        """Wait until the job's output holds `pattern` (a regex, multiline) `count` times; return the text."""
        path = self.output_path(job_id)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = path.read_text() if path.exists() else ""
            if len(re.findall(pattern, text, re.M)) >= count:
                return text
            if job_info(job_id).get("JobState") in FINAL_STATES:
                break
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}: {pattern!r} x{count} not in its output:\n{text}")

    @staticmethod
    def signal_batch(job_id: int, signal: str) -> None:
        """Signal the batch shell only, as `#SBATCH --signal=B:<signal>@<seconds>` does."""
        _run("scancel", f"--signal={signal}", "--batch", str(job_id)).check_returncode()

    @staticmethod
    def cancel(job_id: int) -> None:
        _run("scancel", str(job_id)).check_returncode()

    @staticmethod
    def node_name() -> str:
        return _run("sinfo", "-h", "-N", "-o", "%N").stdout.split()[0]

    def submit(self, script: Union[str, Path], args: Iterable[str] = (), cwd: Optional[Path] = None,
               timeout: float = 30, sbatch_args: Iterable[str] = (),
               env: Optional[Mapping[str, str]] = None) -> JobResult:
        """sbatch, then wait: returns (job_id, final_state, output_text)."""
        job_id = self.sbatch(script, args, cwd=cwd, sbatch_args=sbatch_args, env=env)
        return self.wait(job_id, timeout=timeout)


@pytest.fixture(scope="session")
def slurm() -> Slurm:
    reason = why_no_slurm()
    if reason:
        pytest.skip(reason)
    return Slurm()
