import json
import os

import pytest

from pretrain.errors import DataError
from tokenizer import bpe
from tokenizer.corpus import discover, read_documents

from tests.tokenizer.conftest import LITERAL_EOD


@pytest.fixture(scope="module")
def docs(corpus_dir):
    return [d for d, _ in read_documents(discover([str(corpus_dir)]))]


@pytest.fixture(scope="module")
def trained(docs, tmp_path_factory):
    tok = bpe.train_tokenizer(docs, vocab_size=1024)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_training_gives_requested_vocab_and_eod(trained):
    tok = bpe.load_tokenizer(trained)
    assert tok.get_vocab_size() == 1024
    assert bpe.check_tokenizer(tok, trained) == tok.token_to_id(bpe.EOD_TOKEN) == 0


def test_training_is_deterministic(docs):
    a = bpe.train_tokenizer(docs, vocab_size=600).to_str()
    b = bpe.train_tokenizer(docs, vocab_size=600).to_str()
    assert a == b


def test_round_trip_is_exact_on_real_files(trained, docs):
    tok = bpe.load_tokenizer(trained)
    assert len(docs) > 20 and any(not d.isascii() for d in docs)
    with bpe.serial_tokenizers():
        for doc, ids in zip(docs, bpe.encode_batch(tok, docs)):
            assert tok.decode(ids, skip_special_tokens=False) == doc


def test_literal_eod_text_is_encoded_as_text(trained):
    tok = bpe.load_tokenizer(trained)
    ids = bpe.encode_batch(tok, [LITERAL_EOD])[0]
    assert tok.token_to_id(bpe.EOD_TOKEN) not in ids
    assert tok.decode(ids, skip_special_tokens=False) == LITERAL_EOD


def test_tokenizer_without_eod_is_refused(trained, tmp_path):
    raw = json.loads(open(trained).read())
    raw["added_tokens"] = []
    raw["model"]["vocab"].pop(bpe.EOD_TOKEN)
    path = tmp_path / "no_eod.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="no <\\|endoftext\\|> token"):
        bpe.load_tokenizer(str(path))


def test_not_a_tokenizer_file_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="check --tokenizer"):
        bpe.load_tokenizer(str(path))


def test_serial_tokenizers_restores_the_environment(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with bpe.serial_tokenizers():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
