"""`pretrain-train`: the Hydra training app. Overrides like `experiment=debug run.dir=PATH`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from launch.config import fail, register, to_config
from pretrain.errors import PretrainError


@hydra.main(config_path="pkg://hydra_conf", config_name="config", version_base=None)
def _app(cfg: DictConfig) -> int:
    from pretrain.run import train

    try:
        result = train(to_config(cfg))
    except PretrainError as e:
        fail(e)
    if result.exit_code:
        sys.exit(result.exit_code)
    return 0


def main() -> None:
    register()
    _app()


if __name__ == "__main__":
    main()
