import gzip
import re

import pytest
import zstandard

from pretrain.errors import DataError
from tests.tokenizer.conftest import write_jsonl
from tokenizer.corpus import CorpusStats, discover, doc_hash, input_bytes, read_documents


def test_discover_walks_sorted_and_skips_hidden_unknown_and_excluded(tmp_path):
    for rel in ["b/z.py", "b/a.md", "a.txt", ".hidden/x.txt", "b/.x.txt", "c.bin", "out/t.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    found = discover([str(tmp_path)], exclude=str(tmp_path / "out"))
    assert [p[len(str(tmp_path)) + 1:] for p in found] == ["a.txt", "b/a.md", "b/z.py"]


def test_discover_keeps_input_order_and_drops_duplicates(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    found = discover([str(tmp_path / "b.txt"), str(tmp_path), str(tmp_path / "a.txt")])
    assert found == [str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]


@pytest.mark.parametrize("name, match", [("data.parquet", "unknown file type"),
                                         ("missing.txt", "no such file")])
def test_discover_rejects_bad_explicit_inputs(tmp_path, name, match):
    if name != "missing.txt":
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(DataError, match=match):
        discover([str(tmp_path / name)])


def test_discover_rejects_a_directory_without_text(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="no readable files"):
        discover([str(tmp_path)])


def test_invalid_utf8_files_are_skipped_and_counted(corpus_dir):
    stats = CorpusStats()
    docs = [d for d, _ in read_documents(discover([str(corpus_dir)]), stats=stats)]
    assert stats.skipped_files == 1
    assert stats.documents == len(docs) and stats.bytes == sum(len(d.encode()) for d in docs)
    assert not any("caf" in d and "br" in d for d in docs if len(d) < 40)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_inputs_give_their_text_field(tmp_path, suffix):
    rows = [{"text": "first doc\n", "id": 1}, {"body": "no text"}, {"text": "caf\u00e9 \U0001F600"},
            {"text": 5}]
    path = write_jsonl(tmp_path / f"data{suffix}", rows)
    stats = CorpusStats()
    docs = [d for d, _ in read_documents([str(path)], stats=stats)]
    assert docs == ["first doc\n", "caf\u00e9 \U0001F600"]
    assert stats.skipped_lines == 2


def test_jsonl_bad_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\nnot json\n{"text": "\\ud800 lone surrogate"}\n'
                     b'{"text": "bad \xff utf8"}\n\n')
    stats = CorpusStats()
    assert [d for d, _ in read_documents([str(path)], stats=stats)] == ["ok"]
    assert stats.skipped_lines == 3


def test_jsonl_without_the_text_field_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "a"}, {"content": "b"}])
    with pytest.raises(DataError, match="--text-field"):
        list(read_documents([str(path)]))
    assert [d for d, _ in read_documents([str(path)], text_field="content")] == ["a", "b"]


def test_corrupt_compressed_jsonl_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-30])
    with pytest.raises(DataError, match="corrupt or truncated"):
        list(read_documents([str(path)]))


def test_read_bytes_count_compressed_input_exactly(compressed_corpus, stdlib_modules):
    files = discover([str(compressed_corpus)])
    total, stats, seen = input_bytes(files), CorpusStats(), []
    for _ in read_documents(files, stats=stats):
        seen.append(stats.read_bytes)
    assert len(files) == 9 and seen == sorted(seen) and seen[-1] <= total
    assert stats.read_bytes == total  # every byte of every file, none counted twice
    assert stats.bytes > 4 * total  # the text is over 4x its files: a guess of 3x was passed
    distinct = sum(1 for t in stdlib_modules[::2] if t)
    assert stats.documents == distinct + 3 * sum(1 for i, t in enumerate(stdlib_modules)
                                                 if t and i % 12 in (1, 5, 9))


def _damaged(src, dst, keep=None, flip=None):
    data = bytearray(src.read_bytes())
    if flip is not None:
        data[flip] ^= 0xFF
    dst.write_bytes(bytes(data[:keep]))
    return dst


# Where each cut lands: mid-stream, and in the last bytes (gzip's CRC/size trailer; zstd's last
# block) where zstandard's stream_reader used to return what it had and stop without an error.
@pytest.mark.parametrize("name, keep", [("code-0.jsonl.gz", 0.5), ("code-0.jsonl.gz", -4),
                                        ("crawl-0.jsonl.zst", 0.5), ("crawl-0.jsonl.zst", -3),
                                        ("crawl-0.jsonl.zst", 0.999)])
def test_a_truncated_compressed_file_is_an_error_naming_it(compressed_corpus, tmp_path, name,
                                                           keep):
    src = compressed_corpus / name
    size = src.stat().st_size
    bad = _damaged(src, tmp_path / name, keep=int(size * keep) if keep > 0 else size + keep)
    good = str(compressed_corpus / "code-1.jsonl.gz")
    with pytest.raises(DataError, match=re.escape(str(bad)) + ": cannot read .*truncated"):
        list(read_documents([good, str(bad)]))


def test_a_truncated_plain_jsonl_is_an_error_naming_it(compressed_corpus, tmp_path):
    text = gzip.decompress((compressed_corpus / "code-0.jsonl.gz").read_bytes())
    bad = tmp_path / "cut.jsonl"
    bad.write_bytes(text[:len(text) // 2])
    assert bad.read_bytes().count(b"\n") > 3
    with pytest.raises(DataError, match=re.escape(str(bad)) + ": the last line is cut off"):
        list(read_documents([str(bad)]))
    bad.write_bytes(text[:text.rindex(b"\n", 0, len(text) // 2) + 1] + b'{"text": "last"}')
    assert [d for d, _ in read_documents([str(bad)])][-1] == "last"  # JSON without a newline


def test_corrupt_compressed_files_are_errors(compressed_corpus, tmp_path):
    gz = _damaged(compressed_corpus / "code-0.jsonl.gz", tmp_path / "flip.jsonl.gz", flip=5000)
    data = b'{"text": "a line of text"}\n' * 20000
    zst = tmp_path / "sum.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    zst = _damaged(zst, zst, flip=-1)  # the content checksum
    for bad in (gz, zst):
        with pytest.raises(DataError, match=re.escape(str(bad)) + ": cannot read"):
            list(read_documents([str(bad)]))


def test_zst_frames_are_read_across_and_a_cut_in_the_last_is_an_error(tmp_path):
    rows = [[{"text": f"frame {f} doc {i}"} for i in range(3000)] for f in range(3)]
    frames = [write_jsonl(tmp_path / f"{f}.jsonl.zst", r).read_bytes() for f, r in enumerate(rows)]
    path = tmp_path / "all.jsonl.zst"
    path.write_bytes(b"".join(frames))
    assert [d for d, _ in read_documents([str(path)])] == [r["text"] for f in rows for r in f]
    path.write_bytes(b"".join(frames)[:-len(frames[-1]) // 2])
    with pytest.raises(DataError, match="ends inside a zstd frame"):
        list(read_documents([str(path)]))


def test_max_bytes_stops_after_the_crossing_document(tmp_path):
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text("x" * 100)
    stats = CorpusStats()
    docs = list(read_documents([str(f) for f in files], max_bytes=250, stats=stats))
    assert len(docs) == 3 and stats.truncated and stats.bytes == 300


def test_doc_hash_is_deterministic_and_seeded():
    a = doc_hash(b"some document", 1)
    assert a == doc_hash(b"some document", 1) != doc_hash(b"some document", 2)
    assert all(0 <= u < 1 for u in a)
