"""The background writer of asynchronous checkpoint saves: a thread per save, on every rank.

Each file DeepSpeed's save hands to `submit` is staged: its containers are rebuilt around views
into host buffers kept from the previous save of the same file (one buffer per dtype, aligned
for O_DIRECT: `_Packed`), and every other object of it is deep-copied. The tensors' bytes are
copied into the buffers
- at once when they are on a GPU (pinned buffers, the device's copy speed), or
- on CPU, by the save's thread, while the next step's forward and backward run: those leave
  the weights and optimizer state alone, and the step module calls `wait_staged()` before its
  optimizer update (pretrain.step.DeepSpeedStep.before_update). Copying at the step boundary
  instead stopped the loop for 11% of a synchronous save's time at 350M parameters on 2 ranks.
After the copies the thread drops to nice 19 and writes each file in torch.save's format, the
tensor bytes straight from the buffers to the disk (pretrain.direct_write.save: what DeepSpeed's
loader, the universal conversion and the export read), and fsyncs it.

Why not torch.save in the thread, as the synchronous save does: measured with a 91M-parameter
model on the 2-core CPU machine, pickling, CRC32 and the copy into the page cache on the writer
thread made the step after a save 1.5x-2.7x a step without one and wrote at 0.3x-0.8x the
synchronous save's speed; with O_DIRECT from packed buffers the writes cost training next to
nothing (bench/bench_checkpoint.py --only-async has today's figures).

Why a thread and not a fork()ed child that writes the live state copy-on-write: measured here
(216 MB of tensors, 2 cores) fork() alone blocked 0.11 s, about what staging the copy costs,
every page training writes afterwards is copied by a page fault anyway, and the child of a
process that runs gloo, OpenMP and DataLoader threads may deadlock on a lock one of them held.

Failures are not raised here: `error` holds the first one, the remaining files of that save are
skipped, and the checkpointer (pretrain.checkpoint) agrees on it with the other ranks at a step
boundary. Staging buffers are reused only once the previous save's writes are over, which the
checkpointer guarantees (at most one save in flight). A thread per save, not one for the run:
the copies run at normal priority (an update may be waiting for them) and a thread cannot raise
its priority again once lowered.
"""

from __future__ import annotations

import copy
import errno
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from pretrain import direct_write, faults

log = logging.getLogger(__name__)

SLOW_WRITE_S = 4.0  # how long the slow_write drill holds a save's first file
SLOW_STAGING_S = 2.0  # how long the slow_staging drill holds a save's copies


