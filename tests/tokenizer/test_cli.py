"""The console entry `pretrain-data` (launch/data.py): arguments in, one-line errors out."""

import pytest

from launch.data import main
from pretrain.data.manifest import Manifest


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
