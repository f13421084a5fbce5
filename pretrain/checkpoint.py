"""Atomic, discoverable checkpoints of the DeepSpeed engine plus everything else a run needs.

Layout of `RUN_DIR/checkpoints/`, discovery and the damaged check: pretrain.checkpoint_files.

A save writes into `<name>.tmp`; after every rank has finished, rank 0 writes FILES (every
file's size), the COMMITTED marker, renames the directory to `<name>` and replaces `latest`. A
crash at any point leaves the previous checkpoint as latest and loadable. A failure on any rank,
in the writes or in rank 0's commit, is agreed on (an all-reduce, then the failing rank's words
broadcast) and ends every rank with the same CheckpointError, a full disk saying so.

A background save (trainer.async_save; Checkpointer's doc) stages the state in host memory and
returns; its files are written by a thread per save on each rank (pretrain.checkpoint_writer),
and the same commit happens at a later step boundary, once the ranks agree that every writer is
done.

Nothing is unpickled beyond tensors, containers and primitives plus the few DeepSpeed classes its
files hold (torch's weights-only loading, pretrain.safe_load): a planted `.pt` whose unpickling
would run code is a CheckpointError naming the file, on resume, reshard (pretrain.reshard) and
export.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from pretrain import faults
# The directory's names and discovery, here too for the callers that import them from here.
from pretrain.checkpoint_files import (FILES, LAYOUT, MARKER, PRUNED, TRAINER,  # noqa: F401
                                      UNIVERSAL, clean_stale, committed, damaged, file_sizes,
                                      find_latest, read_json, step_name, step_of, universal_dir)
from pretrain.checkpoint_writer import BackgroundRemover, BackgroundWriter
from pretrain.client_state import ClientState
from pretrain.errors import CheckpointError
from pretrain.fsio import atomic_write
from pretrain.safe_load import numpy_array_classes, safe_load

log = logging.getLogger(__name__)

# Below this many free bytes a failed torch.save is taken for a full disk: its partial file is
# still there when the failure is looked at, so a disk that filled up shows (nearly) nothing free.
LOW_SPACE = 64 * 2**20


# ---- RNG state ---------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """Every generator's state as tensors, lists and primitives (loadable weights-only)."""
    from megatron.core import tensor_parallel

    numpy_state = np.random.get_state(legacy=False)  # {bit_generator, state: {key, pos}, ...}
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):  # else the tuple of numpy's legacy form (older checkpoints)
        key = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
        numpy_state = {**numpy_state, "state": {**numpy_state["state"], "key": key}}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reseed_value(seed: int, step: int) -> int:
    """The seed a resume reseeds from when the checkpoint holds no RNG state for this layout:
    a function of (trainer.seed, step) only, the same on every rank, because megatron needs the
    default generators equal across a TP group; Dist.seed offsets the TP tracker per TP rank."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] % 2**31)


# ---- failures, in words --------------------------------------------------------------------------
def _free_bytes(path: Path) -> Optional[int]:
    for where in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(where).free
        except OSError:
            continue
    return None


def _describe(error: BaseException, where: Path) -> str:
    """A failure to write under `where` in words: a full disk (ENOSPC, or torch's writer failing
    with almost nothing left: it reports no errno) says so, with the bytes free."""
    free = _free_bytes(where)
    low = free is not None and free < LOW_SPACE
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) and cause not in chain:
        chain.append(cause)
    torch_writer = ("unexpected pos", "PytorchStreamWriter failed")
    if not any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
               or (low and any(m in str(e) for m in torch_writer)) for e in chain):
        return str(error) or type(error).__name__
    left = "unknown" if free is None else f"{free:,}"
    return (f"no space left on the device of {where} ({left} bytes free): free some space there "
            f"(or lower trainer.keep_last) and run the same command again")


@dataclass
class SaveReport:
    """One committed save, for the metrics."""

    step: int
    path: Path
    background: bool  # written by the background writer (trainer.async_save)
    block_seconds: float  # the loop stopped for it: waiting for the save before, staging, commit
    write_seconds: float  # writing its files: the writer thread's time, or the whole sync save
    wait_seconds: float  # of block_seconds, waiting for the save before it to finish


@dataclass
class _InFlight:
    """A background save whose files are being written; committed by poll() or finish()."""

    step: int
    tmp: Path
    final: Path
    state: ClientState
    extra_files: Dict[str, Path]
    block_seconds: float
    wait_seconds: float


class Checkpointer:
    """Saves (synchronous, or staged and written in the background), commits, prunes, loads.

    Background saves (`background=True`: trainer.async_save): `save(..., background=True)` stages
    every rank's state in host memory, hands its files to this rank's writer thread
    (pretrain.checkpoint_writer) and returns. The checkpoint stays `<name>.tmp` until a later
    step boundary at which every rank's writer is done: `poll()` (collective, each step) agrees
    on that, then rank 0 commits exactly as a synchronous save does. At most one save is in
    flight: a save, a load (a rollback) or `finish()` waits for it and commits it first. A write
    that failed on any rank is a CheckpointError on every rank at that boundary; the previous
    checkpoint stays the latest and the .tmp is removed at the next start. Pruning (keep_last)
    runs only at a commit and never removes the newest committed checkpoints nor one being loaded.
    """

    def __init__(self, root: Path, dist, keep_last: int = 3, seed: int = 0,
                 background: bool = False):
        self.root = Path(root)
        self.dist = dist
        self.keep_last = keep_last
        self.seed = seed
        self.writer = (BackgroundWriter(dist.rank, pin_memory=dist.device_type == "cuda")
                       if background else None)
        self.in_flight: Optional[_InFlight] = None
        self._remover = BackgroundRemover()
        self._reports: List[SaveReport] = []  # committed saves not yet taken, oldest first

    def save(self, module, step: int, state: ClientState,
             extra_files: Optional[Dict[str, Path]] = None, background: bool = False
             ) -> Optional[Path]:
        """Collective: every rank calls it with the step module (pretrain.step) whose engine state
        to save. Returns the committed directory; a failure on any rank is a CheckpointError on
        every rank. background=True (needs a Checkpointer made with background=True): returns
        None once the state is staged; a later poll() or finish() commits it."""
        t0 = time.perf_counter()
        name = step_name(step)
        if self.in_flight is not None:
            if self.dist.is_main:
                log.info("checkpoint %s is due while %s is still being written: waiting for it",
                         name, self.in_flight.final.name)
            self.finish(charge=False)  # the wait is this save's block time
        wait = time.perf_counter() - t0
        writer = self.writer if background else None
        if background and writer is None:
            raise ValueError("a background save needs Checkpointer(background=True)")
        tmp = self.root / (name + ".tmp")
        final = self.root / name
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.dist.barrier()
        error: Optional[BaseException] = None
        try:
            if writer is not None:
                writer.begin(step)
            module.save(self.root, tmp.name, state.to_dict(), writer)
            if writer is not None:
                writer.start()
            torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank:05d}.pt")
            if faults.active("crash_in_save", step, self.dist.rank):
                raise faults.InjectedFault(f"injected failure after rank {self.dist.rank} wrote")
        except Exception as e:  # agreed on below, so that no rank commits a partial save
            error = e
        # The committed marker is written only once every rank's files are on disk.
        failed = self._agree(error)
        if failed:
            raise CheckpointError(f"saving {name} failed {failed}; {self._kept()} and {tmp} is "
                                  f"removed at the next start") from error
        pending = _InFlight(step, tmp, final, state, extra_files or {},
                            time.perf_counter() - t0, wait)
        if writer is not None:
            self.in_flight = pending
            return None
        return self._commit_agreed(pending, background=False)

    def take_reports(self) -> List[SaveReport]:
        """The saves committed since the last call (by a save, poll, finish or load), oldest first."""
        reports, self._reports = self._reports, []
        return reports

    def poll(self) -> Optional[Path]:
        """Collective, at a step boundary: commit the save in flight once every rank's writer is
        done (returns its directory); None while any rank is still writing, or none is in
        flight. A write that failed on any rank is a CheckpointError on every rank."""
        if self.in_flight is None or not self._writes_agreed(wait=False):
            return None
        return self._commit_in_flight(protect=None, blocked=0.0)

    def finish(self, protect: Optional[Path] = None, charge: bool = True) -> Optional[Path]:
        """Collective: wait for the save in flight, if any, and commit it (at the end, before a
        stop's save, before a load). `protect`: a checkpoint the commit's pruning must keep.
        charge: count the wait in that save's block time (not when a new save waits for it)."""
        if self.in_flight is None:
            return None
        t0 = time.perf_counter()
        self._writes_agreed(wait=True)
        return self._commit_in_flight(protect, time.perf_counter() - t0 if charge else 0.0)

    def _writes_agreed(self, wait: bool) -> bool:
        """Collective: True when every rank's writer is done; False while any is writing; a
        CheckpointError on every rank when any rank's write failed."""
        if wait:
            self.writer.wait()
        error = self.writer.error
        code = 2 + self.dist.rank if error is not None else (0 if self.writer.idle() else 1)
        agreed = int(self.dist.all_reduce_max(code))
        if agreed < 2:
            return agreed == 0
        pending, self.in_flight = self.in_flight, None
        src = agreed - 2
        words = self.dist.broadcast_object(
            _describe(error, self.root) if self.dist.rank == src else None, src=src)
        raise CheckpointError(f"saving {pending.final.name} failed on rank {src}: {words}; "
                              f"{self._kept()} and {pending.tmp} is removed at the next start"
                              ) from error

    def _commit_in_flight(self, protect: Optional[Path], blocked: float) -> Path:
        pending, self.in_flight = self.in_flight, None
        pending.block_seconds += blocked
        return self._commit_agreed(pending, background=True, protect=protect)

    def _commit_agreed(self, pending: _InFlight, background: bool,
                       protect: Optional[Path] = None) -> Path:
        """Collective, once every rank's files are on disk: rank 0 commits, the ranks agree on
        its outcome, rank 0 prunes."""
        t0 = time.perf_counter()
        error: Optional[BaseException] = None
        if self.dist.is_main:
            try:
                self._commit(pending.tmp, pending.final, pending.step, pending.state,
                             pending.extra_files)
            except Exception as e:  # rank 0's alone: the others learn of it below, not by timeout
                error = e
        failed = self._agree(error)
        if failed:
            raise CheckpointError(f"committing {pending.final.name} failed {failed}; "
                                  f"{self._kept()}") from error
        if self.dist.is_main:
            try:
                self._prune(keep=pending.final, protect=protect)
            except OSError as e:  # the save is committed; the others no longer wait for rank 0
                log.warning("could not remove checkpoints older than the newest %d: %s",
                            self.keep_last, e)
        block = pending.block_seconds + time.perf_counter() - t0
        if background:  # the step module waited for the copies before its next update
            block += self.writer.staging_wait_seconds
        self._reports.append(SaveReport(
            pending.step, pending.final, background, block,
            self.writer.write_seconds if background else block, pending.wait_seconds))
        return pending.final

    def _agree(self, error: Optional[BaseException]) -> Optional[str]:
        """Collective: None when no rank failed; else on every rank "on rank R: <R's error>"."""
        failed = int(self.dist.all_reduce_max(self.dist.rank + 1 if error is not None else 0))
        if failed == 0:
            return None
        words = self.dist.broadcast_object(_describe(error, self.root) if error is not None else None,
                                           src=failed - 1)
        return f"on rank {failed - 1}: {words}"

    def _kept(self) -> str:
        latest = find_latest(self.root)
        return f"{latest.name} stays the latest checkpoint" if latest else "no earlier one exists"

    def _commit(self, tmp: Path, final: Path, step: int, state: ClientState,
                extra_files: Dict[str, Path]) -> None:
        """Rank 0, once every rank's files are on disk: FILES, the marker, the rename, `latest`."""
        for dst, src in extra_files.items():
            shutil.copyfile(src, tmp / dst)
        atomic_write(tmp / TRAINER, json.dumps(state.trainer))
        if state.layout is not None:
            atomic_write(tmp / LAYOUT, json.dumps(state.layout.to_json()))
        shutil.rmtree(universal_dir(final), ignore_errors=True)  # made from the step replaced
        atomic_write(tmp / FILES, json.dumps(file_sizes(tmp), indent=0))
        if faults.active("enospc_in_commit", step, self.dist.rank):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / MARKER))
        atomic_write(tmp / MARKER, final.name)
        if final.exists():  # re-saving a step (e.g. after resume_from an older one)
            old = self.root / (final.name + ".replaced.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic_write(self.root / "latest", final.name)

    def _prune(self, keep: Path, protect: Optional[Path] = None) -> None:
        """Older checkpoints beyond keep_last leave the checkpoints at once (renamed to
        `<name>.pruned.tmp`, which no lookup takes for a checkpoint); their files are removed in
        the background (pretrain.checkpoint_writer.BackgroundRemover)."""
        found = committed(self.root)
        for old in found[:-self.keep_last]:
            if old not in (keep, protect):
                for d in (old, universal_dir(old)):  # the checkpoint first: then it is gone
                    if d.exists():
                        doomed = d.with_name(d.name + PRUNED)
                        if doomed.exists():  # left by an earlier prune of a re-saved step
                            shutil.rmtree(doomed, ignore_errors=True)
                        os.replace(d, doomed)
                        self._remover.remove(doomed)

    def close(self) -> None:
        """At the end of training: the pruned checkpoints' files are gone (not collective)."""
        self._remover.wait()

    def load(self, module, path: Path, load_optimizer: bool = True) -> ClientState:
        """Collective. Loads the step module's engine state (model, optimizer, LR schedule) and
        this rank's RNG state; returns the client state saved with it. `path` may be a universal
        form (pretrain.reshard), for a module built to load one. Every file is read weights-only."""
        path = Path(path)
        self.finish(protect=path)  # a rollback while a save is in flight: commit it first
        if not (path / MARKER).exists():
            raise CheckpointError(f"{path} has no {MARKER} marker: it is an incomplete save; "
                                  f"point trainer.resume_from at a committed checkpoint")
        raw = module.load(path, load_optimizer)
        self._load_rng(path)
        return ClientState.from_dict(raw, str(path))

    def _load_rng(self, path: Path) -> None:
        """This rank's saved RNG state when the checkpoint was saved at this layout; otherwise
        (another TP/DP layout, a universal form) every generator is reseeded deterministically."""
        rng_file = path / f"rng_rank{self.dist.rank:05d}.pt"
        saved = read_json(path / LAYOUT) if (path / LAYOUT).exists() else {}
        now = (self.dist.tp, self.dist.dp)
        same = (saved.get("tp", now[0]), saved.get("dp", now[1])) == now
        if rng_file.exists() and same:
            set_rng_state(safe_load(rng_file, classes=numpy_array_classes()))
            return
        step = int(re.match(r"step_(\d+)", path.name).group(1))
        self.dist.seed(reseed_value(self.seed, step))
        if self.dist.is_main:
            log.warning("%s holds no RNG state for TP=%d x DP=%d: reseeded every generator "
                        "from (trainer.seed=%d, step=%d); dropout masks differ from a run that "
                        "was never resharded", path, self.dist.tp, self.dist.dp, self.seed, step)
