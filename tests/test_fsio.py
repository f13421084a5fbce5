"""pretrain.fsio.atomic_write: the old content or the new one, never a part, and no `.part` left."""

import subprocess
import sys

import pytest

from pretrain.fsio import atomic_write, part_path


@pytest.mark.parametrize("fsync", [True, False])
def test_writes_and_replaces(tmp_path, fsync):
    path = tmp_path / "latest"
    atomic_write(path, "step_00000002", fsync=fsync)
    assert path.read_text() == "step_00000002"
    atomic_write(path, "step_00000004\N{EM DASH}".encode(), fsync=fsync)
    assert path.read_text() == "step_00000004\N{EM DASH}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_failed_rename_leaves_the_target_and_no_part(tmp_path):
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a directory cannot be replaced by a file
    with pytest.raises(OSError):
        atomic_write(target, "data")
    assert (target / "inside").is_dir() and not part_path(target).exists()


# A real full-disk failure for this process only: a file-size limit, past which write() fails
# with EFBIG (SIGXFSZ ignored) as it fails with ENOSPC on a full disk.
FULL_DISK = """
import resource, signal, sys
from pretrain.fsio import atomic_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    atomic_write(sys.argv[1], b"x" * 100_000)
except OSError as e:
    print(e.errno)
"""


def test_a_full_disk_leaves_the_old_file_and_no_part(tmp_path):
    path = tmp_path / "FILES"
    path.write_text("old")
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip(), "the write should have failed"
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILES"]
