"""Shards over HTTP from a real nginx: the same samples as local files in both remote modes, at any
number of (simulated) nodes, ranks and workers; bytes per epoch from nginx's access log; dropped
and truncated transfers retried, then counted as bad shards naming the URL; servers without
ranges; a bounded node cache."""

import threading
import time
from typing import Dict, List

import numpy as np
import pytest

from pretrain.data.fetch import FetchPolicy
from pretrain.data.loader import StreamSpec, make_loader
from pretrain.data.manifest import Manifest
from pretrain.data.remote import RemoteSpec
from pretrain.errors import DataError
from tests.data.conftest import publish
from tests.helpers.httpd import Proxy

MICRO, WINDOW = 3, 2
FAST_RETRY = FetchPolicy(retries=2, backoff_s=0.01, timeout_s=10)


def _remote(mode: str, cache, limit_bytes: int = 10**9, prefetch: int = 1) -> RemoteSpec:
    return RemoteSpec(mode, str(cache), limit_bytes, prefetch, threads=2, policy=FAST_RETRY)


def _spec(manifest, dp, rank, start, remote=None, micro=MICRO, **kw) -> StreamSpec:
    return StreamSpec(manifest, "train", start, micro, dp, rank, seed=7, window_shards=WINDOW,
                      remote=remote, **kw)


def _lockstep(specs: List[StreamSpec], steps: int, workers: int) -> np.ndarray:
    """Every rank's loader running at once (their workers are separate processes), consumed step
    by step as ranks do; the samples in global order: step, then rank, then row."""
    its = [iter(make_loader(s, workers, limit=steps)) for s in specs]
    rows = []
    try:
        for _ in range(steps):
            for it in its:
                rows.append(next(it).numpy())  # (micro, seq_len + 1)
    finally:
        for it in its:
            it.close()
    return np.concatenate(rows)


def _local(dataset, dp, start, steps, micro=MICRO) -> np.ndarray:
    m = Manifest.load(dataset)
    return _lockstep([_spec(m, dp, r, start, micro=micro) for r in range(dp)], steps, 0)


def _urls(nginx, name, query: str = "") -> str:
    return f"{nginx.url}/{name}/{{path}}" + (f"?{query}" if query else "")


@pytest.mark.parametrize("mode", ["range", "cache"])
def test_remote_samples_equal_local_files_and_resume_on_another_dp(mode, nginx, wide_dataset,
                                                                   wide_www, tmp_path):
    remote = Manifest.load(wide_dataset).with_shard_urls(_urls(nginx, wide_www))
    spec = _remote(mode, tmp_path / "cache")
    # 2 ranks x 2 workers for 20 steps of 6 samples, then resumed on 1 rank (micro 6, the same
    # global batch) for 40 more: past the end of the epoch (300 samples) into the next one.
    first = _lockstep([_spec(remote, 2, r, 0, spec) for r in range(2)], 20, workers=2)
    rest = _lockstep([_spec(remote, 1, 0, 120, spec, micro=6)], 40, workers=2)
    want = np.concatenate([_local(wide_dataset, 2, 0, 20), _local(wide_dataset, 1, 120, 40, 6)])
    np.testing.assert_array_equal(np.concatenate([first, rest]), want)


