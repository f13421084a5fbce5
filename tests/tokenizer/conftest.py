"""A small real corpus (Python standard library source, ~450 KB) and datasets built from it once."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

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
