"""Manifest.load and decode_sample on a dataset written by the real pretrain-data."""

import json
import os
import re
import shlex
import shutil
import sysconfig

import numpy as np
import pytest
import webdataset as wds

from pretrain.config import DataConfig
from pretrain.data.manifest import (FORMAT, Manifest, compute_fingerprint, decode_sample)
from pretrain.data.sources import load_sources
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


def set_shard_path(ds, split, i, path):
    """Give shard `i` another path in the manifest, fingerprint and all, as a crafted file would."""
    def change(raw):
        raw["splits"][split]["shards"][i]["path"] = path
        raw["fingerprint"] = compute_fingerprint(
            raw["tokenizer"]["sha256"], raw["seq_len"], raw["dtype"],
            {n: s["shards"] for n, s in raw["splits"].items()})
    edit(ds, change)


@pytest.mark.parametrize("path, why", [
    ("pipe:touch {pwned}", "a `pipe:` command"),
    ("https://example.com/train/shard-000001.tar", "a URL"),
    ("s3://bucket/web/train/shard-000001.tar", "a URL"),
    ("{ds}/train/shard-000001.tar", "an absolute path"),
    ("../other/train/shard-000001.tar", "a path that climbs out"),
    ("train/../../other/shard-000001.tar", "a path that climbs out"),
])
def test_a_manifest_names_no_command_and_no_place_outside_its_directory(ds, tmp_path, path, why):
    pwned = tmp_path / "pwned"
    bad = path.format(pwned=pwned, ds=ds)
    set_shard_path(ds, "train", 1, bad)
    message = (re.escape(f"{ds / 'manifest.json'} [splits.train.shards[1]]: shard {bad!r} is "
                         f"{why}") + ".* set data.shards_url")
    for load in (lambda: Manifest.load(ds), lambda: Manifest.load(ds, check_files=False),
                 lambda: load_sources(DataConfig(path=str(ds), shards_url="/fast/{path}"))):
        with pytest.raises(DataError, match=message):
            load()
    assert not pwned.exists()


def test_shards_url_commands_quote_each_path_so_no_name_runs(ds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a command in a name would touch its files
    odd = "train/a;touch pwned1 $(touch pwned2) `touch pwned3` 'x\" y.tar"
    want = [row for row in read_samples(Manifest.load(ds).split("train").urls)]
    bucket = shutil.copytree(ds, tmp_path / "bucket")
    os.rename(bucket / "train" / "shard-000000.tar", bucket / odd)
    set_shard_path(ds, "train", 0, odd)
    (m, _), = load_sources(DataConfig(path=str(ds), shards_url=f"pipe:cat {bucket}/{{path}}"))
    url = m.split("train").shards[0].url
    assert url == f"pipe:cat {bucket}/{shlex.quote(odd)}"
    got = read_samples(m.split("train").urls)  # webdataset runs each command with a shell
    assert len(got) == len(want) and all((a == b).all() for a, b in zip(got, want))
    assert sorted(os.listdir(tmp_path)) == ["bucket", "ds"]  # no pwned*
    https = Manifest.load(ds, check_files=False).with_shard_urls("https://host/web/{path}")
    assert https.split("train").urls[0] == f"https://host/web/{odd}"  # curl's argv: no shell


def test_a_quoted_path_in_a_command_is_refused_where_quoting_is_needed(ds):
    template = f"pipe:cat '{ds}/{{path}}'"  # a plain name reads the same quoted or not
    url = Manifest.load(ds).with_shard_urls(template).split("train").urls[0]
    assert url == f"pipe:cat '{ds}/train/shard-000000.tar'"
    set_shard_path(ds, "train", 0, "train/it's $(here).tar")
    m = Manifest.load(ds, check_files=False)
    for quoted in (template, f'pipe:cat "{ds}/{{path}}"', f"pipe:cat {ds}/\\{{path}}"):
        with pytest.raises(DataError, match="inside quotes or after a backslash.*{path} bare"):
            m.with_shard_urls(quoted)
    bare = m.with_shard_urls(f"pipe:cat '{ds}/'{{path}}").split("train").urls[0]
    assert shlex.split(bare[len("pipe:"):]) == ["cat", f"{ds}/train/it's $(here).tar"]


def read_samples(urls):
    """Each sample's payload of the shards at `urls`, in order, through webdataset."""
    return [np.frombuffer(s["tokens"], dtype="<u2")
            for s in wds.WebDataset(urls, shardshuffle=False)]


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
