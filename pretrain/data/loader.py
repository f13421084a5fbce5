"""Stream micro-batches from WebDataset shards in the order of `order.py`, resumable exactly.

The position is one number, `consumed`: global samples consumed by all ranks. Every rank and
DataLoader worker derives from it (and the seed, epoch and manifest) which samples are its own,
so resuming at `consumed`, on the same or a different data-parallel size, continues at exactly
the next sample.

Each worker reads the shards of one window at a time and keeps only the samples it owns (memory ~
window / (dp x workers)): a local shard in pretrain-data's layout by offset, only those samples
(shardread.py), other tar layouts streamed whole through webdataset's tar reader, and shards
behind a URL or a `pipe:` command through remote.py (HTTP Range reads of the samples owned, or a
node-local cache that fetches each shard once per node), with the next window prefetched. A
shard that cannot be read is skipped with a warning and counted; its samples are replaced by
other samples of the same window (deterministically), and more than `max_bad_shards` such
shards is a DataError.

DataLoader workers ignore the stop signals (SIGINT, SIGTERM, SIGUSR1, SIGUSR2). Slurm signals every
process of a job step on preemption, requeue, scancel or a node drain; a worker that died of it
would make PyTorch raise in the trainer inside whatever collective it is in, before any rank
could save. The trainer decides the stop (pretrain.callbacks.preemption) and ends its workers
with `Batches.close()`; one that does not leave in time is killed.
"""

from __future__ import annotations

import atexit
import logging
import signal
import weakref
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.manifest import Manifest, is_remote
from pretrain.data.order import BlendSchedule, SampleOrder, Window, micro_batch_indices, owner
from pretrain.data.remote import Job, RemoteShards, RemoteSpec, check_cache_budget
from pretrain.data.shardread import BadShard, read_by_offset, read_shard  # noqa: F401 (API)
from pretrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class StreamSpec:
    """What one rank's stream is: a split of a dataset, from a position, for a layout."""

    manifest: Manifest
    split: str
    start: int  # global samples consumed before this stream starts
    micro_batch_size: int
    dp: int
    dp_rank: int
    seed: int
    window_shards: int = 4
    shuffle: bool = True
    max_bad_shards: int = 0
    # More datasets sampled beside `manifest` (which has `weight`): ((manifest, weight), ...).
    blend: Sequence[Tuple[Manifest, float]] = ()
    weight: float = 1.0
    # How shards behind URLs are read (remote.py); None: RemoteSpec's defaults.
    remote: Optional[RemoteSpec] = None

    @property
    def sources(self) -> List[Tuple[Manifest, float]]:
        return [(self.manifest, self.weight)] + list(self.blend)


class ShardStream(IterableDataset):
    """Yields this rank's micro-batches as int64 tensors of shape (micro, seq_len + 1), forever
    (epochs follow each other), or `limit` micro-batches when given."""

    def __init__(self, spec: StreamSpec, limit: Optional[int] = None):
        self.spec = spec
        self.limit = limit
        sources = spec.sources
        self.manifests = [m for m, _ in sources]
        self.shards = [m.split(spec.split).shards for m in self.manifests]
        # Dataset d's own sample order; the blend schedule interleaves the datasets.
        self.orders = [SampleOrder([s.samples for s in shards], spec.seed + 1_000_003 * d,
                                   spec.window_shards, spec.shuffle)
                       for d, shards in enumerate(self.shards)]
        self.blend = BlendSchedule([w for _, w in sources], spec.seed)
        self.bad_shards: List[str] = []
        self.remote_spec = spec.remote or RemoteSpec()
        self.has_remote = any(is_remote(s.url) for shards in self.shards for s in shards)
        if self.has_remote:
            check_cache_budget(self.remote_spec, [(sh, spec.window_shards) for sh in self.shards])
        # No global position at or past this is read (prefetch stops there); None: no end.
        self.end = None if limit is None else spec.start + limit * spec.dp * spec.micro_batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker = get_worker_info()
        wid, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        s = self.spec
        remote = RemoteShards(self.remote_spec, self.manifests) if self.has_remote else None
        caches = [_WindowCache(self, d, wid, workers, remote) for d in range(len(self.orders))]
        k = wid
        try:
            while self.limit is None or k < self.limit:
                idx = micro_batch_indices(s.start, k, s.dp, s.dp_rank, s.micro_batch_size)
                rows = [caches[d].get(local) for d, local in map(self.blend.locate, idx.tolist())]
                yield torch.from_numpy(np.stack(rows).astype(np.int64))  # (micro, seq_len + 1)
                k += workers
        finally:
            if remote is not None:
                remote.close()


