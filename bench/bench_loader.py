"""Data loader throughput per rank process and first-batch latency after a resume, against a
plain webdataset loop over the same shards, in the same run.

    python -m bench.bench_loader [--shards 4] [--shard-mb 64] [--seq-len 2048] [--rounds 5]

A synthetic dataset in our exact shard format (tests/helpers/synthetic.py) of realistic shards
(64 MB tars of seq_len 2048 uint16 samples, pretrain-data's defaults) is written to a temporary
directory. A: our loader (`pretrain.data.loader.make_loader`, shuffled windows of 4 shards,
micro-batch 8) reads one epoch in this process (num_workers=0: the work one rank process does),
as rank 0 of DP=1 and of DP=8 (a rank reads only its own samples, by offset). B: the peer,
`wds.WebDataset(urls, shardshuffle=False)` decoding every sample to token ids and stacking
micro-batches of 8 the same way. Interleaved A B A B, warm-up round dropped, medians; the shards
are in the page cache after the warm-up, so this is the CPU cost of reading, not the disk's.

First batch after resume: a fresh loader started at a far position (90% through epoch 0 and the
same offset in epoch 3), time to its first micro-batch, with 0 and 1 workers; the peer, which has
no resume, skips samples up to the same position in epoch 0.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from bench.common import Timing, interleave, machine, paired_ratio, table

MB = 1 << 20
PEER = "peer: wds.WebDataset"
TAR_OVERHEAD = 1024  # bytes per member: a 512-byte header and padding to 512


def write_synthetic(root: Path, shards: int, shard_mb: float, seq_len: int, vocab: int = 50257,
                    seed: int = 0) -> Path:
    """`shards` tars of about `shard_mb` each, in pretrain-data's format; returns the directory."""
    from tests.helpers.synthetic import write_dataset

    per_sample = (seq_len + 1) * 2 + TAR_OVERHEAD
    per_shard = max(1, int(shard_mb * MB) // per_sample)
    rng = np.random.default_rng(seed)
    samples = rng.integers(1, vocab, size=(shards * per_shard, seq_len + 1), dtype=np.uint16)
    return write_dataset(root, samples, [per_shard] * shards, vocab)


def _spec(manifest, start: int, micro: int, dp: int, rank: int, window: int):
    from pretrain.data.loader import StreamSpec

    return StreamSpec(manifest=manifest, split="train", start=start, micro_batch_size=micro,
                      dp=dp, dp_rank=rank, seed=1234, window_shards=window, shuffle=True)


def ours_epoch(manifest, micro: int, dp: int, window: int, workers: int = 0):
    """Rank 0's micro-batches of one epoch (its share of every window); returns tokens read."""
    from pretrain.data.loader import make_loader

    samples = manifest.split("train").samples
    batches = samples // (micro * dp)

    def run() -> int:
        loader = make_loader(_spec(manifest, 0, micro, dp, 0, window), workers, limit=batches)
        n = 0
        for batch in loader:  # (micro, seq_len + 1) int64
            n += batch.shape[0] * (batch.shape[1] - 1)
        return n

    return run


def peer_epoch(urls: List[str], micro: int, dtype=np.uint16):
    """webdataset's own iteration, decoding every sample and stacking micro-batches."""
    import webdataset as wds

    def run() -> int:
        n, rows = 0, []
        for sample in wds.WebDataset(urls, shardshuffle=False):
            rows.append(np.frombuffer(sample["tokens"], dtype=dtype))
            if len(rows) == micro:
                batch = torch.from_numpy(np.stack(rows).astype(np.int64))  # (micro, seq_len + 1)
                n += batch.shape[0] * (batch.shape[1] - 1)
                rows = []
        return n

    return run


def first_batch_seconds(manifest, start: int, micro: int, window: int, workers: int) -> float:
    from pretrain.data.loader import make_loader

    t0 = time.perf_counter()
    loader = make_loader(_spec(manifest, start, micro, 1, 0, window), workers, limit=1)
    next(iter(loader))
    return time.perf_counter() - t0


def peer_skip_seconds(urls: List[str], start: int, micro: int) -> float:
    """The peer's resume: read and drop `start` samples, then stack one micro-batch."""
    import webdataset as wds

    t0 = time.perf_counter()
    rows = []
    for i, sample in enumerate(wds.WebDataset(urls, shardshuffle=False)):
        if i >= start:
            rows.append(np.frombuffer(sample["tokens"], dtype=np.uint16))
            if len(rows) == micro:
                break
    torch.from_numpy(np.stack(rows).astype(np.int64))
    return time.perf_counter() - t0


@dataclass
class LoaderResult:
    tokens_per_epoch: Dict[str, int]
    timings: Dict[str, Timing]
    resume: Dict[str, float]  # name -> median seconds to the first batch
    resume_peer: float
    dataset_mb: float
    seq_len: int

    def rate(self, name: str, cpu: bool = False) -> float:
        t = self.timings[name]
        return self.tokens_per_epoch[name] / (t.cpu_median if cpu else t.median)

    def ratio(self, name: str, cpu: bool = False):
        """Tokens/s of `name` over the peer's, round by round."""
        return paired_ratio(self.timings[name], self.timings[PEER], cpu,
                            self.tokens_per_epoch[name], self.tokens_per_epoch[PEER])

    def rows(self) -> List[List[object]]:
        return [[name, self.rate(name) / 1e6, f"{t.spread:.0%}", self.rate(name, cpu=True) / 1e6,
                 str(self.ratio(name)), f"{self.ratio(name, cpu=True).median:.2f}x"]
                for name, t in self.timings.items()]


def run(shards: int = 4, shard_mb: float = 64, seq_len: int = 2048, micro: int = 8,
        window: int = 4, rounds: int = 5, resume_reps: int = 3,
        workdir: Optional[str] = None) -> LoaderResult:
    from pretrain.data.manifest import Manifest

    tmp = tempfile.mkdtemp(prefix="bench_loader_", dir=workdir)
    try:
        root = write_synthetic(Path(tmp) / "ds", shards, shard_mb, seq_len)
        manifest = Manifest.load(root)
        urls = manifest.split("train").urls
        variants = {
            "ours, rank 0 of DP=1": ours_epoch(manifest, micro, 1, window),
            "ours, rank 0 of DP=8": ours_epoch(manifest, micro, 8, window),
            PEER: peer_epoch(urls, micro),
        }
        tokens = {name: fn() for name, fn in variants.items()}  # also warms the page cache
        timings = interleave(variants, rounds=rounds, warmup=1)
        samples = manifest.split("train").samples
        far = int(samples * 0.9)
        epoch3 = 3 * samples + far
        resume: Dict[str, List[float]] = {"ours, 90% into epoch 0, 0 workers": [],
                                          "ours, 90% into epoch 3, 0 workers": [],
                                          "ours, 90% into epoch 3, 1 worker": []}
        peer: List[float] = []
        for _ in range(resume_reps):
            resume["ours, 90% into epoch 0, 0 workers"].append(
                first_batch_seconds(manifest, far, micro, window, 0))
            resume["ours, 90% into epoch 3, 0 workers"].append(
                first_batch_seconds(manifest, epoch3, micro, window, 0))
            resume["ours, 90% into epoch 3, 1 worker"].append(
                first_batch_seconds(manifest, epoch3, micro, window, 1))
            peer.append(peer_skip_seconds(urls, far, micro))
        dataset_mb = sum(s.bytes for s in manifest.split("train").shards) / MB
        return LoaderResult(tokens, timings, {k: float(np.median(v)) for k, v in resume.items()},
                            float(np.median(peer)), dataset_mb, seq_len)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_result(res: LoaderResult, rounds: int) -> None:
    print(table(["variant", "M tokens/s", "spread", "M tokens/CPU-s", "vs peer (wall)",
                 "(CPU time)"],
                res.rows(),
                title=f"loader, one epoch of {res.dataset_mb:.0f} MB of shards, seq_len "
                      f"{res.seq_len}, one process; median of {rounds} interleaved rounds; "
                      f"{machine()}"))
    rows = [[name, s, res.resume_peer / s] for name, s in res.resume.items()]
    rows.append(["peer: skip samples to 90% of epoch 0", res.resume_peer, 1.0])
    print(table(["first batch after resume", "seconds", "peer / ours"], rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shard-mb", type=float, default=64.0)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--window", type=int, default=4, help="data.shuffle_window_shards")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workdir", default=None, help="where the temporary dataset goes")
    args = p.parse_args(argv)
    res = run(args.shards, args.shard_mb, args.seq_len, args.micro, args.window, args.rounds,
              workdir=args.workdir)
    print_result(res, args.rounds)


if __name__ == "__main__":
    main()
