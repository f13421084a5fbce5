import gzip
import json

import pytest
import zstandard

from pretrain.errors import DataError
from tokenizer.corpus import CorpusStats, discover, doc_hash, read_documents


def write_jsonl(path, rows):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


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