class _WindowCache:
    """The samples of dataset d that one worker owns in the current window of d's order, read
    when the window is entered; keyed by d's own sample index. Remote shards of the next
    windows are prefetched (RemoteShards)."""

    def __init__(self, stream: ShardStream, d: int, wid: int, workers: int,
                 remote: Optional[RemoteShards]):
        self.stream, self.d, self.wid, self.workers = stream, d, wid, workers
        self.remote = remote
        self.order = stream.orders[d]
        self.shards = stream.shards[d]
        self.window: Optional[Window] = None
        self.rows: Dict[int, np.ndarray] = {}

    def get(self, g: int) -> np.ndarray:
        w = self.window
        if w is None or not (w.start <= g < w.start + w.size):
            self._load(self.order.window_of(g))
        return self.rows[g]

    def _wanted(self, window: Window) -> Dict[int, Dict[int, int]]:
        """shard -> {sample index in the shard: position} of the samples this worker owns."""
        st, s = self.stream, self.stream.spec
        local = window.start + np.arange(window.size, dtype=np.int64)
        g = st.blend.global_of(self.d, local)
        rank, worker = owner(g, s.start, s.dp, s.micro_batch_size, self.workers)
        mine = (g >= s.start) & (rank == s.dp_rank) & (worker == self.wid)
        t = np.nonzero(mine)[0]
        shard_of, index_of = window.locate(t, self.order.counts)
        wanted: Dict[int, Dict[int, int]] = {}
        for pos, sh, ix in zip(local[t].tolist(), shard_of.tolist(), index_of.tolist()):
            wanted.setdefault(sh, {})[ix] = pos
        return wanted

    def _remote_jobs(self, wanted: Dict[int, Dict[int, int]]) -> Dict[int, Job]:
        return {sh: (self.shards[sh], want) for sh, want in wanted.items()
                if is_remote(self.shards[sh].url)}

    def _load(self, window: Window) -> None:
        wanted = self._wanted(window)
        jobs = self._remote_jobs(wanted)
        got = self.remote.read((self.d, window.epoch, window.index), self.d, jobs) if jobs else {}
        self._prefetch(window)
        manifest = self.stream.manifests[self.d]
        self.rows = {}
        missing: List[int] = []
        for sh in window.shards:
            if sh not in wanted:
                continue
            if sh not in got:
                try:
                    got[sh] = read_shard(self.shards[sh], wanted[sh], manifest)
                except BadShard as e:
                    got[sh] = e
            rows = got[sh]
            if isinstance(rows, BadShard):
                self._bad(rows.url, rows.reason)
                rows = rows.rows
            self.rows.update(rows)
            missing += [pos for pos in wanted[sh].values() if pos not in rows]
        if missing:
            self._fill_missing(window, missing)
        self.window = window

    def _prefetch(self, window: Window) -> None:
        """Start fetching this worker's samples of the next windows (not past the stream's end)."""
        if self.remote is None:
            return
        w, end = window, self.stream.end
        for _ in range(self.stream.remote_spec.prefetch_windows):
            w = self.order.window_of(w.start + w.size)
            first = int(self.stream.blend.global_of(self.d, np.array([w.start]))[0])
            if end is not None and first >= end:
                return
            jobs = self._remote_jobs(self._wanted(w))
            if jobs:
                self.remote.prefetch((self.d, w.epoch, w.index), self.d, jobs)

    def _bad(self, url: str, reason: str) -> None:
        st = self.stream
        if url not in st.bad_shards:
            st.bad_shards.append(url)
            log.warning("skipping unreadable shard %s (%s); %d bad so far", url, reason, len(st.bad_shards))
        if len(st.bad_shards) > st.spec.max_bad_shards:
            raise DataError(
                f"{len(st.bad_shards)} unreadable shards (last: {url}: {reason}); data.max_bad_shards="
                f"{st.spec.max_bad_shards}. Re-create the shards or raise data.max_bad_shards")

    def _fill_missing(self, window: Window, missing: List[int]) -> None:
        """Replace samples of a bad shard with this worker's surviving samples, in order."""
        have = sorted(self.rows)
        if not have:
            raise DataError(f"every shard of window {window.index} (epoch {window.epoch}) is unreadable")
        for i, pos in enumerate(sorted(missing)):
            self.rows[pos] = self.rows[have[i % len(have)]]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_WORKER_EXIT_S = 10.0  # how long close() waits for a worker to finish its fetch before SIGKILL


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: the trainer, not a data worker, reacts to a stop signal (module doc).
    Between the fork and this call a worker runs the trainer's inherited Python handlers, which
    only set a flag in the worker's own memory."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Batches:
    """An iterator over a loader's micro-batches that its owner ends with close(). Workers that
    ignore SIGTERM outlive `Process.terminate()`, which is how PyTorch ends them otherwise, and
    PyTorch does nothing at interpreter exit: so close() is called by the trainer, and by an
    atexit hook for any iterator still open."""

    _open: "weakref.WeakSet[Batches]" = weakref.WeakSet()

    def __init__(self, it: Iterator[torch.Tensor]):
        self._it: Optional[Iterator[torch.Tensor]] = it
        Batches._open.add(self)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            raise StopIteration
        return next(self._it)

    def close(self) -> None:
        """End the workers: PyTorch's own shutdown (done event, then a None to each worker, which
        leaves once its current fetch is done), then SIGKILL for any still there."""
        it, self._it = self._it, None
        Batches._open.discard(self)
        workers = list(getattr(it, "_workers", ()))
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # waits up to 5 s per busy worker, then its SIGTERM is ignored
        for w in workers:
            w.join(timeout=_WORKER_EXIT_S)
            if w.is_alive():
                log.warning("data worker %d did not exit in %.0fs: killing it", w.pid, _WORKER_EXIT_S)
                w.kill()
                w.join(timeout=_WORKER_EXIT_S)


@atexit.register
def _close_open_batches() -> None:
    # Registered after torch's own exit hook, so this runs first, while PyTorch can still shut
    # its workers down (its hook turns _shutdown_workers into a no-op).
    for batches in list(Batches._open):
        batches.close()


class ShardLoader(DataLoader):
    """A DataLoader whose iterators are `Batches` and whose workers ignore the stop signals."""

    def __iter__(self) -> Batches:
        return Batches(super().__iter__())


def make_loader(spec: StreamSpec, num_workers: int, pin_memory: bool = False,
                prefetch_factor: int = 4, limit: Optional[int] = None) -> ShardLoader:
    stream = ShardStream(spec, limit=limit)
    kwargs = dict(prefetch_factor=prefetch_factor, persistent_workers=False,
                  worker_init_fn=_ignore_stop_signals) if num_workers else {}
    # A private generator: creating the iterator draws a seed from it, and drawing from the global
    # one would shift the training RNG (dropout) depending on when the loader was made.
    generator = torch.Generator().manual_seed(spec.seed)
    return ShardLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                       generator=generator, **kwargs)
