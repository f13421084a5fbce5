"""Log the step metrics: metrics.jsonl + W&B (rank 0) and the console (a progress bar when
interactive, plain periodic lines in batch jobs so Slurm logs get no carriage-return spam)."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from pretrain.trainer import Callback, StepOutput, Trainer

log = logging.getLogger("pretrain")

# metrics.jsonl name -> W&B dashboard name
WANDB_NAMES = {
    "loss": "train/loss", "ppl": "train/perplexity", "lr": "train/lr",
    "grad_norm": "train/grad_norm", "skipped_steps": "train/skipped_steps",
    "tokens_seen": "train/tokens_seen", "tokens_per_s": "perf/tokens_per_s",
    "tokens_per_s_per_device": "perf/tokens_per_s_per_device", "tflops_per_device": "perf/tflops_per_device",
    "mfu": "perf/mfu", "step_time": "perf/step_time", "data_time": "perf/data_time",
    "compute_time": "perf/compute_time", "peak_memory_gb": "system/peak_memory_gb",
    "consumed_samples": "data/consumed_samples", "epoch": "data/epoch",
    "val_loss": "val/loss", "val_ppl": "val/perplexity",
}


class MetricsLogger(Callback):
    name = "metrics"

    def __init__(self, tracker, log_every: int, flops_per_token: float, peak_flops: Optional[float],
                 epoch_samples: int, progress: str = "auto"):
        self.tracker = tracker
        self.log_every = log_every
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.epoch_samples = epoch_samples
        self.progress = progress
        self._losses: List[torch.Tensor] = []
        self._window: Dict[str, float] = {"step": 0.0, "data": 0.0, "compute": 0.0, "tokens": 0.0}
        self._bar = None
        self._start_step = 0

    def on_train_start(self, trainer: Trainer) -> None:
        self._start_step = trainer.state.step
        interactive = sys.stderr.isatty() if self.progress == "auto" else self.progress == "on"
        if trainer.dist.is_main and interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=trainer.max_steps, initial=trainer.state.step, unit="step",
                             dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        self._losses.append(out.loss)
        w = self._window
        w["step"] += out.step_seconds
        w["data"] += out.data_seconds
        w["compute"] += out.compute_seconds
        w["tokens"] += out.tokens
        step = trainer.state.step
        if step % self.log_every == 0 or step == trainer.max_steps or trainer.stop_reason:
            self._emit(trainer, out)

    def _emit(self, trainer: Trainer, out: StepOutput) -> None:
        n = len(self._losses)
        # One collective per log line: the mean loss over the window and over data-parallel ranks.
        loss = torch.stack(self._losses).mean().float().reshape(1)
        if trainer.dist.world_size > 1:
            loss = loss.to(trainer.dist._comm_device())
            torch.distributed.all_reduce(loss)
            loss = loss / trainer.dist.world_size
        loss_v = float(loss.item())
        grad_norm = trainer.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        w = self._window
        devices = trainer.dist.world_size
        tps = w["tokens"] / w["step"] if w["step"] > 0 else 0.0
        tps_dev = tps / devices
        tflops = tps_dev * self.flops_per_token / 1e12
        record: Dict[str, Any] = {
            "step": trainer.state.step, "loss": loss_v,
            "ppl": math.exp(min(loss_v, 50.0)), "lr": out.lr, "grad_norm": grad_norm,
            "tokens_seen": trainer.state.tokens_seen, "tokens_per_s": tps,
            "tokens_per_s_per_device": tps_dev, "tflops_per_device": tflops,
            "mfu": tps_dev * self.flops_per_token / self.peak_flops if self.peak_flops else None,
            "step_time": w["step"] / n, "data_time": w["data"] / n, "compute_time": w["compute"] / n,
            "skipped_steps": trainer.state.skipped_steps,
            "consumed_samples": trainer.state.consumed_samples,
            "epoch": trainer.state.consumed_samples / self.epoch_samples,
            "peak_memory_gb": _peak_memory_gb(trainer.dist.device_type),
            "time": time.time(),
        }
        self._losses.clear()
        for k in w:
            w[k] = 0.0
        if not trainer.dist.is_main:
            return
        self.tracker.log(record, WANDB_NAMES)
        msg = (f"step {record['step']}/{trainer.max_steps} loss {loss_v:.4f} lr {out.lr:.3e} "
               f"gnorm {grad_norm if grad_norm is None else round(grad_norm, 3)} "
               f"tok/s {tps:,.0f}" + (f" mfu {record['mfu']:.1%}" if record["mfu"] else ""))
        if self._bar is not None:
            self._bar.n = record["step"]
            self._bar.set_postfix_str(f"loss {loss_v:.4f} tok/s {tps:,.0f}")
            self._bar.refresh()
        else:
            remaining = (trainer.max_steps - record["step"]) * record["step_time"]
            log.info("%s eta %s", msg, _fmt_seconds(remaining))

    def on_train_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _peak_memory_gb(device_type: str) -> Optional[float]:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    except Exception:
        return None
