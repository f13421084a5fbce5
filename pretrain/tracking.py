"""Where metrics go: `metrics.jsonl` in the run directory always, W&B on rank 0 when enabled.

One run directory is one W&B run. Its id is created once, kept in `RUN_DIR/wandb_id` and in
every checkpoint (client state `wandb_id`), and reused by every resume and requeued job with
`resume="allow"`, so the dashboard shows one unbroken run. Which id wins: the `wandb_id` file,
else the id restored from the checkpoint (`load_state_dict`; a run directory rebuilt from its
checkpoints), else a new one. Offline runs land in `RUN_DIR/wandb/offline-run-<time>-<id>/`,
one directory per job; `wandb sync RUN_DIR/wandb/offline-run-*` uploads them, in order, into
that one run.

Ranks other than 0 get a Tracker with enabled=False: it writes nothing and starts no W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pretrain.config import LoggerConfig
from pretrain.fsio import atomic_write

log = logging.getLogger("pretrain")

ID_FILE = "wandb_id"
METRICS_FILE = "metrics.jsonl"
# Dashboard sections; every metric in them is charted against trainer/step by default, and every
# record also carries train/tokens_seen, so any chart can switch its x-axis to tokens.
SECTIONS = ("train", "val", "perf", "system", "data")
STEP_AXIS = "trainer/step"
TOKENS_AXIS = "train/tokens_seen"
# Sent to W&B under the axis names (step, tokens_seen) or not at all (W&B keeps its own time).
JSONL_ONLY = ("step", "tokens_seen", "time")


def read_metrics(run_dir: Path) -> Tuple[List[Dict[str, Any]], int]:
    """RUN_DIR/metrics.jsonl: its records in the order written, and how many lines were not a
    record (a line cut short when a job was killed mid-write). Those are skipped wherever they
    are, not only at the end: the run's next job appends after them. FileNotFoundError when
    there is no such file."""
    records, bad = [], 0
    for line in (Path(run_dir) / METRICS_FILE).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null says "not a number" to every reader
    return value


class Tracker:
    """Rank-0 sink. `log(record)` appends a JSON line and forwards to W&B under grouped names.

    The W&B run starts at `start()` (the trainer's on_train_start, after a resume has restored
    the id), not at construction, so that a checkpoint's id can be used."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config_dict: Dict[str, Any],
                 enabled: bool = True, run_name: Optional[str] = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.run_name = run_name
        self.config: Dict[str, Any] = dict(config_dict)  # the W&B run config
        self.wandb_run = None
        self._restored_id: Optional[str] = None  # from a checkpoint's client state
        self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        cut = _ends_mid_line(path)
        self._file = open(path, "a", buffering=1)
        if cut:  # a job killed mid-write: end its line, or this job's first record joins it
            self._file.write("\n")

    # ---- the run id: survives restarts -------------------------------------------------------
    @property
    def run_id(self) -> Optional[str]:
        """This run directory's W&B id: the `wandb_id` file, else the one from a checkpoint."""
        path = self.run_dir / ID_FILE
        if path.exists():
            return path.read_text().strip() or self._restored_id
        return self._restored_id

    def state_dict(self) -> Dict[str, Any]:
        return {"wandb_id": self.run_id}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        saved = sd.get("wandb_id") or None
        current = self.run_id
        if self.enabled and saved and current and saved != current:
            log.warning("W&B: the checkpoint names run %s but %s names %s; continuing %s",
                        saved, self.run_dir / ID_FILE, current, current)
        self._restored_id = saved

    def _ensure_id(self) -> str:
        """The run id, created and persisted (atomically) the first time it is needed."""
        run_id = self.run_id or secrets.token_hex(4)  # not `random`: the run's RNG stays untouched
        path = self.run_dir / ID_FILE
        if not path.exists() or path.read_text().strip() != run_id:
            atomic_write(path, run_id)
        return run_id

    # ---- W&B -----------------------------------------------------------------------------------
    def start(self, step: int = 0, tokens_seen: int = 0) -> None:
        """Open (or continue) the W&B run and mark the start of this job in metrics.jsonl."""
        if not self.enabled or self._file is None:
            return
        if self.cfg.mode != "disabled" and self.wandb_run is None:
            self._start_wandb()
        self._write({"event": "start", "step": step, "tokens_seen": tokens_seen,
                     "wandb_id": self.run_id if self.cfg.mode != "disabled" else None,
                     "time": time.time()})

    def _start_wandb(self) -> None:
        import wandb

        run_id = self._ensure_id()
        kwargs = dict(project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group,
                      name=self.cfg.name or self.run_name, tags=list(self.cfg.tags) or None,
                      id=run_id, resume="allow", dir=str(self.run_dir), config=self.config,
                      settings=wandb.Settings(silent=True))
        try:
            self.wandb_run = wandb.init(mode=self.cfg.mode, **kwargs)
        except Exception as e:  # no network or no API key: keep the metrics, sync them later
            if self.cfg.mode != "online":
                raise
            log.warning("W&B online start failed (%s); logging offline instead: upload later "
                        "with `wandb sync %s/wandb/offline-run-*`", e, self.run_dir)
            self.wandb_run = wandb.init(mode="offline", **kwargs)
        run = self.wandb_run
        run.define_metric(STEP_AXIS, hidden=True)
        run.define_metric(TOKENS_AXIS, step_metric=STEP_AXIS)
        for section in SECTIONS:
            run.define_metric(f"{section}/*", step_metric=STEP_AXIS)
        for name in ("train/loss", "val/loss"):
            run.define_metric(name, step_metric=STEP_AXIS, summary="min")
        log.info("W&B run %s (%s) in %s", run_id, self.cfg.mode, self.run_dir / "wandb")

    def log(self, record: Dict[str, Any], wandb_names: Optional[Dict[str, str]] = None) -> None:
        """record: flat names as in metrics.jsonl (must hold 'step' and 'tokens_seen');
        wandb_names maps them to dashboard names."""
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        self._write(clean)
        if self.wandb_run is not None:
            names = wandb_names or {}
            payload = {names.get(k, k): v for k, v in clean.items()
                       if v is not None and k not in JSONL_ONLY}
            payload[STEP_AXIS] = clean["step"]
            if clean.get("tokens_seen") is not None:
                payload[TOKENS_AXIS] = clean["tokens_seen"]
            # W&B's own step = the optimizer step, so that the offline directories of several
            # jobs sync into one monotonic history. Steps logged again (after a crash, from the
            # last checkpoint; after a stability rollback) fall below it: W&B keeps their first
            # values, metrics.jsonl and pretrain-report the last.
            self.wandb_run.log(payload, step=int(clean["step"]))

    def update_config(self, values: Dict[str, Any]) -> None:
        self.config.update(values)
        if self.wandb_run is not None:
            self.wandb_run.config.update(values, allow_val_change=True)

    def _write(self, record: Dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
