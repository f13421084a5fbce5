"""Jobs on a real Slurm: the variables srun gives each task, requeueing, and the sbatch templates'
stop -> checkpoint -> requeue protocol (slurm/lib.sh), with a stand-in for pretrain-train."""

from __future__ import annotations

import json
import re
import stat
import sys
from pathlib import Path

import pytest

from pretrain.launcher_env import expand_nodelist

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]

# Stands in for pretrain-train: prints one JSON line per process, then, on a job's first run when
# FAKE_WAIT=1, waits for SIGUSR1/SIGTERM and exits 3 as the real one does after saving.
FAKE_TRAIN = """\
import json, os, signal, sys, time
from pretrain.launcher_env import read_process_env
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
penv = read_process_env(os.environ)
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
# One write per line: torchrun's workers share one stdout, and PYTHONUNBUFFERED=1 makes print()
# write the text and its newline separately.
os.write(1, ("FAKE " + json.dumps(dict(rank=penv.rank, world=penv.world_size, launcher=penv.launcher,
         restart=restart, omp=os.environ.get("OMP_NUM_THREADS"), args=sys.argv[1:])) + "\\n").encode())
if restart == 0 and os.environ.get("FAKE_WAIT") == "1":
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    os.write(1, f"STOPPED rank={penv.rank} signals={sorted(set(got))}\\n".encode())
    sys.exit(3)
"""


