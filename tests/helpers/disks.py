"""Small real file systems for full-disk tests (root only: the tests that use them skip else)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def small_ext4(where: Path, mib: int) -> Iterator[Path]:
    """An ext4 file system of `mib` MiB mounted at `where` (made if missing), through a loop
    device: unlike tmpfs it takes O_DIRECT writes, as the disks checkpoints are written to do."""
    where.mkdir(parents=True, exist_ok=True)
    image = where.parent / f".{where.name}.ext4"
    with open(image, "wb") as f:
        f.truncate(mib << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0", str(image)],
                          capture_output=True, text=True) if shutil.which("mkfs.ext4") else None
    mounted = made is not None and made.returncode == 0 and subprocess.run(
        ["mount", "-o", "loop", str(image), str(where)], capture_output=True, text=True)
    if not mounted or mounted.returncode != 0:
        image.unlink()
        why = mounted.stderr.strip() if mounted else "mkfs.ext4 failed or is missing"
        pytest.skip(f"cannot mount a small ext4 here (needs root and a loop device): {why}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
        image.unlink()
