"""Hangs end the job instead of holding it until the Slurm time limit.

Two guards, both armed once the first step has finished (start-up has its own, longer timeout,
parallel.init_timeout_min):
- every process group's collective timeout drops to parallel.timeout_min, so a collective whose
  peer is gone raises instead of waiting for ever;
- a thread that checks that steps keep finishing. When none has for trainer.watchdog_min, it
  writes every thread's Python stack to stderr and to RUN_DIR/stacks/rank<N>.txt and ends the
  process with EXIT_HANG. Every rank has its own watchdog, so the rank that is stuck and the ranks
  that wait for it all leave their stacks; the launcher (torchrun, srun --kill-on-bad-exit) then
  ends the job, and a restart (torchrun --max-restarts, a requeue) resumes from the latest
  checkpoint.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

from pretrain.trainer import Callback, StepOutput, Trainer

log = logging.getLogger("pretrain")

EXIT_HANG = 124  # what `timeout` returns: the job did not finish in time


class Watchdog(Callback):
    name = "watchdog"

    def __init__(self, limit_s: float, collective_timeout_s: float, stacks_dir: Path,
                 clock: Callable[[], float] = time.monotonic,
                 exit: Callable[[int], None] = os._exit, poll_s: float = 1.0):
        self.limit_s = limit_s  # 0: no watchdog thread (the collective timeout still applies)
        self.collective_timeout_s = collective_timeout_s
        self.stacks_dir = Path(stacks_dir)
        self.clock = clock
        self.exit = exit
        self.poll_s = poll_s
        self._last_beat: Optional[float] = None  # None: not armed yet
        self._last_step = 0
        self._rank = 0
        self._armed_timeout = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def on_train_start(self, trainer: Trainer) -> None:
        self._rank = trainer.dist.rank
        if self.limit_s:
            self._thread = threading.Thread(target=self._watch, name="pretrain-watchdog", daemon=True)
            self._thread.start()

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        if not self._armed_timeout:
            trainer.dist.set_collective_timeout(timedelta(seconds=self.collective_timeout_s))
            self._armed_timeout = True
        self._last_step = trainer.state.step
        self._last_beat = self.clock()

    def on_train_end(self, trainer: Trainer) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            beat = self._last_beat
            if beat is not None and self.clock() - beat > self.limit_s:
                self.fire()
                return

    def fire(self) -> None:
        """Dump every thread's stack (stderr and a file), then end the process."""
        idle = self.clock() - (self._last_beat or 0.0)
        msg = (f"watchdog: rank {self._rank} finished no step for {idle:.0f}s (limit "
               f"{self.limit_s:.0f}s, trainer.watchdog_min); last finished step {self._last_step}. "
               f"A rank is stuck or gone: dumping every thread's stack and exiting with {EXIT_HANG}")
        print(msg, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            self.stacks_dir.mkdir(parents=True, exist_ok=True)
            path = self.stacks_dir / f"rank{self._rank:05d}.txt"
            with open(path, "w") as f:
                f.write(msg + "\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            print(f"watchdog: stacks written to {path}", file=sys.stderr, flush=True)
        except OSError as e:  # the stacks are on stderr already
            print(f"watchdog: could not write stacks under {self.stacks_dir}: {e}", file=sys.stderr)
        sys.stderr.flush()
        self.exit(EXIT_HANG)
