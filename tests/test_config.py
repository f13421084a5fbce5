"""A bad configuration fails at start-up, before any process group, naming the setting."""

import time

import pytest

from launch.config import compose_config
from pretrain.config import Config
from pretrain.errors import ConfigError
from tests.launch_helpers import run_train, tiny_overrides


@pytest.mark.parametrize("overrides, world, setting", [
    (["parallel.tp=3"], 3, "parallel.tp"),  # 3 does not divide 4 heads
    (["parallel.tp=2"], 3, "parallel.tp"),  # 2 does not divide a world of 3
    (["optimizer.lr=-0.1"], 1, "optimizer.lr"),
    (["trainer.global_batch_size=12"], 2, "trainer.global_batch_size"),  # micro 8 x dp 2
    (["parallel.zero_stage=4"], 1, "parallel.zero_stage"),
    (["model.num_query_groups=3"], 1, "model.num_query_groups"),
    (["schedule.name=exp"], 1, "schedule.name"),
    (["trainer.precision=fp8"], 1, "trainer.precision"),
    (["data.path=null"], 1, "data.path"),
    (["data.blend=[/other]"], 1, "data.blend_weights"),  # a dataset without its weight
])
def test_validation_names_the_setting(overrides, world, setting):
    cfg = compose_config(["experiment=debug", "data.path=/some/data", *overrides])
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        cfg.validate(world_size=world)


@pytest.mark.parametrize("override, text", [
    ("model.hiden_size=64", "hiden_size"),  # misspelt key
    ("optimizer.lr=fast", "optimizer.lr"),  # wrong type
    ("model=gpt5", "model/gpt5"),  # unknown preset
    ("data.shards=/d/shard-{0..3}.tar", "quote the value for Hydra .*\"data.shards='/d/shard-"),
])
def test_hydra_rejects_unknown_keys_and_types(override, text):
    with pytest.raises(ConfigError, match=text):
        compose_config(["experiment=debug", override])


def test_presets_compose_and_validate():
    for preset in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-1.3b", "llama-1b"):
        cfg = compose_config([f"model={preset}", "data.path=/d"])
        cfg.validate(world_size=8)
        assert cfg.model.name == preset
    cfg = compose_config(["experiment=gpt2-124m", "data.path=/d"])
    assert cfg.layout(8).batch_sizes() == {"tp": 1, "pp": 1, "dp": 8, "micro_batch_size": 16,
                                           "global_batch_size": 512, "grad_accum": 4}


def test_saved_config_round_trips():
    cfg = compose_config(["experiment=debug", "data.path=/d", "parallel.tp=2"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    raw = cfg.to_dict()
    raw["model"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        Config.from_dict(raw)


@pytest.mark.slow
def test_cli_fails_before_any_process_group(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    proc = run_train(tiny_overrides(tiny_dataset, run_dir, parallel__tp=3), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "parallel.tp" in proc.stderr and "ConfigError" in proc.stderr
    # Nothing was started or written: no DeepSpeed communication op, no run directory.
    assert "shm_comm" not in proc.stdout + proc.stderr
    assert not run_dir.exists()
    assert time.time() - t0 < 60

    proc = run_train(tiny_overrides(tiny_dataset, run_dir, model__seq_len=64), check=False)
    assert proc.returncode == 2 and "model.seq_len" in proc.stderr

    proc = run_train(tiny_overrides(tmp_path / "nowhere", run_dir), check=False)
    assert proc.returncode == 2 and "DataError" in proc.stderr and "pretrain-data" in proc.stderr

    # A brace range the shell passed unquoted to Hydra: how to write it, before Hydra starts.
    proc = run_train(tiny_overrides(tiny_dataset, run_dir, data__shards="/d/s-{0..3}.tar"),
                     check=False)
    assert proc.returncode == 2 and "\"data.shards='/d/s-{0..3}.tar'\"" in proc.stderr
    assert not run_dir.exists()