def _one_epoch(nginx, name, manifest_dir, mode, nodes, tmp_path) -> Dict[int, int]:
    """One epoch read by 4 ranks (1 worker each) as `nodes` nodes, every node with its own cache
    and its own URL query, so that nginx's log tells the nodes apart; returns node -> bytes."""
    per_node, specs = 4 // nodes, []
    for r in range(4):
        node = r // per_node
        m = Manifest.load(manifest_dir).with_shard_urls(_urls(nginx, name, f"node={node}"))
        specs.append(_spec(m, 4, r, 0, _remote(mode, tmp_path / f"{mode}-node{node}")))
    nginx.mark()
    got = _lockstep(specs, 25, workers=1)  # 25 steps x 4 ranks x 3 = 300 samples: one epoch
    np.testing.assert_array_equal(got, _local(manifest_dir, 4, 0, 25))
    return {n: nginx.bytes_sent(f"node={n}") for n in range(nodes)}


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_bytes_per_epoch_cache_once_per_node_range_once_in_total(nodes, nginx, wide_dataset,
                                                                 wide_www, tmp_path):
    dataset = sum(s.bytes for s in Manifest.load(wide_dataset).split("train").shards)
    cache = _one_epoch(nginx, wide_www, wide_dataset, "cache", nodes, tmp_path)
    reqs = nginx.requests()
    for n in range(nodes):  # each shard fetched whole exactly once by each node
        fetched = sorted(r.uri for r in reqs if r.args == f"node={n}")
        assert fetched == [f"/{wide_www}/train/shard-{i:06d}.tar" for i in range(6)]
        assert cache[n] <= 1.05 * dataset, (n, cache[n] / dataset)
    ranged = _one_epoch(nginx, wide_www, wide_dataset, "range", nodes, tmp_path)
    assert all(r.status == 206 for r in nginx.requests())
    total = sum(ranged.values())
    print(f"\nnodes={nodes}: cache {[round(b / dataset, 3) for b in cache.values()]} x the "
          f"dataset per node; range {total / dataset:.3f} x in total")
    assert total <= 1.10 * dataset
    assert not any((tmp_path / f"range-node{n}" / "shards").exists() and
                   list((tmp_path / f"range-node{n}" / "shards").glob("*.tar"))
                   for n in range(nodes))  # range mode keeps nothing on disk


@pytest.mark.parametrize("mode", ["range", "cache"])
def test_a_dropped_transfer_is_retried_and_the_data_stays_exact(mode, nginx, wide_dataset,
                                                                wide_www, tmp_path):
    proxy = Proxy(nginx.url).start()
    try:
        path = f"/{wide_www}/train/shard-000005.tar"  # read first (seed 7)
        proxy.cut(path, after=3000, times=1)
        m = Manifest.load(wide_dataset).with_shard_urls(f"{proxy.url}/{wide_www}/{{path}}")
        nginx.mark()
        got = _lockstep([_spec(m, 1, 0, 0, _remote(mode, tmp_path / "c"))], 50, workers=1)
    finally:
        proxy.stop()
    np.testing.assert_array_equal(got, _local(wide_dataset, 1, 0, 50))
    attempts = [r for r in nginx.requests() if r.uri == path]
    assert len(attempts) == 2 if mode == "cache" else len(attempts) >= 2


@pytest.mark.parametrize("mode", ["range", "cache"])
def test_a_shard_that_keeps_failing_is_a_bad_shard_named_by_its_url(mode, nginx, wide_dataset,
                                                                    wide_www, tmp_path, caplog):
    proxy = Proxy(nginx.url).start()
    try:
        path = f"/{wide_www}/train/shard-000004.tar"
        proxy.cut(path, after=3000, times=1000)
        m = Manifest.load(wide_dataset).with_shard_urls(f"{proxy.url}/{wide_www}/{{path}}")
        url = f"{proxy.url}{path}"
        nginx.mark()
        with pytest.raises(DataError, match="max_bad_shards") as e:
            _lockstep([_spec(m, 1, 0, 0, _remote(mode, tmp_path / "a"))], 50, workers=2)
        assert url in str(e.value) and "failed 3 times" in str(e.value)
        tries = [r for r in nginx.requests() if r.uri == path]
        # cache: the node's second reader finds the first one's failure and does not try again
        assert len(tries) == 3 if mode == "cache" else len(tries) >= 3
        got = _lockstep([_spec(m, 1, 0, 0, _remote(mode, tmp_path / "b"), max_bad_shards=1)],
                        50, workers=0)
    finally:
        proxy.stop()
    assert len(got) == 150 and f"skipping unreadable shard {url}" in caplog.text


