"""What a checkpoint carries besides the engine's tensors: one owner, one typed, versioned schema.

DeepSpeed stores the client state's keys at the top level of every `mp_rank_XX_model_states.pt`,
and its universal-checkpoint converter reads `universal_checkpoint_info` there, so the saved form
stays a flat dict (`to_dict`). Versions:
    1  (no "client_state_version" key; checkpoints up to issue 12): trainer_state, wandb_id,
       data {consumed_samples, fingerprint}, layout {tp, dp, zero_stage, padded_vocab_size},
       universal_checkpoint_info
    2  the same keys, the version, and layout.json version 2 (pretrain.layout)
`from_dict` reads every version; a key of the wrong type is a CheckpointError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from pretrain.errors import CheckpointError
from pretrain.layout import Layout

VERSION = 2
VERSION_KEY = "client_state_version"
# deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO (tests/test_client_state.py checks it):
# written literally so that the loop and the run recipe import nothing from DeepSpeed.
UNIVERSAL_INFO_KEY = "universal_checkpoint_info"


@dataclass
class ClientState:
    # Trainer.state_dict(): {"trainer": TrainState counters, "callbacks": {name: state}}
    trainer: Dict[str, Any] = field(default_factory=dict)
    consumed_samples: int = 0  # the data position (also in trainer's counters)
    data_fingerprint: Optional[str] = None  # pretrain.data.sources.fingerprint of the blend
    wandb_id: Optional[str] = None  # the W&B run a resume continues
    layout: Optional[Layout] = None  # the layout the engine state was saved at
    universal_info: Dict[str, Any] = field(default_factory=dict)  # DeepSpeed's merge rules
    version: int = VERSION

    @property
    def step(self) -> int:
        return int(self.trainer.get("trainer", {}).get("step", 0))

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            VERSION_KEY: VERSION, "trainer_state": self.trainer, "wandb_id": self.wandb_id,
            "data": {"consumed_samples": self.consumed_samples,
                     "fingerprint": self.data_fingerprint}}
        if self.layout is not None:
            out["layout"] = self.layout.to_json()
        if self.universal_info:
            out[UNIVERSAL_INFO_KEY] = self.universal_info
        return out

    @classmethod
    def from_dict(cls, raw: Optional[Dict[str, Any]], where: str = "the checkpoint") -> "ClientState":
        raw = raw or {}
        version = raw.get(VERSION_KEY, 1)
        if type(version) is not int or not 1 <= version <= VERSION:
            raise CheckpointError(f"{where}: client state version {version!r} is not one this "
                                  f"release reads (1..{VERSION}); resume it with the release "
                                  f"that wrote it")
        trainer = _typed(raw, "trainer_state", dict, {}, where)
        data = _typed(raw, "data", dict, {}, where)
        layout = raw.get("layout")
        return cls(trainer=trainer,
                   consumed_samples=int(data.get("consumed_samples") or 0),
                   data_fingerprint=data.get("fingerprint"),
                   wandb_id=_typed(raw, "wandb_id", str, None, where),
                   layout=Layout.from_json(layout, f"{where} (client state)") if layout else None,
                   universal_info=_typed(raw, UNIVERSAL_INFO_KEY, dict, {}, where),
                   version=version)


def _typed(raw: Dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise CheckpointError(f"{where}: client state {key!r} is a {type(value).__name__}, not a "
                              f"{kind.__name__} (the checkpoint is damaged)")
    return value
