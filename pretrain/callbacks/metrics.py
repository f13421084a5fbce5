"""Log the step metrics: metrics.jsonl + W&B (rank 0) and the console (a progress bar when
interactive, plain periodic lines in batch jobs so Slurm logs get no carriage-return spam).

Every `log_every` steps one record: the mean loss over the window and over data-parallel ranks
(one all-reduce), the rest from rank 0's clocks and counters. Throughput and times are window
means. MFU follows BENCHMARKS.md: tokens/s per device x (6N + 12LHQT) / peak; it is null when
the device's peak is unknown (CPUs; set cluster.gpu_peak_tflops to give one).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from pretrain.data.order import SampleOrder, Window
from pretrain.trainer import Callback, StepOutput, Trainer

log = logging.getLogger("pretrain")

# metrics.jsonl name -> W&B dashboard name (jsonl keeps the short names the tests and the report
# read; W&B groups them into sections)
WANDB_NAMES = {
    "loss": "train/loss", "ppl": "train/perplexity", "lr": "train/lr",
    "grad_norm": "train/grad_norm", "skipped_steps": "train/skipped_steps",
    "overflow_steps": "train/overflow_steps", "tokens_seen": "train/tokens_seen",
    "tokens_per_s": "perf/tokens_per_s", "tokens_per_s_per_device": "perf/tokens_per_s_per_device",
    "tflops_per_device": "perf/tflops_per_device", "mfu": "perf/mfu",
    "step_time": "perf/step_time", "data_time": "perf/data_time",
    "compute_time": "perf/compute_time", "fwd_bwd_time": "perf/fwd_bwd_time",
    "optimizer_time": "perf/optimizer_time", "elapsed_s": "perf/elapsed_s",
    "peak_memory_gb": "system/peak_memory_gb",
    "consumed_samples": "data/consumed_samples", "epoch": "data/epoch", "shard": "data/shard",
    "val_loss": "val/loss", "val_ppl": "val/perplexity",
}


class DataPosition:
    """Where training is in the data, from the one number `consumed` (global samples): the
    fractional epoch and the shard holding the next sample, in the loader's own order."""

    def __init__(self, order: SampleOrder):
        self.order = order
        self._window: Optional[Window] = None  # the window of the last call (its perm is O(size))

    def __call__(self, consumed: int) -> Dict[str, Any]:
        w = self._window
        if w is None or not w.start <= consumed < w.start + w.size:
            w = self._window = self.order.window_of(consumed)
        shard, _ = w.locate(np.array([consumed - w.start]), self.order.counts)
        return {"epoch": consumed / self.order.epoch_size, "shard": int(shard[0])}


class MetricsLogger(Callback):
    name = "metrics"

    def __init__(self, tracker, log_every: int, flops_per_token: float, peak_flops: Optional[float],
                 data_position: Callable[[int], Dict[str, Any]], progress: str = "auto"):
        self.tracker = tracker
        self.log_every = log_every
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # FLOP/s of one device; None: unknown, no MFU
        self.data_position = data_position
        self.progress = progress
        self._losses: List[torch.Tensor] = []
        self._window = dict.fromkeys(("step", "data", "compute", "optimizer", "tokens"), 0.0)
        self._timed_optimizer = 0  # steps in the window whose StepOutput timed the optimizer
        self._bar = None

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        self.tracker.start(trainer.state.step, trainer.state.tokens_seen)
        interactive = sys.stderr.isatty() if self.progress == "auto" else self.progress == "on"
        if interactive:
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
        if "optimizer_seconds" in out.extras:
            w["optimizer"] += out.extras["optimizer_seconds"]
            self._timed_optimizer += 1
        if self._bar is not None:
            self._bar.update(1)
        step = trainer.state.step
        if step % self.log_every == 0 or step == trainer.max_steps or trainer.stop_reason:
            self._emit(trainer, out)

    def _emit(self, trainer: Trainer, out: StepOutput) -> None:
        # One collective per log line: the mean loss over the window and over all ranks.
        loss = torch.stack(self._losses).mean().float().reshape(1)
        if trainer.dist.world_size > 1:
            loss = loss.to(trainer.dist._comm_device())
            torch.distributed.all_reduce(loss)
            loss = loss / trainer.dist.world_size
        record = self._record(trainer, out, float(loss.item()), len(self._losses))
        self._losses.clear()
        self._window = dict.fromkeys(self._window, 0.0)
        self._timed_optimizer = 0
        if trainer.dist.is_main:
            self.tracker.log(record, WANDB_NAMES)
            self._console(trainer, record)

    def _record(self, trainer: Trainer, out: StepOutput, loss: float, n: int) -> Dict[str, Any]:
        w, state, engine = self._window, trainer.state, trainer.engine
        tps = w["tokens"] / w["step"] if w["step"] > 0 else 0.0
        tps_dev = tps / trainer.dist.world_size
        grad_norm = engine.get_global_grad_norm()  # before clipping (ZeRO 1-3, bf16); None at ZeRO 0 fp32
        timed = self._timed_optimizer == n
        return {
            "step": state.step, "tokens_seen": state.tokens_seen,
            "loss": loss, "ppl": math.exp(min(loss, 50.0)), "lr": out.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "skipped_steps": state.skipped_steps,
            "overflow_steps": int(getattr(engine, "skipped_steps", 0)),  # fp16 loss-scale skips
            "tokens_per_s": tps, "tokens_per_s_per_device": tps_dev,
            "tflops_per_device": tps_dev * self.flops_per_token / 1e12,
            "mfu": tps_dev * self.flops_per_token / self.peak_flops if self.peak_flops else None,
            "step_time": w["step"] / n, "data_time": w["data"] / n, "compute_time": w["compute"] / n,
            "fwd_bwd_time": (w["compute"] - w["optimizer"]) / n if timed else None,
            "optimizer_time": w["optimizer"] / n if timed else None,
            "peak_memory_gb": _peak_memory_gb(trainer.dist.device_type),
            "consumed_samples": state.consumed_samples, **self.data_position(state.consumed_samples),
            "elapsed_s": state.epoch_seconds, "time": time.time(),
        }

    def _console(self, trainer: Trainer, r: Dict[str, Any]) -> None:
        if self._bar is not None:  # tqdm shows step, rate and ETA itself
            self._bar.set_postfix_str(f"loss {r['loss']:.4f} tok/s {r['tokens_per_s']:,.0f}",
                                      refresh=False)
            return
        gnorm = "n/a" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
        mfu = f" mfu {r['mfu']:.1%}" if r["mfu"] is not None else ""
        eta = (trainer.max_steps - r["step"]) * r["step_time"]
        log.info("step %d/%d loss %.4f lr %.3e gnorm %s tok/s %s%s eta %s", r["step"],
                 trainer.max_steps, r["loss"], r["lr"], gnorm, f"{r['tokens_per_s']:,.0f}", mfu,
                 _fmt_seconds(eta))

    def on_train_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _peak_memory_gb(device_type: str) -> Optional[float]:
    """Peak device memory allocated by this process (CUDA); on CPU, the process's peak RSS."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    except (ImportError, OSError):
        return None
