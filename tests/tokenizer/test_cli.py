"""The console entry `pretrain-data` (launch/data.py): arguments in, one-line errors out."""

import gzip
import os
import re
import subprocess
import sys

import pytest
import zstandard

from launch.data import main
from pretrain.data.manifest import Manifest
from tests.launch_helpers import REPO, cpu_env


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr()


def test_cli_writes_a_dataset(corpus_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    main(["--input", str(corpus_dir / "json"), "--input", str(corpus_dir / "fractions.py"),
          "--output", str(out), "--vocab-size", "300", "--seq-len", "16", "--workers", "1",
          "--val-fraction", "0.2", "--shard-size-mb", "0.01", "--seed", "3"])
    m = Manifest.load(out)
    assert m.seq_len == 16 and m.split("train").samples > 0
    assert m.source["inputs"][1].endswith("fractions.py")
    assert "pretrain-data: train" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--input", "/nonexistent/corpus"], "no such file or directory"),
    (["--seq-len", "0"], "--seq-len"),
])
def test_cli_errors_are_one_line_and_exit_2(corpus_dir, tmp_path, capsys, argv, message):
    argv = argv if "--input" in argv else ["--input", str(corpus_dir)] + argv
    code, out = run(argv + ["--output", str(tmp_path / "ds")], capsys)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and lines[0].startswith("error:")


def test_cli_refuses_an_existing_dataset(corpus_dir, tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text("{}")
    code, out = run(["--input", str(corpus_dir), "--output", str(tmp_path / "ds")], capsys)
    assert code == 2 and "--overwrite" in out.err


def test_cli_unknown_explicit_extension(tmp_path, capsys):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    code, out = run(["--input", str(tmp_path / "data.parquet"), "--output", str(tmp_path / "o")],
                    capsys)
    assert code == 2 and "unknown file type" in out.err


def test_cli_in_a_batch_job_builds_a_compressed_corpus_with_plain_progress(
        stdlib_jsonl_gz, stdlib_modules, dataset, tmp_path):
    text = gzip.decompress(stdlib_jsonl_gz.read_bytes())
    assert len(text) > 4 * 2**20 and len(text) > 4 * stdlib_jsonl_gz.stat().st_size
    out = tmp_path / "ds"
    tok = os.path.join(dataset[0].output, "tokenizer.json")
    done = subprocess.run(  # stderr is a pipe, as in a batch job's log
        [sys.executable, "-m", "launch.data", "--input", str(stdlib_jsonl_gz), "--output",
         str(out), "--tokenizer", tok, "--seq-len", "64", "--workers", "1"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = re.findall(r"tokenizing: +(\d+)% of 1\.\d MB input read, [\d.]+ MB text", done.stderr)
    assert len(lines) >= 3 and lines[-1] == "100" and "\r" not in done.stderr
    assert Manifest.load(out).source["bytes"] == sum(len(t.encode()) for t in stdlib_modules)


def _cut(data: bytes, suffix: str) -> bytes:
    if suffix == ".jsonl":
        return data[:data.index(b"\n", len(data) // 2) - 10]  # mid-line
    if suffix == ".jsonl.zst":
        return zstandard.ZstdCompressor().compress(data)[:-3]
    return gzip.compress(data, mtime=0)[:-3000]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_cli_truncated_input_fails_naming_it_and_writes_no_dataset(stdlib_jsonl_gz, tmp_path,
                                                                  capsys, suffix):
    text = gzip.decompress(stdlib_jsonl_gz.read_bytes())
    text = text[:text.index(b"\n", 2**20) + 1]  # whole lines: only the file is cut
    bad = tmp_path / f"cut{suffix}"
    bad.write_bytes(_cut(text, suffix))
    out = tmp_path / "ds"
    code, got = run(["--input", str(bad), "--output", str(out), "--vocab-size", "300",
                     "--seq-len", "64", "--workers", "1"], capsys)
    lines = got.err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"error: DataError: {bad}: ")
    assert "truncated" in lines[-1]
    assert not (out / "manifest.json").exists() and os.listdir(out) == []
