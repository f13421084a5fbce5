"""A real nginx for the tests that read shards over HTTP (tests/helpers/httpd.py), and datasets
served by it. Without nginx those tests skip and say why (.ci/nginx_install.sh installs it)."""

import shutil
from pathlib import Path

import pytest

from tests.helpers.httpd import Nginx, why_no_nginx
from tests.helpers.synthetic import indexed_samples, write_dataset


@pytest.fixture(scope="session")
def www(tmp_path_factory) -> Path:
    """The directory nginx serves: tests put datasets' shards under it."""
    return tmp_path_factory.mktemp("www")


@pytest.fixture(scope="session")
def nginx(www, tmp_path_factory):
    why = why_no_nginx()
    if why:
        pytest.skip(why)
    server = Nginx(www, tmp_path_factory.mktemp("nginx")).start()
    yield server
    server.stop()


def publish(local: Path, www: Path, name: str) -> Path:
    """Copy a dataset's shards to www/name (as a user uploads them); the manifest stays local."""
    dest = www / name
    for split in ("train", "val"):
        if (local / split).is_dir():
            shutil.copytree(local / split, dest / split)
    return dest


@pytest.fixture(scope="session")
def wide_dataset(tmp_path_factory) -> Path:
    """300 samples of 1024 tokens in 6 shards of 50 (members of 2560 bytes: headers are a small
    part of what a range read fetches, as with real sequence lengths); each sample's first two
    tokens spell its index."""
    root = tmp_path_factory.mktemp("wide_dataset")
    return write_dataset(root, indexed_samples(300, 1023, 1024), [50] * 6, 1024,
                         val=indexed_samples(20, 1023, 1024, seed=1))


@pytest.fixture(scope="session")
def wide_www(wide_dataset, www) -> str:
    """The wide dataset's shards under nginx's root; returns the name to put in URLs."""
    publish(wide_dataset, www, "wide")
    return "wide"
