"""Checkpoints that were tampered with, damaged or could not be written never run code, never crash
with a raw error and never cost the previous checkpoint:

- a planted `.pt` whose unpickling runs code (an rng, model-states or optimizer file; FILES
  updated to match, as an attacker would) is refused with a CheckpointError naming the file, at
  resume and at a DP 1 -> 2 reshard (pretrain-export: tests/test_export.py); its code never runs;
- a `latest` pointer that names anything but a step_XXXXXXXX directory of checkpoints/ is ignored;
- garbage in FILES, layout.json or trainer.json makes the checkpoint damaged: the latest falls
  back to the previous intact one, naming it in trainer.resume_from is a CheckpointError;
- a full disk during DeepSpeed's write (a real 3 MiB tmpfs) or during rank 0's commit (an injected
  ENOSPC) ends every rank with "no space left", promptly, and the previous checkpoint stays the
  latest and loadable.
"""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.checkpoint import FILES, LAYOUT, MARKER, damaged, file_sizes, find_latest, step_name
from pretrain.config import Config
from pretrain.dist import Dist
from pretrain.errors import CheckpointError
from pretrain.layout import Layout
from pretrain.reshard import prepare, read_layout
from pretrain.run import find_resume_point
from tests.launch_helpers import run_train, tiny_overrides
from tests.test_checkpoint import assert_same_params, final_params, losses

pytestmark = pytest.mark.slow
TIMEOUT = 300
MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
RNG = "rng_rank00000.pt"


class Planted:
    """Unpickling it calls Path.touch(marker) (pickled as getattr(Path, "touch")): what a real
    payload would do instead is anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def plant(step_dir: Path, name: str, marker: Path) -> None:
    """Replace a file of a committed checkpoint and update FILES, so that the size check passes."""
    torch.save({"module": Planted(marker)}, step_dir / name)
    (step_dir / FILES).write_text(json.dumps(file_sizes(step_dir)))
    assert damaged(step_dir) is None


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / step_name(step)


def overrides(data: Path, run: Path, steps: int, **extra):
    return tiny_overrides(data, run, steps=steps, trainer__checkpoint_every=1, **extra)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    """3 steps in one process (ZeRO 1, fp32), a checkpoint after each."""
    run = tmp_path_factory.mktemp("safety") / "trained"
    run_train(overrides(tiny_dataset, run, 3), timeout=TIMEOUT)
    return run


def copy_of(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    (dest / "metrics.jsonl").unlink()
    return dest


# ---- 3a: nothing on the load or reshard paths unpickles arbitrary objects --------------------
@pytest.mark.parametrize("name", [RNG, MODEL, OPTIM])
def test_planted_pickle_is_refused_at_resume(tiny_dataset, trained, tmp_path, name):
    run = copy_of(trained, tmp_path / "run")
    marker = tmp_path / "MARKER"
    plant(ckpt(run, 3), name, marker)
    proc = run_train(overrides(tiny_dataset, run, 4), timeout=TIMEOUT, check=False)
    assert not marker.exists(), "the planted pickle ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: CheckpointError" in proc.stderr and name in proc.stderr
    assert "GLOBAL getattr" in proc.stderr  # what it tried to load


def test_planted_pickle_is_refused_at_a_dp1_to_dp2_reshard(tiny_dataset, trained, tmp_path):
    run = copy_of(trained, tmp_path / "run")
    marker = tmp_path / "MARKER"
    plant(ckpt(run, 3), OPTIM, marker)  # read by DeepSpeed's ds_to_universal
    proc = run_train(overrides(tiny_dataset, run, 4), nproc=2, timeout=TIMEOUT, check=False)
    assert not marker.exists(), "the planted pickle ran"
    assert proc.returncode != 0
    assert proc.stderr.count("error: CheckpointError: converting") == 2  # every rank
    assert OPTIM in proc.stderr and "GLOBAL getattr" in proc.stderr

    # The model-states file, read by our own step before the converter (in process).
    plant(ckpt(run, 3), MODEL, marker)
    solo = Dist(SimpleNamespace(rank=0, world_size=1, local_rank=0), Layout(1, 1, 1, 256), "cpu",
                "gloo")
    saved = read_layout(ckpt(run, 3), {}, 256)
    with pytest.raises(CheckpointError, match=f"{MODEL}.*GLOBAL getattr"):
        prepare(ckpt(run, 3), saved, Layout(1, 2, saved.zero_stage, saved.padded_vocab_size), solo)
    assert not marker.exists()


def test_safe_load_reads_every_file_of_a_genuine_checkpoint(trained):
    from pretrain.checkpoint import safe_load

    for f in sorted(ckpt(trained, 3).glob("*.pt")):
        assert isinstance(safe_load(f), dict), f


def test_rng_files_of_older_checkpoints_still_load(trained, tmp_path):
    """Until the RNG state was saved as tensors, numpy's state was pickled as a numpy array."""
    import numpy as np

    from pretrain.checkpoint import Checkpointer

    step = Path(shutil.copytree(ckpt(trained, 3), tmp_path / step_name(3)))
    state = torch.load(step / RNG, weights_only=True)
    np.random.seed(7)
    state["numpy"] = np.random.get_state()  # the legacy tuple, holding an array
    expected = np.random.rand(3)
    torch.save(state, step / RNG)
    np.random.seed(0)
    solo = SimpleNamespace(rank=0, tp=1, dp=1, is_main=True)
    Checkpointer(tmp_path, solo)._load_rng(step)
    assert np.array_equal(np.random.rand(3), expected)


