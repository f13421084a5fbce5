"""`make debug` end to end: a real corpus (the Python standard library's source), a tokenizer,
shards, a pretraining run with DeepSpeed + megatron-core + webdataset + wandb offline, a report."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint import MARKER, find_latest
from tests.launch_helpers import REPO, cpu_env, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def debug(tmp_path_factory):
    """`make debug` once: (its dataset, its run directory)."""
    venv = Path(sys.prefix)
    if not (venv / ".installed").exists():
        pytest.skip(f"{venv} was not made by `make install` (no .installed marker)")
    root = tmp_path_factory.mktemp("debug")
    data, run = root / "data", root / "run"
    proc = subprocess.run(
        ["make", "--no-print-directory", "debug", f"VENV={venv}", f"DEBUG_DATA={data}",
         f"DEBUG_RUN={run}"],
        cwd=REPO, env=cpu_env({"OMP_NUM_THREADS": "2"}), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, run


def test_make_debug(debug):
    data, run = debug
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] > 10_000 and manifest["vocab_size"] == 4096

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[-1]["step"] == 200
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "step_time", "mfu"):
        assert key in train[-1], key
    assert train[-1]["mfu"] is None  # no known peak on a CPU
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # it learns
    assert any("val_loss" in r for r in records)
    latest = find_latest(run / "checkpoints")
    assert latest.name == "step_00000200" and (latest / MARKER).exists()
    assert (run / "config.yaml").exists() and list((run / "wandb").glob("offline-run-*"))


def readme_two_rank_commands() -> list:
    """The README's `torchrun --nproc-per-node 2 -m launch.train ...` lines (continuations joined)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.split("#")[0]) for line in text.splitlines()
            if line.startswith("torchrun --nproc-per-node 2 -m launch.train")]


def test_the_readmes_two_rank_commands_run(debug, tmp_path):
    """Each of them, on `make debug`'s dataset, for 3 steps."""
    data, _ = debug
    commands = readme_two_rank_commands()
    assert len(commands) >= 4 and any("parallel.pp=2" in c for c in commands)
    for i, argv in enumerate(commands):
        argv = [a for a in argv if not a.startswith(("data.path=", "run.dir="))]
        argv[0:1] = [sys.executable, "-m", "torch.distributed.run", f"--master-port={free_port()}"]
        run = tmp_path / f"run{i}"
        proc = subprocess.run(
            argv + [f"data.path={data}", f"run.dir={run}", "trainer.max_steps=3",
                    "trainer.eval_every=0", "trainer.checkpoint_every=0", "logger.mode=disabled"],
            cwd=REPO, env=cpu_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True,
            timeout=600)
        assert proc.returncode == 0, (argv, proc.stdout[-2000:] + proc.stderr[-3000:])
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(x)]
        assert steps[-1] == 3, argv
