"""Pack one split's token stream into fixed-length samples and write them as tar shards.

The stream is every document's tokens followed by the EOD id, in input order. It is cut into
non-overlapping samples of exactly `sample_tokens = seq_len + 1` ids; the final partial sample is
dropped and counted. Sample k of the split is the tar member `{k:010d}.tokens`. A shard is
closed once it reaches the target size, written as `name.tar.tmp` and renamed, and is
byte-for-byte a function of the token stream (fixed tar headers: mtime 0, uid/gid 0, mode 0644).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from typing import Any, BinaryIO, Dict, List, Optional

import numpy as np

from pretrain.data.manifest import (KEY_DIGITS, SAMPLE_SUFFIX, TAR_BLOCK, member_bytes,
                                    tar_checksum)


class _HashingWriter:
    """Counts and hashes the bytes of a shard on their way to disk."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes


RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads an archive to a multiple of this


class _MemberHeaders:
    """The 512-byte USTAR header of member `{key:010d}.tokens` as tarfile writes it (mode 0644,
    uid/gid 0, mtime 0, no user/group names), made from one template: only the ten name digits
    and the checksum differ between samples (tarfile.addfile costs ~30 us a sample, this ~2 us;
    the writing process must keep up with every tokenizing worker)."""

    def __init__(self, payload_bytes: int):
        self.template = bytearray(self._tarfile_header(0, payload_bytes))
        self.base = tar_checksum(self.template) - sum(self.template[:KEY_DIGITS])
        self.payload_bytes = payload_bytes

    @staticmethod
    def _tarfile_header(key: int, payload_bytes: int) -> bytes:
        info = tarfile.TarInfo(f"{key:0{KEY_DIGITS}d}.{SAMPLE_SUFFIX}")
        info.size = payload_bytes
        info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")

    def __call__(self, key: int) -> bytes:
        digits = b"%0*d" % (KEY_DIGITS, key)
        if len(digits) != KEY_DIGITS:  # beyond 10^10 samples: the general path
            return self._tarfile_header(key, self.payload_bytes)
        header = self.template[:]
        header[:KEY_DIGITS] = digits
        header[148:156] = b"%06o\0 " % (self.base + sum(digits))
        return bytes(header)


class ShardWriter:
    """Writes `root/split/shard-NNNNNN.tar`; `add()` tokens in stream order, then `close()`."""

    def __init__(self, root: str, split: str, sample_tokens: int, dtype: np.dtype,
                 target_bytes: int):
        self.root, self.split = root, split
        self.sample_tokens = sample_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.target_bytes = target_bytes
        self.samples = 0
        self.shards: List[Dict[str, Any]] = []
        self._pending: List[np.ndarray] = []
        self._pending_tokens = 0
        self._file: Optional[BinaryIO] = None
        self._out: Optional[_HashingWriter] = None
        payload = sample_tokens * self.dtype.itemsize
        self._headers = _MemberHeaders(payload)
        self._padding = bytes(member_bytes(payload) - TAR_BLOCK - payload)
        self._shard_samples = 0
        os.makedirs(os.path.join(root, split), exist_ok=True)

    def add(self, tokens: np.ndarray) -> None:
        """Append ids to the stream and write every sample that is now complete."""
        if not len(tokens):
            return
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        if self._pending_tokens < self.sample_tokens:
            return
        stream = np.concatenate(self._pending).astype(self.dtype, copy=False)
        full = len(stream) // self.sample_tokens
        for row in stream[: full * self.sample_tokens].reshape(full, self.sample_tokens):
            self._write_sample(row.tobytes())
        rest = stream[full * self.sample_tokens:].copy()
        self._pending, self._pending_tokens = [rest], len(rest)

    def close(self) -> Dict[str, Any]:
        """Finish the last shard; the split's manifest entry (partial sample dropped)."""
        if self._out is not None:
            self._close_shard()
        return {"samples": self.samples, "tokens": self.samples * self.sample_tokens,
                "dropped_tokens": self._pending_tokens, "shards": self.shards}

    def _write_sample(self, payload: bytes) -> None:
        if self._out is None:
            self._open_shard()
        self._out.write(b"".join((self._headers(self.samples), payload, self._padding)))
        self.samples += 1
        self._shard_samples += 1
        if self._out.bytes >= self.target_bytes:
            self._close_shard()

    def _shard_path(self) -> str:
        return f"{self.split}/shard-{len(self.shards):06d}.tar"

    def _open_shard(self) -> None:
        self._file = open(os.path.join(self.root, self._shard_path()) + ".tmp", "wb")
        self._out = _HashingWriter(self._file)
        self._shard_samples = 0

    def _close_shard(self) -> None:
        # End of archive as tarfile.close() writes it: two zero blocks, then zeros up to a record.
        end = self._out.bytes + 2 * TAR_BLOCK
        self._out.write(bytes(2 * TAR_BLOCK + (-end % RECORD)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        rel = self._shard_path()
        path = os.path.join(self.root, rel)
        os.replace(path + ".tmp", path)
        self.shards.append({"path": rel, "samples": self._shard_samples,
                            "tokens": self._shard_samples * self.sample_tokens,
                            "bytes": self._out.bytes, "sha256": self._out.sha256.hexdigest()})
        self._file = self._out = None