def _fake_train(tmp_path: Path) -> Path:
    path = tmp_path / "fake-train"
    path.write_text(f"#!{sys.executable}\n{FAKE_TRAIN}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _records(output: str, prefix: str):
    return [json.loads(line[len(prefix):]) for line in output.splitlines() if line.startswith(prefix)]


def test_srun_tasks_agree_on_rank_world_and_master(slurm, tmp_path):
    script = f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --output=%x-%j.out
echo "NODELIST=$SLURM_JOB_NODELIST"
srun --cpus-per-task=1 {sys.executable} -c '
import dataclasses, json, os
from pretrain.launcher_env import read_process_env
print("ENV " + json.dumps(dataclasses.asdict(read_process_env(os.environ))), flush=True)
'
"""
    job_id, state, output = slurm.submit(script, cwd=tmp_path, timeout=30)
    assert state == "COMPLETED", output
    envs = sorted(_records(output, "ENV "), key=lambda e: e["rank"])
    assert [e["rank"] for e in envs] == [0, 1], output
    assert {e["launcher"] for e in envs} == {"slurm"}
    assert {e["world_size"] for e in envs} == {2}
    assert sorted(e["local_rank"] for e in envs) == [0, 1]  # one node: local rank = rank
    assert len({(e["master_addr"], e["master_port"]) for e in envs}) == 1, envs
    # The master is the job's first node, the one node here.
    nodes = expand_nodelist(re.search(r"^NODELIST=(\S+)", output, re.M).group(1))
    assert envs[0]["master_addr"] == nodes[0] == slurm.node_name()


def test_requeued_job_runs_again_with_restart_count(slurm, tmp_path):
    script = f"""#!/bin/bash
#SBATCH --ntasks=1
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
echo "BATCH restart=${{SLURM_RESTART_COUNT:-0}}"
srun {sys.executable} -c 'import os; print("STEP restart=" + os.environ.get("SLURM_RESTART_COUNT", "0"))'
if [[ -z ${{SLURM_RESTART_COUNT:-}} ]]; then
    scontrol requeue "$SLURM_JOB_ID"
    sleep 30  # the requeue ends this run with SIGTERM
fi
"""
    job_id, state, output = slurm.submit(script, cwd=tmp_path, timeout=30)
    assert state == "COMPLETED", output
    assert re.findall(r"(BATCH|STEP) restart=(\d)", output) == [
        ("BATCH", "0"), ("STEP", "0"), ("BATCH", "1"), ("STEP", "1")], output


def _template_job(slurm, tmp_path, template, sbatch_args=(), env=None, args=("trainer.max_steps=3",)):
    env = {"PRETRAIN_BIN": str(_fake_train(tmp_path)), "FAKE_WAIT": "1", **(env or {})}
    return slurm.sbatch(REPO / "slurm" / template, list(args), cwd=tmp_path,
                        sbatch_args=list(sbatch_args), env=env)


def test_debug_template_stops_on_usr1_and_requeues_itself(slurm, tmp_path):
    job_id = _template_job(slurm, tmp_path, "debug_cpu.sbatch")
    slurm.wait_for_output(job_id, r"^FAKE ", count=2)
    slurm.signal_batch(job_id, "USR1")  # what --signal=B:USR1@60 does before the time limit
    job_id, state, output = slurm.wait(job_id, timeout=30)
    assert state == "COMPLETED", output
    runs = _records(output, "FAKE ")
    assert sorted((r["restart"], r["rank"]) for r in runs) == [(0, 0), (0, 1), (1, 0), (1, 1)], output
    assert all(r["world"] == 2 and r["launcher"] == "slurm" and r["omp"] == "1" for r in runs)
    # The template's defaults come first, the sbatch arguments last; run.dir survives the requeue.
    assert runs[0]["args"][0] == "experiment=debug" and runs[0]["args"][-1] == "trainer.max_steps=3"
    assert {a for r in runs for a in r["args"] if a.startswith("run.dir=")} == {
        f"run.dir={REPO}/runs/slurm-debug-{job_id}"}
    assert output.count("signals=['USR1']") == 2, output
    assert "requeue 1 of at most 20" in output


def test_debug_template_does_not_requeue_a_cancelled_job(slurm, tmp_path):
    job_id = _template_job(slurm, tmp_path, "debug_cpu.sbatch")
    slurm.wait_for_output(job_id, r"^FAKE ", count=2)
    slurm.cancel(job_id)  # scancel: SIGTERM to the batch shell and to every task
    job_id, state, output = slurm.wait(job_id, timeout=30)
    assert state == "CANCELLED", output
    assert output.count("signals=['TERM']") == 2, output
    assert "requeue" not in output.replace("DUE TO JOB REQUEUE", "")


def test_debug_template_stops_requeueing_after_max_requeues(slurm, tmp_path):
    job_id = _template_job(slurm, tmp_path, "debug_cpu.sbatch", env={"MAX_REQUEUES": "0"})
    slurm.wait_for_output(job_id, r"^FAKE ", count=2)
    slurm.signal_batch(job_id, "USR1")
    job_id, state, output = slurm.wait(job_id, timeout=30)
    assert state == "FAILED", output  # exit 3 stays visible: the run stopped unfinished
    assert "MAX_REQUEUES=0" in output and len(_records(output, "FAKE ")) == 2


def test_train_template_runs_one_task_per_gpu_slot(slurm, tmp_path):
    # No GPUs here: --gpus-per-node=0 and 2 tasks of 1 CPU stand in for a GPU node.
    job_id = _template_job(slurm, tmp_path, "train.sbatch", env={"FAKE_WAIT": "0"},
                           sbatch_args=["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"],
                           args=["experiment=gpt2-124m", "run.dir=/scratch/x"])
    job_id, state, output = slurm.wait(job_id, timeout=30)
    assert state == "COMPLETED", output
    runs = _records(output, "FAKE ")
    assert sorted(r["rank"] for r in runs) == [0, 1] and {r["world"] for r in runs} == {2}, output
    assert {tuple(r["args"]) for r in runs} == {("experiment=gpt2-124m", "run.dir=/scratch/x")}


@pytest.mark.slow
def test_torchrun_template_forwards_usr1_to_workers_and_requeues(slurm, tmp_path):
    job_id = _template_job(slurm, tmp_path, "train_torchrun.sbatch", env={"NPROC_PER_NODE": "2"},
                           sbatch_args=["--gpus-per-node=0", "--cpus-per-task=2"])
    slurm.wait_for_output(job_id, r"^FAKE ", count=2, timeout=60)
    slurm.signal_batch(job_id, "USR1")
    job_id, state, output = slurm.wait(job_id, timeout=60)
    assert state == "COMPLETED", output
    runs = _records(output, "FAKE ")
    assert sorted((r["restart"], r["rank"]) for r in runs) == [(0, 0), (0, 1), (1, 0), (1, 1)], output
    assert {r["launcher"] for r in runs} == {"torchrun"} and {r["world"] for r in runs} == {2}
    assert {r["omp"] for r in runs} == {"1"}  # --cpus-per-task=2 shared by 2 workers
    assert output.count("signals=['USR1']") == 2, output
