"""torch.save's file format, with the tensor bytes written straight from host memory to the disk.

`save(state, path)` writes a file that `torch.load` (and so DeepSpeed's load, the universal
conversion and pretrain-export) reads like any other: torch's own serializer writes the pickle and
the zip headers, leaving holes where the tensor records go (every record starts on a 4096-byte
boundary, no CRC32 is computed), and the bytes of each tensor are then written into its hole with
O_DIRECT from the host buffer that holds it (`host_buffer`: 4096-byte aligned). The kernel then
hands the buffer to the disk without copying it into the page cache, and nothing is pickled,
copied or checksummed on a CPU: the background writer of asynchronous saves costs the training
processes next to no CPU time or memory bandwidth, and the disk writes as fast as it can.

Measured on this project's 2-core CPU machine (ext4 on a virtio disk): 1.2 GB/s with O_DIRECT
against 0.52 GB/s for buffered writes + fsync (dd, 1 GiB).

What cannot go direct goes through the page cache, in the same file: a buffer that is not
aligned (a tensor that was not staged into a `host_buffer`), the last partial block of each
record, a platform or file system without O_DIRECT (or refusing a direct write), a path torch's writer cannot open (not
ASCII: then the whole file is `torch.save`d). The caller fsyncs the file.
"""

from __future__ import annotations

import errno
import os
import pickle
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Sequence

import numpy as np
import torch

ALIGN = 4096  # record offsets in the file and host buffer addresses: a block of any disk
CHUNK = 1 << 30  # bytes per write call (a multiple of ALIGN)
PICKLE_PROTOCOL = 2  # torch.save's default


@dataclass
class Written:
    direct: int = 0  # tensor bytes written with O_DIRECT
    buffered: int = 0  # tensor bytes written through the page cache


def host_buffer(shape: Sequence[int], dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """An empty CPU tensor whose storage starts on an ALIGN boundary (so `save` can write it with
    O_DIRECT); page-locked for fast copies from a GPU when `pin` (if CUDA lets us register it)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    block = raw[start:start + nbytes]
    if pin and nbytes:
        _pin(block)
    return torch.from_numpy(block).view(dtype).view(tuple(shape))


def _pin(block: np.ndarray) -> None:
    try:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(block.ctypes.data, block.nbytes, 0)) != 0:
            return
    except Exception:  # no CUDA runtime: pageable memory (slower copies, same bytes)
        return
    weakref.finalize(block.base, cudart.cudaHostUnregister, block.ctypes.data)


class _HoleyRecords:
    """torch's zip writer, seen by torch's serializer: a tensor record gets its header and an
    unwritten hole of its size; its storage is kept to be written into the hole afterwards."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self.storages: Dict[str, torch.UntypedStorage] = {}

    def write_record(self, name: str, data: Any, size: int) -> None:
        if name.startswith("data/") and isinstance(data, torch.UntypedStorage):
            self.writer.write_record_metadata(name, size)
            self.storages[name] = data
        else:
            self.writer.write_record(name, data, size)


def save(state: Any, path: str) -> Written:
    """Write `state` to `path` as torch.save would (see the module doc); not fsynced."""
    path = str(path)
    try:
        path.encode("ascii")
    except UnicodeEncodeError:  # torch's file writer opens ASCII paths only
        torch.save(state, path)
        return Written(buffered=_tensor_bytes(path))
    writer = torch._C.PyTorchFileWriter(path, False, ALIGN)
    records = _HoleyRecords(writer)
    torch.serialization._save(state, records, pickle, PICKLE_PROTOCOL, False)
    writer.write_end_of_file()
    del writer  # closes the file
    reader = torch._C.PyTorchFileReader(path)
    offsets = {name: reader.get_record_offset(name) for name in records.storages}
    del reader
    return _fill(path, records.storages, offsets)


def _fill(path: str, storages: Dict[str, torch.UntypedStorage],
          offsets: Dict[str, int]) -> Written:
    done = Written()
    fd = os.open(path, os.O_WRONLY)
    direct = _open_direct(path)
    try:
        for name, storage in storages.items():
            data = _bytes(storage)
            offset, n = offsets[name], len(data)
            head = n - n % ALIGN if direct is not None and offset % ALIGN == 0 \
                and storage.data_ptr() % ALIGN == 0 else 0
            try:
                _write_all(direct, data[:head], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:  # a full disk, an I/O error: the save fails
                    raise
                # opened with O_DIRECT but a write refused (a larger logical block): from here
                # on through the page cache
                os.close(direct)
                direct, head = None, 0
            _write_all(fd, data[head:], offset + head)
            done.direct += head
            done.buffered += n - head
    finally:
        os.close(fd)
        if direct is not None:
            os.close(direct)
    return done


def _open_direct(path: str):
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:  # the file system refuses O_DIRECT: through the page cache
        return None


def _bytes(storage: torch.UntypedStorage) -> memoryview:
    n = storage.nbytes()
    if n == 0:
        return memoryview(b"")
    flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n,), (1,))
    return memoryview(flat.numpy())


def _write_all(fd, data: memoryview, offset: int) -> None:
    """pwrite every byte of `data` at `offset` (a write may be short; each is at most CHUNK)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + CHUNK], offset + done)


def _tensor_bytes(path: str) -> int:
    reader = torch._C.PyTorchFileReader(path)
    return sum(reader.get_record_size(r) for r in reader.get_all_records()
               if r.startswith("data/"))
