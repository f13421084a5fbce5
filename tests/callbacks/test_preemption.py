"""Only one rank gets the signal; both stop after the same step (2 gloo ranks, real collectives)."""

import os
import signal
import sys
import textwrap

import pytest

from tests.launch_helpers import REPO, cpu_env, free_port

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from types import SimpleNamespace
    from pretrain.callbacks.preemption import PreemptionCallback
    from pretrain.config import ParallelConfig
    from pretrain.dist import Dist

    dist = Dist.from_env(ParallelConfig(tp=1, device="cpu"))
    import torch.distributed as td
    td.init_process_group("gloo")  # plain gloo: the callback only needs its all-reduce
    dist.initialized = True

    class Trainer(SimpleNamespace):
        def request_stop(self, reason):
            self.stop_reason = self.stop_reason or reason

    tr = Trainer(dist=dist, state=SimpleNamespace(step=0), max_steps=10, stop_reason=None)
    cb = PreemptionCallback()
    cb.on_train_start(tr)
    for step in range(1, 11):
        tr.state.step = step
        if step == 4 and dist.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
        cb.on_step_end(tr, None)
        if tr.stop_reason:
            break
    cb.on_train_end(tr)
    print(f"RESULT rank={dist.rank} stopped_at={tr.state.step} reason={tr.stop_reason}", flush=True)
    td.destroy_process_group()
""")


def test_one_signalled_rank_stops_every_rank_at_the_same_step(tmp_path):
    import subprocess

    script = tmp_path / "agree.py"
    script.write_text(SCRIPT)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=cpu_env({"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}))
             for r in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    results = sorted(line for out in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert results == ["RESULT rank=0 stopped_at=4 reason=signal SIGUSR1",
                       "RESULT rank=1 stopped_at=4 reason=signal SIGUSR1"], outs


def test_exit_code_says_whether_to_come_back():
    from pretrain.callbacks.preemption import EXIT_REQUEUE, EXIT_STOPPED, exit_code
    from pretrain.callbacks.preemption import stop_for_signal as stop

    assert exit_code(None) == 0
    assert exit_code(stop("SIGUSR1")) == exit_code(stop("SIGUSR2")) == EXIT_REQUEUE == 3
    assert exit_code(stop("SIGTERM")) == exit_code(stop("SIGINT")) == EXIT_STOPPED == 4


def test_sigint_is_caught_and_outranks_the_warning_signals():
    import signal as sig
    from types import SimpleNamespace

    from pretrain.callbacks.preemption import PreemptionCallback

    cb = PreemptionCallback()
    cb._handler(sig.SIGUSR1, None)
    cb._handler(sig.SIGINT, None)
    cb._handler(sig.SIGUSR2, None)
    stops = []
    tr = SimpleNamespace(dist=SimpleNamespace(all_reduce_max=lambda v: v, is_main=False),
                         stop_reason=None, state=SimpleNamespace(step=3), max_steps=10,
                         request_stop=stops.append)
    cb.on_step_end(tr, None)
    assert [str(s) for s in stops] == ["signal SIGINT"]