# ---- 3b: the latest pointer stays inside checkpoints/ ----------------------------------------
def committed_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / MARKER).write_text(path.name)
    return path


@pytest.mark.parametrize("pointer", [
    "../../other/checkpoints/step_00000009", "/abs/other/checkpoints/step_00000009",
    "step_00000001/../../../other/checkpoints/step_00000009", "step_9", "", "\x00\xff junk",
])
def test_latest_pointing_anywhere_but_a_step_here_is_ignored(tmp_path, pointer, caplog):
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        committed_dir(root / step_name(step))
    outside = committed_dir(tmp_path / "other" / "checkpoints" / step_name(9))
    (root / "latest").write_text(pointer.replace("/abs", str(tmp_path)), errors="surrogateescape")
    with caplog.at_level(logging.WARNING):
        assert find_latest(root) == root / step_name(2)
    assert "latest" in caplog.text and str(outside) not in str(find_latest(root))
    (root / "latest").write_text(step_name(1))  # a good pointer still wins over the newest
    assert find_latest(root) == root / step_name(1)


# ---- 4a: garbage in FILES, layout.json, trainer.json -----------------------------------------
def same_size(text: bytes, like: Path) -> bytes:
    """Garbage as long as the file it replaces, so that FILES's size check alone cannot see it."""
    size = like.stat().st_size
    assert len(text) <= size
    return text.ljust(size) if text.startswith((b"[", b"{")) else (text * size)[:size]


