"""The streaming loader resumes exactly, on any data-parallel size, and handles bad shards."""

import json
import shutil

import numpy as np
import pytest

from pretrain.data.loader import StreamSpec, make_loader
from pretrain.data.manifest import Manifest
from pretrain.errors import DataError
from tests.helpers.synthetic import indexed_samples, sample_index, write_dataset

V = 1024


def _stream(root, dp, rank, start, micro=3, workers=2, seed=7, steps=None, **kw):
    spec = StreamSpec(Manifest.load(root), "train", start, micro, dp, rank, seed, window_shards=2, **kw)
    return make_loader(spec, num_workers=workers, limit=steps)


def _global_sequence(root, dp, start, steps, micro=3, workers=2, accum=1):
    """Sample indices in global order: step by step, micro-batch by micro-batch, rank by rank."""
    per_rank = [[b for b in _stream(root, dp, r, start, micro, workers, steps=steps * accum)]
                for r in range(dp)]
    seq = []
    for k in range(steps * accum):
        for r in range(dp):
            seq += [sample_index(row, V) for row in per_rank[r][k].numpy()]
    return seq


def test_two_ranks_two_workers_resume_exactly(indexed_dataset):
    straight = _global_sequence(indexed_dataset, dp=2, start=0, steps=40)
    for cut in (1, 13, 27):  # save/restore after `cut` steps of 2 x 3 samples
        first = _global_sequence(indexed_dataset, dp=2, start=0, steps=cut)
        rest = _global_sequence(indexed_dataset, dp=2, start=cut * 6, steps=40 - cut)
        assert first + rest == straight


@pytest.mark.parametrize("dp_before, dp_after", [(1, 2), (2, 1)])
def test_resume_on_another_data_parallel_size_sees_every_sample_once(indexed_dataset, dp_before,
                                                                     dp_after):
    # One epoch is 1000 samples; global batch 6 with micro 3 x dp 2, or micro 6 x dp 1.
    micro = {1: 6, 2: 3}
    cut = 70  # steps before the change
    first = _global_sequence(indexed_dataset, dp_before, 0, cut, micro=micro[dp_before])
    rest = _global_sequence(indexed_dataset, dp_after, cut * 6, 166 - cut, micro=micro[dp_after])
    seen = first + rest  # 996 samples of the first epoch
    assert len(seen) == len(set(seen)) == 996
    assert seen == _global_sequence(indexed_dataset, 2, 0, 166, micro=3)


def test_an_epoch_covers_every_sample_then_reshuffles(indexed_dataset):
    seq = _global_sequence(indexed_dataset, dp=2, start=0, steps=334, micro=3)  # 2004 samples
    assert sorted(seq[:1000]) == list(range(1000))
    assert sorted(seq[1000:2000]) == list(range(1000))
    assert seq[:1000] != seq[1000:2000]


def test_batches_are_int64_with_the_sample_length(indexed_dataset):
    batch = next(iter(_stream(indexed_dataset, 1, 0, 0, micro=5, workers=0)))
    assert batch.dtype.is_floating_point is False and str(batch.dtype) == "torch.int64"
    assert tuple(batch.shape) == (5, 17)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_skipped_and_counted_then_stops(indexed_dataset, tmp_path, caplog):
    root = _copy(indexed_dataset, tmp_path / "ds")
    shard = root / "train" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[: 40 * 1024 + 100])  # cut mid-member
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][2]["bytes"] = shard.stat().st_size  # pass the size check
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="max_bad_shards"):
        _global_sequence(root, 1, 0, 200, micro=5, workers=0)
    seq = []
    for b in _stream(root, 1, 0, 0, micro=5, workers=0, steps=200, max_bad_shards=1):
        seq += [sample_index(r, V) for r in b.numpy()]
    assert len(seq) == 1000
    assert "skipping unreadable shard" in caplog.text and "shard-000002" in caplog.text
    # Samples 280..449 lived in shard 2; the 40 before the cut are read, the rest replaced.
    assert set(range(280, 320)) <= set(seq) and not set(range(320, 450)) & set(seq)


def _stream_samples(info, manifest):
    """Every sample of a shard through webdataset's tar reader, as decoded token arrays."""
    import webdataset as wds

    from pretrain.data.manifest import decode_sample

    return [decode_sample(x["tokens"], manifest)
            for x in wds.tariterators.tarfile_samples([{"url": info.url}])]


def test_local_shards_are_read_by_offset_exactly_as_streamed(indexed_dataset):
    from pretrain.data.loader import read_by_offset

    m = Manifest.load(indexed_dataset)
    rng = np.random.default_rng(0)
    for info in m.split("train").shards:
        every = _stream_samples(info, m)
        assert len(every) == info.samples
        want = {int(i): 1000 + int(i) for i in rng.choice(info.samples, 17, replace=False)}
        got = read_by_offset(info, want, m)
        assert sorted(got) == sorted(want.values())
        for i, pos in want.items():
            np.testing.assert_array_equal(got[pos], every[i])


def test_tars_in_another_layout_are_streamed_with_the_same_order(indexed_dataset, tmp_path):
    from pretrain.data.loader import read_by_offset

    samples = indexed_samples(1000, 16, V)
    pax = write_dataset(tmp_path / "pax", samples, [150, 130, 170, 100, 160, 140, 150], V,
                        val=indexed_samples(40, 16, V, seed=1), pax=True)
    m = Manifest.load(pax)
    assert all(read_by_offset(info, {0: 0, 5: 5}, m) is None for info in m.split("train").shards)
    assert (_global_sequence(pax, dp=2, start=0, steps=40)
            == _global_sequence(indexed_dataset, dp=2, start=0, steps=40))


