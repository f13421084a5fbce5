"""pretrain-report: plots and a summary from metrics.jsonl; a resumed run's replayed steps count
once; no metrics is a clear error (exit 2). The report of a real run is in test_tracking.py."""

import json
import math
from pathlib import Path

import pytest

from launch.report import main as report_main
from pretrain.report import ReportError, load_metrics, make_report


def step_record(step: int, loss: float, **extra) -> dict:
    r = {"step": step, "tokens_seen": 100 * step, "loss": loss, "ppl": math.exp(loss),
         "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0, "tokens_per_s_per_device": 500.0,
         "tflops_per_device": 0.1, "mfu": None, "step_time": 0.1, "data_time": 0.01,
         "compute_time": 0.09, "fwd_bwd_time": None, "optimizer_time": None,
         "peak_memory_gb": 1.0, "elapsed_s": 0.1 * step, "time": 1000.0 + step}
    r.update(extra)
    return r


def write(run: Path, records: list, tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run


def test_resumed_run_counts_each_step_once(tmp_path):
    # Job 1 logged steps 1-5 and checkpointed at 4; job 2 resumed at 4 and logged 5 again.
    records = ([{"event": "start", "step": 0, "time": 1000.0}]
               + [step_record(s, 5.0 - 0.1 * s) for s in range(1, 6)]
               + [{"step": 4, "tokens_seen": 400, "val_loss": 4.7, "val_ppl": math.exp(4.7)}]
               + [{"event": "start", "step": 4, "time": 2000.0}]
               + [step_record(s, 4.0 - 0.1 * s, mfu=0.25, time=2000.0 + s) for s in range(5, 8)])
    run = write(tmp_path / "run", records, tail='{"step": 8, "loss": 3.')  # cut short by a crash
    m = load_metrics(run)
    assert [r["step"] for r in m.train] == list(range(1, 8)) and m.train[4]["loss"] == 3.5
    assert len(m.starts) == 2 and m.bad_lines == 1

    report = make_report(run)
    assert [p.name for p in report["files"]] == ["report.png", "summary.txt"]
    assert (run / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"
    text = (run / "report" / "summary.txt").read_text()
    assert text == report["summary"]
    for line in ("steps        1..7 logged, 2 job(s)", "tokens       700",
                 "loss         first 4.9000  last 3.3000  min 3.3000 (step 7)",
                 "val loss     4.7000 (step 4", "MFU          25.0% (median)",
                 "wall time    0h16m47s", "checkpoints  none", "skipped      1 unreadable line"):
        assert line in text, (line, text)


@pytest.mark.parametrize("content", [None, "", "\n", '{"event": "start", "step": 0}\n'])
def test_no_metrics_is_a_clear_error(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(ReportError, match="metrics.jsonl"):
        make_report(run)
    with pytest.raises(SystemExit) as e:
        report_main([str(run)])
    assert e.value.code == 2 and "error: ReportError" in capsys.readouterr().err
    assert not (run / "report").exists()