@pytest.mark.parametrize("mode", ["range", "cache"])
def test_a_shard_truncated_on_the_server_is_bad(mode, nginx, wide_dataset, www, tmp_path, caplog):
    name = f"trunc-{mode}"
    served = publish(wide_dataset, www, name)
    shard = served / "train" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:60000])
    m = Manifest.load(wide_dataset).with_shard_urls(_urls(nginx, name))
    got = _lockstep([_spec(m, 1, 0, 0, _remote(mode, tmp_path / "c"), max_bad_shards=1)], 50, 0)
    assert len(got) == 150
    assert f"{nginx.url}/{name}/train/shard-000002.tar" in caplog.text
    assert "the manifest says" in caplog.text or "HTTP 416" in caplog.text


@pytest.mark.parametrize("ranges", ["none", "first"])
def test_a_server_without_multipart_ranges_is_read_through_the_cache(ranges, nginx, wide_dataset,
                                                                     wide_www, tmp_path, caplog):
    proxy = Proxy(nginx.url, ranges=ranges).start()
    try:
        m = Manifest.load(wide_dataset).with_shard_urls(f"{proxy.url}/{wide_www}/{{path}}")
        # 2 ranks: a rank's samples of a shard are scattered, a request asks for many ranges
        got = _lockstep([_spec(m, 2, r, 0, _remote("range", tmp_path / "c")) for r in range(2)],
                        25, workers=0)
    finally:
        proxy.stop()
    np.testing.assert_array_equal(got, _local(wide_dataset, 2, 0, 25))
    assert "ignores Range requests" in caplog.text
    assert len(list((tmp_path / "c" / "shards").glob("*.tar"))) == 4  # the 2 windows read


def _cache_bytes(shards) -> int:
    """What the cache holds on disk now: complete shards and downloads in progress."""
    total = 0
    for p in list(shards.glob("*.tar")) + list(shards.glob("*.part")):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_the_node_cache_never_exceeds_its_limit(nginx, wide_dataset, wide_www, tmp_path):
    m = Manifest.load(wide_dataset).with_shard_urls(_urls(nginx, wide_www))
    shard = max(s.bytes for s in m.split("train").shards)
    limit = int(4.5 * shard)  # 2 windows of 2 shards (read + prefetched), of 6 shards
    spec = _remote("cache", tmp_path / "c", limit)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _cache_bytes(tmp_path / "c" / "shards"))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    nginx.mark()
    try:  # two ranks with two workers each: four readers share the cache, for two epochs
        got = _lockstep([_spec(m, 2, r, 0, spec) for r in range(2)], 100, workers=2)
    finally:
        done.set()
        watcher.join()
    np.testing.assert_array_equal(got, _local(wide_dataset, 2, 0, 100))
    assert 0 < peak[0] <= limit
    fetches = len(nginx.requests())
    assert 6 < fetches < 12  # evicted shards came back in epoch 2; never more than once per epoch
    with pytest.raises(DataError, match="cache_limit_gb"):
        make_loader(_spec(m, 1, 0, 0, _remote("cache", tmp_path / "c", 3 * shard)), 0)


def test_validation_reads_through_the_node_cache_once(nginx, wide_dataset, wide_www, tmp_path):
    """Evaluation reads the same val samples every time: the first one fetches the val shard
    whole into the cache, later ones read it from there, whatever data.remote_mode says."""
    from pretrain.config import DataConfig
    from pretrain.data.remote import remote_spec

    cfg = DataConfig(path=str(wide_dataset), remote_mode="range", cache_dir=str(tmp_path / "c"))
    spec = remote_spec(cfg, "val")
    assert (spec.mode, spec.prefetch_windows) == ("cache", 0)
    m = Manifest.load(wide_dataset).with_shard_urls(_urls(nginx, wide_www))
    val = StreamSpec(m, "val", 0, 4, 1, 0, seed=7, shuffle=False, remote=spec)
    local = StreamSpec(Manifest.load(wide_dataset), "val", 0, 4, 1, 0, seed=7, shuffle=False)
    want = np.concatenate([b.numpy() for b in make_loader(local, 0, limit=3)])
    nginx.mark()
    for _ in range(2):  # two evaluations
        got = np.concatenate([b.numpy() for b in make_loader(val, 0, limit=3)])
        np.testing.assert_array_equal(got, want)
    assert [(r.uri, r.status) for r in nginx.requests()] == [(f"/{wide_www}/val/shard-000000.tar", 200)]