def test_a_damaged_header_is_found_and_the_shard_skipped(indexed_dataset, tmp_path, caplog):
    from pretrain.data.loader import read_by_offset

    root = _copy(indexed_dataset, tmp_path / "ds")
    shard = root / "train" / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    stride = 512 + 512  # 17 uint16 tokens: one header block and one data block per sample
    data[7 * stride + 3] ^= 0x01  # the name of member 7: same size, bad header checksum
    shard.write_bytes(bytes(data))
    m = Manifest.load(root)
    info = m.split("train").shards[2]
    assert read_by_offset(info, {6: 6}, m) is not None  # the intact members still read
    assert read_by_offset(info, {6: 6, 7: 7}, m) is None  # -> streamed, which reports it
    with pytest.raises(DataError, match="max_bad_shards"):
        _global_sequence(root, 1, 0, 200, micro=5, workers=0)
    assert "skipping unreadable shard" in caplog.text and "shard-000002" in caplog.text


def test_token_outside_vocabulary_is_a_data_error_naming_the_shard(tmp_path):
    samples = indexed_samples(20, 16, V)
    samples[13, 5] = V + 7
    root = write_dataset(tmp_path / "ds", samples, [10, 10], V)
    with pytest.raises(DataError, match="shard-000001"):
        list(_stream(root, 1, 0, 0, micro=4, workers=0, steps=5, shuffle=False))


def test_missing_shard_is_found_before_training(indexed_dataset, tmp_path):
    root = _copy(indexed_dataset, tmp_path / "ds")
    (root / "train" / "shard-000004.tar").unlink()
    with pytest.raises(DataError, match="shard-000004"):
        Manifest.load(root)


def _tagged(tmp_path, name, n, tag, per_shard):
    x = indexed_samples(n, 16, V, seed=tag)
    x[:, 2] = tag  # which dataset a sample came from
    return write_dataset(tmp_path / name, x, per_shard, V)


def test_blend_respects_weights_and_resumes_exactly(tmp_path):
    web = Manifest.load(_tagged(tmp_path, "web", 900, 1, [300, 300, 300]))
    code = Manifest.load(_tagged(tmp_path, "code", 500, 2, [250, 250]))

    def seq(dp, start, steps, micro):
        spec = lambda r: StreamSpec(web, "train", start, micro, dp, r, 5, window_shards=2,
                                    weight=0.7, blend=[(code, 0.3)])
        per_rank = [list(make_loader(spec(r), num_workers=2, limit=steps)) for r in range(dp)]
        return [(int(row[2]), sample_index(row, V)) for k in range(steps) for r in range(dp)
                for row in per_rank[r][k].numpy()]

    straight = seq(2, 0, 250, 3)  # 1500 samples
    tags = [t for t, _ in straight]
    assert abs(tags.count(1) / len(tags) - 0.7) < 0.02  # exact per 1000-sample block
    # Each dataset's own stream is a permutation until it wraps into its next epoch.
    web_seen = [i for t, i in straight if t == 1][:900]
    assert sorted(web_seen) == list(range(900))
    # Save/restore after 101 steps on 2 ranks, continue on 1 rank with the same global batch.
    assert seq(2, 0, 101, 3) + seq(1, 606, 149, 6) == straight


def test_shards_open_anywhere_through_a_url_template(indexed_dataset, tmp_path):
    """Manifest and tokenizer local, shards moved elsewhere and read through webdataset's pipe:."""
    from pretrain.config import DataConfig
    from pretrain.data.remote import RemoteSpec
    from pretrain.data.sources import load_sources

    local = _copy(indexed_dataset, tmp_path / "ds")
    remote = tmp_path / "bucket"
    shutil.move(str(local / "train"), str(remote / "train"))
    cfg = DataConfig(path=str(local), shards_url=f"pipe:cat {remote}/{{path}}")
    with pytest.raises(DataError, match="shard-000000"):
        load_sources(DataConfig(path=str(local)))  # without the template the shards are missing
    (manifest, _), = load_sources(cfg)
    assert manifest.split("train").shards[0].url.startswith("pipe:cat ")
    spec = StreamSpec(manifest, "train", 0, 5, 1, 0, 7, window_shards=2,
                      remote=RemoteSpec(cache_dir=str(tmp_path / "cache")))
    seq = [sample_index(r, V) for b in make_loader(spec, 0, limit=200) for r in b.numpy()]
    assert sorted(seq) == list(range(1000))
    assert len(list((tmp_path / "cache" / "shards").glob("*.tar"))) == 7  # fetched by the command


def test_workers_ignore_stop_signals_and_close_ends_them(indexed_dataset):
    """Slurm signals every process of a step: a data worker must not die of it (the trainer would
    raise inside a collective before any rank saved); the trainer ends its workers with close()."""
    import os
    import signal
    import time

    straight = [sample_index(r, V) for b in _stream(indexed_dataset, 1, 0, 0, steps=30) for r in b.numpy()]
    batches = iter(_stream(indexed_dataset, 1, 0, 0))
    got = [sample_index(r, V) for _ in range(6) for r in next(batches).numpy()]
    workers = list(batches._it._workers)
    assert len(workers) == 2
    for w in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
            os.kill(w.pid, sig)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    got += [sample_index(r, V) for _ in range(24) for r in next(batches).numpy()]
    assert got == straight  # nothing lost or repeated: the workers carried on
    t0 = time.monotonic()
    batches.close()
    assert not any(w.is_alive() for w in workers) and time.monotonic() - t0 < 15
    with pytest.raises(StopIteration):
        next(batches)