class BackgroundWriter:
    """One rank's writer: `begin(step)`, `submit(state, path)` for each file of the save,
    `start()`; the caller then calls `wait_staged()` before it next changes any tensor it
    submitted (the optimizer update), and polls `idle()` / `error`."""

    def __init__(self, rank: int, pin_memory: bool = False):
        self.rank = rank
        self.pin_memory = pin_memory
        self._buffers: Dict[str, _Packed] = {}  # file name -> its staging buffers
        self._files: List[_File] = []  # this save's, until start()
        self._staged = threading.Event()  # every copy of the save in flight is made
        self._staged.set()
        self._lock = threading.Lock()
        self._unfinished = 0  # saves started and not yet written (or skipped)
        self._thread: Optional[threading.Thread] = None
        self.step = 0
        self.error: Optional[BaseException] = None
        self.write_seconds = 0.0  # the thread's time copying and writing this save's files
        self.staging_seconds = 0.0  # the caller's time in submit()
        self.copy_seconds = 0.0  # the thread's time copying (copies deferred to it)
        self.staging_wait_seconds = 0.0  # the caller's time in wait_staged()

    def begin(self, step: int) -> None:
        """A new save: its step (fault drills), cleared error and clocks. Only when idle."""
        assert self.idle(), "a save is still being written"
        self.step, self.error, self._files = step, None, []
        self.write_seconds = self.staging_seconds = 0.0
        self.copy_seconds = self.staging_wait_seconds = 0.0

    def submit(self, state: Any, path: str) -> None:
        """Stage `state` (see the module doc) for a write to `path`; written after start()."""
        t0 = time.perf_counter()
        self._files.append(self._stage(state, Path(path).name, str(path)))
        self.staging_seconds += time.perf_counter() - t0

    def start(self) -> None:
        """Hand this save's files to a thread of its own: it makes the deferred copies at normal
        priority (the next update may be waiting for them), then writes at nice 19."""
        files, self._files = self._files, []
        if any(f.copies for f in files):
            self._staged.clear()
        with self._lock:
            self._unfinished += 1
        self._thread = threading.Thread(target=self._run, args=(files,), daemon=True,
                                        name=f"checkpoint-writer-{self.step}")
        self._thread.start()

    def wait_staged(self) -> None:
        """Return once every tensor submitted so far is copied: from then on training may change
        them. Its time counts in the save's block time (pretrain.checkpoint)."""
        if not self._staged.is_set():
            t0 = time.perf_counter()
            self._staged.wait()
            self.staging_wait_seconds += time.perf_counter() - t0

    def idle(self) -> bool:
        """Every started save written (or skipped after a failure)."""
        with self._lock:
            return self._unfinished == 0

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    # ---- staging -----------------------------------------------------------------------------
    @torch.no_grad()
    def _stage(self, state: Any, name: str, path: str) -> "_File":
        originals: Dict[int, torch.Tensor] = {}  # id -> tensor, in the order first reached

        def collect(x: Any) -> None:
            if isinstance(x, torch.Tensor):
                originals.setdefault(id(x), x)
            elif type(x) in (dict, OrderedDict):
                for v in x.values():
                    collect(v)
            elif type(x) in (list, tuple):
                for v in x:
                    collect(v)

        collect(state)
        tensors = [t.detach() for t in originals.values()]
        layout = [(tuple(t.shape), t.dtype, t.is_cuda) for t in tensors]
        packed = self._buffers.get(name)
        if packed is None or packed.layout != layout:  # a file's layout stays the same save to save
            packed = self._buffers[name] = _Packed(layout, self.pin_memory)
        copies = list(zip(tensors, packed.views))
        if any(t.is_cuda for t in tensors):  # copied now, at the device's copy speed
            for t, copy_to in copies:
                copy_to.copy_(t, non_blocking=True)
            torch.cuda.synchronize()  # the non-blocking copies are in host memory from here on
            copies = []
        views = {key: view for key, view in zip(originals, packed.views)}

        def walk(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return views[id(x)]
            if type(x) in (dict, OrderedDict):
                return type(x)((k, walk(v)) for k, v in x.items())
            if type(x) in (list, tuple):
                return type(x)(walk(v) for v in x)
            return copy.deepcopy(x)  # a small object (a loss scaler): training may change it

        return _File(path, walk(state), copies)

    # ---- the thread ----------------------------------------------------------------------------
    def _run(self, files: List["_File"]) -> None:
        try:
            t0 = time.perf_counter()
            self._copy(files)
            self.copy_seconds = time.perf_counter() - t0
            _lower_priority()  # the writes cost little CPU (O_DIRECT); they wait behind training
            for f in files:
                self._write(f.staged, f.path, self.step)
            self.write_seconds = time.perf_counter() - t0
        except BaseException as e:  # agreed on by the checkpointer at a step boundary
            self.error = e
            log.debug("background save of step %d failed: %s", self.step, e)
        finally:
            self._staged.set()  # also after a failure: nothing waits for copies never made
            del files
            with self._lock:
                self._unfinished -= 1

    @torch.no_grad()
    def _copy(self, files: List["_File"]) -> None:
        if faults.active("slow_staging", self.step, self.rank):
            print(f"[fault] rank {self.rank} holds its step-{self.step} copies for "
                  f"{SLOW_STAGING_S:.0f}s", flush=True)
            time.sleep(SLOW_STAGING_S)
        for f in files:
            for t, copy_to in f.copies:
                copy_to.copy_(t)
            f.copies = []  # the originals are no longer held
        self._staged.set()

    def _write(self, staged: Any, path: str, step: int) -> None:
        if faults.active("slow_write", step, self.rank):
            print(f"[fault] rank {self.rank} holds its step-{step} write for {SLOW_WRITE_S:.0f}s",
                  flush=True)
            time.sleep(SLOW_WRITE_S)
        if faults.active("enospc_in_write", step, self.rank):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        direct_write.save(staged, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class _File:
    """One file of a save: its staged state (views into the staging buffers) and the copies
    into them still to be made by the thread ((original, buffer view) pairs)."""

    path: str
    staged: Any
    copies: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _lower_priority() -> None:
    """The calling thread at the lowest CPU priority (Linux: nice is per thread), so that where
    training keeps every core busy the writer takes what is left instead of slowing the step."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


class _Packed:
    """The staging buffers of one file: a tensor per dtype (aligned for O_DIRECT,
    pretrain.direct_write.host_buffer) that every tensor of that dtype is a view into, each
    starting on a 64-byte boundary. torch.save then writes one record per dtype instead of one
    per tensor: the writer thread makes a few large writes, not hundreds of small ones (each a
    wait for the GIL while training runs: 1.4 s instead of 0.5 s for a 91M-parameter model's
    150-tensor file)."""

    def __init__(self, layout: List[Tuple[Tuple[int, ...], torch.dtype, bool]], pin: bool):
        self.layout = layout
        starts, totals = [], {}  # element offsets; elements per dtype
        for shape, dtype, _ in layout:
            align = max(1, 64 // torch.empty((), dtype=dtype).element_size())
            at = -(-totals.get(dtype, 0) // align) * align
            starts.append(at)
            totals[dtype] = at + math.prod(shape)
        on_gpu = {dtype for _, dtype, cuda in layout if cuda}
        flat = {dtype: direct_write.host_buffer((n,), dtype, pin=pin and dtype in on_gpu)
                for dtype, n in totals.items()}
        self.views = [flat[dtype][at:at + math.prod(shape)].view(shape)
                      for (shape, dtype, _), at in zip(layout, starts)]


class BackgroundRemover:
    """Deletes pruned checkpoints on a thread of its own: removing the files of a large checkpoint
    (0.55 s for 1.4 GB on ext4 here, longer on network file systems) would otherwise stop the
    step loop at every commit. Directories handed to it are already renamed out of the
    checkpoints' namespace (`*.tmp`), so a removal cut short by the process's end is finished by
    the next start's clean-up (pretrain.checkpoint.clean_stale)."""

    def __init__(self) -> None:
        self._queue: "queue.Queue[Path]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def remove(self, path: Path) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-remover",
                                            daemon=True)
            self._thread.start()
        self._queue.put(Path(path))

    def wait(self) -> None:
        """Every directory handed over is gone (or failed to go: logged)."""
        self._queue.join()

    def _run(self) -> None:
        _lower_priority()
        while True:
            path = self._queue.get()
            try:
                shutil.rmtree(path, onerror=lambda f, p, e: log.warning(
                    "could not remove %s of the pruned checkpoint %s: %s", p, path, e[1]))
            finally:
                self._queue.task_done()
