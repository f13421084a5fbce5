"""Find the input files and stream their documents, in a deterministic order.

A plain text file is one document. A JSONL file (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) holds one
JSON object per line; its `text_field` is one document. Files are read one at a time and JSONL
line by line, so memory stays at one file (text) or one line (JSONL), whatever the corpus size.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import zstandard

from pretrain.errors import DataError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp",
    ".java", ".js", ".ts", ".go", ".rs", ".rb", ".sh", ".html", ".htm", ".css", ".xml",
    ".toml", ".yaml", ".yml", ".cfg", ".ini", ".csv", ".tsv",
})
# Rough text / file size ratios, only to spread the tokenizer's training sample over the corpus.
_COMPRESSION = {".jsonl.gz": 3.0, ".jsonl.zst": 4.0}


def kind_of(path: str) -> Optional[str]:
    """'jsonl', 'text', or None for a file we do not read."""
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if os.path.splitext(name)[1] in TEXT_SUFFIXES:
        return "text"
    return None


def discover(inputs: Sequence[str], exclude: Optional[str] = None) -> List[str]:
    """The files to read: each input in the order given, a directory's files (recursively,
    skipping hidden entries and `exclude`) in sorted path order, each file once."""
    if not inputs:
        raise DataError("no input: pass --input PATH (a directory, text file or .jsonl[.gz|.zst])")
    excluded = os.path.abspath(exclude) if exclude else None
    files: List[str] = []
    for given in inputs:
        path = os.path.abspath(given)
        if os.path.isdir(path):
            found = _walk(path, excluded)
            if not found:
                raise DataError(f"{given}: no readable files (extensions: .jsonl[.gz|.zst], "
                                f"{', '.join(sorted(TEXT_SUFFIXES))}); point --input at your "
                                "corpus")
            files += found
        elif os.path.isfile(path):
            if kind_of(path) is None:
                raise DataError(f"{given}: unknown file type; give a text file "
                                f"({', '.join(sorted(TEXT_SUFFIXES))}) or .jsonl/.jsonl.gz/"
                                ".jsonl.zst, or rename it")
            files.append(path)
        else:
            raise DataError(f"{given}: no such file or directory; check --input")
    seen = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _walk(root: str, excluded: Optional[str]) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked directories
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and os.path.join(dirpath, d) != excluded]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not name.startswith(".") and kind_of(path) and os.path.isfile(path):
                found.append(path)
    return sorted(found)


def estimated_text_bytes(files: Sequence[str]) -> int:
    """A guess at the corpus's text size from file sizes (compressed files scaled up)."""
    total = 0.0
    for f in files:
        suffix = next((s for s in _COMPRESSION if f.lower().endswith(s)), None)
        total += os.path.getsize(f) * _COMPRESSION.get(suffix, 1.0)
    return int(total)


def doc_hash(data: bytes, seed: int) -> Tuple[float, float]:
    """Two independent uniform numbers in [0, 1) that are a function of the document and seed:
    the first chooses the split, the second the tokenizer's training sample."""
    d = hashlib.blake2b(data, digest_size=16, key=str(seed).encode()).digest()
    scale = 2.0 ** -64
    return int.from_bytes(d[:8], "little") * scale, int.from_bytes(d[8:], "little") * scale


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents read
    skipped_files: int = 0  # not valid UTF-8
    skipped_lines: int = 0  # JSONL lines that are not JSON, not UTF-8, or lack a string text field
    truncated: bool = False  # stopped at max_bytes


def read_documents(files: Sequence[str], text_field: str = "text",
                   max_bytes: Optional[int] = None, stats: Optional[CorpusStats] = None,
                   warn: bool = True) -> Iterator[Tuple[str, int]]:
    """Yield (document, its UTF-8 byte count) from `files` in order; stop once `max_bytes` of
    text have been read (the document that crosses the limit is the last)."""
    stats = stats if stats is not None else CorpusStats()
    for path in files:
        if max_bytes is not None and stats.bytes >= max_bytes:
            stats.truncated = True
            return
        stats.files += 1
        docs = _jsonl_documents(path, text_field, stats, warn) if kind_of(path) == "jsonl" \
            else _text_document(path, stats, warn)
        for doc, n in docs:
            stats.documents += 1
            stats.bytes += n
            yield doc, n
            if max_bytes is not None and stats.bytes >= max_bytes:
                stats.truncated = True
                return


def _text_document(path: str, stats: CorpusStats, warn: bool) -> Iterator[Tuple[str, int]]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        doc = data.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.skipped_files += 1
        if warn:
            log.warning("skipping %s: not valid UTF-8 (%s); %d files skipped so far",
                        path, e.reason, stats.skipped_files)
        return
    if doc:
        yield doc, len(data)


def _open_jsonl(path: str) -> io.BufferedIOBase:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    if path.lower().endswith(".zst"):
        reader = zstandard.ZstdDecompressor().stream_reader(
            open(path, "rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def _jsonl_documents(path: str, field: str, stats: CorpusStats,
                     warn: bool) -> Iterator[Tuple[str, int]]:
    lines = missing = found = bad = 0
    first_keys: List[str] = []
    try:
        with _open_jsonl(path) as f:
            for line in f:
                if not line.strip():
                    continue
                lines += 1
                try:
                    obj = json.loads(line)
                except ValueError:  # JSONDecodeError and UnicodeDecodeError
                    bad += 1
                    continue
                text = obj.get(field) if isinstance(obj, dict) else None
                if lines == 1 and isinstance(obj, dict):
                    first_keys = sorted(obj)[:10]
                if not isinstance(text, str):
                    missing += 1
                    continue
                try:
                    n = len(text.encode("utf-8"))
                except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
                    bad += 1
                    continue
                found += 1
                if text:
                    yield text, n
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is corrupt or truncated, replace "
                        "or remove it") from e
    if lines and not found:
        raise DataError(f"{path}: no line has a string field '{field}' (first line's keys: "
                        f"{first_keys}); pass --text-field NAME")
    stats.skipped_lines += missing + bad
    if warn and missing + bad:
        log.warning("%s: skipped %d of %d lines (%d not JSON/UTF-8, %d without a string '%s')",
                    path, missing + bad, lines, bad, missing, field)
