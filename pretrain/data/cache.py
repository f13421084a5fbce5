"""A node-local cache of whole shards, shared by the processes of a node that read remote data.

Every rank and DataLoader worker of a node opens the same data.cache_dir (on node-local disk or
/dev/shm: one copy per node is the point). Coordination is by files and `flock`, with no process
group and no elected process:

  shards/<sha256>.tar           a complete shard, checked against the manifest (size, sha256)
  shards/<sha256>.lock          held by the one process downloading that shard; the others wait
                                on it and then find the complete file
  shards/<sha256>.<bytes>.part  a download in progress; its size is reserved in the budget
  shards/<sha256>.failed        why the last download failed after its retries, so that the
                                node's other readers of the same run skip the shard at once
  pins/<reader>.json            the shards a live reader needs now (the window it reads and the
                                ones it prefetches), flock-held by that reader: a dead reader's
                                pins free themselves
  .lock                         held while one process does the budget's bookkeeping

Content-addressed by sha256: datasets, runs or URLs holding the same shard share one copy. A file
appears under its final name only complete and verified (renamed there), so no reader ever sees a
partial shard; a crash leaves at most a .part, which the next downloader of that shard removes.

The budget: complete shards plus reserved downloads never exceed data.cache_limit_gb. Space is
made by evicting shards that no live reader pins, least recently used first, so the shards the
node's readers have all finished with go first and a shard still needed is never removed. A
download that cannot get space waits for readers to move on, and fails with a DataError naming
the setting when the cache stays full.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Set, Tuple

from pretrain.data.fetch import FetchError
from pretrain.errors import DataError

log = logging.getLogger(__name__)
SPACE_WAIT_S = 600.0  # how long a download waits for space before the run fails
_POLL_S = 0.2
_ids = itertools.count()


@contextmanager
def _flocked(path: str, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


def _free(path: str) -> bool:
    """Whether nobody holds the flock on `path` (a process that held it has died)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class NodeCache:
    """One reader's handle on the node's cache (module doc). Thread-safe: a reader's prefetch
    threads share it."""

    def __init__(self, root: str, limit_bytes: int, space_wait_s: float = SPACE_WAIT_S):
        self.root = os.path.abspath(root)
        self.dir = os.path.join(self.root, "shards")
        self.pins_dir = os.path.join(self.root, "pins")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.pins_dir, exist_ok=True)
        self.limit = int(limit_bytes)
        self.space_wait_s = space_wait_s
        self.started = time.time()
        self.name = f"{os.getpid()}-{next(_ids)}"
        self._pins: Dict[object, Set[str]] = {}
        self._pin_fd = -1
        self._mutex = threading.Lock()  # the pins of this reader's threads

    def path(self, sha256: str) -> str:
        return os.path.join(self.dir, f"{sha256}.tar")

    # ---- pins ------------------------------------------------------------------------------
    def pin(self, key: object, shas: Iterable[str]) -> None:
        """Mark the shards under `key` (e.g. a window) as needed by this reader until unpin(key).
        Under the budget lock, so that an eviction sees either the pin or the file gone."""
        with self._mutex:
            self._pins[key] = set(shas)
            self._write_pins()

    def unpin(self, key: object) -> None:
        with self._mutex:
            if self._pins.pop(key, None) is not None:
                self._write_pins()

    def _write_pins(self) -> None:
        final = os.path.join(self.pins_dir, f"{self.name}.json")
        tmp = os.path.join(self.pins_dir, f".{self.name}.tmp")
        with self._budget():
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)  # held while this reader lives; the lock moves with rename
            os.write(fd, json.dumps(sorted(set().union(*self._pins.values()))).encode())
            os.replace(tmp, final)
            if self._pin_fd >= 0:
                os.close(self._pin_fd)
            self._pin_fd = fd

    def close(self) -> None:
        """Drop this reader's pins (a reader that dies without it is detected by its lock)."""
        with self._mutex:
            self._pins.clear()
        if self._pin_fd >= 0:
            try:
                os.unlink(os.path.join(self.pins_dir, f"{self.name}.json"))
            except OSError:
                pass
            os.close(self._pin_fd)
            self._pin_fd = -1

    def _live_pins(self) -> Set[str]:
        pinned: Set[str] = set()
        for name in os.listdir(self.pins_dir):
            path = os.path.join(self.pins_dir, name)
            if name.startswith("."):
                continue
            if _free(path):  # its reader is gone
                try:
                    os.unlink(path)
                except OSError:
                    pass
                continue
            try:
                with open(path) as f:
                    pinned.update(json.load(f))
            except (OSError, ValueError):
                pass
        return pinned

    # ---- shards ----------------------------------------------------------------------------
    def get(self, sha256: str, size: int, url: str, fetch: Callable[[str], None]) -> str:
        """The path of the complete shard: already here, or fetched by `fetch(part_path)` (which
        writes and verifies it) in this process while the node's other readers of it wait. The
        caller has pinned it. A failed fetch raises FetchError, also to the node's readers that
        were waiting for it."""
        final = self.path(sha256)
        if self._touch(final):
            return final
        with _flocked(os.path.join(self.dir, f"{sha256}.lock")):
            if self._touch(final):
                return final
            self._raise_if_failed(sha256, url)
            part = os.path.join(self.dir, f"{sha256}.{size}.part")
            self._reserve(sha256, size, part)
            try:
                fetch(part)
            except FetchError as e:
                self._unlink(part)
                with open(os.path.join(self.dir, f"{sha256}.failed"), "w") as f:
                    f.write(e.reason)
                raise
            except BaseException:
                self._unlink(part)
                raise
            os.replace(part, final)
            self._unlink(os.path.join(self.dir, f"{sha256}.failed"))
            return final

    def _touch(self, path: str) -> bool:
        try:
            os.utime(path)  # least recently used is evicted first
            return True
        except FileNotFoundError:
            return False

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _raise_if_failed(self, sha256: str, url: str) -> None:
        marker = os.path.join(self.dir, f"{sha256}.failed")
        try:
            if os.path.getmtime(marker) >= self.started:
                with open(marker) as f:
                    raise FetchError(url, f"{f.read()} (another reader on this node)", permanent=True)
        except OSError:
            pass  # none, or from an earlier run: try again

    # ---- the budget ------------------------------------------------------------------------
    @contextmanager
    def _budget(self) -> Iterator[None]:
        with _flocked(os.path.join(self.root, ".lock")):
            yield

    def _scan(self) -> Tuple[int, List[Tuple[float, int, str]]]:
        """(bytes held: complete shards and live reservations, complete shards as (mtime, size,
        sha256)); reservations of dead downloaders are removed."""
        used, complete = 0, []
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if name.endswith(".tar"):
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                used += st.st_size
                complete.append((st.st_mtime, st.st_size, name[:-4]))
            elif name.endswith(".part"):
                sha, reserved = name.split(".")[:2]
                if _free(os.path.join(self.dir, f"{sha}.lock")):
                    self._unlink(path)  # its downloader died
                else:
                    used += int(reserved)
        return used, complete

    def _reserve(self, sha256: str, size: int, part: str) -> None:
        """Create the reservation `part` once `size` more bytes fit in the budget, evicting
        unpinned shards (least recently used first); wait while everything is pinned."""
        if size > self.limit:
            raise DataError(f"a {size / 1e9:.3g} GB shard does not fit in data.cache_limit_gb="
                            f"{self.limit / 1e9:.3g} ({self.root}); raise the limit")
        deadline = time.monotonic() + self.space_wait_s
        while True:
            with self._budget():
                used, complete = self._scan()
                if used + size > self.limit:
                    pinned = self._live_pins()
                    for _, nbytes, sha in sorted(complete):
                        if sha in pinned or sha == sha256:
                            continue
                        self._unlink(self.path(sha))
                        used -= nbytes
                        log.debug("evicted %s (%d bytes) from %s", sha[:12], nbytes, self.root)
                        if used + size <= self.limit:
                            break
                if used + size <= self.limit:
                    open(part, "wb").close()
                    return
            if time.monotonic() > deadline:
                raise DataError(
                    f"the shard cache {self.root} stayed full for {self.space_wait_s:.0f} s: "
                    f"{used / 1e9:.3g} GB of data.cache_limit_gb={self.limit / 1e9:.3g} is held by "
                    "shards that this node's readers still need; raise data.cache_limit_gb, or "
                    "lower data.shuffle_window_shards or data.prefetch_windows")
            time.sleep(_POLL_S)
