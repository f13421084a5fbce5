"""Progress of the tokenizing pass: a bar on a terminal, plain log lines in a batch job's log.

The fraction done is exact: input file bytes read (compressed bytes for compressed files) over
the files' sizes on disk, or text read over --max-input-mb when that is nearer its end. Showing
progress must never fail a job: a display error turns the display off with one warning.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Callable, Optional, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

MB = 1 << 20


class Progress:
    def __init__(self, total_bytes: int, max_text_bytes: Optional[int] = None,
                 enabled: bool = True, interactive: Optional[bool] = None,
                 every_s: float = 60.0, every_fraction: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, file: Optional[TextIO] = None):
        """`total_bytes`: the input files' size. `interactive`: a bar on `file` (stderr), else
        plain log lines, every `every_fraction` of the work and at least every `every_s`; None:
        a bar when stderr is a terminal."""
        self.total, self.max_text = max(int(total_bytes), 0), max_text_bytes
        self.every_s, self.every_fraction, self.clock = every_s, every_fraction, clock
        self.start = self.last_line = clock()
        self.marks = 0  # whole `every_fraction`s done at the last line
        self.enabled = enabled
        self._bar = None
        if enabled and (sys.stderr.isatty() if interactive is None else interactive):
            self._guarded(lambda: setattr(self, "_bar", tqdm(
                total=self.total, desc="tokenizing", unit="B", unit_scale=True, unit_divisor=1024,
                mininterval=1.0, dynamic_ncols=True, file=file)))

    def fraction(self, read_bytes: int, text_bytes: int) -> float:
        """Of the pass done, in [0, 1]; the pass ends at whichever of the two limits comes first."""
        done = read_bytes / self.total if self.total else 1.0
        if self.max_text:
            done = max(done, text_bytes / self.max_text)
        return min(max(done, 0.0), 1.0)

    def update(self, read_bytes: int, text_bytes: int, tokens: int) -> None:
        self._guarded(lambda: self._show(self.fraction(read_bytes, text_bytes), text_bytes, tokens))

    def close(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            self._guarded(bar.close)

    def _guarded(self, show: Callable[[], None]) -> None:
        if not self.enabled:
            return
        try:
            show()
        except Exception as e:  # a display, whatever fails in it, is not worth the job
            self.enabled, self._bar = False, None
            log.warning("progress display off after an error in it (%s: %s); the job goes on",
                        type(e).__name__, e)

    def _show(self, done: float, text_bytes: int, tokens: int) -> None:
        now = self.clock()
        elapsed = max(now - self.start, 1e-9)
        rates = (f"{text_bytes / MB:.1f} MB text, {text_bytes / MB / elapsed:.2f} MB/s, "
                 f"{tokens / elapsed:,.0f} tokens/s")
        if self._bar is not None:
            self._bar.set_postfix_str(rates, refresh=False)
            self._bar.update(int(done * self.total) - self._bar.n)
            return
        marks = math.floor(round(done / self.every_fraction, 9))
        if marks <= self.marks and now - self.last_line < self.every_s:
            return
        self.marks, self.last_line = marks, now
        eta = tqdm.format_interval(elapsed * (1 - done) / done) if done > 0 else "?"
        log.info("tokenizing: %3.0f%% of %.1f MB input read, %s, elapsed %s, eta %s", 100 * done,
                 self.total / MB, rates, tqdm.format_interval(elapsed), eta)
