"""`pretrain-data` as a recipe: find inputs, train (or reuse) the tokenizer, tokenize in parallel,
pack into shards, write the manifest last.

Determinism: documents are read in a fixed order and batched by size; workers encode batches and
the writer consumes the results in input order, so the shards are byte-identical whatever the
number of workers. The split of a document (train or val) and whether it is in the tokenizer's
training sample are functions of its text and the seed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from tokenizers import Tokenizer

from pretrain.data.manifest import (FORMAT, MANIFEST_NAME, compute_fingerprint, dtype_for_vocab,
                                    sha256_file)
from pretrain.errors import ConfigError, DataError, EnvironmentSetupError
from pretrain.fsio import atomic_write, part_path
import tokenizer.bpe as bpe  # not `from tokenizer import`: tokenizer/__init__ imports this module
import tokenizer.encoders as encoders
from tokenizer.corpus import (CorpusStats, discover, doc_hash, estimated_text_bytes,
                              input_bytes, read_documents)
from tokenizer.progress import Progress
from tokenizer.shards import ShardWriter

log = logging.getLogger(__name__)

MB = 1 << 20
TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "val")


@dataclass
class PrepareConfig:
    inputs: List[str]
    output: str
    vocab_size: int = 32768
    seq_len: int = 2048
    text_field: str = "text"
    val_fraction: float = 0.005
    shard_size_mb: float = 64.0
    workers: Optional[int] = None  # None: every core this process may use
    tokenizer: Optional[str] = None  # reuse this tokenizer.json instead of training one
    max_input_mb: Optional[float] = None
    overwrite: bool = False
    seed: int = 1234
    # The tokenizer trains on a deterministic sample of the train documents of about this size.
    tokenizer_sample_mb: float = 256.0
    # Documents go to a worker in batches of about this much text.
    batch_mb: float = 1.0
    progress: bool = True
    # The engine that runs tokenizer.json's BPE: auto (tiktoken when it gives the same ids),
    # tiktoken, or tokenizers (tokenizer/encoders.py).
    encoder: str = "auto"

    def validate(self) -> "PrepareConfig":
        def check(cond: bool, flag: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{flag}: {msg}")

        check(bool(self.inputs), "--input", "give at least one file or directory")
        check(bool(self.output), "--output", "give the dataset directory to write")
        check(257 <= self.vocab_size <= 1 << 32, "--vocab-size",
              f"{self.vocab_size} must hold the 256 bytes plus {bpe.EOD_TOKEN}: use 257 .. 2^32")
        check(self.seq_len >= 1, "--seq-len", f"must be positive, got {self.seq_len}")
        check(0.0 <= self.val_fraction < 1.0, "--val-fraction",
              f"must be in [0, 1), got {self.val_fraction}")
        check(self.shard_size_mb > 0, "--shard-size-mb", "must be positive")
        check(self.workers is None or self.workers >= 1, "--workers", "must be >= 1")
        check(self.max_input_mb is None or self.max_input_mb > 0, "--max-input-mb",
              "must be positive")
        check(self.seed >= 0, "--seed", "must be >= 0")
        check(self.tokenizer_sample_mb > 0 and self.batch_mb > 0, "tokenizer_sample_mb/batch_mb",
              "must be positive")
        check(self.encoder in encoders.CHOICES, "--encoder",
              f"{self.encoder!r}: choose one of {', '.join(encoders.CHOICES)}")
        check(self.tokenizer is None or os.path.isfile(self.tokenizer), "--tokenizer",
              f"{self.tokenizer} is not a file; give a tokenizer.json written by pretrain-data")
        return self

    @property
    def num_workers(self) -> int:
        if self.workers:
            return self.workers
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1

    @property
    def max_input_bytes(self) -> Optional[int]:
        return None if self.max_input_mb is None else int(self.max_input_mb * MB)


@dataclass
class PrepareResult:
    manifest: Dict[str, Any]
    stats: CorpusStats
    tokens: int  # tokens encoded, EOD included, before packing
    seconds: float  # tokenize + write pass (the tokenizer's training not included)
    train_seconds: float = 0.0  # training (or copying) the tokenizer

    def summary(self) -> str:
        m, s = self.manifest, self.stats
        per_split = ", ".join(f"{n} {m['splits'][n]['samples']} samples in "
                              f"{len(m['splits'][n]['shards'])} shards" for n in SPLITS)
        rate = s.bytes / MB / max(self.seconds, 1e-9)
        return (f"pretrain-data: {per_split} of {m['sample_tokens']} tokens; {s.documents} "
                f"documents, {s.bytes / MB:.2f} MB, {self.tokens} tokens, {rate:.2f} MB/s, "
                f"{self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s; "
                f"{s.skipped_files} files skipped (not UTF-8), {s.skipped_lines} JSONL lines "
                "skipped")


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Write the dataset directory `cfg.output`; the manifest is written last. A run that fails
    (a corrupt input, an interrupt) removes what it wrote: no partial dataset is left, and the
    re-run needs no --overwrite."""
    cfg.validate()
    files = discover(cfg.inputs, exclude=cfg.output)
    reused = _read_bytes(cfg.tokenizer) if cfg.tokenizer else None
    out = _prepare_output(cfg.output, cfg.overwrite)
    try:
        return _write_dataset(cfg, files, out, reused)
    except BaseException:
        _remove_ours(out)
        raise


