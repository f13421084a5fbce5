"""Shards over HTTP: bytes fetched per epoch and loader tokens/s per rank, ours (range and cache
modes) against plain `wds.WebDataset` on the same URLs, where every rank streams every shard.

    python -m bench.bench_remote_data [--shards 16] [--shard-mb 16] [--latency-ms 20] [--rounds 3]

The server is a real nginx (tests/helpers/httpd.py; .ci/nginx_install.sh installs it) serving a
synthetic dataset in pretrain-data's format (bench_loader.write_synthetic: seq_len 2048, uint16).

Bytes: one epoch read by N simulated nodes of 2 ranks each (every node with its own cache
directory and URL query, so that nginx's access log tells the nodes apart), read without added
latency; what nginx sent (headers included) over the dataset's bytes, per node and in total. The
peer's figure is one rank's whole-epoch stream, measured, times the number of ranks.

Throughput: DP = 1, 2, 4 ranks as concurrent processes (each with --workers DataLoader workers,
default 1 as data.num_workers, on both sides) read one epoch (their share) through a proxy in its
own process that delays every request by --latency-ms (a distant store); tokens per rank over the
wall time of the
slowest rank. Cache mode starts from an empty cache each round (the first epoch, the expensive
one). Interleaved rounds (ours range, ours cache, peer), warm-up dropped, medians. On a 2-core
machine DP=4 is CPU-bound: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from bench.common import Timing, machine, paired_ratio, table

PEER = "peer: wds.WebDataset"
RANGE, CACHE = "ours, range", "ours, cache"
VARIANTS = (RANGE, CACHE, PEER)
MICRO, WINDOW = 8, 4


def _spec(manifest, dp: int, rank: int, mode: str, cache: str, micro: int = MICRO):
    from pretrain.data.loader import StreamSpec
    from pretrain.data.remote import RemoteSpec

    remote = RemoteSpec(mode=mode, cache_dir=cache, cache_limit_bytes=1 << 40)
    return StreamSpec(manifest=manifest, split="train", start=0, micro_batch_size=micro, dp=dp,
                      dp_rank=rank, seed=1234, window_shards=WINDOW, shuffle=True, remote=remote)


def ours_epoch(manifest, dp: int, rank: int, mode: str, cache: str, workers: int = 1) -> int:
    """One epoch of rank `rank`'s micro-batches; returns the tokens it yielded."""
    from pretrain.data.loader import make_loader

    steps = manifest.split("train").samples // (MICRO * dp)
    n = 0
    for batch in make_loader(_spec(manifest, dp, rank, mode, cache), workers, limit=steps):
        n += batch.shape[0] * (batch.shape[1] - 1)  # (micro, seq_len + 1)
    return n


class _PeerStream(torch.utils.data.IterableDataset):
    """webdataset streaming every shard (curl per shard), keeping every dp-th sample as a rank
    that owns 1/dp of them would, stacked into int64 micro-batches like ours."""

    def __init__(self, urls: Sequence[str], dp: int, rank: int):
        self.urls, self.dp, self.rank = list(urls), dp, rank

    def __iter__(self):
        import webdataset as wds

        rows = []
        for i, sample in enumerate(wds.WebDataset(self.urls, shardshuffle=False)):
            if i % self.dp != self.rank:
                continue
            rows.append(np.frombuffer(sample["tokens"], dtype=np.uint16))
            if len(rows) == MICRO:
                yield torch.from_numpy(np.stack(rows).astype(np.int64))  # (micro, seq_len + 1)
                rows = []


def peer_epoch(urls: Sequence[str], dp: int, rank: int, workers: int = 1) -> int:
    """The peer's epoch for one rank, in a DataLoader with `workers` workers as ours."""
    n = 0
    for batch in torch.utils.data.DataLoader(_PeerStream(urls, dp, rank), batch_size=None,
                                             num_workers=workers):
        n += batch.shape[0] * (batch.shape[1] - 1)
    return n


