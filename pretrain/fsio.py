"""Writing a whole file so that a reader (or the next start after a crash) finds the old content
or the new one, never a part of it: the checkpoint's small files and `latest` pointer, the run
directory's config.yaml and wandb_id, the universal checkpoint's marker, pretrain-data's manifest
and tokenizer.

No third-party imports: pretrain-data (tokenizer/) uses it too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

# A write in progress is `<name>.part` beside its target. Not `.tmp`: in a checkpoint directory
# `.tmp` names a save in progress, which start-up removes as a directory.
PART_SUFFIX = ".part"


def part_path(path: Union[str, Path]) -> Path:
    """Where atomic_write(path) stages the data: removing it is part of removing path."""
    path = Path(path)
    return path.with_name(path.name + PART_SUFFIX)


def atomic_write(path: Union[str, Path], data: Union[str, bytes], fsync: bool = True) -> None:
    """Write data (str as UTF-8) to path through a sibling `.part` file renamed over it.

    A failed write (a full disk, an interrupt) removes the `.part` file and leaves path as it
    was: nothing half-written is ever at path. fsync=True also makes the result durable before
    returning: the data reaches the disk before the rename (else a power loss can leave an empty
    file after it), and the directory after it (else the rename itself can be lost). fsync=False
    keeps the all-or-nothing but not the durability, for files that are cheap to lose.
    """
    path = Path(path)
    tmp = part_path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
