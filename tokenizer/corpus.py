"""Find the input files and stream their documents, in a deterministic order.

A plain text file is one document. A JSONL file (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) holds one
JSON object per line; its `text_field` is one document. Files are read one at a time and JSONL
line by line, so memory stays at one file (text) or one line (JSONL), whatever the corpus size.

A truncated or corrupt JSONL file is a DataError naming it, never a shorter corpus: a compressed
stream must reach its end-of-stream marker (gzip checks this itself; zstandard's stream reader
stops silently inside a cut frame, so zstd frames are decoded here), and a last line without a
newline that is not JSON is a cut line. Progress is counted in input file bytes read (compressed
bytes for compressed files), against their sizes on disk: exact, whatever the compression ratio.
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
_READ_CHUNK = 1 << 18  # compressed bytes per read of a .zst file


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


def input_bytes(files: Sequence[str]) -> int:
    """The files' size on disk: what `CorpusStats.read_bytes` reaches once all are read."""
    return sum(os.path.getsize(f) for f in files)


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
    read_bytes: int = 0  # bytes of the input files read so far (compressed bytes where compressed)
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
    stats.read_bytes += len(data)
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


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame of `raw`, in order. Input that ends inside a
    frame raises EOFError (zstandard's stream_reader returns what it decoded and stops); a bad
    frame or content checksum raises ZstdError."""

    def __init__(self, raw: io.RawIOBase):
        super().__init__()
        self._raw, self._dctx = raw, zstandard.ZstdDecompressor()
        self._frame = None  # the decompressobj of the frame being read; None between frames
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            data = self._raw.read(_READ_CHUNK)
            if not data:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._pos = self._decode(data), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decode(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            data, self._frame = self._frame.unused_data, None
        return b"".join(out)


def _open_jsonl(path: str, raw: io.RawIOBase) -> io.BufferedIOBase:
    """The decompressed bytes of `path`, opened unbuffered as `raw` (whose position is then the
    count of file bytes read)."""
    if path.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # EOFError at a cut, BadGzipFile on a bad CRC
    if path.lower().endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(raw), _READ_CHUNK)
    return io.BufferedReader(raw)


def _jsonl_documents(path: str, field: str, stats: CorpusStats,
                     warn: bool) -> Iterator[Tuple[str, int]]:
    lines = missing = found = bad = 0
    first_keys: List[str] = []
    start = stats.read_bytes
    try:
        with open(path, "rb", buffering=0) as raw, _open_jsonl(path, raw) as f:
            for line in f:
                if not line.strip():
                    continue
                lines += 1
                try:
                    obj = json.loads(line)
                except ValueError:  # JSONDecodeError and UnicodeDecodeError
                    if not line.endswith(b"\n"):  # only the last line can lack one
                        raise DataError(f"{path}: the last line is cut off (no newline at the end, "
                                        "not JSON): the file is truncated; replace or remove "
                                        "it") from None
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
                    stats.read_bytes = start + raw.tell()
                    yield text, n
            stats.read_bytes = start + raw.tell()
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
