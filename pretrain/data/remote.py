"""Shards behind a URL: fetched once per node into a shared cache, or only the bytes a reader owns.

Two modes (data.remote_mode), both exact: a reader gets the same token ids as from local files.
- `range` (the default): each reader (a rank's DataLoader worker) fetches with HTTP Range requests
  only the tar members of the samples it owns, many ranges per request, and checks each member's
  header; together the readers of the whole cluster read each shard about once per epoch,
  whatever the number of nodes. It needs a server that serves multipart ranges (nginx, Apache,
  most file servers); a shard whose server ignores ranges (S3 and GCS serve one range per
  request), a `pipe:` command or a tar in another layout falls back to `cache`.
- `cache`: the readers of a node share a node-local cache of whole shards (cache.py): each shard
  is downloaded once per node, checked against the manifest's size and sha256, and read by
  offset like a local file.
The validation split always goes through the cache: it is read again at every evaluation.

Prefetch: while a reader consumes window w, threads fetch the samples it owns in the next
data.prefetch_windows windows (in cache mode: the shards, pinned so that nothing evicts them), so
the network's latency is hidden behind training.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from pretrain.data.cache import NodeCache
from pretrain.data.fetch import (FetchPolicy, RangesIgnored, download, fetch_ranges, is_http)
from pretrain.data.manifest import TAR_BLOCK, Manifest, ShardInfo, decode_sample, member_bytes
from pretrain.data.shardread import BadShard, Rows, in_layout, member_payload, read_shard
from pretrain.errors import DataError

log = logging.getLogger(__name__)
MODES = ("range", "cache")
GB = 1e9


def default_cache_dir() -> str:
    """Node-local: the temporary directory (Slurm often gives each job its own), per user."""
    return os.path.join(tempfile.gettempdir(), f"pretrain-shards-{os.getuid()}")


@dataclass(frozen=True)
class RemoteSpec:
    """How one stream reads remote shards (from DataConfig: remote_spec)."""

    mode: str = "range"
    cache_dir: str = field(default_factory=default_cache_dir)
    cache_limit_bytes: int = int(20 * GB)
    prefetch_windows: int = 1
    threads: int = 4  # concurrent requests per reader
    policy: FetchPolicy = FetchPolicy()


def remote_spec(data, split: str) -> RemoteSpec:
    """A stream's RemoteSpec from DataConfig; validation always reads through the cache."""
    return RemoteSpec(mode="cache" if split != "train" else data.remote_mode,
                      cache_dir=data.cache_dir or default_cache_dir(),
                      cache_limit_bytes=int(data.cache_limit_gb * GB),
                      prefetch_windows=data.prefetch_windows if split == "train" else 0,
                      threads=data.fetch_threads,
                      policy=FetchPolicy(data.fetch_retries, data.fetch_backoff_s,
                                         data.fetch_timeout_s))


def check_cache_budget(spec: RemoteSpec, windows: Sequence[Tuple[List[ShardInfo], int]]) -> None:
    """Fail early when the cache cannot hold what a node's readers pin at once: the window being
    read and the prefetched ones, for each dataset (shards, window size). Range mode uses the
    cache only for shards that cannot be read by ranges, so only cache mode is checked."""
    needed = 0
    for shards, window in windows:
        remote = sorted((s.bytes for s in shards if _cached(spec, s)), reverse=True)
        needed += (1 + spec.prefetch_windows) * sum(remote[:window])
    if needed > spec.cache_limit_bytes:
        raise DataError(
            f"data.cache_limit_gb={spec.cache_limit_bytes / GB:.3g} cannot hold the shards a node "
            f"reads at once ({needed / GB:.3g} GB: {1 + spec.prefetch_windows} windows of the "
            "largest shards); raise data.cache_limit_gb, or lower data.shuffle_window_shards or "
            "data.prefetch_windows")


def _cached(spec: RemoteSpec, info: ShardInfo) -> bool:
    return spec.mode == "cache" or not is_http(info.url)


Job = Tuple[ShardInfo, Dict[int, int]]  # a shard and the samples wanted from it


