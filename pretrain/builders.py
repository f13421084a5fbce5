"""Assemble the parts of a run (model, engine, data streams, tracker, callbacks, trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from pretrain.callbacks.checkpointing import CheckpointCallback
from pretrain.callbacks.evaluation import EvalCallback
from pretrain.callbacks.metrics import DataPosition, MetricsLogger
from pretrain.callbacks.preemption import PreemptionCallback
from pretrain.callbacks.stability import StabilityCallback
from pretrain.callbacks.watchdog import Watchdog
from pretrain.checkpoint import Checkpointer
from pretrain.client_state import ClientState
from pretrain.config import Config
from pretrain.data.loader import StreamSpec, make_loader
from pretrain.data.remote import remote_spec
from pretrain.data.sources import Sources, fingerprint
from pretrain.dist import Dist
from pretrain.model.fallbacks import log_fallbacks
from pretrain.model.gpt import GPT, count_parameters
from pretrain.model.flops import flops_per_token, peak_flops
from pretrain import reshard
from pretrain.plan import count_params
from pretrain.step import StepModule, build_step_module, partitioned_construction
from pretrain.tracking import Tracker
from pretrain.trainer import Trainer


@dataclass
class Run:
    module: StepModule
    trainer: Trainer
    tracker: Tracker
    checkpointer: Checkpointer


def data_spec(cfg: Config, dist: Dist, sources: Sources, split: str, start: int) -> StreamSpec:
    """Training reads the blend; validation reads data.path's held-out split only."""
    (manifest, weight), blend = sources[0], sources[1:] if split == "train" else ()
    return StreamSpec(manifest=manifest, split=split, start=start, weight=weight, blend=blend,
                      micro_batch_size=cfg.trainer.micro_batch_size, dp=dist.dp,
                      dp_rank=dist.dp_rank, seed=cfg.data.seed,
                      window_shards=cfg.data.shuffle_window_shards,
                      shuffle=cfg.data.shuffle and split == "train",
                      max_bad_shards=cfg.data.max_bad_shards, remote=remote_spec(cfg.data, split))


def device_peak(cfg: Config, dist: Dist) -> Tuple[Optional[str], Optional[float]]:
    """The device's name and peak dense bf16 FLOP/s for MFU: cluster.gpu_peak_tflops when set
    (any device, a CPU too), else looked up from the GPU's name; None when unknown (no MFU)."""
    name = torch.cuda.get_device_name(dist.device) if dist.device_type == "cuda" else None
    if cfg.cluster.gpu_peak_tflops:
        return name, cfg.cluster.gpu_peak_tflops * 1e12
    return name, peak_flops(name)


def build_run(cfg: Config, dist: Dist, sources: Sources, run_dir: Path,
              load_universal: bool = False) -> Run:
    """dist.layout is the run's (Config.layout with the dataset's vocabulary). load_universal:
    the step module will load a universal checkpoint (a resume at another layout)."""
    manifest = sources[0][0]
    layout = dist.layout
    padded = layout.padded_vocab_size
    log_fallbacks(cfg.model.normalization, dist.device_type)
    compute_dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32
    model = GPT(cfg.model, padded, layout.tp, dist.device_type, layout.sequence_parallel,
                pp=layout.pp, seed=cfg.trainer.seed, device=dist.device,
                pipeline_dtype=compute_dtype, partitioned=partitioned_construction(cfg, dist))
    n_params = count_parameters(model)
    if cfg.trainer.compile:
        model = torch.compile(model)
    module = build_step_module(model, cfg, dist, load_universal)
    tracker = Tracker(run_dir, cfg.logger, cfg.to_dict(), enabled=dist.is_main,
                      run_name=cfg.run.name or run_dir.name)
    device_name, peak = device_peak(cfg, dist)
    fpt = flops_per_token(cfg.model, padded, manifest.seq_len)
    tracker.update_config({"parameters": count_params(cfg.model, padded).total,
                           "params_per_tp_rank": n_params, "padded_vocab_size": padded,
                           "flops_per_token": fpt, "device": device_name or dist.device_type,
                           "peak_tflops_per_device": peak / 1e12 if peak else None,
                           "world_size": dist.world_size, **layout.batch_sizes()})
    background = cfg.trainer.async_save is not False  # null (older configs): the default, on
    checkpointer = Checkpointer(run_dir / "checkpoints", dist, cfg.trainer.keep_last,
                                cfg.trainer.seed, background=background)
    merge_rules = reshard.universal_info(module.module, padded, cfg.model.activation == "swiglu")
    pin = dist.device_type == "cuda"

    def make_batches(consumed: int):
        spec = data_spec(cfg, dist, sources, "train", consumed)
        return make_loader(spec, cfg.data.num_workers, pin, cfg.data.prefetch_factor)

    def make_val_batches():
        spec = data_spec(cfg, dist, sources, "val", 0)
        return make_loader(spec, 0, pin, limit=cfg.trainer.eval_batches)

    position = DataPosition.of(data_spec(cfg, dist, sources, "train", 0))
    callbacks = [
        PreemptionCallback(),
        MetricsLogger(tracker, cfg.trainer.log_every, fpt, peak, position, cfg.trainer.progress_bar),
    ]
    if cfg.trainer.eval_every and "val" in manifest.splits and manifest.split("val").samples > 0:
        callbacks.append(EvalCallback(cfg.trainer.eval_every, make_val_batches, tracker))
    extra_files = {"config.yaml": run_dir / "config.yaml", "data.yaml": run_dir / "data.yaml",
                   "tokenizer.json": Path(manifest.tokenizer_path)}
    trainer = Trainer(module, dist, layout, cfg.trainer.max_steps, manifest.seq_len, make_batches,
                      callbacks)
    data_fingerprint = fingerprint(sources)

    def client_state(tr: Trainer) -> ClientState:
        return ClientState(trainer=tr.state_dict(), consumed_samples=tr.state.consumed_samples,
                           data_fingerprint=data_fingerprint,
                           wandb_id=tracker.state_dict().get("wandb_id"), layout=layout,
                           universal_info=merge_rules)

    callbacks.append(CheckpointCallback(checkpointer, cfg.trainer.checkpoint_every,
                                        cfg.trainer.checkpoint_every_min, client_state, extra_files,
                                        background=background, tracker=tracker))
    # Stability after the metrics (a bad step is logged before a rollback) and before the
    # checkpoint (which saves its state); the watchdog's heartbeat last, after everything a step does.
    callbacks.insert(-1, StabilityCallback(cfg.stability, checkpointer))
    callbacks.append(Watchdog(60 * cfg.trainer.watchdog_min, 60 * cfg.parallel.timeout_min,
                              run_dir / "stacks"))
    return Run(module, trainer, tracker, checkpointer)
