"""pretrain-data end to end on real stdlib text: the shards are what the trainer's loader reads."""

import json
import logging
import os
import re

import numpy as np
import pytest
import webdataset as wds

from pretrain.data.manifest import Manifest, decode_sample
from pretrain.errors import ConfigError, DataError
from tokenizer import bpe, prepare
from tokenizer.corpus import discover, doc_hash, input_bytes, read_documents

from tests.tokenizer.conftest import small_config, write_jsonl


def read_split(manifest, name):
    """Every sample of a split, in order, through webdataset as the loader reads them."""
    urls = manifest.split(name).urls
    if not urls:
        return np.zeros((0, manifest.sample_tokens), dtype=manifest.dtype), []
    rows, keys = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        rows.append(decode_sample(sample["tokens"], manifest))
        keys.append(sample["__key__"])
    return np.stack(rows), keys


def reference_streams(cfg, tok_path):
    """The EOD-joined token stream of each split, computed directly from the documents."""
    tok = bpe.load_tokenizer(tok_path)
    eod = tok.token_to_id(bpe.EOD_TOKEN)
    streams = {"train": [], "val": []}
    for doc, _ in read_documents(discover(cfg.inputs), cfg.text_field):
        split = "val" if doc_hash(doc.encode(), cfg.seed)[0] < cfg.val_fraction else "train"
        streams[split] += bpe.encode_batch(tok, [doc])[0] + [eod]
    return {k: np.asarray(v) for k, v in streams.items()}


def test_shards_read_by_webdataset_pack_the_token_stream_exactly(dataset):
    cfg, result = dataset
    m = Manifest.load(cfg.output)
    assert (m.seq_len, m.sample_tokens, m.vocab_size, m.dtype) == (64, 65, 1024, np.dtype("<u2"))
    assert m.fingerprint == result.manifest["fingerprint"] and m.to_dict() == result.manifest
    ref = reference_streams(cfg, m.tokenizer_path)
    for name in ("train", "val"):
        rows, keys = read_split(m, name)
        info = m.split(name)
        assert len(rows) == info.samples > 0 and rows.shape[1] == 65
        assert keys == [f"{i:010d}" for i in range(info.samples)]
        np.testing.assert_array_equal(rows.reshape(-1), ref[name][: info.tokens])
        assert info.dropped_tokens == len(ref[name]) - info.tokens < 65
    assert len(m.split("train").shards) > 1
    assert m.split("val").samples < m.split("train").samples


def test_val_documents_are_disjoint_from_train(dataset):
    cfg, result = dataset
    docs = [d for d, _ in read_documents(discover(cfg.inputs))]
    val = [d for d in docs if doc_hash(d.encode(), cfg.seed)[0] < cfg.val_fraction]
    assert 0 < len(val) < len(docs)
    m = Manifest.load(cfg.output)
    tok = bpe.load_tokenizer(m.tokenizer_path)
    train_ids, val_ids = (read_split(m, name)[0].reshape(-1).tolist() for name in ("train", "val"))
    train_text = tok.decode(train_ids, skip_special_tokens=False)
    val_text = tok.decode(val_ids, skip_special_tokens=False)
    long_val = [d for d in val if len(d) > 500]
    assert long_val and not any(d in train_text for d in long_val)
    assert any(d[:400] in val_text for d in long_val)
    src = result.manifest["source"]
    assert src["documents"] == len(docs) and src["skipped_files"] == 1
    assert src["bytes"] == sum(len(d.encode()) for d in docs)


def test_workers_do_not_change_a_byte(dataset, tmp_path):
    cfg, result = dataset
    two = prepare(small_config(cfg.inputs, tmp_path / "two", workers=2, batch_mb=0.02))
    assert json.dumps(two.manifest, sort_keys=True) == json.dumps(result.manifest, sort_keys=True)
    for split in ("train", "val"):
        for shard in result.manifest["splits"][split]["shards"]:
            a = open(os.path.join(cfg.output, shard["path"]), "rb").read()
            assert a == open(tmp_path / "two" / shard["path"], "rb").read()