def _rank_main(variant: str, manifest, urls, dp, rank, cache, workers, barrier, out) -> None:
    barrier.wait()
    t0 = time.perf_counter()
    if variant == PEER:
        tokens = peer_epoch(urls, dp, rank, workers)
    else:
        mode = "range" if variant == RANGE else "cache"
        tokens = ours_epoch(manifest, dp, rank, mode, cache, workers)
    out.put((rank, tokens, time.perf_counter() - t0))


def concurrent_ranks(variant: str, manifest, urls, dp: int, cache: str,
                     workers: int = 1) -> Tuple[int, float]:
    """All dp ranks at once, each in its own process: (tokens of rank 0, slowest rank's s)."""
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(dp), ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(variant, manifest, urls, dp, r, cache, workers,
                                                  barrier, out)) for r in range(dp)]
    for p in procs:
        p.start()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{variant} rank process exited {p.exitcode}")
    tokens = {rank: t for rank, t, _ in results}
    return tokens[0], max(s for _, _, s in results)


class DelayProxy:
    """tests.helpers.httpd.Proxy in its own process."""

    def __init__(self, upstream: str, delay_s: float):
        from tests.launch_helpers import REPO

        self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.httpd", upstream,
                                      str(delay_s)], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclass
class RemoteResult:
    dataset_bytes: int
    node_bytes: Dict[Tuple[str, int], List[int]]  # (variant, nodes) -> bytes per node
    requests: Dict[Tuple[str, int], int]  # (variant, nodes) -> HTTP requests, all nodes
    tokens: Dict[Tuple[str, int], int]  # (variant, dp) -> tokens of rank 0 per epoch
    timings: Dict[Tuple[str, int], Timing]
    served: Dict[Tuple[str, int], float]  # (variant, dp) -> bytes served per epoch / dataset
    latency_ms: float
    workers: int

    def rate(self, variant: str, dp: int) -> float:
        return self.tokens[variant, dp] / self.timings[variant, dp].median

    def ratio(self, variant: str, dp: int):
        return paired_ratio(self.timings[variant, dp], self.timings[PEER, dp],
                            ours_units=self.tokens[variant, dp], peer_units=self.tokens[PEER, dp])


def measure_bytes(nginx, manifest_dir: Path, nodes: int, mode: str, work: Path,
                  ranks_per_node: int = 2) -> Tuple[List[int], int]:
    """Bytes nginx sent to each node for one epoch read by nodes x ranks_per_node ranks, and the
    number of requests."""
    from pretrain.data.manifest import Manifest

    dp = nodes * ranks_per_node
    nginx.mark()
    for rank in range(dp):  # one after another: what a node fetches does not depend on timing
        node = rank // ranks_per_node
        m = Manifest.load(manifest_dir).with_shard_urls(f"{nginx.url}/ds/{{path}}?node={node}")
        ours_epoch(m, dp, rank, mode, str(work / f"{mode}-{nodes}-{node}"), workers=0)
    return [nginx.bytes_sent(f"node={n}") for n in range(nodes)], len(nginx.requests())


