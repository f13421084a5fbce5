"""Only one rank gets the signal; both stop after the same step (2 gloo ranks, real collectives)."""

import os
import signal
from types import SimpleNamespace

import pytest

from tests.helpers.ranks import run_on_ranks


class _Trainer(SimpleNamespace):
    def request_stop(self, reason):
        self.stop_reason = self.stop_reason or reason


def _stop_when_rank_1_is_signalled(dist) -> tuple:
    """The callback in a 10-step loop on one of two ranks; only rank 1 gets SIGUSR1, at step 4."""
    from pretrain.callbacks.preemption import PreemptionCallback

    tr = _Trainer(dist=dist, state=SimpleNamespace(step=0), max_steps=10, stop_reason=None)
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
    return tr.state.step, str(tr.stop_reason)


@pytest.mark.slow
def test_one_signalled_rank_stops_every_rank_at_the_same_step():
    assert run_on_ranks(2, _stop_when_rank_1_is_signalled) == [(4, "signal SIGUSR1")] * 2


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