def test_reusing_the_tokenizer_gives_the_same_dataset(dataset, tmp_path):
    cfg, result = dataset
    tok = os.path.join(cfg.output, "tokenizer.json")
    again = prepare(small_config(cfg.inputs, tmp_path / "again", tokenizer=tok, vocab_size=300))
    assert again.manifest["fingerprint"] == result.manifest["fingerprint"]


def test_existing_output_is_refused_unless_overwrite(dataset, tmp_path):
    cfg, _ = dataset
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    small = small_config([os.path.join(cfg.inputs[0], "json")], out, vocab_size=300)
    with pytest.raises(DataError, match="--overwrite"):
        prepare(small)
    small.overwrite = True
    first = prepare(small)
    assert (out / "keep.txt").read_text() == "not ours"
    with pytest.raises(DataError, match="--overwrite"):
        prepare(small_config(small.inputs, out, vocab_size=300))
    small.seq_len = 32
    second = prepare(small)
    assert second.manifest["seq_len"] == 32 != first.manifest["seq_len"]
    Manifest.load(out)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_jsonl_gives_the_same_dataset_as_plain(tmp_path, corpus_dir, suffix):
    docs = [d for d, _ in read_documents(discover([str(corpus_dir / "json")]))]
    rows = [{"id": i, "text": d} for i, d in enumerate(docs)]
    made = {}
    for s in (".jsonl", suffix):
        path = write_jsonl(tmp_path / f"docs{s}", rows)
        made[s] = prepare(small_config([path], tmp_path / f"out{s}", vocab_size=300,
                                       val_fraction=0.0))
    assert made[".jsonl"].manifest["splits"] == made[suffix].manifest["splits"]
    assert made[suffix].manifest["source"]["documents"] == len(docs)


def test_max_input_mb_bounds_the_text_read(corpus_dir, tmp_path):
    result = prepare(small_config([corpus_dir], tmp_path / "o", vocab_size=300, max_input_mb=0.05))
    src = result.manifest["source"]
    assert src["truncated"] and 0.05 * 2**20 <= src["bytes"] < 0.05 * 2**20 + 200_000


def test_bad_settings_name_the_flag(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="--seq-len"):
        prepare(small_config([corpus_dir], tmp_path / "o", seq_len=0))
    with pytest.raises(ConfigError, match="--vocab-size"):
        prepare(small_config([corpus_dir], tmp_path / "o", vocab_size=100))


def test_a_compressed_corpus_builds_with_exact_progress(compressed_corpus, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    files = discover([str(compressed_corpus)])
    result = prepare(small_config([compressed_corpus], tmp_path / "o", vocab_size=300,
                                  progress=True, tokenizer_sample_mb=1.0, batch_mb=0.5))
    src = result.manifest["source"]
    assert src["bytes"] > 4 * input_bytes(files)  # past the old guess, where the bar crashed
    assert src["documents"] == result.stats.documents and src["skipped_lines"] == 0
    Manifest.load(tmp_path / "o")
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenizer.progress"]
    done = [int(m.split("%")[0].split()[-1]) for m in lines]
    assert len(lines) >= 5 and done == sorted(done) and done[-1] == 100


def test_a_failed_run_leaves_no_dataset(compressed_corpus, dataset, tmp_path):
    cut = tmp_path / "in" / "cut.jsonl.zst"
    cut.parent.mkdir()
    data = (compressed_corpus / "crawl-1.jsonl.zst").read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])
    inputs = [compressed_corpus / "code-0.jsonl.gz", cut]
    tok = os.path.join(dataset[0].output, "tokenizer.json")
    for reuse in (None, tok):  # fails while training the tokenizer, or after shards are written
        out = tmp_path / f"out-{bool(reuse)}"
        with pytest.raises(DataError, match=re.escape(str(cut)) + ": cannot read .*truncated"):
            prepare(small_config(inputs, out, vocab_size=300, tokenizer=reuse, batch_mb=0.05))
        assert os.listdir(out) == []
    prepare(small_config(inputs[:1], out, tokenizer=tok))  # the re-run needs no --overwrite
    Manifest.load(out)