def run(shards: int = 16, shard_mb: float = 16, seq_len: int = 2048, latency_ms: float = 20,
        rounds: int = 3, dps: Sequence[int] = (1, 2, 4), nodes: Sequence[int] = (1, 2, 4, 8),
        workers: int = 1, workdir: Optional[str] = None) -> RemoteResult:
    from bench.bench_loader import write_synthetic
    from pretrain.data.manifest import Manifest
    from tests.helpers.httpd import Nginx, why_no_nginx

    why = why_no_nginx()
    if why:
        raise SystemExit(why)
    work = Path(tempfile.mkdtemp(prefix="bench_remote_", dir=workdir))
    nginx = proxy = None
    try:
        www = work / "www"
        local = write_synthetic(www / "ds", shards, shard_mb, seq_len)
        nginx = Nginx(www, work / "nginx").start()
        dataset = sum(s.bytes for s in Manifest.load(local).split("train").shards)
        measured = {(mode, n): measure_bytes(nginx, local, n, mode, work / "bytes")
                    for n in nodes for mode in ("cache", "range")}
        node_bytes = {k: b for k, (b, _) in measured.items()}
        requests = {k: r for k, (_, r) in measured.items()}
        nginx.mark()
        peer_epoch(Manifest.load(local).with_shard_urls(f"{nginx.url}/ds/{{path}}")
                   .split("train").urls, 1, 0, workers=0)
        one_rank = nginx.bytes_sent()  # the peer: every rank streams the whole epoch
        for n in nodes:
            node_bytes[PEER, n] = [2 * one_rank] * n
            requests[PEER, n] = 2 * n * shards

        proxy = DelayProxy(nginx.url, latency_ms / 1000)
        manifest = Manifest.load(local).with_shard_urls(f"{proxy.url}/ds/{{path}}")
        urls = manifest.split("train").urls
        cache = str(work / "cache")
        tokens: Dict[Tuple[str, int], int] = {}
        timings: Dict[Tuple[str, int], Timing] = {}
        served: Dict[Tuple[str, int], float] = {}
        for dp in dps:
            runs: Dict[str, List[Tuple[int, float, int]]] = {n: [] for n in VARIANTS}
            for r in range(1 + rounds):  # A B C A B C ..., round 0 is the warm-up
                for name in VARIANTS:
                    shutil.rmtree(cache, ignore_errors=True)  # cache: the first epoch's cost
                    nginx.mark()
                    tok, seconds = concurrent_ranks(name, manifest, urls, dp, cache, workers)
                    if r:
                        runs[name].append((tok, seconds, nginx.bytes_sent()))
            for name, kept in runs.items():
                secs = [s for _, s, _ in kept]
                tokens[name, dp] = kept[-1][0]
                timings[name, dp] = Timing(secs, secs)  # wall of the slowest rank
                served[name, dp] = float(np.median([b for _, _, b in kept])) / dataset
        return RemoteResult(dataset, node_bytes, requests, tokens, timings, served, latency_ms,
                            workers)
    finally:
        if proxy is not None:
            proxy.stop()
        if nginx is not None:
            nginx.stop()
        shutil.rmtree(work, ignore_errors=True)


def bytes_rows(res: RemoteResult) -> List[List[object]]:
    nodes = sorted({n for _, n in res.node_bytes})
    rows = []
    for variant in ("cache", "range", PEER):
        for n in nodes:
            per = [b / res.dataset_bytes for b in res.node_bytes[variant, n]]
            rows.append([variant if variant == PEER else f"ours, {variant}", n, max(per), sum(per),
                         res.requests[variant, n]])
    return rows


def rate_rows(res: RemoteResult) -> List[List[object]]:
    rows = []
    for (variant, dp), t in sorted(res.timings.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ratio = "" if variant == PEER else str(res.ratio(variant, dp))
        rows.append([variant, dp, res.rate(variant, dp) / 1e6, f"{t.spread:.0%}",
                     res.served[variant, dp], ratio])
    return rows


def print_result(res: RemoteResult) -> None:
    print(table(["reader", "nodes (2 ranks each)", "bytes / dataset, busiest node",
                 "bytes / dataset, all nodes", "requests"], bytes_rows(res),
                title=f"bytes served per epoch (nginx access log, headers included), dataset "
                      f"{res.dataset_bytes / 1e6:.0f} MB; {machine()}"))
    print(table(["reader", "DP", "M tokens/s per rank", "spread", "bytes / dataset",
                 "vs peer (tokens/s)"], rate_rows(res),
                title=f"loader over HTTP with {res.latency_ms:g} ms per request, one epoch, "
                      f"{res.workers} DataLoader worker(s) per rank; medians of interleaved "
                      f"rounds; {machine()}"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--shard-mb", type=float, default=16.0)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--workdir", default=None, help="where the temporary dataset goes")
    args = p.parse_args(argv)
    print_result(run(args.shards, args.shard_mb, args.seq_len, args.latency_ms, args.rounds,
                     args.dp, args.nodes, args.workers, args.workdir))


if __name__ == "__main__":
    main()
