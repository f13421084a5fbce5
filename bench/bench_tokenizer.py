"""Tokenizer + shard writing throughput against a plain peer loop, in the same run.

    python -m bench.bench_tokenizer [--mb 8] [--reps 5]

A: pretrain-data's tokenize-and-write pass (the tokenizer is trained once beforehand and reused),
one worker, then two, on its default engine (tiktoken running tokenizer.json's BPE, see
tokenizer/encoders.py), and one worker on the `tokenizers` engine. B: the Megatron-style peer, Hugging Face tokenizers encoding document by
document in one process and appending each document's ids to a flat binary file. Both read the
same Python standard library source, with the same tokenizer, interleaved A B A B; the first
round is a warm-up and is dropped; medians. MB/s counts UTF-8 text. "CPU MB/s" divides by the
CPU seconds of the process (and its workers): on a shared machine it is the per-core figure.
Second peer: tiktoken encoding the same vocabulary document by document into a flat file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sysconfig
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import numpy as np

from tokenizer import PrepareConfig, bpe, prepare
from tokenizer.corpus import discover, read_documents
from tokenizer.encoders import GPT2_PATTERN, byte_level_alphabet
from tokenizer.pipeline import BatchEncoder, batched

MB = 1 << 20


def make_corpus(root: str, mb: float) -> List[str]:
    """Copy stdlib .py files (sorted, valid UTF-8) into root until `mb` of text."""
    std = sysconfig.get_paths()["stdlib"]
    files = [f for f in discover([std]) if f.endswith(".py") and "site-packages" not in f]
    total = 0
    for i, f in enumerate(files):
        data = open(f, "rb").read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        with open(os.path.join(root, f"{i:06d}.py"), "wb") as out:
            out.write(data)
        total += len(data)
        if total >= mb * MB:
            break
    return discover([root])


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], int]) -> Tuple[float, float, int]:
    """(wall s, CPU s, text bytes) of one run."""
    c, t = cpu_seconds(), time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - t, cpu_seconds() - c, nbytes


def ours(corpus: str, out: str, tok: str, workers: int, seq_len: int,
         encoder: str = "auto") -> Callable[[], int]:
    def run() -> int:
        cfg = PrepareConfig(inputs=[corpus], output=out, tokenizer=tok, workers=workers,
                            seq_len=seq_len, val_fraction=0.0, overwrite=True, progress=False,
                            encoder=encoder)
        return prepare(cfg).stats.bytes
    return run


def ours_encode_only(corpus: str, tok: str, seq_len: int) -> Callable[[], int]:
    """The same read + encode, no packing or tar writing: the shards' overhead is the difference."""
    def run() -> int:
        cfg = PrepareConfig(inputs=[corpus], output="-", tokenizer=tok, workers=1, seq_len=seq_len)
        encoder = BatchEncoder(tok, cfg, "uint16")
        n = 0
        with bpe.serial_tokenizers():
            for batch in batched(read_documents(discover([corpus])), int(cfg.batch_mb * MB)):
                n += encoder(batch)["bytes"]
        return n
    return run


def peer_hf(files: List[str], tok_path: str, out: str) -> Callable[[], int]:
    """Megatron-style: one document at a time, ids appended to a flat .bin."""
    def run() -> int:
        tok = bpe.load_tokenizer(tok_path)
        eod = tok.token_to_id(bpe.EOD_TOKEN)
        n = 0
        with bpe.serial_tokenizers(), open(out, "wb") as f:
            for path in files:
                text = open(path, encoding="utf-8").read()
                ids = tok.encode(text, add_special_tokens=False).ids
                ids.append(eod)
                f.write(np.array(ids, dtype=np.uint16).tobytes())
                n += len(text.encode("utf-8"))
        return n
    return run


