"""A real Slurm for tests: the `slurm` fixture and its `submit` helper, and `pretrain_bin`.

The cluster is the one-node cluster that `.ci/slurm_up.sh` starts (`make test` under `.ci/run`).
Without it the tests that ask for `slurm` skip and say why. There is no slurmdbd, so no sacct:
a job's state comes from `scontrol show job`, which keeps a finished job for MinJobAge (60 s).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

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

    def __init__(self):
        self._stdout: Dict[int, Path] = {}  # job id -> its --output file

    def env(self, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """The environment a job gets (sbatch exports it): this venv on PATH, the repo importable.

        The venv's bin goes last: a job then finds its own tools (torchrun) but the same `ninja`
        as the tests that run outside Slurm. Two ninjas (a system 1.11 and the venv's pip 1.13)
        write incompatible .ninja_log files, and DeepSpeed's JIT-built ops would be rebuilt by
        every process that found the other one (a minute of CPU each).
        """
        env = dict(os.environ)
        env["PATH"] = f"{env.get('PATH', '')}{os.pathsep}{Path(sys.executable).parent}"
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
        job_id = int(out.stdout.strip().split(";")[0])
        self._stdout[job_id] = self.output_path(job_id)  # learn it now, while Slurm knows the job
        return job_id

    def output_path(self, job_id: int) -> Path:
        return self._stdout.get(job_id) or Path(job_info(job_id)["StdOut"])

    def wait(self, job_id: int, timeout: float = 30, release_requeued: bool = True) -> JobResult:
        """Poll until the job reaches a final state; read its output file.

        release_requeued: start a requeued job as soon as Slurm can, not after its ~2 minute hold.
        """
        return self.wait_all([job_id], timeout, release_requeued)[0]

    def wait_all(self, job_ids: Sequence[int], timeout: float = 30,
                 release_requeued: bool = True) -> List[JobResult]:
        """wait() for several jobs at once: Slurm forgets a job MinJobAge (60 s) after it ends, so a
        job that finishes while the test waits for another must be seen ending by the same loop."""
        infos = {j: job_info(j) for j in job_ids}
        paths = {j: self._stdout.get(j) or Path(infos[j]["StdOut"]) for j in job_ids}
        read = {j: (lambda p=paths[j]: p.read_text() if p.exists() else "(no output file)") for j in job_ids}
        done: Dict[int, JobResult] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(done) < len(job_ids):
            for j in (j for j in job_ids if j not in done):
                info = infos[j] = job_info(j) or infos[j]
                state = info.get("JobState", "UNKNOWN")
                if state in FINAL_STATES:
                    done[j] = JobResult(j, state, read[j]())
                elif release_requeued and state == "PENDING" and info.get("Reason") == "BeginTime" \
                        and int(info.get("Restarts", "0")) > 0 and self._requeued_for(info) > REQUEUE_SETTLE_S:
                    _run("scontrol", "update", f"JobId={j}", "StartTime=now")
            time.sleep(0.25)
        if len(done) == len(job_ids):
            return [done[j] for j in job_ids]
        late = [j for j in job_ids if j not in done]
        _run("scancel", *map(str, late))
        raise AssertionError("\n".join(
            f"job {j} not done after {timeout:.0f}s (state {infos[j].get('JobState')}, reason "
            f"{infos[j].get('Reason')}); cancelled. Output:\n{read[j]()}" for j in late))

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
    def cancel_named(name: str) -> None:
        """scancel every job of this name (what a test submitted through a launcher it cannot ask)."""
        _run("scancel", f"--name={name}")

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
def pretrain_bin(tmp_path_factory) -> Path:
    """PRETRAIN_BIN for the templates (their default is `.venv/bin/pretrain-train`): the CLI of this
    checkout run by this interpreter, so that jobs work in CI's .venv and in any other venv."""
    path = tmp_path_factory.mktemp("bin") / "pretrain-train"
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m launch.train "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def slurm() -> Slurm:
    reason = why_no_slurm()
    if reason:
        pytest.skip(reason)
    return Slurm()
