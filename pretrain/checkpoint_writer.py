"""The background writer of asynchronous checkpoint saves: one thread per rank.

A file handed to `submit` is first staged: every tensor of its state is copied to host memory
(into buffers kept from the previous save of the same file, pinned when the tensors are on a GPU)
and every other object of it is deep-copied, so that training may change the originals in place
as soon as `submit` returns. Containers are rebuilt around the copies; a tensor reached twice is
copied once. The thread then writes the staged state with the given write function (DeepSpeed's
own torch.save: the same format as a synchronous save) and fsyncs the file.

Why a thread and not a fork()ed child that writes the live state copy-on-write: measured here
(216 MB of tensors, 2 cores) fork() alone blocked 0.11 s, about what staging the copy costs,
every page training writes afterwards is copied by a page fault anyway, and the child of a
process that runs gloo, OpenMP and DataLoader threads may deadlock on a lock one of them held.

Failures are not raised here: `error` holds the first one, the remaining files of that save are
skipped, and the checkpointer (pretrain.checkpoint) agrees on it with the other ranks at a step
boundary. Staging buffers are reused only once the previous save's writes are over, which the
checkpointer guarantees (at most one save in flight).
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from pretrain import faults

log = logging.getLogger(__name__)

SLOW_WRITE_S = 4.0  # how long the slow_write drill holds a save's first file

Write = Callable[[Any, str], None]  # (state, path): writes the file, as torch.save does


class BackgroundWriter:
    def __init__(self, rank: int, pin_memory: bool = False):
        self.rank = rank
        self.pin_memory = pin_memory
        self._queue: "queue.Queue[tuple]" = queue.Queue()
        self._buffers: Dict[str, List[torch.Tensor]] = {}  # file name -> staging buffers, in order
        self._lock = threading.Lock()
        self._unfinished = 0  # files submitted and not yet written (or skipped)
        self._thread: Optional[threading.Thread] = None
        self.step = 0
        self.error: Optional[BaseException] = None
        self.write_seconds = 0.0  # the thread's time writing this save's files
        self.staging_seconds = 0.0  # the caller's time copying this save's state

    def begin(self, step: int) -> None:
        """A new save: its step (fault drills), cleared error and clocks. Only when idle."""
        assert self.idle(), "a save is still being written"
        self.step, self.error = step, None
        self.write_seconds = self.staging_seconds = 0.0

    def submit(self, write: Write, state: Any, path: str) -> None:
        """Stage `state` (see the module doc) and queue its write to `path`; returns at once."""
        t0 = time.perf_counter()
        staged = self._stage(state, Path(path).name)
        self.staging_seconds += time.perf_counter() - t0
        with self._lock:
            self._unfinished += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()
        self._queue.put((write, staged, str(path), self.step))

    def idle(self) -> bool:
        """Every submitted file written (or skipped after a failure)."""
        with self._lock:
            return self._unfinished == 0

    def wait(self) -> None:
        self._queue.join()

    # ---- staging -----------------------------------------------------------------------------
    @torch.no_grad()
    def _stage(self, state: Any, name: str) -> Any:
        buffers = self._buffers.setdefault(name, [])
        copies: Dict[int, torch.Tensor] = {}  # id(original) -> its copy
        seen: List[torch.Tensor] = []  # the originals, alive while their ids are keys
        count = [0]

        def tensor(t: torch.Tensor) -> torch.Tensor:
            if id(t) in copies:
                return copies[id(t)]
            seen.append(t)
            key, t = id(t), t.detach()
            i, count[0] = count[0], count[0] + 1
            reuse = i < len(buffers) and buffers[i].shape == t.shape and buffers[i].dtype == t.dtype
            if not reuse:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu",
                                  pin_memory=self.pin_memory and t.is_cuda)
                buffers[i:i + 1] = [buf]
            buffers[i].copy_(t, non_blocking=t.is_cuda)
            copies[key] = buffers[i]
            return buffers[i]

        def walk(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return tensor(x)
            if type(x) in (dict, OrderedDict):
                return type(x)((k, walk(v)) for k, v in x.items())
            if type(x) in (list, tuple):
                return type(x)(walk(v) for v in x)
            return copy.deepcopy(x)  # a small object (a loss scaler): training may change it

        staged = walk(state)
        del buffers[count[0]:]  # a file that shrank keeps no stale buffers
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies are in host memory from here on
        return staged

    # ---- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        _lower_priority()
        while True:
            write, staged, path, step = self._queue.get()
            try:
                if self.error is None:  # after a failure the rest of that save is skipped
                    t0 = time.perf_counter()
                    self._write(write, staged, path, step)
                    self.write_seconds += time.perf_counter() - t0
            except BaseException as e:  # agreed on by the checkpointer at a step boundary
                self.error = e
                log.debug("background write of %s failed: %s", path, e)
            finally:
                del staged
                with self._lock:
                    self._unfinished -= 1
                self._queue.task_done()

    def _write(self, write: Write, staged: Any, path: str, step: int) -> None:
        if faults.active("slow_write", step, self.rank):
            print(f"[fault] rank {self.rank} holds its step-{step} write for {SLOW_WRITE_S:.0f}s",
                  flush=True)
            time.sleep(SLOW_WRITE_S)
        if faults.active("enospc_in_write", step, self.rank):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        write(staged, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _lower_priority() -> None:
    """The calling thread at the lowest CPU priority (Linux: nice is per thread), so that where
    training keeps every core busy the writer takes what is left instead of slowing the step."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass
