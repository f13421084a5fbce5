"""A byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on the corpus or reused.

Byte-level BPE maps every UTF-8 byte to a symbol, so any text encodes and decodes back to itself
exactly: no unknown token, no normalization. The one special token is the end-of-document
token, which the shard writer appends after every document; text that happens to contain
`<|endoftext|>` is encoded as ordinary bytes (`encode_special_tokens`), never as that id.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, List, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pretrain.errors import DataError

EOD_TOKEN = "<|endoftext|>"


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: Optional[int] = None,
                    progress: bool = False) -> Tokenizer:
    """Train on `texts` (streamed). The result is a function of the texts and vocab_size."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def check_tokenizer(tok: Tokenizer, where: str) -> int:
    """The EOD id of a tokenizer fit for the shards; DataError if it has no EOD token."""
    eod = tok.token_to_id(EOD_TOKEN)
    if eod is None:
        raise DataError(f"{where}: the tokenizer has no {EOD_TOKEN} token; train one with "
                        "pretrain-data (leave out --tokenizer) or add the token")
    return eod


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json ready to encode documents (special-token text is encoded as text)."""
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise DataError(f"{path}: not a tokenizers tokenizer.json ({e}); check --tokenizer") from e
    check_tokenizer(tok, path)
    tok.encode_special_tokens = True
    return tok


def encode_batch(tok: Tokenizer, docs: List[str]) -> List[List[int]]:
    """Token ids of each document, without the EOD token. Runs on the calling thread only when
    inside `serial_tokenizers()`."""
    return [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]


@contextlib.contextmanager
def serial_tokenizers() -> Iterator[None]:
    """Keep `tokenizers` on the calling thread (it reads this variable on every call), so that
    `--workers` alone decides how many cores encoding uses."""
    key = "TOKENIZERS_PARALLELISM"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
