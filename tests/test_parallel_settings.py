"""parallel.pp and parallel.sequence_parallel: validated with the setting named, mapped to the
layout by Config.layout, planned by pretrain-plan; what training cannot run (pipeline stages
beside ZeRO 0/2/3, fp16 or torch.compile; sequence parallelism with ZeRO-3) is refused before any
process group."""

import pytest
import torch

from launch.config import compose_config
from pretrain.errors import ConfigError
from tests.launch_helpers import run_train, tiny_overrides


@pytest.mark.parametrize("overrides, setting", [
    (["parallel.pp=0"], "parallel.pp"),
    (["parallel.pp=3"], "parallel.pp"),  # 3 does not divide the debug model's layers
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),  # tp = 1
    (["parallel.pp=2", "parallel.zero_stage=2"], "parallel.zero_stage"),
    (["parallel.pp=2", "parallel.zero_stage=3"], "parallel.zero_stage"),
    (["parallel.tp=4", "parallel.sequence_parallel=true", "model.seq_len=126",
      "model.num_attention_heads=4"], "parallel.sequence_parallel"),
])
def test_invalid_layouts_name_the_setting(overrides, setting):
    cfg = compose_config(["experiment=debug", "model.num_layers=4", *overrides])
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        cfg.validate(need_data=False, for_training=False)


def test_layout_carries_pp_and_sequence_parallel():
    cfg = compose_config(["experiment=debug", "model.num_layers=4", "parallel.tp=2",
                          "parallel.pp=2", "parallel.sequence_parallel=true",
                          "trainer.micro_batch_size=2", "trainer.global_batch_size=16"])
    cfg.validate(world_size=8, need_data=False, for_training=False)
    layout = cfg.layout(8, 300)
    assert (layout.tp, layout.pp, layout.dp, layout.sequence_parallel) == (2, 2, 2, True)
    assert layout.grad_accum == 4 and layout.padded_vocab_size == 512


@pytest.mark.parametrize("overrides, words", [
    (["parallel.pp=2", "parallel.zero_stage=0"], r"parallel\.zero_stage.*ZeRO-1 only"),
    (["parallel.pp=2", "parallel.zero_stage=1", "trainer.precision=fp16"],
     r"trainer\.precision.*fp16 with parallel\.pp=2"),
    (["parallel.pp=2", "parallel.zero_stage=1", "trainer.compile=true"],
     r"trainer\.compile.*parallel\.pp=2"),
    (["parallel.sequence_parallel=true", "parallel.zero_stage=3"],
     r"parallel\.sequence_parallel.*zero_stage=3 is not supported"),
])
def test_training_refuses_what_only_the_planner_can_do(overrides, words):
    cfg = compose_config(["experiment=debug", "data.path=/d", "model.num_layers=4",
                          "parallel.tp=2", *overrides])
    with pytest.raises(ConfigError, match=words):
        cfg.validate(world_size=4)
    cfg.validate(world_size=4, for_training=False)  # the planner takes it
    sp = compose_config(["experiment=debug", "data.path=/d", "parallel.tp=2",
                         "parallel.sequence_parallel=true"])
    sp.validate(world_size=4)  # sequence parallelism at ZeRO 0-2 trains
    pp = compose_config(["experiment=debug", "data.path=/d", "model.num_layers=4",
                         "parallel.pp=2", "parallel.zero_stage=1"])
    pp.validate(world_size=2)  # pipeline stages at ZeRO-1 train


def test_train_refuses_pipeline_at_zero0_before_any_process_group(tiny_dataset, tmp_path):
    from pretrain.run import train

    cfg = compose_config(tiny_overrides(tiny_dataset, tmp_path / "run", parallel__pp=2,
                                        parallel__zero_stage=0))
    env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="1")
    with pytest.raises(ConfigError, match="ZeRO-1 only"):
        train(cfg, env=env)
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_refuses_pipeline_at_zero0_with_one_error_line(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_dataset, run_dir, parallel__pp=2, parallel__zero_stage=0),
                     nproc=2, check=False)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "ZeRO-1 only" in proc.stderr and "use parallel.zero_stage=1" in proc.stderr
    assert "shm_comm" not in proc.stdout + proc.stderr and not run_dir.exists()