def peer_tiktoken(files: List[str], tok_path: str, out: str):
    """tiktoken with the same merges (ranks from our vocabulary); None when not installed."""
    try:
        import tiktoken
    except ImportError:
        return None
    raw = json.load(open(tok_path))
    byte_of = {c: b for b, c in byte_level_alphabet().items()}
    ranks = {bytes(byte_of[c] for c in tokstr): i for tokstr, i in raw["model"]["vocab"].items()
             if tokstr != bpe.EOD_TOKEN}
    enc = tiktoken.Encoding("bench", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={})

    def run() -> int:
        n = 0
        with open(out, "wb") as f:
            for path in files:
                text = open(path, encoding="utf-8").read()
                ids = enc.encode_ordinary(text)
                ids.append(0)
                f.write(np.array(ids, dtype=np.uint16).tobytes())
                n += len(text.encode("utf-8"))
        return n
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=8.0, help="MB of stdlib text")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench_tokenizer_")
    try:
        corpus = os.path.join(work, "corpus")
        os.makedirs(corpus)
        files = make_corpus(corpus, args.mb)
        tok_path = os.path.join(work, "tokenizer.json")
        docs = (d for d, _ in read_documents(files))
        bpe.train_tokenizer(docs, args.vocab_size).save(tok_path)
        variants = {
            ONE: ours(corpus, f"{work}/o1", tok_path, 1, args.seq_len),
            TWO: ours(corpus, f"{work}/o2", tok_path, 2, args.seq_len),
            ENCODE: ours_encode_only(corpus, tok_path, args.seq_len),
            "pretrain-data, tokenizers engine": ours(corpus, f"{work}/o3", tok_path, 1,
                                                     args.seq_len, encoder="tokenizers"),
            HF_PEER: peer_hf(files, tok_path, os.path.join(work, "peer.bin")),
        }
        tt = peer_tiktoken(files, tok_path, os.path.join(work, "tt.bin"))
        if tt is not None:
            variants[TIKTOKEN_PEER] = tt
        runs: Dict[str, List[Tuple[float, float, int]]] = {k: [] for k in variants}
        for rep in range(args.reps + 1):  # round 0 is the warm-up
            for name, fn in variants.items():
                r = timed(fn)
                if rep:
                    runs[name].append(r)
        report(runs, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


ONE, TWO, ENCODE = "pretrain-data, 1 worker", "pretrain-data, 2 workers", "  encode only, 1 worker"
HF_PEER, TIKTOKEN_PEER = "peer: HF tokenizers per doc", "peer: tiktoken per doc"


def paired(runs: Dict[str, List[Tuple[float, float, int]]], a: str, b: str,
           wall: bool = False) -> Tuple[float, float, float]:
    """(median, min, max) over rounds of a's MB/s over b's MB/s in the same round: the machine's
    speed drifts from round to round, a ratio within a round does not."""
    def rate(r: Tuple[float, float, int]) -> float:
        return r[2] / (r[0] if wall else r[1])

    ratios = [rate(x) / rate(y) for x, y in zip(runs[a], runs[b])]
    return statistics.median(ratios), min(ratios), max(ratios)


def report(runs: Dict[str, List[Tuple[float, float, int]]], args) -> None:
    wall = {k: statistics.median(b / MB / w for w, _, b in v) for k, v in runs.items()}
    cpu = {k: statistics.median(b / MB / c for _, c, b in v) for k, v in runs.items()}
    print(f"\ntokenize + shard writing, {args.mb:g} MB of stdlib source, vocab {args.vocab_size}, "
          f"seq_len {args.seq_len}, median of {args.reps} (interleaved, warm-up dropped), "
          f"{os.cpu_count()} cores\n")
    print(f"| {'variant':32s} | wall MB/s | CPU MB/s (per core) | vs HF peer (CPU, paired) |")
    print(f"| {'-' * 32} | --------: | ------------------: | ------------------------ |")
    for k in runs:
        m, lo, hi = paired(runs, k, HF_PEER)
        print(f"| {k:32s} | {wall[k]:9.2f} | {cpu[k]:19.2f} | "
              f"{f'{m:.2f}x [{lo:.2f}-{hi:.2f}]':24s} |")
    eff = paired(runs, TWO, ONE, wall=True)
    print(f"\nparallel efficiency, 1 -> 2 workers (wall): {eff[0] / 2:.0%} "
          f"[{eff[1] / 2:.0%}-{eff[2] / 2:.0%}]")
    over = paired(runs, ONE, ENCODE)
    print(f"shard writing overhead (CPU, 1 worker vs encode only): {1 - over[0]:.1%} "
          f"[{1 - over[2]:.1%}-{1 - over[1]:.1%}]")
    if TIKTOKEN_PEER in runs:
        m, lo, hi = paired(runs, ONE, TIKTOKEN_PEER)
        print(f"per core vs tiktoken (CPU, paired by round): {m:.2f}x [{lo:.2f}-{hi:.2f}]")


if __name__ == "__main__":
    main()
