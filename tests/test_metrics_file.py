"""metrics.jsonl across jobs that were killed mid-write: the cut line stays a line of its own
(the next job's Tracker ends it), and the one reader (pretrain.tracking.read_metrics, used by
pretrain-report and pretrain-verify) skips it and counts it, wherever it is."""

import json

from launch.verify import losses
from pretrain.config import LoggerConfig
from pretrain.tracking import METRICS_FILE, Tracker, read_metrics

CUT = '{"step": 3, "tokens_seen": 300, "lo'  # a record cut short by a kill


def test_cut_lines_are_skipped_and_counted_wherever_they_are(tmp_path):
    lines = [json.dumps({"step": 1, "loss": 2.0}), CUT, "", json.dumps({"step": 2, "loss": 1.5}),
             "[1, 2]", CUT]  # not a record either: a list
    (tmp_path / METRICS_FILE).write_text("\n".join(lines))
    records, bad = read_metrics(tmp_path)
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}] and bad == 3


def test_the_next_job_starts_a_new_line_after_a_cut_one(tmp_path):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"step": 2, "loss": 1.5}) + "\n" + CUT)
    tracker = Tracker(tmp_path, LoggerConfig(mode="disabled"), {})
    tracker.start(step=2, tokens_seen=200)
    tracker.log({"step": 3, "tokens_seen": 300, "loss": 1.25})
    tracker.close()
    records, bad = read_metrics(tmp_path)
    assert bad == 1
    assert [r.get("event", r.get("loss")) for r in records] == [1.5, "start", 1.25]


def test_a_complete_file_is_appended_to_as_is(tmp_path):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    tracker = Tracker(tmp_path, LoggerConfig(mode="disabled"), {})
    tracker.log({"step": 2, "tokens_seen": 200, "loss": 1.5})
    tracker.close()
    assert (tmp_path / METRICS_FILE).read_text().count("\n") == 2  # no blank line between


def test_verify_reads_losses_past_a_cut_line(tmp_path):
    assert losses(tmp_path) == {}  # no file yet: no losses
    (tmp_path / METRICS_FILE).write_text("\n".join([
        json.dumps({"step": 1, "loss": 2.0}), CUT, json.dumps({"step": 1, "loss": 1.75}),
        json.dumps({"step": 2, "val_loss": 1.9})]))
    assert losses(tmp_path) == {1: 1.75}  # the last record of a step wins; val has no loss
