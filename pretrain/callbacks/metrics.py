"""Log the step metrics: metrics.jsonl + W&B (rank 0) and the console (a progress bar when
interactive, plain periodic lines in batch jobs so Slurm logs get no carriage-return spam).

Every `log_every` steps one record, written by rank 0 with no collective: the mean over the
window of the trainer's all-rank loss (non-finite losses of skipped steps left out), the
gradient norm of the last step, rank 0's clocks and counters. Throughput and times are window
means. MFU follows BENCHMARKS.md: tokens/s per device x (6N + 12LHQT) / peak; it is null when
the device's peak is unknown (CPUs; set cluster.gpu_peak_tflops to give one).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pretrain.data.loader import ShardStream, StreamSpec
from pretrain.data.order import SampleOrder, Window
from pretrain.trainer import Callback, StepOutput, Trainer

log = logging.getLogger("pretrain")

# metrics.jsonl name -> W&B dashboard name (jsonl keeps the short names the tests and the report
# read; W&B groups them into sections)
WANDB_NAMES = {
    "loss": "train/loss", "ppl": "train/perplexity", "lr": "train/lr",
    "grad_norm": "train/grad_norm", "skipped_steps": "train/skipped_steps",
    "tokens_seen": "train/tokens_seen",
    "tokens_per_s": "perf/tokens_per_s", "tokens_per_s_per_device": "perf/tokens_per_s_per_device",
    "tflops_per_device": "perf/tflops_per_device", "mfu": "perf/mfu",
    "step_time": "perf/step_time", "data_time": "perf/data_time",
    "compute_time": "perf/compute_time", "fwd_bwd_time": "perf/fwd_bwd_time",
    "optimizer_time": "perf/optimizer_time", "elapsed_s": "perf/elapsed_s",
    "peak_memory_gb": "system/peak_memory_gb",
    "consumed_samples": "data/consumed_samples", "epoch": "data/epoch", "shard": "data/shard",
    "dataset": "data/dataset",
    "val_loss": "val/loss", "val_ppl": "val/perplexity",
    # one record per committed checkpoint (pretrain.callbacks.checkpointing)
    "checkpoint_step": "checkpoint/step", "checkpoint_block_s": "perf/checkpoint_block_s",
    "checkpoint_write_s": "perf/checkpoint_write_s", "checkpoint_wait_s": "perf/checkpoint_wait_s",
}


class DataPosition:
    """Where training is in the data, from the one number `consumed` (global samples), in the
    loader's own order: the dataset of the next sample (0 = data.path; others with a blend), and
    that dataset's fractional epoch and shard holding the next sample."""

    def __init__(self, orders: Sequence[SampleOrder], locate: Callable[[int], Tuple[int, int]]):
        self.orders = orders
        self.locate = locate  # global position -> (dataset, index in that dataset's stream)
        self._windows: Dict[int, Window] = {}  # the last window per dataset (its perm is O(size))

    @classmethod
    def of(cls, spec: StreamSpec) -> "DataPosition":
        stream = ShardStream(spec)  # builds the orders only; reads nothing
        return cls(stream.orders, stream.blend.locate)

    def __call__(self, consumed: int) -> Dict[str, Any]:
        d, local = self.locate(consumed)
        order, w = self.orders[d], self._windows.get(d)
        if w is None or not w.start <= local < w.start + w.size:
            w = self._windows[d] = order.window_of(local)
        shard, _ = w.locate(np.array([local - w.start]), order.counts)
        return {"dataset": d, "epoch": local / order.epoch_size, "shard": int(shard[0])}


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
        self._losses: List[float] = []  # the window's all-rank mean losses (the trainer's)
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
        # A skipped step's loss (NaN, or a finite spike) stays out of the logged mean.
        self._losses.append(math.nan if out.skipped else out.global_loss)
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
        # No collective: the trainer's loss is already the all-rank mean, the rest is rank 0's.
        if trainer.dist.is_main:
            record = self._record(trainer, out)
            self.tracker.log(record, WANDB_NAMES)
            self._console(trainer, record)
        self._losses.clear()
        self._window = dict.fromkeys(self._window, 0.0)
        self._timed_optimizer = 0

    def _record(self, trainer: Trainer, out: StepOutput) -> Dict[str, Any]:
        w, state, n = self._window, trainer.state, len(self._losses)
        finite = [x for x in self._losses if math.isfinite(x)]  # skipped steps are NaN here
        loss = sum(finite) / len(finite) if finite else None
        tps = w["tokens"] / w["step"] if w["step"] > 0 else 0.0
        tps_dev = tps / trainer.dist.world_size
        grad_norm = trainer.module.grad_norm()  # the last step's, before clipping
        timed = self._timed_optimizer == n
        return {
            "step": state.step, "tokens_seen": state.tokens_seen,
            "loss": loss, "ppl": math.exp(min(loss, 50.0)) if loss is not None else None,
            "lr": out.lr, "grad_norm": grad_norm,
            "skipped_steps": state.skipped_steps,  # updates discarded: bad loss or gradient
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
            self._bar.set_postfix_str(f"loss {_num(r['loss'], '.4f')} "
                                      f"tok/s {r['tokens_per_s']:,.0f}", refresh=False)
            return
        mfu = f" mfu {r['mfu']:.1%}" if r["mfu"] is not None else ""
        eta = (trainer.max_steps - r["step"]) * r["step_time"]
        log.info("step %d/%d loss %s lr %.3e gnorm %s tok/s %s%s eta %s", r["step"],
                 trainer.max_steps, _num(r["loss"], ".4f"), r["lr"], _num(r["grad_norm"], ".3f"),
                 f"{r['tokens_per_s']:,.0f}", mfu, _fmt_seconds(eta))

    def on_train_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _num(x: Optional[float], fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


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
