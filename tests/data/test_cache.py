"""The node cache's bookkeeping: what dead readers and downloaders leave behind frees itself,
what a live reader pins is never evicted, a failing `pipe:` command is a bad shard."""

import hashlib
import os
import subprocess
import sys

import pytest

from pretrain.data.cache import NodeCache
from pretrain.data.fetch import FetchError, FetchPolicy, download
from pretrain.errors import DataError


def _shard(n: int, fill: bytes):
    data = fill * n
    return data, hashlib.sha256(data).hexdigest()


def _write(data: bytes):
    def fetch(part: str) -> None:
        with open(part, "wb") as f:
            f.write(data)
    return fetch


def _reader(root, limit: int, data: bytes, sha: str, **kw):
    """A reader that pins a shard and gets it (fetched by writing `data`); (reader, its path)."""
    cache = NodeCache(str(root), limit_bytes=limit, **kw)
    cache.pin("w", [sha])
    return cache, cache.get(sha, len(data), f"http://x/{sha[:8]}", _write(data))


def test_dead_readers_pins_and_downloads_free_their_space(tmp_path):
    root = tmp_path / "cache"
    old, old_sha = _shard(4000, b"a")
    new, new_sha = _shard(4000, b"b")
    first, _ = _reader(root, 7000, old, old_sha)
    # A reader that died holding its pins and a downloader that died mid-download (3000 bytes
    # reserved): their files stay, their locks went with them, as after a SIGKILL.
    os.close(first._pin_fd)
    (root / "shards" / f"{'c' * 64}.3000.part").write_bytes(b"c" * 100)
    assert len(os.listdir(root / "pins")) == 1
    second, path = _reader(root, 7000, new, new_sha, space_wait_s=1)
    assert open(path, "rb").read() == new
    assert not (root / "shards" / f"{old_sha}.tar").exists()  # evicted: nobody alive pins it
    assert not list((root / "shards").glob("*.part"))
    assert os.listdir(root / "pins") == [f"{second.name}.json"]


def test_a_shard_a_live_reader_pins_is_never_evicted(tmp_path):
    root = tmp_path / "cache"
    held, held_sha = _shard(5000, b"a")
    other, other_sha = _shard(5000, b"b")
    reader, _ = _reader(root, 8000, held, held_sha)
    with pytest.raises(DataError, match="stayed full.*cache_limit_gb"):
        _reader(root, 8000, other, other_sha, space_wait_s=0.5)
    assert (root / "shards" / f"{held_sha}.tar").exists()
    reader.close()  # the reader moves on: now there is room
    _reader(root, 8000, other, other_sha)
    assert not (root / "shards" / f"{held_sha}.tar").exists()


def test_a_pinned_shard_in_a_killed_process_is_freed(tmp_path):
    """A reader process that dies by SIGKILL: its pin file stays, its flock does not."""
    root = tmp_path / "cache"
    code = ("import os, sys; from pretrain.data.cache import NodeCache; "
            f"c = NodeCache({str(root)!r}, 10**6); c.pin('w', ['f' * 64]); "
            "print(len(os.listdir(c.pins_dir)), flush=True); os.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == -9 and out.stdout.strip() == "1"
    assert NodeCache(str(root), 10**6)._live_pins() == set()
    assert os.listdir(root / "pins") == []


def test_a_failing_pipe_command_is_retried_then_a_fetch_error(tmp_path):
    data, sha = _shard(100, b"x")
    with pytest.raises(FetchError, match="pipe:cat /nonexistent.*failed 2 times"):
        download("pipe:cat /nonexistent/shard.tar", str(tmp_path / "part"), len(data), sha,
                 FetchPolicy(retries=1, backoff_s=0.01))
    src = tmp_path / "shard.tar"
    src.write_bytes(data)
    download(f"pipe:cat {src}", str(tmp_path / "part"), len(data), sha, FetchPolicy())
    assert (tmp_path / "part").read_bytes() == data
    src.write_bytes(data[:-1] + b"y")
    with pytest.raises(FetchError, match="sha256 differs"):
        download(f"pipe:cat {src}", str(tmp_path / "part"), len(data), sha,
                 FetchPolicy(retries=0))
