"""Encoders for the shard writer: the same token ids from `tokenizer.json`, two engines.

`tokenizer.json` (Hugging Face `tokenizers`) is the tokenizer of record: it ships with the
dataset, the checkpoints and the exported model. To write shards, its byte-level BPE can also run
on tiktoken's engine, 6-8x faster per core: tiktoken merges the adjacent pair whose
concatenation has the lowest rank, `tokenizers` the pair that comes first in the merge list. With
ranks = token ids, the two agree when the vocabulary was built the way `tokenizers`' BPE trainer
builds one (every merge makes a new token, ids in merge order), with GPT-2's pre-tokenizing
regex and nothing else in the pipeline. `tiktoken_problem` checks exactly that; on 231 MB of
Python and HTML (24,472 documents) the ids were identical at vocabularies of 8192 and 32768.
As a guard against what the check cannot see (e.g. a Unicode-table difference between the two
regex engines), the start of the first document of every batch is also encoded by `tokenizers`
and compared; a difference is a DataError.

`open_encoder(path, "auto" | "tiktoken" | "tokenizers")`; `choose_engine` says which it would be.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional

import numpy as np

from pretrain.errors import DataError
import tokenizer.bpe as bpe  # not `from tokenizer import bpe`: that reads a half-imported package

log = logging.getLogger(__name__)

CHOICES = ("auto", "tiktoken", "tokenizers")
# The pattern `tokenizers`' ByteLevel pre-tokenizer splits with (GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHECK_CHARS = 2048  # of the first document of each batch, encoded by both engines


def byte_level_alphabet() -> Dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are written."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class TokenizersEncoder:
    """`tokenizers` itself, on the calling thread."""

    name = "tokenizers"

    def __init__(self, path: str):
        self.tok = bpe.load_tokenizer(path)
        self.eod = bpe.check_tokenizer(self.tok, path)

    def encode(self, docs: List[str]) -> List[np.ndarray]:
        with bpe.serial_tokenizers():
            return [np.asarray(x, dtype=np.uint32) for x in bpe.encode_batch(self.tok, docs)]


class TiktokenEncoder:
    """tiktoken with ranks taken from tokenizer.json; checked against `tokenizers` per batch."""

    name = "tiktoken"

    def __init__(self, path: str, raw: Dict[str, Any]):
        import tiktoken

        alphabet = {c: b for b, c in byte_level_alphabet().items()}
        vocab = raw["model"]["vocab"]
        ranks = {bytes(alphabet[c] for c in token): i for token, i in vocab.items()
                 if token != bpe.EOD_TOKEN}
        # No special tokens: "<|endoftext|>" in a document is ordinary text, as in `tokenizers`.
        self.enc = tiktoken.Encoding(f"pretrain:{path}", pat_str=GPT2_PATTERN,
                                     mergeable_ranks=ranks, special_tokens={})
        self.reference = TokenizersEncoder(path)
        self.eod = self.reference.eod
        self.path = path

    def encode(self, docs: List[str]) -> List[np.ndarray]:
        if docs:
            self.check(docs[0][:CHECK_CHARS])
        # encode_ordinary + np.array: 1.5x faster here than encode_to_numpy, which also searches
        # the text for special tokens
        return [np.array(self.enc.encode_ordinary(d), dtype=np.uint32) for d in docs]

    def check(self, text: str) -> None:
        ours = self.enc.encode_ordinary(text)
        ref = self.reference.encode([text])[0].tolist()
        if ours != ref:
            at = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b),
                      min(len(ours), len(ref)))
            raise DataError(
                f"tiktoken and tokenizers encode a document differently at token {at} with "
                f"{self.path} (text near: {text[:80]!r}); re-run pretrain-data with "
                "--encoder tokenizers")


def tiktoken_problem(raw: Any) -> Optional[str]:
    """Why tokenizer.json (parsed) cannot run on tiktoken with the same ids; None if it can."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        return "not a tokenizers tokenizer.json"
    model, pre = raw["model"], raw.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r}, not BPE"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "unk_token"):
        if model.get(key):
            return f"BPE option {key}={model[key]!r}"
    if model.get("byte_fallback") or model.get("ignore_merges"):
        return "BPE with byte_fallback or ignore_merges"
    if raw.get("normalizer"):
        return "a normalizer"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex",
                                                                                      True):
        return "a pre-tokenizer other than ByteLevel(add_prefix_space=False, use_regex=True)"
    added = [t.get("content") for t in raw.get("added_tokens") or []]
    if added != [bpe.EOD_TOKEN]:
        return f"added tokens {added} (only {bpe.EOD_TOKEN} is supported)"
    vocab: Dict[str, int] = model.get("vocab") or {}
    alphabet = set(byte_level_alphabet().values())
    if any(ch not in vocab for ch in alphabet):
        return "a vocabulary without all 256 bytes"
    if any(ch not in alphabet for t in vocab if t != bpe.EOD_TOKEN for ch in t):
        return "vocabulary entries outside the byte-level alphabet"
    made = []
    for m in model.get("merges") or []:
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        made.append(vocab.get(left + right))
    if None in made or len(set(made)) != len(made) or made != sorted(made):
        return "merges that do not each make a new token in id order"
    return None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable tokenizer ({e}); check --tokenizer") from e


def choose_engine(path: str, choice: str = "auto", raw: Any = None) -> str:
    """"tiktoken" or "tokenizers": the engine `choice` gives for tokenizer.json at `path`
    (`raw`: that file, parsed, when the caller has it)."""
    if choice not in CHOICES:
        raise DataError(f"--encoder {choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "tokenizers":
        return choice
    problem = tiktoken_problem(_read_json(path) if raw is None else raw)
    why = f"{path} has {problem}"
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        problem, why = "no tiktoken", "tiktoken is not installed"
    if problem is None:
        return "tiktoken"
    if choice == "tiktoken":
        raise DataError(f"--encoder tiktoken: {why}; use --encoder tokenizers")
    log.info("encoding with tokenizers, not tiktoken: %s", why)
    return "tokenizers"


def open_encoder(path: str, choice: str = "auto"):
    """The encoder for tokenizer.json at `path`: TiktokenEncoder or TokenizersEncoder."""
    if choice == "tokenizers":
        return TokenizersEncoder(path)
    raw = _read_json(path)
    if choose_engine(path, choice, raw) == "tokenizers":
        return TokenizersEncoder(path)
    return TiktokenEncoder(path, raw)
