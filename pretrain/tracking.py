"""Where metrics go: `metrics.jsonl` in the run directory always, W&B on rank 0 when enabled.

The W&B run id is created once per run directory (file `wandb_id`) and reused by every resume
and every requeued job, so the dashboard shows one unbroken run. Ranks other than 0 get a
Tracker that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

from pretrain.config import LoggerConfig

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """Rank-0 sink. `log(record)` appends a JSON line and forwards to W&B under grouped names."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config_dict: Dict[str, Any],
                 enabled: bool = True, run_name: Optional[str] = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.wandb_run = None
        self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.mode != "disabled":
            self._start_wandb(config_dict, run_name)

    @property
    def run_id(self) -> Optional[str]:
        path = self.run_dir / "wandb_id"
        return path.read_text().strip() if path.exists() else None

    def _persisted_id(self) -> str:
        existing = self.run_id
        if existing:
            return existing
        import secrets

        new = secrets.token_hex(4)  # not `random`: the run's RNG streams stay untouched
        tmp = self.run_dir / "wandb_id.tmp"
        tmp.write_text(new)
        os.replace(tmp, self.run_dir / "wandb_id")
        return new

    def _start_wandb(self, config_dict: Dict[str, Any], run_name: Optional[str]) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group,
            name=self.cfg.name or run_name, tags=list(self.cfg.tags) or None,
            id=self._persisted_id(), resume="allow", mode=self.cfg.mode,
            dir=str(self.run_dir), config=config_dict,
        )
        for axis in ("train/*", "val/*", "perf/*", "system/*", "data/*"):
            self.wandb_run.define_metric(axis, step_metric="trainer/step")

    def log(self, record: Dict[str, Any], wandb_names: Optional[Dict[str, str]] = None) -> None:
        """record: flat names as in metrics.jsonl; wandb_names maps them to dashboard names."""
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self.wandb_run is not None:
            names = wandb_names or {}
            payload = {names.get(k, k): v for k, v in clean.items() if v is not None}
            payload["trainer/step"] = record.get("step")
            self.wandb_run.log(payload)

    def update_config(self, values: Dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.config.update(values, allow_val_change=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
