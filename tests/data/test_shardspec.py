"""data.shards: paths, globs, brace lists and pipe: commands select and locate training shards."""

import shutil

import pytest

from pretrain.config import DataConfig
from pretrain.data.loader import StreamSpec, make_loader
from pretrain.data.remote import RemoteSpec
from pretrain.data.shardspec import expand
from pretrain.data.sources import fingerprint, load_sources
from pretrain.errors import DataError
from tests.helpers.synthetic import sample_index

V = 1024
# indexed_dataset: 1000 samples in 7 shards of these sizes, sample i in shard order
SIZES = [150, 130, 170, 100, 160, 140, 150]
STARTS = [sum(SIZES[:i]) for i in range(len(SIZES))]


def _samples_of(shards):
    return sorted(i for s in shards for i in range(STARTS[s], STARTS[s] + SIZES[s]))


def _read_epoch(manifest, cache_dir=None):
    """One epoch's sample indices; shards behind pipe: go through a node cache in `cache_dir`."""
    n = manifest.split("train").samples
    remote = RemoteSpec(cache_dir=str(cache_dir)) if cache_dir else None
    spec = StreamSpec(manifest, "train", 0, 5, 1, 0, 7, window_shards=2, remote=remote)
    seq = [sample_index(r, V) for b in make_loader(spec, 0, limit=n // 5) for r in b.numpy()]
    assert len(seq) == n // 5 * 5
    return seq


def test_expand_brace_ranges_lists_globs_and_several_patterns(tmp_path):
    for n in (2, 0, 1):
        (tmp_path / f"s-{n:03d}.tar").write_bytes(b"")
    assert expand("/d/s-{000..002}.tar") == [f"/d/s-{n:03d}.tar" for n in range(3)]
    assert expand("/d/s-{005,001}.tar::/d/s-000.tar::/d/s-001.tar") == [
        "/d/s-005.tar", "/d/s-001.tar", "/d/s-000.tar"]  # order as written, duplicates dropped
    assert expand(f"{tmp_path}/s-*.tar") == [str(tmp_path / f"s-{n:03d}.tar") for n in range(3)]
    assert expand(f"{tmp_path}/s-00[{{0,2}}].tar") == [str(tmp_path / "s-000.tar"),
                                                        str(tmp_path / "s-002.tar")]
    assert expand("pipe:aws s3 cp s3://b/s-{0..1}.tar -") == ["pipe:aws s3 cp s3://b/s-0.tar -",
                                                              "pipe:aws s3 cp s3://b/s-1.tar -"]


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("/d/a.tar::", "empty pattern"),
    ("/nowhere/s-*.tar", "matches no file"),
    ("pipe:aws s3 cp s3://b/*.tar -", "brace list"),
    ("https://host/s-?.tar", "cannot be listed"),
])
def test_expand_errors_say_what_to_write(spec, message):
    with pytest.raises(DataError, match=message):
        expand(spec)


def test_a_brace_list_selects_those_shards_and_nothing_else(indexed_dataset, tmp_path):
    nvme = tmp_path / "nvme"  # shards copied to fast local disk; manifest stays where it was
    shutil.copytree(indexed_dataset / "train", nvme)
    cfg = DataConfig(path=str(indexed_dataset), shards=f"{nvme}/shard-{{000001..000003}}.tar")
    (manifest, _), = load_sources(cfg)
    train = manifest.split("train")
    assert [s.path for s in train.shards] == [f"train/shard-{n:06d}.tar" for n in (1, 2, 3)]
    assert [s.url for s in train.shards] == [str(nvme / f"shard-{n:06d}.tar") for n in (1, 2, 3)]
    assert train.samples == 400 and train.tokens == 400 * 17
    assert sorted(_read_epoch(manifest)) == _samples_of([1, 2, 3])
    assert manifest.split("val").urls == load_sources(DataConfig(
        path=str(indexed_dataset)))[0][0].split("val").urls  # validation is untouched


def test_a_selection_is_its_own_dataset_for_resume(indexed_dataset):
    def fp(shards):
        return fingerprint(load_sources(DataConfig(path=str(indexed_dataset), shards=shards)))

    whole = fingerprint(load_sources(DataConfig(path=str(indexed_dataset))))
    train = indexed_dataset / "train"
    assert fp(f"{train}/*.tar") == whole  # every shard: the same dataset
    assert fp(f"{train}/shard-{{000000..000006}}.tar") == whole
    some = fp(f"{train}/shard-{{000000..000003}}.tar")
    assert some != whole and some == fp(f"{train}/shard-{{000003,000001,000000,000002}}.tar")


def test_glob_and_pipe_commands_read_through_webdataset(indexed_dataset, tmp_path):
    bucket = tmp_path / "bucket" / "web"
    shutil.copytree(indexed_dataset / "train", bucket / "train")
    spec = (f"pipe:cat {bucket}/train/shard-{{000000,000004}}.tar"
            f"::{indexed_dataset}/train/shard-00000[56].tar")
    (manifest, _), = load_sources(DataConfig(path=str(indexed_dataset), shards=spec))
    assert [s.url.startswith("pipe:") for s in manifest.split("train").shards] == [
        True, True, False, False]
    assert sorted(_read_epoch(manifest, tmp_path / "cache")) == _samples_of([0, 4, 5, 6])


def test_shards_not_in_the_manifest_or_missing_are_errors(indexed_dataset, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "part-000000.tar").write_bytes(b"x")
    with pytest.raises(DataError, match="not a shard of the 'train' split"):
        load_sources(DataConfig(path=str(indexed_dataset), shards=f"{other}/*.tar"))
    with pytest.raises(DataError, match="shard-000007.tar' is not a shard"):
        load_sources(DataConfig(path=str(indexed_dataset),
                                shards=f"{indexed_dataset}/train/shard-{{000005..000009}}.tar"))
    nvme = tmp_path / "nvme"
    shutil.copytree(indexed_dataset / "train", nvme)
    (nvme / "shard-000005.tar").unlink()
    with pytest.raises(DataError, match="shard-000005.tar: shard listed in .* is missing"):
        load_sources(DataConfig(path=str(indexed_dataset), shards=f"{nvme}/shard-{{000004..000005}}.tar"))
    with pytest.raises(DataError, match="same shard"):
        load_sources(DataConfig(path=str(indexed_dataset), shards=(
            f"{indexed_dataset}/train/shard-000001.tar::{tmp_path}/x/train/shard-000001.tar")))
