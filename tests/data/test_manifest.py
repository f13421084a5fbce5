"""Manifest.load and decode_sample on a dataset written by the real pretrain-data."""

import json
import os
import shutil
import sysconfig

import numpy as np
import pytest

from pretrain.data.manifest import (FORMAT, Manifest, compute_fingerprint, decode_sample)
from pretrain.errors import DataError
from tokenizer import PrepareConfig, prepare

STDLIB_JSON = os.path.join(sysconfig.get_paths()["stdlib"], "json")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest") / "ds"
    prepare(PrepareConfig(inputs=[STDLIB_JSON], output=str(out), vocab_size=300, seq_len=32,
                          val_fraction=0.2, shard_size_mb=0.02, workers=1, progress=False))
    return out


@pytest.fixture
def ds(built, tmp_path):
    """A copy each test may damage."""
    return shutil.copytree(built, tmp_path / "ds")


def edit(ds, change):
    path = ds / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_load_gives_typed_fields_and_absolute_urls(ds):
    m = Manifest.load(ds)
    assert Manifest.load(ds / "manifest.json") == m
    assert m.root == str(ds) and m.tokenizer_path == str(ds / "tokenizer.json")
    assert (m.seq_len, m.sample_tokens, m.dtype, m.vocab_size, m.eod_id) == \
        (32, 33, np.dtype("<u2"), 300, 0)
    assert m.splits == ["train", "val"]
    train = m.split("train")
    assert train.name == "train" and len(train.shards) > 1
    assert train.samples == sum(s.samples for s in train.shards)
    assert train.tokens == train.samples * 33
    s = train.shards[0]
    assert s.path == "train/shard-000000.tar" and s.url == str(ds / s.path)
    assert s.bytes == os.path.getsize(s.url) and len(s.sha256) == 64
    assert m.to_dict() == json.loads((ds / "manifest.json").read_text())


def test_missing_manifest_says_to_run_pretrain_data(tmp_path):
    with pytest.raises(DataError, match="run `pretrain-data"):
        Manifest.load(tmp_path)


def test_wrong_format_is_refused(ds):
    edit(ds, lambda raw: raw.update(format="megatron-indexed/1"))
    with pytest.raises(DataError, match=f"expected '{FORMAT}'"):
        Manifest.load(ds)


def test_missing_shard_is_named(ds):
    os.remove(ds / "train" / "shard-000001.tar")
    with pytest.raises(DataError, match="shard-000001.tar: shard listed in .* is missing"):
        Manifest.load(ds)
    assert Manifest.load(ds, check_files=False).split("train").shards[1].path.endswith("1.tar")


def test_shard_size_mismatch_is_named(ds):
    with open(ds / "val" / "shard-000000.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DataError, match="val/shard-000000.tar: .* bytes on disk"):
        Manifest.load(ds)


def test_replaced_tokenizer_is_refused(ds):
    with open(ds / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(DataError, match="tokenizer was replaced"):
        Manifest.load(ds)


def test_hand_edited_shard_list_breaks_the_fingerprint(ds):
    edit(ds, lambda raw: raw["splits"]["train"]["shards"].reverse())
    with pytest.raises(DataError, match="fingerprint"):
        Manifest.load(ds)


def test_inconsistent_counts_are_refused(ds):
    edit(ds, lambda raw: raw["splits"]["train"].update(samples=1))
    with pytest.raises(DataError, match="disagree with its shards"):
        Manifest.load(ds)


def test_remote_and_absolute_shard_paths_are_kept_as_given(ds):
    def to_remote(raw):
        shards = raw["splits"]["train"]["shards"]
        shards[0]["path"] = "pipe:curl -s https://example.com/shard-000000.tar"
        shards[1]["path"] = "https://example.com/train/shard-000001.tar"
        shards[2]["path"] = str(ds / shards[2]["path"])
        raw["fingerprint"] = compute_fingerprint(
            raw["tokenizer"]["sha256"], raw["seq_len"], raw["dtype"],
            {n: s["shards"] for n, s in raw["splits"].items()})
    edit(ds, to_remote)
    urls = Manifest.load(ds).split("train").urls
    assert urls[0].startswith("pipe:curl") and urls[1].startswith("https://")
    assert urls[2] == str(ds / "train" / "shard-000002.tar")


def test_unknown_split_is_named(ds):
    with pytest.raises(DataError, match="no split 'test'"):
        Manifest.load(ds).split("test")


def test_decode_sample_checks_length_and_ids(ds):
    m = Manifest.load(ds)
    good = np.arange(33, dtype="<u2") % 300
    np.testing.assert_array_equal(decode_sample(good.tobytes(), m), good)
    with pytest.raises(DataError, match="expected 66"):
        decode_sample(good[:-1].tobytes(), m)
    bad = good.copy()
    bad[5] = 300
    with pytest.raises(DataError, match="token id 300 >= vocab_size 300"):
        decode_sample(bad.tobytes(), m)


def test_fingerprint_depends_on_what_decides_the_stream():
    shards = {"train": [{"path": "train/shard-000000.tar", "samples": 4, "sha256": "ab"}]}
    base = compute_fingerprint("t" * 64, 128, "uint16", shards)
    assert base == compute_fingerprint("t" * 64, 128, "uint16", dict(shards))
    assert base != compute_fingerprint("u" * 64, 128, "uint16", shards)
    assert base != compute_fingerprint("t" * 64, 64, "uint16", shards)
    assert base != compute_fingerprint("t" * 64, 128, "uint32", shards)
    assert base != compute_fingerprint("t" * 64, 128, "uint16", {"val": shards["train"]})


def test_malformed_values_are_a_data_error(ds):
    edit(ds, lambda raw: raw.update(seq_len="long"))
    with pytest.raises(DataError, match="malformed manifest"):
        Manifest.load(ds)
