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


def test_shards_are_byte_for_byte_what_tarfile_writes(tmp_path):
    """The writer builds headers from a template; the bytes are tarfile's own (USTAR), also for
    sample keys whose digits sum differently and for a payload that is not a multiple of 512."""
    import io

    stream = (np.arange(2049 * 25) * 7919) % 50000
    info = write(tmp_path, [stream], sample_tokens=2049, target=30_000)
    rows = stream.astype("<u2").reshape(25, 2049)
    key = 0
    assert len(info["shards"]) > 2
    for shard in info["shards"]:
        ref = io.BytesIO()
        with tarfile.TarFile(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row in rows[key:key + shard["samples"]]:
                m = tarfile.TarInfo(f"{key:010d}.tokens")
                m.size, m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname = (
                    row.nbytes, 0, 0o644, 0, 0, "", "")
                tar.addfile(m, io.BytesIO(row.tobytes()))
                key += 1
        assert (tmp_path / shard["path"]).read_bytes() == ref.getvalue()


def test_header_template_matches_tarfile_for_any_key():
    from tokenizer.shards import _MemberHeaders

    headers = _MemberHeaders(4098)
    for key in (0, 1, 9, 10, 99, 12345, 987654321, 9999999999, 10**10, 10**11 + 7):
        assert headers(key) == _MemberHeaders._tarfile_header(key, 4098), key
