import hashlib
import os
import tarfile

import numpy as np

from tokenizer.shards import ShardWriter


def write(root, chunks, sample_tokens=5, target=4096):
    w = ShardWriter(str(root), "train", sample_tokens, np.dtype("uint16"), target)
    for c in chunks:
        w.add(np.asarray(c, dtype=np.uint16))
    return w.close()


def test_stream_is_cut_into_exact_samples_and_the_rest_dropped(tmp_path):
    chunks = [np.arange(n) + 10 * i for i, n in enumerate([3, 0, 7, 1, 12, 4])]
    info = write(tmp_path, chunks)
    stream = np.concatenate(chunks).astype(np.uint16)
    got = []
    for shard in info["shards"]:
        with tarfile.open(tmp_path / shard["path"]) as tar:
            for m in tar.getmembers():
                got.append(np.frombuffer(tar.extractfile(m).read(), dtype="<u2"))
    assert info["samples"] == len(stream) // 5 == len(got) == 5
    assert info["dropped_tokens"] == len(stream) % 5 == 2
    np.testing.assert_array_equal(np.concatenate(got), stream[:25])


def test_shards_roll_at_the_target_size_with_fixed_headers(tmp_path):
    info = write(tmp_path, [np.arange(5 * 40) % 300], sample_tokens=5, target=4096)
    assert len(info["shards"]) > 1 and sum(s["samples"] for s in info["shards"]) == 40
    key = 0
    for i, shard in enumerate(info["shards"]):
        path = tmp_path / shard["path"]
        assert shard["path"] == f"train/shard-{i:06d}.tar"
        assert shard["bytes"] == os.path.getsize(path)
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard["tokens"] == shard["samples"] * 5
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                assert m.name == f"{key:010d}.tokens" and m.size == 10
                assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (0, 0o644, 0, 0, "", "")
                key += 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_same_stream_gives_identical_bytes_whatever_the_chunking(tmp_path):
    stream = np.arange(1000) % 700
    a = write(tmp_path / "a", [stream])
    b = write(tmp_path / "b", np.array_split(stream, 37))
    assert a == b


def test_an_empty_split_has_no_shards(tmp_path):
    info = write(tmp_path, [[1, 2]])
    assert info == {"samples": 0, "tokens": 0, "dropped_tokens": 2, "shards": []}
