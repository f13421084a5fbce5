"""Real corpora from the Python standard library, built once: a small mixed one (~450 KB of
source) and compressed JSONL as corpora ship (~6 MB of text at 4-11x), and a dataset."""

from __future__ import annotations

import gzip
import json
import shutil
import sysconfig
from pathlib import Path
from typing import List

import pytest
import zstandard

from tokenizer import PrepareConfig, prepare

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Real files with non-ASCII text (fractions, statistics: a few characters; big5-utf8: Chinese).
EXTRA = ["fractions.py", "statistics.py", "zipfile.py", "test/cjkencodings/big5-utf8.txt"]
LATIN1 = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1")  # not UTF-8: skipped
LITERAL_EOD = "text that mentions <|endoftext|> as plain characters\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """email/*.py and json/*.py (in subdirectories), a few non-ASCII files, one latin-1 file."""
    root = tmp_path_factory.mktemp("corpus")
    for package in ("email", "json"):
        (root / package).mkdir()
        for f in sorted((STDLIB / package).glob("*.py")):
            shutil.copy(f, root / package / f.name)
    for name in EXTRA:
        if (STDLIB / name).exists():  # some distributions ship without the test package
            shutil.copy(STDLIB / name, root / Path(name).name)
    (root / "latin1.txt").write_bytes(LATIN1)
    (root / "literal_eod.md").write_text(LITERAL_EOD, encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\x01binary")
    return root


def small_config(inputs, output, **overrides) -> PrepareConfig:
    kwargs = dict(inputs=[str(i) for i in inputs], output=str(output), vocab_size=1024, seq_len=64,
                  val_fraction=0.1, shard_size_mb=0.05, workers=1, progress=False, seed=7)
    kwargs.update(overrides)
    return PrepareConfig(**kwargs)


@pytest.fixture(scope="session")
def dataset(corpus_dir, tmp_path_factory):
    """(config, result) of pretrain-data on the corpus with one worker."""
    cfg = small_config([corpus_dir], tmp_path_factory.mktemp("ds") / "out")
    return cfg, prepare(cfg)


def write_jsonl(path: Path, rows) -> Path:
    """`rows` (dicts) as JSONL, gzip- or zstd-compressed by the file's suffix."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def stdlib_modules() -> List[str]:
    """The source of every top-level stdlib module (about 170 files, 4.5 MB)."""
    return [f.read_text(encoding="utf-8", errors="replace") for f in sorted(STDLIB.glob("*.py"))]


@pytest.fixture(scope="session")
def compressed_corpus(tmp_path_factory, stdlib_modules) -> Path:
    """JSONL as real corpora ship it, 9 files, ~5.7 MB of text in ~0.9 MB: six `.jsonl.gz` of
    distinct modules (gzip ratio ~4.2x) and three `.jsonl.zst` whose modules each come three
    times under different headers, like a web crawl's near-duplicates (zstd ratio ~11x)."""
    root = tmp_path_factory.mktemp("compressed")
    for k in range(6):
        write_jsonl(root / f"code-{k}.jsonl.gz",
                    [{"text": t, "id": i} for i, t in enumerate(stdlib_modules[2 * k::12])])
    for k in range(3):
        write_jsonl(root / f"crawl-{k}.jsonl.zst",
                    [{"text": f"{head}\n{t}"} for t in stdlib_modules[4 * k + 1::12]
                     for head in ("", "# mirror a", "# mirror b")])
    return root


@pytest.fixture(scope="session")
def stdlib_jsonl_gz(tmp_path_factory, stdlib_modules) -> Path:
    """One .jsonl.gz of every module: ~4.7 MB of text at a gzip ratio of ~4.2x."""
    return write_jsonl(tmp_path_factory.mktemp("gz") / "stdlib.jsonl.gz",
                       [{"text": t} for t in stdlib_modules])
