"""Shard specs: which of a dataset's shards a run reads, and where each one lives.

A spec is one string in webdataset's notation: brace lists and ranges
(`/d/web/train/shard-{000000..000099}.tar`, `.../shard-{000003,000007}.tar`), shell globs for local
files (`/mnt/nvme/web/train/*.tar`), `pipe:` commands and URLs (`pipe:aws s3 cp
s3://bucket/web/train/shard-{000000..000099}.tar -`), several of them joined by `::`.

`expand` turns a spec into locations; `Manifest.select_shards` matches each location to a shard of
the manifest (by its path in the manifest, else by file name), so the manifest still gives every
shard's sample count and checksum and the loader's order stays a pure function of the selection.
"""

from __future__ import annotations

import glob
import os
from typing import List

import braceexpand

from pretrain.data.manifest import is_remote
from pretrain.errors import DataError

SEPARATOR = "::"
GLOB_CHARS = ("*", "?", "[")


def expand(spec: str) -> List[str]:
    """Every location a spec names, in the order written (globs sorted), duplicates dropped."""
    if not spec or not spec.strip():
        raise DataError("data.shards is empty; give a path, a glob or a brace list of shards")
    out: List[str] = []
    for part in spec.split(SEPARATOR):
        part = part.strip()
        if not part:
            raise DataError(f"data.shards={spec!r}: an empty pattern between '{SEPARATOR}'")
        try:
            names = list(braceexpand.braceexpand(part))
        except Exception as e:  # braceexpand raises its own UnbalancedBracesError
            raise DataError(f"data.shards: cannot expand {part!r} ({e}); write ranges as "
                            "{000000..000099} and lists as {a,b}") from e
        for name in names:
            out.extend(_glob(name, spec) if _is_glob(name) else [name])
    seen = set()
    return [x for x in out if not (x in seen or seen.add(x))]


def _is_glob(name: str) -> bool:
    return any(c in name for c in GLOB_CHARS)


def _glob(pattern: str, spec: str) -> List[str]:
    if is_remote(pattern):
        raise DataError(f"data.shards: {pattern!r} is remote and has a glob character; remote "
                        "storage cannot be listed here, name its shards with a brace list such "
                        "as shard-{000000..000099}.tar")
    found = sorted(glob.glob(os.path.expanduser(pattern)))
    if not found:
        raise DataError(f"data.shards={spec!r}: {pattern!r} matches no file")
    return found
