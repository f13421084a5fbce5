"""The parallel layout: computed once from the settings, errors naming the setting, the rank
arithmetic megatron-core uses, and layout.json of every version."""

import json

import pytest

from pretrain.config import Config, ModelConfig, ParallelConfig, TrainerConfig
from pretrain.errors import CheckpointError, ConfigError
from pretrain.layout import Layout


def config(tp=1, micro=4, gbs=None, divisible=128):
    return Config(model=ModelConfig(make_vocab_size_divisible_by=divisible),
                  parallel=ParallelConfig(tp=tp, zero_stage=1),
                  trainer=TrainerConfig(micro_batch_size=micro, global_batch_size=gbs))


def test_degrees_and_batches_follow_from_the_settings():
    lay = config(tp=2, micro=4, gbs=64).layout(8, vocab_size=50257)
    assert (lay.tp, lay.pp, lay.dp, lay.world_size, lay.model_parallel_size) == (2, 1, 4, 8, 2)
    assert (lay.micro_batch_size, lay.grad_accum, lay.global_batch_size) == (4, 4, 64)
    assert lay.padded_vocab_size == 50432  # a multiple of 128 x TP
    assert config(micro=4).layout(3).global_batch_size == 12  # no accumulation by default


@pytest.mark.parametrize("tp, world, gbs, setting", [
    (3, 4, None, "parallel.tp"), (2, 4, 12, "trainer.global_batch_size"),
])
def test_a_layout_that_cannot_be_names_the_setting(tp, world, gbs, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        config(tp=tp, gbs=gbs).layout(world)


def test_rank_arithmetic_is_megatrons():
    """TP fastest, then DP, then PP: the same groups megatron's parallel_state builds."""
    lay = Layout(tp=2, dp=2, zero_stage=1, padded_vocab_size=256, pp=2)
    ranks = [(lay.tp_rank(r), lay.dp_rank(r), lay.pp_rank(r)) for r in range(lay.world_size)]
    assert ranks == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0),
                     (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    flat = Layout(tp=2, dp=3, zero_stage=0)
    assert [flat.dp_rank(r) for r in range(6)] == [r // 2 for r in range(6)]


def test_a_resume_keeps_the_saved_vocabulary_rows_where_tp_divides_them():
    saved = Layout(tp=2, dp=1, zero_stage=1, padded_vocab_size=512)
    assert config().layout(2, 300, saved).padded_vocab_size == 512  # not 384
    odd = Layout(tp=1, dp=1, zero_stage=1, padded_vocab_size=50257)
    assert config(tp=2, divisible=1).layout(2, 50257, odd).padded_vocab_size == 50258


def test_layout_json_round_trips_and_old_files_read(tmp_path):
    lay = config(tp=2, micro=2, gbs=16).layout(4, vocab_size=1000)
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(lay.to_json()))
    assert Layout.from_file(path) == lay
    path.write_text(json.dumps({"tp": 2, "dp": 1, "zero_stage": 3, "padded_vocab_size": 256}))
    old = Layout.from_file(path)  # written before version 2
    assert (old.tp, old.dp, old.pp, old.zero_stage, old.grad_accum) == (2, 1, 1, 3, 0)
    assert old.same_shards(Layout(2, 1, 1, 256)) and not old.same_shards(Layout(1, 2, 3, 256))


@pytest.mark.parametrize("text", ['[1, 2]', '{"tp": "2", "dp": 1, "zero_stage": 1, '
                                  '"padded_vocab_size": 256}', '{"tp": 1}', 'not json'])
def test_a_garbled_layout_json_is_a_checkpoint_error(tmp_path, text):
    path = tmp_path / "layout.json"
    path.write_text(text)
    with pytest.raises(CheckpointError, match="layout.json"):
        Layout.from_file(path)
