"""The recipe of one training run, top to bottom.

check config and data (no process group yet) -> start the process groups -> build model and
engine -> resume if a checkpoint exists -> train with callbacks -> final checkpoint.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from pretrain import reshard
from pretrain.checkpoint import clean_stale, damaged, find_latest
from pretrain.config import Config
from pretrain.data.manifest import Manifest
from pretrain.data.sources import fingerprint, load_sources
from pretrain.dist import Dist
from pretrain.errors import CheckpointError, ConfigError, DataError
from pretrain.fsio import atomic_write
from pretrain.reasons import StopReason
from pretrain.plan import vocab_for_dataset
from pretrain.rundir import RunDirBusy, RunDirLock, check_writable

log = logging.getLogger("pretrain")

# Model settings that may change between a checkpoint and its resume (the rest define its shape).
RESUMABLE_MODEL_KEYS = {"dropout", "attention_dropout", "fused_kernels", "recompute", "name"}


@dataclass
class RunResult:
    state: Dict[str, Any]
    stop_reason: Optional[StopReason]
    run_dir: Path
    exit_code: int = 0


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    # Our own messages on rank 0; libraries (DeepSpeed is chatty) only when they warn.
    logging.getLogger("pretrain").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # Hydra's logging set-up disables the loggers that exist before the job starts (those of the
    # modules the launcher imported): ours speak again.
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (name == "pretrain" or name.startswith("pretrain.")) and isinstance(logger, logging.Logger):
            logger.disabled = False
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_resumable(cfg: Config, saved: Dict[str, Any], manifest: Manifest, data_fp: str,
                    saved_data: Dict) -> None:
    """A resume that would be wrong fails here, before any process group starts."""
    now = cfg.to_dict()["model"]
    before = saved.get("model", {})
    changed = sorted(k for k in now if k not in RESUMABLE_MODEL_KEYS and before.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"model.{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"the checkpoint was trained with a different model shape ({diffs}); "
                          f"use a new run.dir or trainer.resume=false")
    fp = saved_data.get("fingerprint")
    if fp and fp != data_fp and not cfg.data.allow_fingerprint_change:
        was, now_data = saved.get("data", {}), cfg.to_dict()["data"]
        keys = ("path", "shards", "weight", "blend", "blend_weights")
        moved = ", ".join(f"data.{k}: {was.get(k)!r} -> {now_data[k]!r}" for k in keys
                          if k in was and was.get(k) != now_data[k])
        raise DataError(
            f"the data ({manifest.root}{', with data.shards' if cfg.data.shards else ''}"
            f"{', with data.blend' if cfg.data.blend else ''}) is not the data this run was "
            f"trained on (fingerprint {data_fp[:12]} != {fp[:12]}"
            f"{'; ' + moved if moved else ': the files changed'}); train on the original data, "
            f"or set data.allow_fingerprint_change=true to continue on the new one on purpose")
    if saved_data.get("tokenizer_sha256") not in (None, manifest.tokenizer_sha256):
        raise DataError(f"the dataset's tokenizer ({manifest.tokenizer_path}) differs from the one "
                        f"this run was trained with; use a dataset made with the same tokenizer")


def find_resume_point(cfg: Config, ckpt_root: Path) -> Optional[Path]:
    if cfg.trainer.resume_from:
        path = Path(cfg.trainer.resume_from)
        if not (path / "COMMITTED").exists():
            raise CheckpointError(f"trainer.resume_from={path}: not a committed checkpoint "
                                  f"(no COMMITTED marker); pick one under {ckpt_root}")
        problem = damaged(path)
        if problem is not None:
            raise CheckpointError(f"trainer.resume_from={path}: the checkpoint is damaged "
                                  f"({problem}); pick another one under {path.parent}")
        return path
    return find_latest(ckpt_root) if cfg.trainer.resume else None


def train(cfg: Config, env: Optional[Dict[str, str]] = None) -> RunResult:
    """Run (or resume) the training described by cfg in this process. Collective over ranks."""
    from pretrain.builders import build_run

    dist = Dist.from_env(cfg.parallel, env)
    setup_logging(dist.rank)
    cfg.validate(world_size=dist.world_size)
    sources = load_sources(cfg.data)
    manifest, data_fp = sources[0][0], fingerprint(sources)
    vocab = vocab_for_dataset(cfg, manifest)
    if manifest.seq_len != cfg.model.seq_len:
        raise ConfigError(f"model.seq_len={cfg.model.seq_len} but the dataset {manifest.root} holds "
                          f"{manifest.seq_len}-token sequences; set model.seq_len={manifest.seq_len} "
                          f"or write shards with pretrain-data --seq-len {cfg.model.seq_len}")
    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    resume_path = find_resume_point(cfg, ckpt_root)
    saved_layout = None
    if resume_path is not None:
        saved_cfg = yaml.safe_load((resume_path / "config.yaml").read_text())
        data_yaml = resume_path / "data.yaml"
        saved_data = yaml.safe_load(data_yaml.read_text()) if data_yaml.exists() else {}
        check_resumable(cfg, saved_cfg, manifest, data_fp, saved_data)
        saved_layout = reshard.read_layout(resume_path, saved_cfg, vocab)
    dist = dist.with_layout(cfg.layout(dist.world_size, vocab, saved_layout))  # the run's layout
    check_writable(run_dir)

    # ---- from here on, process groups exist --------------------------------------------------
    dist.initialize(seed=cfg.trainer.seed)
    lock = RunDirLock(run_dir) if dist.is_main else None
    try:
        _take(lock, dist)  # before this job writes anything there
        if dist.is_main:
            clean_stale(ckpt_root)
            _write_yaml(run_dir / "config.yaml", cfg.to_dict())
            _write_yaml(run_dir / "data.yaml", {"path": str(manifest.root),
                                                "blend": [[str(m.root), w] for m, w in sources],
                                                "fingerprint": data_fp,
                                                "tokenizer_sha256": manifest.tokenizer_sha256})
        dist.barrier()
        if resume_path is not None:  # saved at another layout: its universal form, made once
            resume_path = reshard.prepare(resume_path, saved_layout, dist.layout, dist)
        run = build_run(cfg, dist, sources, run_dir,
                        load_universal=reshard.is_universal(resume_path))
        if resume_path is not None:
            saved = run.checkpointer.load(run.module, resume_path)
            run.trainer.load_state_dict(saved.trainer)
            run.tracker.load_state_dict({"wandb_id": saved.wandb_id})  # if RUN_DIR/wandb_id is gone
            if dist.is_main:
                log.info("resumed from %s at step %d", resume_path, run.trainer.state.step)
                if run.trainer.state.step >= cfg.trainer.max_steps:
                    log.info("nothing to do: the run is at step %d and trainer.max_steps=%d; "
                             "raise trainer.max_steps to continue", run.trainer.state.step,
                             cfg.trainer.max_steps)
        state = run.trainer.fit()
        stop = run.trainer.stop_reason
        run.tracker.close()
        return RunResult(state.state_dict(), stop, run_dir, stop.exit_code if stop else 0)
    finally:
        if lock is not None:
            lock.release()
        dist.shutdown()


def _take(lock: Optional[RunDirLock], dist: Dist) -> None:
    """Rank 0 takes the run directory's lock; every rank learns whether it did."""
    refused = None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirBusy as e:
            refused = str(e)
    refused = dist.broadcast_object(refused)
    if refused is not None:
        raise RunDirBusy(refused)


def _write_yaml(path: Path, data: Dict[str, Any]) -> None:
    """Durable: checkpoints copy config.yaml and data.yaml in, and a resume reads them back."""
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))
