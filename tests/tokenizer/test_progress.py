"""The tokenizing pass's progress: exact fractions, plain lines for logs, never a failed job."""

import io
import logging

from tokenizer.progress import MB, Progress


class BrokenPipe(io.StringIO):
    """stderr piped into a reader that has gone (`pretrain-data ... 2>&1 | head`)."""

    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "tokenizer.progress"]


def test_plain_lines_every_tenth_and_every_interval(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    p = Progress(100 * MB, interactive=False, every_s=60, clock=clock)
    for read in range(0, 101, 5):  # a line at each 10%, none between
        clock.now += 1
        p.update(read * MB, 4 * read * MB, 1000 * read)
    got = lines(caplog)
    assert [m.split("%")[0].split()[-1] for m in got] == [str(x) for x in range(10, 101, 10)]
    assert "of 100.0 MB input read, 400.0 MB text" in got[-1] and "tokens/s" in got[-1]
    caplog.clear()
    slow = Progress(100 * MB, interactive=False, every_s=60, clock=clock)
    for _ in range(3):  # a long stretch without 10% still logs once an interval
        clock.now += 61
        slow.update(MB, MB, 1)
    assert len(lines(caplog)) == 3 and " 1% of 100.0 MB" in lines(caplog)[0]


def test_fraction_is_bounded_and_the_nearer_limit_counts():
    p = Progress(10 * MB, max_text_bytes=40 * MB, interactive=False)
    assert p.fraction(5 * MB, 10 * MB) == 0.5
    assert p.fraction(5 * MB, 30 * MB) == 0.75  # --max-input-mb ends the pass first
    assert p.fraction(12 * MB, 0) == 1.0  # a file that grew while read
    assert Progress(0, interactive=False).fraction(0, 0) == 1.0  # empty files


def test_a_bar_past_its_total_or_on_a_broken_stream_never_raises(caplog):
    out = io.StringIO()
    bar = Progress(MB, interactive=True, file=out)
    bar.update(3 * MB, 20 * MB, 10)  # more read than the total: the old bar's format failed here
    bar.close()
    assert "tokenizing" in out.getvalue() and "20.0 MB text" in out.getvalue()
    bar = Progress(MB, interactive=True, file=BrokenPipe())
    bar.update(MB // 2, MB, 10)
    bar.update(MB, 2 * MB, 20)
    bar.close()
    assert [r.getMessage() for r in caplog.records] == [
        "progress display off after an error in it (BrokenPipeError: [Errno 32] Broken pipe); "
        "the job goes on"]
