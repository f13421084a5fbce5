"""The checkpoint's client state: one typed, versioned schema that reads every earlier version."""

import pytest

from pretrain.client_state import UNIVERSAL_INFO_KEY, VERSION, VERSION_KEY, ClientState
from pretrain.errors import CheckpointError
from pretrain.layout import Layout


def test_round_trip_and_deepspeeds_key():
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    assert UNIVERSAL_INFO_KEY == UNIVERSAL_CHECKPOINT_INFO  # the converter reads it there
    state = ClientState(trainer={"trainer": {"step": 7}, "callbacks": {}}, consumed_samples=56,
                        data_fingerprint="ab" * 32, wandb_id="run123",
                        layout=Layout(2, 2, 1, 256, micro_batch_size=4, grad_accum=2),
                        universal_info={"x": [1]})
    raw = state.to_dict()
    assert raw[VERSION_KEY] == VERSION and raw[UNIVERSAL_INFO_KEY] == {"x": [1]}
    assert ClientState.from_dict(raw) == state and state.step == 7


def test_a_version_1_client_state_reads():
    """The keys checkpoints carried before the schema had a version (up to issue 12)."""
    raw = {"trainer_state": {"trainer": {"step": 3}}, "wandb_id": None,
           "data": {"consumed_samples": 24, "fingerprint": "f" * 64},
           "layout": {"tp": 1, "dp": 2, "zero_stage": 1, "padded_vocab_size": 256},
           UNIVERSAL_INFO_KEY: {"rules": []}}
    state = ClientState.from_dict(raw)
    assert (state.version, state.step, state.consumed_samples) == (1, 3, 24)
    assert state.layout == Layout(1, 2, 1, 256) and state.wandb_id is None


@pytest.mark.parametrize("raw, words", [
    ({VERSION_KEY: 99}, "version 99"),
    ({"trainer_state": [1, 2]}, "'trainer_state' is a list"),
    ({"layout": {"tp": "x"}}, "not a parallel layout"),
])
def test_a_client_state_that_is_not_one_is_a_checkpoint_error(raw, words):
    with pytest.raises(CheckpointError, match=words):
        ClientState.from_dict(raw, "step_00000003")
