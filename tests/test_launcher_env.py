"""pretrain.launcher_env: Slurm host lists, and rank/world/master from torchrun, srun or nothing."""

from __future__ import annotations

import functools
import shutil
import subprocess

import pytest

from pretrain.errors import EnvironmentSetupError
from pretrain.launcher_env import expand_nodelist, read_process_env

# Compressed host lists in the forms Slurm writes them (`scontrol show hostlist` compresses only a
# trailing number, so "gpu1-ib,gpu2-ib" stays as it is), with what `scontrol show hostnames`
# (Slurm 22.05) expands them to.
NODELISTS = {
    "vm": ["vm"],
    "node[01-03,07]": ["node01", "node02", "node03", "node07"],
    "a1,b[2-3]": ["a1", "b2", "b3"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],
    "n[08,9-10]": ["n08", "n9", "n10"],
    "h[1,3-4],g7": ["h1", "h3", "h4", "g7"],
    "node[01-03,07],login1": ["node01", "node02", "node03", "node07", "login1"],
    "x-[1-2],y": ["x-1", "x-2", "y"],
    "rack1-node[01-02],rack2-node[01-02]": ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
    "gpu1-ib,gpu2-ib": ["gpu1-ib", "gpu2-ib"],
    "a9b[1-2],a10b1": ["a9b1", "a9b2", "a10b1"],
}


@pytest.mark.parametrize("nodelist", NODELISTS)
def test_expand_nodelist(nodelist):
    assert expand_nodelist(nodelist) == NODELISTS[nodelist]


def _scontrol_hostnames(nodelist: str):
    """What the real Slurm expands `nodelist` to; None without a configured Slurm here."""
    if not _scontrol_works():
        return None
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         timeout=10, check=True)
    return out.stdout.split()


@functools.lru_cache(maxsize=None)
def _scontrol_works() -> bool:
    if shutil.which("scontrol") is None:
        return False
    try:  # without a slurm.conf, scontrol retries for a minute before it gives up
        return subprocess.run(["scontrol", "show", "hostnames", "a1"], capture_output=True,
                              timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.parametrize("nodelist", NODELISTS)
def test_expand_nodelist_agrees_with_scontrol(nodelist):
    expected = _scontrol_hostnames(nodelist)
    if expected is None:
        pytest.skip("no configured Slurm here: `scontrol show hostnames` does not answer")
    assert expand_nodelist(nodelist) == expected


def _srun_env(**over):
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_RESTART_COUNT": "1"}
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29400"}
    p = read_process_env(env)
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.master_addr, p.master_port) == (
        "torchrun", 3, 4, 1, "gpu07", 29400)


def test_torchrun_inside_an_sbatch_job_wins_over_slurm():
    # torchrun under srun: the worker also sees the srun task's SLURM_* (one task per node).
    env = _srun_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0")
    env.update({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"})
    p = read_process_env(env)
    assert (p.launcher, p.rank, p.world_size, p.local_rank) == ("torchrun", 5, 8, 1)


def test_srun_variables():
    p = read_process_env(_srun_env())
    assert (p.launcher, p.rank, p.world_size, p.local_rank) == ("slurm", 1, 4, 1)
    assert p.master_addr == "gpu07"  # the step's first node
    assert p.master_port == 10000 + 4242 % 20000  # the same on every task of the job


def test_srun_master_can_be_set():
    p = read_process_env(_srun_env(MASTER_ADDR="10.0.0.1", MASTER_PORT="31000"))
    assert (p.master_addr, p.master_port) == ("10.0.0.1", 31000)


def test_srun_step_nodelist_wins_over_the_job_nodelist():
    # A step may run on part of the allocation.
    p = read_process_env(_srun_env(SLURM_JOB_NODELIST="gpu[07-09]", SLURM_STEP_NODELIST="gpu[08-09]"))
    assert p.master_addr == "gpu08"


def test_batch_shell_without_a_step_is_a_single_process():
    # The batch script itself has SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; only srun's tasks have
    # SLURM_STEP_ID (seen on Slurm 22.05).
    env = _srun_env(SLURM_STEP_ID=None)
    assert read_process_env(env).launcher == "single"


def test_single_process():
    p = read_process_env({})
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.master_addr) == ("single", 0, 1, 0, "127.0.0.1")
    assert 0 < p.master_port < 65536


@pytest.mark.parametrize("env, message", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside the world of 4"),
    ({"RANK": "-1", "WORLD_SIZE": "4"}, "outside the world"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "local rank 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
    (_srun_env(SLURM_PROCID="4"), "rank 4 is outside the world of 4 (slurm"),
    (_srun_env(SLURM_NTASKS=""), "SLURM_NTASKS=''"),
    (_srun_env(SLURM_LOCALID="7"), "local rank 7"),
    (_srun_env(SLURM_JOB_NODELIST="", SLURM_STEP_NODELIST=None), "SLURM_JOB_NODELIST is empty"),
])
def test_inconsistent_variables_raise(env, message):
    with pytest.raises(EnvironmentSetupError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_process_env(env)