def _write_dataset(cfg: PrepareConfig, files: List[str], out: str,
                   reused: Optional[bytes]) -> PrepareResult:
    tok_path = os.path.join(out, TOKENIZER_NAME)
    t0 = time.perf_counter()
    if reused is None:
        tok = _train_on_sample(files, cfg)
        atomic_write(tok_path, tok.to_str(pretty=True).encode())
    else:
        bpe.load_tokenizer(cfg.tokenizer)  # fails early on a file without the EOD token
        atomic_write(tok_path, reused)
    train_seconds = time.perf_counter() - t0
    log.info("tokenizer %s in %.1f s: %s", "trained" if reused is None else "copied",
             train_seconds, tok_path)

    tok = bpe.load_tokenizer(tok_path)
    vocab_size, eod = tok.get_vocab_size(), tok.token_to_id(bpe.EOD_TOKEN)
    dtype = dtype_for_vocab(vocab_size)
    # Decided once here, so that every worker runs the same engine.
    cfg = dataclasses.replace(cfg, encoder=encoders.choose_engine(tok_path, cfg.encoder))
    stats = CorpusStats()
    t0 = time.perf_counter()
    splits, tokens = _write_shards(files, cfg, out, tok_path, dtype, stats)
    seconds = time.perf_counter() - t0
    if stats.documents == 0:
        raise DataError(f"no text in {cfg.inputs}: every file was empty or skipped; check --input "
                        "and --text-field")
    for name in SPLITS:
        if splits[name]["samples"] == 0 and (name == "train" or cfg.val_fraction > 0):
            log.warning("split %s has no samples (%d tokens < seq_len + 1); give more input, a "
                        "smaller --seq-len or a larger --val-fraction", name,
                        splits[name]["dropped_tokens"])
    manifest = _manifest(cfg, out, tok_path, vocab_size, eod, dtype, splits, stats)
    atomic_write(os.path.join(out, MANIFEST_NAME), json.dumps(manifest, indent=2).encode() + b"\n")
    return PrepareResult(manifest, stats, tokens, seconds, train_seconds)


def _train_on_sample(files: List[str], cfg: PrepareConfig) -> Tokenizer:
    """Train on the train-split documents picked by hash at a rate that spreads about
    `tokenizer_sample_mb` over the corpus, stopping at that size."""
    budget = int(cfg.tokenizer_sample_mb * MB)
    total = estimated_text_bytes(files)
    if cfg.max_input_bytes is not None:
        total = min(total, cfg.max_input_bytes)
    rate = min(1.0, budget / max(total, 1))

    def sample() -> Iterator[str]:
        taken = 0
        for doc, n in read_documents(files, cfg.text_field, cfg.max_input_bytes, warn=False):
            is_val, pick = _choose(doc.encode("utf-8"), cfg)
            if is_val or pick >= rate:
                continue
            yield doc
            taken += n
            if taken >= budget:
                return

    log.info("training a %d-token BPE tokenizer on ~%.0f MB of %d files", cfg.vocab_size,
             min(budget, total * rate) / MB, len(files))
    # tokenizers draws its bar on a terminal and writes blank lines to a log: bar or nothing.
    tok = bpe.train_tokenizer(sample(), cfg.vocab_size,
                              progress=cfg.progress and sys.stderr.isatty())
    if tok.get_vocab_size() <= 257:
        raise DataError(f"no training text in {cfg.inputs}: every file was empty or skipped; "
                        "check --input and --text-field")
    return tok


def _choose(data: bytes, cfg: PrepareConfig) -> Tuple[bool, float]:
    """(is the document in the val split, its draw for the tokenizer's sample)."""
    u_split, u_sample = doc_hash(data, cfg.seed)
    return u_split < cfg.val_fraction, u_sample


def _write_shards(files: List[str], cfg: PrepareConfig, out: str, tok_path: str, dtype: str,
                  stats: CorpusStats) -> Tuple[Dict[str, Dict[str, Any]], int]:
    writers = {name: ShardWriter(out, name, cfg.seq_len + 1, np.dtype(dtype),
                                 int(cfg.shard_size_mb * MB)) for name in SPLITS}
    docs = read_documents(files, cfg.text_field, cfg.max_input_bytes, stats)
    read_at: collections.deque = collections.deque()  # (file bytes, text bytes) at each batch's end

    def batches() -> Iterator[List[str]]:
        for batch in batched(docs, int(cfg.batch_mb * MB)):
            read_at.append((stats.read_bytes, stats.bytes))
            yield batch

    total_mb = estimated_text_bytes(files) / MB
    if cfg.max_input_mb is not None:
        total_mb = min(total_mb, cfg.max_input_mb)
    # Starting a worker costs about a second: no more workers than batches to give them.
    workers = max(1, min(cfg.num_workers, math.ceil(total_mb / cfg.batch_mb)))
    progress = Progress(input_bytes(files), cfg.max_input_bytes, enabled=cfg.progress)
    tokens = 0
    try:
        for batch in _encoded(batches(), cfg, tok_path, dtype, workers):
            for name in SPLITS:
                writers[name].add(batch[name])
            tokens += batch["tokens"]
            progress.update(*read_at.popleft(), tokens)
    finally:
        progress.close()
    return {name: w.close() for name, w in writers.items()}, tokens


