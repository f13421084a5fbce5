"""pretrain-train over HTTP from a real nginx, on two simulated nodes (two torchrun agents with
their own caches), one in each remote mode: the losses equal a run over local files, bitwise, and
nginx's access log shows what each node fetched. Resume and DP changes over HTTP are tested on
the loader (test_remote.py), where they are exact sample by sample."""

import subprocess
import sys
from typing import List

import pytest

from tests.data.conftest import publish
from tests.launch_helpers import REPO, cpu_env, free_port, run_train, tiny_overrides, train_records

pytestmark = pytest.mark.slow


def _nodes(overrides: List[List[str]], timeout: float = 300) -> None:
    """One torchrun agent per simulated node (1 rank each) on this machine: real multi-node
    rendezvous, with each node's own overrides (its cache directory, its URL query)."""
    port, procs = free_port(), []
    try:
        for node, ov in enumerate(overrides):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(overrides)),
                   "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr",
                   "127.0.0.1", "--master-port", str(port), "-m", "launch.train", *ov]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]


def test_training_over_http_equals_local_files(nginx, tiny_dataset, www, tmp_path):
    publish(tiny_dataset, www, "tiny")
    ref = tmp_path / "local"
    run_train(tiny_overrides(tiny_dataset, ref, steps=4), nproc=2)

    # Two nodes of one rank, each with its own node-local cache and URL query (so that nginx's
    # log tells them apart): node 0 reads in cache mode, node 1 in range mode.
    run = tmp_path / "http"
    nginx.mark()
    _nodes([tiny_overrides(tiny_dataset, run, steps=4, data__remote_mode=mode,
                           data__cache_dir=tmp_path / f"node{n}",
                           data__shards_url=f"'{nginx.url}/tiny/{{path}}?node={n}'")
            for n, mode in enumerate(["cache", "range"])])
    want = [(r["step"], r["loss"], r["grad_norm"]) for r in train_records(ref)]
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in train_records(run)]
    assert got == want  # bitwise: the same samples in the same order

    log = nginx.requests()
    cache, ranged = ([r for r in log if r.args == f"node={n}"] for n in range(2))
    # the one window (4 shards): whole and once on node 0, only node 1's samples on node 1
    assert sorted(r.uri for r in cache) == [f"/tiny/train/shard-{i:06d}.tar" for i in range(4)]
    assert all(r.status == 200 for r in cache) and all(r.status == 206 for r in ranged)
    assert len(list((tmp_path / "node0" / "shards").glob("*.tar"))) == 4
    # node 1's half of the samples of this window and of the next one (prefetched: the next
    # epoch's), each about 3/4 of a member (no padding), never a whole shard
    dataset = sum(p.stat().st_size for p in (tiny_dataset / "train").iterdir())
    assert 0.5 < sum(r.bytes_sent for r in ranged) / dataset < 0.9
