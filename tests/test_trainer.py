"""The trainer's pieces that need no process group: counters and callback state that survive a
restart, the spike rule, the watchdog, fault parsing. The loop itself runs in every end-to-end
test (tests/test_reliability.py drives its skip, rollback and hang paths)."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from pretrain import faults
from pretrain.callbacks.stability import SpikeDetector, StabilityCallback
from pretrain.callbacks.watchdog import EXIT_HANG, Watchdog
from pretrain.config import StabilityConfig
from pretrain.trainer import StepOutput, TrainState


def test_train_state_round_trip():
    state = TrainState(step=7, consumed_samples=56, tokens_seen=7168, skipped_steps=2,
                       epoch_seconds=1.5)
    other = TrainState()
    other.load_state_dict(state.state_dict())
    assert other == state


def test_spike_rule_waits_for_a_full_window_and_the_warmup():
    d = SpikeDetector(k=3.0, window=4, warmup=5)
    for loss in (5.0, 4.9, 5.1):
        d.add(loss)
    assert not d.is_spike(step=10, loss=100.0)  # window not full
    d.add(5.0)
    assert not d.is_spike(step=5, loss=100.0)  # still warming up
    assert d.is_spike(step=6, loss=100.0)
    assert not d.is_spike(step=6, loss=5.2)  # mean 5.0 + 3 x std 0.071
    assert not SpikeDetector(k=0.0, window=2, warmup=0).is_spike(step=9, loss=1e9)  # off


def _step(loss: float, skipped=None) -> StepOutput:
    return StepOutput(loss=torch.tensor(loss), data_seconds=0, compute_seconds=0, step_seconds=0,
                      lr=0, samples=1, tokens=1, global_loss=loss, skipped=skipped)


def test_stability_state_survives_a_restart():
    cfg = StabilityConfig(spike_std=3.0, spike_window=3, spike_warmup=0, max_bad_steps=5)
    trainer = SimpleNamespace(state=TrainState(), dist=SimpleNamespace(is_main=False))
    cb = StabilityCallback(cfg, checkpointer=None)
    for i, loss in enumerate([5.0, 4.9, 5.1, 4.95]):
        trainer.state.step = i + 1
        cb.on_step_end(trainer, _step(loss))
    assert cb.on_before_update(trainer, float("nan")) == "nonfinite_loss"
    assert cb.on_before_update(trainer, 50.0) == "loss_spike"
    cb.on_step_end(trainer, _step(50.0, "loss_spike"))

    restored = StabilityCallback(cfg, checkpointer=None)
    restored.load_state_dict(cb.state_dict())
    assert list(restored.spikes.losses) == [4.9, 5.1, 4.95] and restored.streak == 1
    assert restored.on_before_update(trainer, 50.0) == "loss_spike"
    assert restored.on_before_update(trainer, 5.0) is None


def test_watchdog_dumps_stacks_and_exits_when_no_step_finishes(tmp_path, capfd):
    now = [100.0]
    exited = threading.Event()
    codes = []
    timeouts = []

    def fake_exit(code):
        codes.append(code)
        exited.set()

    dog = Watchdog(limit_s=30, collective_timeout_s=60, stacks_dir=tmp_path / "stacks",
                   clock=lambda: now[0], exit=fake_exit, poll_s=0.01)
    trainer = SimpleNamespace(dist=SimpleNamespace(rank=3, set_collective_timeout=timeouts.append),
                              state=SimpleNamespace(step=0))
    dog.on_train_start(trainer)
    now[0] += 1000  # not armed before the first step: start-up has its own timeout
    time.sleep(0.1)
    assert not codes
    trainer.state.step = 1
    dog.on_step_end(trainer, None)
    assert [t.total_seconds() for t in timeouts] == [60.0]  # steady-state collective timeout
    now[0] += 29
    time.sleep(0.1)
    assert not codes
    now[0] += 2
    assert exited.wait(5)
    dog.on_train_end(trainer)
    assert codes == [EXIT_HANG]
    text = (tmp_path / "stacks" / "rank00003.txt").read_text()
    assert "rank 3 finished no step for 31s" in text and "last finished step 1" in text
    assert "test_watchdog_dumps_stacks" in text  # the main thread's stack, waiting in this test
    assert "rank 3 finished no step" in capfd.readouterr().err


def test_faults_fire_once_on_the_named_rank(monkeypatch):
    monkeypatch.setenv("PRETRAIN_FAULTS", "nan_loss@3:1,spike@4")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    faults.reset()
    try:
        one = torch.tensor(1.0)
        assert faults.perturb_loss(one, 3, 0) is one
        assert torch.isnan(faults.perturb_loss(one, 3, 1))
        assert faults.perturb_loss(one, 3, 1) is one  # once per process
        assert faults.perturb_loss(one, 4, 0).item() == faults.SPIKE_FACTOR
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        faults.reset()
        assert faults.perturb_loss(one, 3, 1) is one  # a restarted worker meets no faults
    finally:
        monkeypatch.delenv("PRETRAIN_FAULTS")
        faults.reset()


def test_nan_grad_fault_keeps_the_loss_finite():
    faults.reset()
    x = torch.tensor(2.0, requires_grad=True)
    y = faults._NanGrad.apply(x * 3)
    y.backward()
    assert y.item() == 6.0 and torch.isnan(x.grad)


@pytest.mark.parametrize("key,value,message", [
    ("on_bad_steps", "retry", "stability.on_bad_steps: 'retry' is not one of rollback, stop"),
    ("spike_window", 1, "stability.spike_window: must be >= 2"),
    ("max_bad_steps", 0, "stability.max_bad_steps: must be >= 1"),
])
def test_stability_config_errors_name_the_setting(key, value, message):
    from pretrain.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        StabilityConfig(**{key: value}).validate()
