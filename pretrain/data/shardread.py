"""Read the samples a worker owns out of one shard file: the reading half of the shard contract.

A shard in pretrain-data's layout is read by offset, only the samples wanted (`read_by_offset`);
anything else (another tar layout, damage) is streamed whole through webdataset's tar reader,
which finds and reports the damage. The HTTP Range reader (remote.py) checks the members it
fetched with the same `member_payload`. `want` maps a sample's index in the shard to its position
in the worker's window throughout.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
import webdataset as wds

from pretrain.data.manifest import (TAR_BLOCK, Manifest, ShardInfo, decode_sample, member_bytes,
                                    tar_checksum)
from pretrain.errors import DataError

Rows = Dict[int, np.ndarray]  # position in the window -> (sample_tokens,) token ids


class BadShard(Exception):
    """A shard that cannot be read (truncated, corrupt, unreachable): the loader skips it, counts
    it against data.max_bad_shards and fills its samples from others. `rows` holds the samples
    read before the damage. A DataError, in contrast, stops the run."""

    def __init__(self, url: str, reason: str, rows: Optional[Rows] = None):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason, self.rows = url, reason, rows or {}


def _checksum_ok(header: bytes) -> bool:
    try:
        recorded = int(header[148:156].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        return False
    return recorded == tar_checksum(header)


def member_payload(buf: bytes, manifest: Manifest) -> Optional[memoryview]:
    """The payload of one member as pretrain-data writes it (a USTAR header `{key:010d}.tokens`
    of the manifest's sample size, then the payload), checked: name, size and header checksum.
    None when `buf` is not such a member."""
    payload = manifest.sample_tokens * manifest.dtype.itemsize
    size_field = b"%011o\0" % payload  # USTAR: size as 11 octal digits and a NUL
    if (len(buf) < TAR_BLOCK + payload or buf[124:136] != size_field
            or buf[10:18] != b".tokens\0" or not buf[:10].isdigit() or not _checksum_ok(buf)):
        return None
    return memoryview(buf)[TAR_BLOCK:TAR_BLOCK + payload]


def in_layout(info: ShardInfo, manifest: Manifest) -> bool:
    """Whether a shard of this size can be in pretrain-data's layout: member i's header at
    i x stride, then the end-of-archive blocks."""
    stride = member_bytes(manifest.sample_tokens * manifest.dtype.itemsize)
    return info.bytes >= info.samples * stride + 2 * TAR_BLOCK


def read_by_offset(info: ShardInfo, want: Dict[int, int], manifest: Manifest) -> Optional[Rows]:
    """Samples `want` of a local shard in pretrain-data's layout: USTAR members of one fixed size,
    so that member i's header starts at i x (512 + size rounded up to 512). Every header read is
    checked; None when the shard is not in that layout or is damaged (the caller streams it
    instead, which reports the damage)."""
    payload = manifest.sample_tokens * manifest.dtype.itemsize
    stride = member_bytes(payload)
    out: Rows = {}
    try:
        with open(info.url, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size < info.samples * stride + 2 * TAR_BLOCK:
                return None  # truncated: let the stream count it
            fd = f.fileno()
            for i in sorted(want):
                view = member_payload(os.pread(fd, TAR_BLOCK + payload, i * stride), manifest)
                if view is None:
                    return None
                out[want[i]] = decode_sample(view, manifest)
    except OSError:
        return None
    except DataError as e:
        raise DataError(f"shard {info.url}, sample {i}: {e}") from e
    return out


def read_streaming(info: ShardInfo, want: Dict[int, int], manifest: Manifest) -> Rows:
    """Samples `want` of any tar webdataset reads, streamed whole. Raises BadShard (with the
    samples read before it) when the tar cannot be read or holds another number of samples than
    the manifest says; DataError for a readable sample with bad tokens."""
    out: Rows = {}
    samples = iter(wds.tariterators.tarfile_samples([{"url": info.url}]))
    i = -1
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except Exception as e:  # truncated or corrupt tar, unreadable file
            raise BadShard(info.url, str(e), out) from e
        i += 1
        if i in want:
            if "tokens" not in sample:
                raise DataError(f"{info.url}: sample {sample.get('__key__')} has no .tokens member")
            try:
                out[want[i]] = decode_sample(sample["tokens"], manifest)
            except DataError as e:
                raise DataError(f"shard {info.url}, sample {sample.get('__key__')}: {e}") from e
    if i + 1 != info.samples:
        raise BadShard(info.url, f"holds {i + 1} samples, the manifest says {info.samples}", out)
    return out


def read_shard(info: ShardInfo, want: Dict[int, int], manifest: Manifest) -> Rows:
    """Samples `want` of the local shard file `info.url`: by offset when it is in pretrain-data's
    layout, else streamed (which raises BadShard for a damaged one)."""
    got = read_by_offset(info, want, manifest)
    return got if got is not None else read_streaming(info, want, manifest)