def batched(docs: Iterable[Tuple[str, int]], batch_bytes: int) -> Iterator[List[str]]:
    batch: List[str] = []
    size = 0
    for doc, n in docs:
        batch.append(doc)
        size += n
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class BatchEncoder:
    """Splits a batch of documents and encodes each split's documents into one EOD-joined array."""

    def __init__(self, tok_path: str, cfg: PrepareConfig, dtype: str):
        self.encoder = encoders.open_encoder(tok_path, cfg.encoder)
        self.eod = self.encoder.eod
        self.cfg, self.dtype = cfg, np.dtype(dtype).newbyteorder("<")

    def __call__(self, docs: List[str]) -> Dict[str, Any]:
        parts: Dict[str, List[str]] = {name: [] for name in SPLITS}
        nbytes = 0
        for doc in docs:
            data = doc.encode("utf-8")
            nbytes += len(data)
            is_val, _ = _choose(data, self.cfg)
            parts["val" if is_val else "train"].append(doc)
        result: Dict[str, Any] = {"bytes": nbytes, "tokens": 0}
        for name, group in parts.items():
            ids = self.encoder.encode(group) if group else []
            ends = np.cumsum([len(x) + 1 for x in ids], dtype=np.int64)
            n = int(ends[-1]) if len(ids) else 0
            arr = np.empty(n, dtype=self.dtype)  # doc0 EOD doc1 EOD ...
            for x, end in zip(ids, ends):
                arr[end - 1 - len(x):end - 1] = x
            arr[ends - 1] = self.eod
            result[name] = arr
            result["tokens"] += n
        return result


_worker_encoder: Optional[BatchEncoder] = None


def _init_worker(tok_path: str, cfg: PrepareConfig, dtype: str) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # this process is one of --workers cores
    _worker_encoder = BatchEncoder(tok_path, cfg, dtype)


def _encode_in_worker(docs: List[str]) -> Dict[str, Any]:
    return _worker_encoder(docs)


def _encoded(batches: Iterator[List[str]], cfg: PrepareConfig, tok_path: str, dtype: str,
             workers: int) -> Iterator[Dict[str, Any]]:
    """Encoded batches in input order. With several workers at most 2 x workers batches are in
    flight (Pool.imap would read the whole corpus ahead into memory)."""
    if workers == 1:
        encoder = BatchEncoder(tok_path, cfg, dtype)
        with bpe.serial_tokenizers():
            for batch in batches:
                yield encoder(batch)
        return
    # spawn: a forked child of a process that ran tokenizers' thread pool may deadlock.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(tok_path, cfg, dtype))
    try:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise EnvironmentSetupError(f"a tokenizing worker died ({e}); out of memory? lower "
                                    "--workers") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _manifest(cfg: PrepareConfig, out: str, tok_path: str, vocab_size: int, eod: int, dtype: str,
              splits: Dict[str, Dict[str, Any]], stats: CorpusStats) -> Dict[str, Any]:
    tok_sha = sha256_file(tok_path)
    return {
        "format": FORMAT,
        "seq_len": cfg.seq_len,
        "sample_tokens": cfg.seq_len + 1,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "eod_id": eod,
        "tokenizer": {"file": TOKENIZER_NAME, "sha256": tok_sha},
        "splits": splits,
        "source": {"inputs": list(cfg.inputs), "documents": stats.documents, "bytes": stats.bytes,
                   "skipped_files": stats.skipped_files, "skipped_lines": stats.skipped_lines,
                   "truncated": stats.truncated, "text_field": cfg.text_field,
                   "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                   "encoder": cfg.encoder},
        "fingerprint": compute_fingerprint(tok_sha, cfg.seq_len, dtype,
                                           {n: s["shards"] for n, s in splits.items()}),
        "created_by": "pretrain-data",
    }


# With the writes in progress: `.part` (pretrain.fsio) and `.tmp` (what versions before it left).
_OURS = (MANIFEST_NAME, TOKENIZER_NAME) + SPLITS + tuple(
    staged for name in (MANIFEST_NAME, TOKENIZER_NAME)
    for staged in (part_path(name).name, name + ".tmp"))


def _prepare_output(path: str, overwrite: bool) -> str:
    """An empty dataset directory. An existing non-empty one is refused unless `overwrite`, which
    removes only what pretrain-data writes (manifest first, so a crash leaves it incomplete)."""
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--output {path} is a file; give a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise DataError(f"--output {path} is not empty (a dataset is there already?); pass "
                            "--overwrite to replace it or choose another directory")
        _remove_ours(out)
    os.makedirs(out, exist_ok=True)
    return out


def _remove_ours(out: str) -> None:
    """Remove what pretrain-data writes in `out`, the manifest first."""
    for name in _OURS:
        target = os.path.join(out, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