class RemoteShards:
    """One reader's remote shards: window reads and prefetch, on a small thread pool.

    `read(key, jobs)` returns each shard's rows, or the BadShard that made it unreadable;
    `prefetch(key, jobs)` starts the same work ahead. Created inside the reader's process (a
    DataLoader worker), closed when its stream ends.
    """

    def __init__(self, spec: RemoteSpec, manifests: Sequence[Manifest]):
        self.spec = spec
        self.manifests = manifests
        self.pool = ThreadPoolExecutor(spec.threads, thread_name_prefix="shard-fetch")
        self.stop = threading.Event()
        self.pending: Dict[object, Dict[int, Future]] = {}
        self.no_ranges: Dict[str, str] = {}  # server -> why ranges are not used there
        self._cache: Optional[NodeCache] = None

    @property
    def cache(self) -> NodeCache:
        if self._cache is None:
            self._cache = NodeCache(self.spec.cache_dir, self.spec.cache_limit_bytes)
        return self._cache

    def prefetch(self, key: object, d: int, jobs: Dict[int, Job]) -> None:
        if key not in self.pending:
            self.pending[key] = self._submit(key, d, jobs)

    def read(self, key: object, d: int, jobs: Dict[int, Job]) -> Dict[int, object]:
        """shard -> rows or BadShard, for the shards of `jobs` (prefetched or fetched now)."""
        futures = self.pending.pop(key, None) or self._submit(key, d, jobs)
        out: Dict[int, object] = {}
        try:
            for sh, fut in futures.items():
                try:
                    out[sh] = fut.result()
                except BadShard as e:
                    out[sh] = e
        finally:
            if self._cache is not None:
                self._cache.unpin(key)
        return out

    def close(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._cache is not None:
            self._cache.close()

    def _submit(self, key: object, d: int, jobs: Dict[int, Job]) -> Dict[int, Future]:
        cached = [info.sha256 for info, _ in jobs.values() if self._use_cache(info)]
        if cached:
            self.cache.pin(key, cached)
        return {sh: self.pool.submit(self._read, d, info, want) for sh, (info, want) in jobs.items()}

    def _use_cache(self, info: ShardInfo) -> bool:
        return _cached(self.spec, info) or _server(info.url) in self.no_ranges

    def _read(self, d: int, info: ShardInfo, want: Dict[int, int]) -> Rows:
        manifest = self.manifests[d]
        if not self._use_cache(info) and in_layout(info, manifest):
            try:
                got = self._read_ranges(info, want, manifest)
                if got is not None:
                    return got
                why = "a member header differs from pretrain-data's layout"
            except RangesIgnored as e:
                why = e.reason
                self._no_ranges(info.url, why)
            log.info("%s: %s; reading it whole through the node cache", info.url, why)
            self.cache.pin(("fallback", info.sha256), [info.sha256])
        try:
            path = self.cache.get(info.sha256, info.bytes, info.url, lambda part: download(
                info.url, part, info.bytes, info.sha256, self.spec.policy, self.stop))
            return read_shard(dataclasses.replace(info, url=path), want, manifest)
        except BadShard as e:  # name the URL, not the cached file
            raise BadShard(info.url, e.reason, e.rows) from e
        finally:
            if self._cache is not None:
                self._cache.unpin(("fallback", info.sha256))

    def _read_ranges(self, info: ShardInfo, want: Dict[int, int], manifest: Manifest
                     ) -> Optional[Rows]:
        """The members of the samples wanted, by HTTP Range requests: each member's header and
        payload (not its padding), header checked. None when a header is not pretrain-data's."""
        payload = manifest.sample_tokens * manifest.dtype.itemsize
        stride = member_bytes(payload)
        idx = sorted(want)
        spans = [(i * stride, i * stride + TAR_BLOCK + payload) for i in idx]
        bufs = fetch_ranges(info.url, spans, info.bytes, self.spec.policy, self.stop)
        out: Rows = {}
        for i, buf in zip(idx, bufs):
            view = member_payload(buf, manifest)
            if view is None:
                return None
            try:
                out[want[i]] = decode_sample(view, manifest)
            except DataError as e:
                raise DataError(f"shard {info.url}, sample {i}: {e}") from e
        return out

    def _no_ranges(self, url: str, why: str) -> None:
        server = _server(url)
        if server not in self.no_ranges:
            self.no_ranges[server] = why
            log.warning("%s: %s; this reader reads that server's shards whole through the node "
                        "cache (data.remote_mode=cache does so from the start)", server, why)


def _server(url: str) -> str:
    return url.split("/", 3)[2] if "://" in url else url
