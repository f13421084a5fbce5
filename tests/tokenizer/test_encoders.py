"""tokenizer.json's BPE on tiktoken's engine gives tokenizers' ids, and says when it cannot."""

import json

import numpy as np
import pytest

from pretrain.errors import DataError
from tokenizer import bpe, prepare
from tokenizer.corpus import discover, read_documents
from tokenizer.encoders import (TiktokenEncoder, TokenizersEncoder, choose_engine, open_encoder,
                                tiktoken_problem)

from tests.tokenizer.conftest import small_config


@pytest.fixture(scope="module")
def tok_path(dataset):
    cfg, _ = dataset
    return f"{cfg.output}/tokenizer.json"


def test_auto_picks_tiktoken_and_both_engines_write_the_same_bytes(dataset, tmp_path):
    cfg, result = dataset
    assert result.manifest["source"]["encoder"] == "tiktoken"
    slow = prepare(small_config(cfg.inputs, tmp_path / "slow", encoder="tokenizers"))
    assert slow.manifest["source"]["encoder"] == "tokenizers"
    # The fingerprint hashes every shard's sha256: the same fingerprint is the same bytes.
    assert slow.manifest["fingerprint"] == result.manifest["fingerprint"]


def test_same_ids_document_by_document(dataset, tok_path):
    cfg, _ = dataset
    docs = [d for d, _ in read_documents(discover(cfg.inputs))]
    docs += ["caf\u00e9 \u00fcber na\u00efve \u4e2d\u6587 \U0001f600 <|endoftext|>  \t\n\n x",
             "   leading spaces", "trailing spaces   ", "'s 're 've 12345 3.14 \u0661\u0662"]
    fast, ref = open_encoder(tok_path), TokenizersEncoder(tok_path)
    assert isinstance(fast, TiktokenEncoder) and fast.eod == ref.eod
    for a, b in zip(fast.encode(docs), ref.encode(docs)):
        np.testing.assert_array_equal(a, b)


def _edited(tok_path, tmp_path, change):
    raw = json.load(open(tok_path))
    change(raw)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(raw))
    return str(path), raw


def _duplicate_merge(raw):
    merges = raw["model"]["merges"]
    merges.append(merges[-1])


@pytest.mark.parametrize("change, why", [
    (lambda raw: raw.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda raw: raw["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer"),
    (lambda raw: raw["added_tokens"].append(dict(raw["added_tokens"][0], id=9999,
                                                 content="<pad>")), "added tokens"),
    (_duplicate_merge, "merges"),
    (lambda raw: raw["model"]["vocab"].pop("\u0100"), "256 bytes"),
])
def test_tokenizers_tiktoken_cannot_mirror_fall_back_or_fail(tok_path, tmp_path, change, why):
    assert tiktoken_problem(json.load(open(tok_path))) is None
    path, raw = _edited(tok_path, tmp_path, change)
    assert why in tiktoken_problem(raw)
    assert choose_engine(path, "auto") == "tokenizers"
    with pytest.raises(DataError, match="--encoder tokenizers"):
        choose_engine(path, "tiktoken")


def test_a_difference_between_the_engines_stops_the_write(dataset, tok_path, tmp_path):
    cfg, _ = dataset
    other = tmp_path / "other.json"  # another vocabulary stands in for a diverging engine
    docs = [d for d, _ in read_documents(discover(cfg.inputs))]
    bpe.train_tokenizer(docs, vocab_size=300).save(str(other))
    fast = open_encoder(tok_path)
    fast.reference = TokenizersEncoder(str(other))
    with pytest.raises(DataError, match="encode a document differently .* --encoder tokenizers"):
        fast.encode(docs[:3])
    with pytest.raises(DataError, match="choose one of"):
        open_encoder(tok_path, "sentencepiece")
