"""Every `experiment=NAME` that the README, the Makefile or a Slurm script tells a user to run is a
preset in hydra_conf/experiment/ that composes and validates as it stands."""

import re

import pytest

from launch.config import compose_config
from tests.launch_helpers import REPO

PRESETS = REPO / "hydra_conf" / "experiment"
DOCUMENTS = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "slurm").glob("*.sbatch"))]


def mentioned() -> dict:
    """name -> the documents that mention experiment=name."""
    names: dict = {}
    for path in DOCUMENTS:
        for name in re.findall(r"experiment=([\w.-]+)", path.read_text()):
            names.setdefault(name, set()).add(path.name)
    return names


def test_the_documents_mention_experiments():
    assert {"debug", "gpt2-124m"} <= set(mentioned())  # the regex still finds them


@pytest.mark.parametrize("name", sorted(mentioned()))
def test_every_mentioned_experiment_exists_and_composes(name):
    where = ", ".join(sorted(mentioned()[name]))
    assert (PRESETS / f"{name}.yaml").is_file(), \
        f"{where} names experiment={name}, which is not in hydra_conf/experiment/"
    cfg = compose_config([f"experiment={name}"])
    # A fixed vocabulary where the preset leaves it to the dataset; 8 ranks, as on one GPU node.
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = 4096
    cfg.validate(world_size=8, need_data=False)
    assert cfg.run.dir


def test_gpt2_350m_is_gpt2_medium():
    cfg = compose_config(["experiment=gpt2-350m"])
    m = cfg.model
    assert (m.name, m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_len) == \
        ("gpt2-medium", 24, 1024, 16, 1024)
    tokens = cfg.trainer.global_batch_size * m.seq_len * cfg.trainer.max_steps
    assert tokens == 512 * 1024 * 60000  # ~31.5B, the recipe's budget
