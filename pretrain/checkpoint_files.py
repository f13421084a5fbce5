"""The checkpoints directory on disk: names, discovery, the damaged check, stale clean-up.

Layout of `RUN_DIR/checkpoints/`:
    step_00000100/            one committed checkpoint (DeepSpeed files, trainer.json, rng_*.pt,
                              config.yaml, tokenizer.json, COMMITTED)
    step_00000200.tmp/        a save in progress (or one that crashed): never loaded, removed at start
    latest                    the name of the newest committed checkpoint (replaced atomically)
    step_00000100.universal/  its DeepSpeed universal form, made when a resume runs at another
                              parallel layout (pretrain.reshard); removed with step_00000100/
    step_00000050.pruned.tmp/ a checkpoint pruned (keep_last) whose files a thread is removing

A committed checkpoint whose files no longer match FILES (truncated or lost later, e.g. by a full
disk or a bad copy), or whose FILES, layout.json or trainer.json is not what a save writes, is
damaged: resuming from the latest one falls back, with a warning, to the newest intact checkpoint;
naming a damaged one in trainer.resume_from is a CheckpointError. The check reads sizes and those
small files only, before any process group starts, so every rank picks the same one. `latest` is
followed only when it names a step_XXXXXXXX directory of checkpoints/.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional

from pretrain.errors import CheckpointError
from pretrain.layout import Layout

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
FILES = "FILES"  # JSON {relative path: size in bytes} of every file of the checkpoint
LAYOUT = "layout.json"  # the parallel layout it was saved at (pretrain.reshard.Layout)
TRAINER = "trainer.json"  # the trainer's state for people and tools (the engine keeps its own)
_NAME = re.compile(r"step_([0-9]{8})")  # fullmatch: nothing else is a checkpoint's name


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def committed(root: Path) -> List[Path]:
    """Committed checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / MARKER).exists()]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    return int(_NAME.fullmatch(Path(path).name).group(1))


UNIVERSAL = ".universal"
PRUNED = ".pruned.tmp"  # a pruned checkpoint whose files are being removed


def universal_dir(step_dir: Path) -> Path:
    """Where the universal form of a step directory lives (a sibling, never inside it)."""
    return Path(step_dir).with_name(Path(step_dir).name + UNIVERSAL)


def file_sizes(path: Path) -> Dict[str, int]:
    """Sizes of a checkpoint's files. Each is opened (not just stat'ed) so that NFS revalidates
    the size of files other nodes wrote (close-to-open consistency)."""
    sizes = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name not in (FILES, MARKER):
            with open(f, "rb") as fh:
                sizes[str(f.relative_to(path))] = os.fstat(fh.fileno()).st_size
    return sizes


def read_json(path: Path) -> Dict[str, Any]:
    """One of a checkpoint's JSON object files; CheckpointError for anything else (garbage)."""
    try:
        value = json.loads(Path(path).read_bytes())
    except ValueError as e:  # invalid JSON, or bytes that are not text at all
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def _listing(path: Path) -> Dict[str, int]:
    """FILES: {relative path inside the checkpoint: size}, checked to be just that."""
    sizes = read_json(path / FILES)
    for name, size in sizes.items():
        parts = PurePosixPath(name).parts
        inside = bool(parts) and parts[0] != "/" and ".." not in parts
        if not (inside and type(size) is int and size >= 0):
            raise CheckpointError(f"{path / FILES} is not a listing of the checkpoint's files and "
                                  f"sizes (it holds {name!r}: {size!r})")
    return sizes


def damaged(path: Path) -> Optional[str]:
    """What is wrong with a committed checkpoint's files, or None if they are as saved."""
    path = Path(path)
    try:
        if (path / FILES).exists():  # saved before FILES existed: no sizes to check against
            for name, size in _listing(path).items():
                try:
                    actual = (path / name).stat().st_size
                except FileNotFoundError:
                    return f"{name} is missing"
                if actual != size:
                    return f"{name} has {actual} bytes, {size} were saved"
        if (path / TRAINER).exists():
            read_json(path / TRAINER)
        if (path / LAYOUT).exists():
            Layout.from_file(path / LAYOUT)
    except CheckpointError as e:
        return str(e)
    return None


def _pointed(root: Path) -> Optional[Path]:
    """The checkpoint `latest` names, when it names a step_XXXXXXXX directory of root. Anything
    else (a path out of the run, e.g. ../../other/checkpoints/step_N, or junk) is ignored, with a
    warning: resuming another run's checkpoint must be asked for (trainer.resume_from)."""
    pointer = root / "latest"
    try:
        name = pointer.read_bytes().decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read the checkpoint pointer %s (%s); scanning %s", pointer, e, root)
        return None
    if not _NAME.fullmatch(name):
        log.warning("checkpoint pointer %s holds %r, not the name of a step_XXXXXXXX directory of "
                    "%s: ignoring it and scanning", pointer, name[:200], root)
        return None
    return root / name


def find_latest(root: Path) -> Optional[Path]:
    """The newest intact committed checkpoint: the `latest` pointer's, else the newest one found.
    Damaged ones are passed over with a warning."""
    candidates = committed(root)[::-1]
    named = _pointed(root)
    if named is not None:
        if (named / MARKER).exists():
            candidates.insert(0, named)
        else:
            log.warning("checkpoint pointer %s names %s, which is not committed; scanning",
                        root / "latest", named)
    for candidate in candidates:
        problem = damaged(candidate)
        if problem is None:
            return candidate
        log.warning("checkpoint %s is damaged (%s): falling back to an older one", candidate, problem)
    return None


def clean_stale(root: Path) -> None:
    """Remove saves that never committed, and universal forms whose checkpoint is gone (rank 0,
    before training starts)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        uncommitted = p.is_dir() and _NAME.fullmatch(p.name) and not (p / MARKER).exists()
        if p.name.endswith(".tmp") or uncommitted:
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith(UNIVERSAL) and not (root / p.name[:-len(UNIVERSAL)] / MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)