GARBAGE = {
    "FILES-not-json": (FILES, b"{not json"),
    "FILES-a-list": (FILES, b'["x"]'),
    "FILES-wrong-types": (FILES, b'{"a": "x"}'),
    "FILES-outside": (FILES, b'{"../../etc/hostname": 1}'),
    "FILES-binary": (FILES, b"\xff\xfe\x00"),
    "layout-a-list": (LAYOUT, b'["x"]'),
    "layout-wrong-types": (LAYOUT, b'{"tp": "x", "dp": 1}'),
    "layout-binary": (LAYOUT, b"\xff\xfe\x00"),
    "trainer-binary": ("trainer.json", b"\xff\xfe\x00"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_makes_a_checkpoint_damaged(trained, tmp_path, case, caplog):
    name, junk = GARBAGE[case]
    root = tmp_path / "checkpoints"
    shutil.copytree(trained / "checkpoints", root)
    newest = root / step_name(3)
    (newest / name).write_bytes(junk if name == FILES else same_size(junk, newest / name))
    problem = damaged(newest)
    assert problem and name in problem, problem
    with caplog.at_level(logging.WARNING):
        assert find_latest(root) == root / step_name(2)
    assert "is damaged" in caplog.text
    cfg = Config()
    cfg.trainer.resume_from = str(newest)
    with pytest.raises(CheckpointError, match="damaged"):
        find_resume_point(cfg, root)
    if name == LAYOUT:
        with pytest.raises(CheckpointError, match=LAYOUT):
            read_layout(newest, {}, 256)


@pytest.mark.parametrize("name", [FILES, LAYOUT])
def test_damaged_newest_resumes_from_the_previous_one(tiny_dataset, trained, tmp_path, name):
    run = copy_of(trained, tmp_path / "run")
    target = ckpt(run, 3) / name
    target.write_bytes(same_size(b"\xff\xfe garbage", target))
    proc = run_train(overrides(tiny_dataset, run, 3), timeout=TIMEOUT)
    assert "step_00000003 is damaged" in proc.stdout
    assert f"resumed from {ckpt(run, 2)}" in proc.stdout
    assert losses(run)[3] == losses(trained)[3]  # step 3 again, as in the uninterrupted run
    assert_same_params(final_params(run), final_params(trained))


# ---- 4c: a full disk ---------------------------------------------------------------------------
def rank_errors(stderr: str) -> list:
    """Each rank's CheckpointError message (the ranks' lines may interleave in one pipe)."""
    return [part.split("\n")[0].split("error: ")[0]
            for part in stderr.split("error: CheckpointError: ")[1:]]


def assert_previous_is_latest_and_loads(tiny_dataset, run: Path, nproc: int) -> None:
    root = run / "checkpoints"
    assert (root / "latest").read_text() == step_name(1) and find_latest(root) == ckpt(run, 1)
    assert damaged(ckpt(run, 1)) is None and not ckpt(run, 2).exists()
    proc = run_train(overrides(tiny_dataset, run, 1), nproc=nproc, timeout=TIMEOUT)
    assert f"resumed from {ckpt(run, 1)} at step 1" in proc.stdout


def test_full_disk_in_the_rank0_commit_ends_every_rank(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    start = time.monotonic()
    proc = run_train(overrides(tiny_dataset, run, 3, parallel__timeout_min=5), nproc=2,
                     timeout=TIMEOUT, check=False, env={"PRETRAIN_FAULTS": "enospc_in_commit@2"})
    took = time.monotonic() - start
    assert proc.returncode != 0
    ended = rank_errors(proc.stderr)
    assert len(ended) == 2, proc.stderr[-4000:]  # every rank, not only rank 0
    for text in ended:
        assert text.startswith("committing step_00000002 failed on rank 0: no space left"), text
        assert "bytes free" in text and "step_00000001 stays the latest checkpoint" in text
    assert took < 150, f"{took:.0f}s: a rank waited for the collective timeout (5 min)"
    assert_previous_is_latest_and_loads(tiny_dataset, run, nproc=2)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: one checkpoint of the tiny model (about 2.1 MB) fits, a second does not."""
    where = tmp_path / "run" / "checkpoints"
    where.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield where.parent
    subprocess.run(["umount", "-l", str(where)], check=True)


def test_full_disk_in_deepspeeds_write_ends_every_rank(tiny_dataset, small_disk):
    run = small_disk
    proc = run_train(overrides(tiny_dataset, run, 3, parallel__timeout_min=5), nproc=2,
                     timeout=TIMEOUT, check=False)
    assert proc.returncode != 0
    ended = rank_errors(proc.stderr)
    assert len(ended) == 2, proc.stderr[-4000:]
    for text in ended:
        assert text.startswith("saving step_00000002 failed on rank"), text
        assert f"no space left on the device of {run / 'checkpoints'} (" in text
        assert "bytes free" in text and "unexpected pos" not in text
    assert_previous_is_latest_and_loads(tiny_dataset, run, nproc=2)
