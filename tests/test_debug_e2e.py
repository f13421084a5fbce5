"""`make debug` end to end: a real corpus (the Python standard library's source), a tokenizer,
shards, a pretraining run with DeepSpeed + megatron-core + webdataset + wandb offline, a report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint import MARKER, find_latest
from tests.launch_helpers import REPO, cpu_env

pytestmark = pytest.mark.slow


def test_make_debug(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / ".installed").exists():
        pytest.skip(f"{venv} was not made by `make install` (no .installed marker)")
    data, run = tmp_path / "data", tmp_path / "run"
    proc = subprocess.run(
        ["make", "--no-print-directory", "debug", f"VENV={venv}", f"DEBUG_DATA={data}",
         f"DEBUG_RUN={run}"],
        cwd=REPO, env=cpu_env({"OMP_NUM_THREADS": "2"}), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

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
