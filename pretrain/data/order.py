"""The sample order: a pure function of (seed, epoch, shard sample counts).

Within an epoch the shards are permuted, grouped into windows of `window` consecutive shards,
and the samples of each window are permuted. The global sample index g (samples consumed since
the start of training, over all ranks) therefore names one sample of one shard, whatever the
number of ranks or workers, which is what makes resume exact and layout-independent.

Ownership: from a start position P, chunks of `micro` consecutive global samples go round-robin
to the data-parallel ranks; a rank's k-th micro-batch is [P + (k*dp + r)*micro, ... + micro),
and DataLoader worker k % workers produces it (PyTorch returns worker outputs in turn, so the
rank sees its micro-batches in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(list(keys)))


@dataclass(frozen=True)
class Window:
    epoch: int
    index: int  # window number within the epoch
    start: int  # global index of the window's first position
    shards: Tuple[int, ...]  # shard indices, in read order
    perm: np.ndarray  # position t in the window -> sample number within the window's shards

    @property
    def size(self) -> int:
        return len(self.perm)

    def locate(self, t: np.ndarray, counts: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """Positions in the window -> (shard index, sample index within that shard)."""
        sizes = np.array([counts[s] for s in self.shards], dtype=np.int64)
        bounds = np.cumsum(sizes)  # end of each shard's samples within the window
        local = self.perm[t]
        which = np.searchsorted(bounds, local, side="right")
        first = bounds[which] - sizes[which]
        return np.array(self.shards, dtype=np.int64)[which], local - first


class SampleOrder:
    def __init__(self, counts: Sequence[int], seed: int, window: int = 4, shuffle: bool = True):
        if not counts or sum(counts) == 0:
            raise ValueError("a split with no samples has no order")
        self.counts = [int(c) for c in counts]
        self.seed = int(seed)
        self.window = max(1, int(window))
        self.shuffle = shuffle
        self.epoch_size = sum(self.counts)
        self._epoch_cache: dict = {}

    def _epoch_windows(self, epoch: int) -> List[Tuple[Tuple[int, ...], int]]:
        """(shards, first position) of each window in the epoch, cached for the current epoch."""
        if epoch not in self._epoch_cache:
            n = len(self.counts)
            order = _rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
            windows, pos = [], 0
            for i in range(0, n, self.window):
                shards = tuple(int(s) for s in order[i:i + self.window])
                windows.append((shards, pos))
                pos += sum(self.counts[s] for s in shards)
            self._epoch_cache = {epoch: windows}
        return self._epoch_cache[epoch]

    def window_of(self, g: int) -> Window:
        """The window holding global position g."""
        epoch, offset = divmod(int(g), self.epoch_size)
        windows = self._epoch_windows(epoch)
        starts = [start for _, start in windows]
        j = int(np.searchsorted(starts, offset, side="right") - 1)
        shards, start = windows[j]
        size = sum(self.counts[s] for s in shards)
        perm = _rng(self.seed, epoch, j).permutation(size) if self.shuffle else np.arange(size)
        return Window(epoch, j, epoch * self.epoch_size + start, shards, perm)


def micro_batch_indices(start: int, k: int, dp: int, rank: int, micro: int) -> np.ndarray:
    """Global sample indices of rank `rank`'s k-th micro-batch counted from position `start`."""
    first = start + (k * dp + rank) * micro
    return np.arange(first, first + micro, dtype=np.int64)


def owner(g: np.ndarray, start: int, dp: int, micro: int, workers: int) -> Tuple[np.ndarray, np.ndarray]:
    """(rank, worker) that reads each global index g >= start."""
    chunk = (g - start) // micro
    return chunk % dp, (chunk // dp) % workers


class BlendSchedule:
    """Which dataset each global sample comes from, for weighted blends: a pure function of g.

    Global positions are cut into blocks of `block`; each block holds a fixed count of samples of
    each dataset (largest-remainder rounding of weight x block) in a seeded random order. So
    dataset d's k-th sample and its global position are computable both ways, which is what the
    loader needs for exact resume and for rank/worker ownership.
    """

    def __init__(self, weights: Sequence[float], seed: int, block: int = 1000):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or np.any(w <= 0):
            raise ValueError("blend weights must be positive")
        w = w / w.sum()
        exact = w * block
        counts = np.floor(exact).astype(np.int64)
        counts[np.argsort(-(exact - counts), kind="stable")[: block - counts.sum()]] += 1
        if np.any(counts == 0):
            raise ValueError(f"a blend weight is below 1/{block}: raise it or drop the dataset")
        self.counts = counts
        self.block = block
        self.seed = seed
        self._cache: dict = {}

    @property
    def single(self) -> bool:
        return len(self.counts) == 1

    def _assignment(self, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """(dataset of each position in block b, rank of that position among its dataset's)."""
        if b not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            a = _rng(self.seed, 7919, b).permutation(np.repeat(np.arange(len(self.counts)), self.counts))
            rank = np.empty(self.block, dtype=np.int64)
            for d in range(len(self.counts)):
                where = np.nonzero(a == d)[0]
                rank[where] = np.arange(len(where))
            self._cache[b] = (a, rank)
        return self._cache[b]

    def locate(self, g: int) -> Tuple[int, int]:
        """Global position -> (dataset, index in that dataset's own sample stream)."""
        if self.single:
            return 0, int(g)
        b, p = divmod(int(g), self.block)
        a, rank = self._assignment(b)
        d = int(a[p])
        return d, b * int(self.counts[d]) + int(rank[p])

    def global_of(self, d: int, local: np.ndarray) -> np.ndarray:
        """Dataset d's stream indices -> their global positions."""
        if self.single:
            return local
        c = int(self.counts[d])
        b, j = np.divmod(local, c)
        out = np.empty_like(local)
        for blk in np.unique(b):
            a, _ = self._assignment(int(blk))
            where = b == blk
            out[where] = blk * self.block + np.nonzero(a == d)[0][j[where]]
        return out
