"""Hydra <-> typed config, at the boundary: register the schema, compose, convert once."""

from __future__ import annotations

import sys
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pretrain.config import Config
from pretrain.errors import ConfigError, PretrainError

CONFIG_MODULE = "hydra_conf"
_REGISTERED = False


def register() -> None:
    """Register the dataclass schema so Hydra type-checks every group and override."""
    global _REGISTERED
    if not _REGISTERED:
        ConfigStore.instance().store(name="config_schema", node=Config)
        _REGISTERED = True


def to_config(cfg: DictConfig) -> Config:
    """The composed Hydra config as our dataclasses (hydra's own node dropped)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return Config.from_dict(container)


def compose_config(overrides: Optional[List[str]] = None) -> Config:
    """Compose like `pretrain-train` does, without starting anything (tests, pretrain-plan)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    check_overrides(list(overrides or []))
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        try:
            cfg = compose(config_name="config", overrides=list(overrides or []))
        except Exception as e:  # Hydra's own errors for bad keys/values/groups
            raise ConfigError(_hydra_message(e)) from e
    return to_config(cfg)


def check_overrides(overrides: List[str]) -> None:
    """Parse each `key=value` override as Hydra will; a value it cannot read is a ConfigError that
    says how to write it (braces, as in shard ranges, must be quoted for Hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_overrides([arg])
        except Exception as e:  # Hydra's OverrideParseException
            key, value = arg.split("=", 1)
            hint = ""
            if ("{" in value or "}" in value) and value[:1] not in ("'", '"'):
                hint = (f"; Hydra reads '{{' as the start of a dictionary: quote the value for "
                        f"Hydra inside the shell's quotes, \"{key}='{value}'\"")
            raise ConfigError(f"cannot read the override {arg!r} ({_hydra_message(e)}){hint}") \
                from None


def _hydra_message(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return " ".join(line.strip() for line in msg if line.strip())


def fail(e: PretrainError) -> None:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
