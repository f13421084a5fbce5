"""Typed configuration: one dataclass per component, validated once at the boundary.

The Hydra app (launch/) composes YAML into these dataclasses (OmegaConf's structured configs,
so a misspelt key or a wrong type fails at composition) and then calls `Config.validate()`, which
checks the relations between settings and raises ConfigError naming the setting and the fix.
Nothing in this package imports Hydra.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from pretrain.errors import ConfigError
from pretrain.layout import Layout

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "wsd", "constant")
LOGGER_MODES = ("online", "offline", "disabled")


def _check(cond: bool, setting: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{setting}: {message}")


@dataclass
class ModelConfig:
    """A decoder-only transformer. Presets in hydra_conf/model/ fill these in."""

    name: str = "custom"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    # Grouped-query attention: None means one key/value head per query head (multi-head).
    num_query_groups: Optional[int] = None
    # None means 4 x hidden_size (GPT-2); SwiGLU presets set it explicitly.
    ffn_hidden_size: Optional[int] = None
    # None: taken from the dataset's tokenizer at start-up.
    vocab_size: Optional[int] = None
    # Pad the vocabulary to a multiple of this (times TP) for fast matmuls and TP divisibility.
    make_vocab_size_divisible_by: int = 128
    seq_len: int = 128
    max_position_embeddings: Optional[int] = None
    position_embedding: str = "learned"  # learned | rope
    rotary_base: int = 10000
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    norm_epsilon: float = 1e-5
    activation: str = "gelu"  # gelu | gelu_tanh | swiglu
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    # megatron-core fused kernels (bias-activation, vocab-parallel cross entropy): for GPUs.
    # "auto" turns them on when running on CUDA and off on CPU, where they do not pay (FIELD-NOTES).
    fused_kernels: str = "auto"  # auto | on | off
    # Activation checkpointing: none | selective (core attention) | full (whole layers).
    recompute: str = "none"

    def validate(self, tp: int = 1) -> None:
        p = "model"
        for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_len"):
            _check(getattr(self, key) > 0, f"{p}.{key}", f"must be positive, got {getattr(self, key)}")
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            f"{p}.hidden_size",
            f"{self.hidden_size} is not divisible by model.num_attention_heads="
            f"{self.num_attention_heads}; pick a multiple",
        )
        groups = self.num_query_groups or self.num_attention_heads
        _check(
            self.num_attention_heads % groups == 0,
            f"{p}.num_query_groups",
            f"{groups} must divide model.num_attention_heads={self.num_attention_heads}",
        )
        _check(
            self.num_attention_heads % tp == 0,
            "parallel.tp",
            f"tp={tp} must divide model.num_attention_heads={self.num_attention_heads}",
        )
        _check(groups % tp == 0, "parallel.tp", f"tp={tp} must divide the {groups} key/value groups")
        _check(
            self.ffn_size % tp == 0, "parallel.tp", f"tp={tp} must divide ffn size {self.ffn_size}"
        )
        _check(self.position_embedding in ("learned", "rope"), f"{p}.position_embedding",
               f"'{self.position_embedding}' is not one of learned, rope")
        _check(self.normalization in ("LayerNorm", "RMSNorm"), f"{p}.normalization",
               f"'{self.normalization}' is not one of LayerNorm, RMSNorm")
        _check(self.activation in ("gelu", "gelu_tanh", "swiglu"), f"{p}.activation",
               f"'{self.activation}' is not one of gelu, gelu_tanh, swiglu")
        _check(self.fused_kernels in ("auto", "on", "off"), f"{p}.fused_kernels",
               f"'{self.fused_kernels}' is not one of auto, on, off")
        _check(self.recompute in ("none", "selective", "full"), f"{p}.recompute",
               f"'{self.recompute}' is not one of none, selective, full")
        _check(0.0 <= self.dropout < 1.0, f"{p}.dropout", "must be in [0, 1)")
        _check(0.0 <= self.attention_dropout < 1.0, f"{p}.attention_dropout", "must be in [0, 1)")
        _check(self.make_vocab_size_divisible_by > 0, f"{p}.make_vocab_size_divisible_by",
               "must be positive")
        if self.vocab_size is not None:
            _check(self.vocab_size > 0, f"{p}.vocab_size", "must be positive")
        _check(self.max_positions >= self.seq_len, f"{p}.max_position_embeddings",
               f"{self.max_positions} is shorter than model.seq_len={self.seq_len}")

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_len

    def padded_vocab_size(self, tp: int = 1, vocab_size: Optional[int] = None) -> int:
        """The embedding rows: the tokenizer's vocabulary rounded up to a multiple of divisor x TP."""
        vocab = vocab_size if vocab_size is not None else self.vocab_size
        if vocab is None:
            raise ConfigError("model.vocab_size: unknown; set it or point data.path at a dataset")
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(vocab / multiple) * multiple)


@dataclass
class DataConfig:
    # A dataset directory written by pretrain-data (holds manifest.json).
    path: Optional[str] = None
    # Blends: more dataset directories sampled with these weights beside `path` (which has
    # `weight`), e.g. data.path=/d/web data.weight=0.7 data.blend=[/d/code] data.blend_weights=[0.3].
    weight: float = 1.0
    # Where data.path's shards are opened, `{path}` standing for each shard's path in the
    # manifest: "pipe:aws s3 cp s3://bucket/web/{path} -", "https://host/web/{path}", "/fast/{path}".
    shards_url: Optional[str] = None
    # Which training shards to read and where: a path, a glob or a brace list, webdataset style,
    # `::` between several, e.g. '/nvme/web/train/shard-{000000..000049}.tar' or
    # 'pipe:aws s3 cp s3://bucket/web/train/shard-{000000..000099}.tar -'. Each must be a train
    # shard of data.path's manifest (matched by its path there, else its file name); null: all.
    shards: Optional[str] = None
    blend: List[str] = field(default_factory=list)
    blend_weights: List[float] = field(default_factory=list)
    num_workers: int = 1
    # Samples are shuffled within windows of this many consecutive shards of the shard order.
    shuffle_window_shards: int = 4
    shuffle: bool = True
    seed: int = 1234
    # Stop after this many unreadable shards (each one is skipped with a warning).
    max_bad_shards: int = 0
    # A changed dataset or tokenizer is an error on resume unless this is true.
    allow_fingerprint_change: bool = False
    prefetch_factor: int = 4
    # Shards behind a URL (http(s):// or a pipe: command in data.shards_url / data.shards).
    # range: each rank fetches only the samples it owns with HTTP Range requests (whole cluster
    # ~1x the dataset per epoch; servers without multipart ranges, such as S3 or GCS, and pipe:
    # fall back to cache). cache: whole shards fetched once per node into data.cache_dir.
    remote_mode: str = "range"
    # Node-local and shared by the node's ranks (local disk or /dev/shm, not a shared filesystem);
    # null: <tmp>/pretrain-shards-<uid>. Bounded by cache_limit_gb (least recently used evicted).
    cache_dir: Optional[str] = None
    cache_limit_gb: float = 20.0
    # Windows of shards fetched ahead of the one being read; concurrent requests per reader.
    prefetch_windows: int = 1
    fetch_threads: int = 4
    # A failed request is retried fetch_retries times, fetch_backoff_s x 2^k apart, then the shard
    # counts as bad (data.max_bad_shards); fetch_timeout_s bounds each connect and read.
    fetch_retries: int = 4
    fetch_backoff_s: float = 1.0
    fetch_timeout_s: float = 60.0

    def validate(self) -> None:
        _check(self.path is not None, "data.path",
               "no dataset: run `pretrain-data --input ... --output DIR` and pass data.path=DIR")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.shuffle_window_shards >= 1, "data.shuffle_window_shards", "must be >= 1")
        _check(self.max_bad_shards >= 0, "data.max_bad_shards", "must be >= 0")
        _check(self.weight > 0, "data.weight", "must be positive")
        _check(len(self.blend) == len(self.blend_weights), "data.blend_weights",
               f"{len(self.blend_weights)} weights for {len(self.blend)} datasets in data.blend")
        _check(all(w > 0 for w in self.blend_weights), "data.blend_weights", "must be positive")
        _check(self.remote_mode in ("range", "cache"), "data.remote_mode",
               f"'{self.remote_mode}' is not one of range, cache")
        _check(self.cache_limit_gb > 0, "data.cache_limit_gb", "must be positive")
        _check(self.prefetch_windows >= 0, "data.prefetch_windows", "must be >= 0 (0: no prefetch)")
        _check(self.fetch_threads >= 1, "data.fetch_threads", "must be >= 1")
        _check(self.fetch_retries >= 0, "data.fetch_retries", "must be >= 0")
        _check(self.fetch_backoff_s >= 0, "data.fetch_backoff_s", "must be >= 0")
        _check(self.fetch_timeout_s > 0, "data.fetch_timeout_s", "must be positive")


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Clip the global gradient norm to this; 0 turns clipping off.
    grad_clip: float = 1.0
    # torch's fused/foreach AdamW on GPU; DeepSpeed's FusedAdam when "deepspeed".
    impl: str = "torch"  # torch | deepspeed

    def validate(self) -> None:
        p = "optimizer"
        _check(self.name == "adamw", f"{p}.name", f"'{self.name}' is not supported; use adamw")
        _check(self.lr > 0, f"{p}.lr", f"must be positive, got {self.lr}")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{p}.beta1/beta2", "must be in [0, 1)")
        _check(self.eps > 0, f"{p}.eps", "must be positive")
        _check(self.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0 (0 turns clipping off)")
        _check(self.impl in ("torch", "deepspeed"), f"{p}.impl", "must be torch or deepspeed")


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | linear | wsd | constant
    warmup_steps: int = 100
    # The learning rate decays to lr x min_lr_ratio.
    min_lr_ratio: float = 0.1
    # warmup-stable-decay: the last fraction of the steps decays linearly.
    decay_fraction: float = 0.2
    # Steps the schedule spans; None means trainer.max_steps.
    total_steps: Optional[int] = None

    def validate(self) -> None:
        p = "schedule"
        _check(self.name in SCHEDULES, f"{p}.name", f"'{self.name}' is not one of {SCHEDULES}")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio", "must be in [0, 1]")
        _check(0 < self.decay_fraction <= 1, f"{p}.decay_fraction", "must be in (0, 1]")


@dataclass
class ParallelConfig:
    tp: int = 1
    # Pipeline-parallel stages (must divide model.num_layers); data-parallel = world / (tp x pp).
    pp: int = 1
    # Megatron's sequence parallelism: norms, dropouts and their activations split over the TP
    # ranks along the sequence (Korthikanti et al. 2022); needs tp > 1.
    sequence_parallel: bool = False
    zero_stage: int = 1
    # auto: cuda when available, else cpu. Asking for cuda without a GPU is an error.
    device: str = "auto"
    # auto: nccl on cuda, gloo on cpu.
    backend: str = "auto"
    # Offload optimizer state to CPU memory (ZeRO 1-3).
    offload_optimizer: bool = False
    # Collective timeouts (minutes): generous for start-up, tighter once training runs.
    init_timeout_min: float = 30.0
    # Once the first step has finished every collective must complete within this; a rank that
    # stops answering then fails the job instead of holding it until the Slurm time limit.
    timeout_min: float = 10.0

    def validate(self) -> None:
        p = "parallel"
        _check(self.tp >= 1, f"{p}.tp", f"must be >= 1, got {self.tp}")
        _check(self.pp >= 1, f"{p}.pp", f"must be >= 1, got {self.pp}")
        _check(not (self.sequence_parallel and self.tp == 1), f"{p}.sequence_parallel",
               "needs parallel.tp > 1 (it splits activations over the tensor-parallel ranks)")
        # The CPU prototype of issue 14: DeepSpeed's ZeRO-2 fails and ZeRO-3 hangs under
        # megatron-core's pipeline schedule; ZeRO-1 (Megatron's distributed optimizer) works.
        _check(not (self.pp > 1 and self.zero_stage >= 2), f"{p}.zero_stage",
               f"ZeRO-{self.zero_stage} with parallel.pp={self.pp} is not supported (DeepSpeed's "
               f"ZeRO-2/3 do not work under pipeline parallelism); use parallel.zero_stage=1")
        _check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage",
               f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.device in ("auto", "cpu", "cuda"), f"{p}.device", "must be auto, cpu or cuda")
        _check(self.backend in ("auto", "gloo", "nccl"), f"{p}.backend", "must be auto, gloo or nccl")
        _check(not (self.offload_optimizer and self.zero_stage == 0), f"{p}.offload_optimizer",
               "needs parallel.zero_stage >= 1")
        _check(self.init_timeout_min > 0, f"{p}.init_timeout_min", "must be positive")
        _check(self.timeout_min > 0, f"{p}.timeout_min", "must be positive")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8
    # Sequences per optimizer step across all data-parallel ranks. None: micro x DP (no accumulation).
    global_batch_size: Optional[int] = None
    precision: str = "bf16"  # fp32 | bf16 | fp16 (fp16 only on GPU, with loss scaling)
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic validation
    eval_batches: int = 8
    checkpoint_every: int = 0  # steps; 0: only at the end
    checkpoint_every_min: float = 0.0  # wall-clock minutes; 0: off
    keep_last: int = 3
    resume: bool = True
    resume_from: Optional[str] = None
    progress_bar: str = "auto"  # auto | on | off
    compile: bool = False
    # Exit (stacks dumped to stderr and RUN_DIR/stacks/) when no step has finished for this many
    # minutes: it must exceed the longest step including its checkpoint save and eval. 0: off.
    watchdog_min: float = 30.0
    # Scheduled checkpoints staged in host memory and written by a background thread, committed
    # at a later step once every rank is done (pretrain.checkpoint). false: every save
    # synchronous (no host copy of the state). null is taken for true (older configs).
    async_save: Optional[bool] = True

    def validate(self) -> None:
        p = "trainer"
        _check(self.max_steps > 0, f"{p}.max_steps", f"must be positive, got {self.max_steps}")
        _check(self.micro_batch_size > 0, f"{p}.micro_batch_size", "must be positive")
        _check(self.precision in PRECISIONS, f"{p}.precision",
               f"'{self.precision}' is not one of {PRECISIONS}")
        _check(self.log_every > 0, f"{p}.log_every", "must be positive")
        _check(self.eval_every >= 0, f"{p}.eval_every", "must be >= 0")
        _check(self.checkpoint_every >= 0, f"{p}.checkpoint_every", "must be >= 0")
        _check(self.keep_last >= 1, f"{p}.keep_last", "must be >= 1")
        _check(self.progress_bar in ("auto", "on", "off"), f"{p}.progress_bar",
               "must be auto, on or off")
        _check(self.watchdog_min >= 0, f"{p}.watchdog_min", "must be >= 0 (0 turns it off)")
        _check(self.async_save in (None, True, False), f"{p}.async_save",
               f"must be true or false, got {self.async_save!r}")
        if self.global_batch_size is not None:
            _check(self.global_batch_size > 0, f"{p}.global_batch_size", "must be positive")


@dataclass
class StabilityConfig:
    """What a step with a bad loss does: skipped, counted, and after a streak, rollback or stop."""

    # A loss or gradient norm that is NaN/inf on any rank: every rank skips that step's update.
    skip_nonfinite: bool = True
    # A loss above mean + spike_std x std of the last spike_window good steps is skipped.
    # 0 turns spike detection off; it starts once the window is full and after spike_warmup steps.
    spike_std: float = 0.0
    spike_window: int = 100
    spike_warmup: int = 1000
    # After this many consecutive skipped steps: `rollback` loads the newest checkpoint from
    # before the streak and skips the data read since it; `stop` ends the run with an error.
    max_bad_steps: int = 10
    on_bad_steps: str = "rollback"  # rollback | stop
    # Rollbacks allowed in one run before it stops anyway.
    max_rollbacks: int = 3

    def validate(self) -> None:
        p = "stability"
        _check(self.spike_std >= 0, f"{p}.spike_std", "must be >= 0 (0 turns spike detection off)")
        _check(self.spike_window >= 2, f"{p}.spike_window", "must be >= 2 (a std needs two losses)")
        _check(self.spike_warmup >= 0, f"{p}.spike_warmup", "must be >= 0")
        _check(self.max_bad_steps >= 1, f"{p}.max_bad_steps", "must be >= 1")
        _check(self.on_bad_steps in ("rollback", "stop"), f"{p}.on_bad_steps",
               f"'{self.on_bad_steps}' is not one of rollback, stop")
        _check(self.max_rollbacks >= 0, f"{p}.max_rollbacks", "must be >= 0")


@dataclass
class LoggerConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "pretrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)

    def validate(self) -> None:
        _check(self.mode in LOGGER_MODES, "logger.mode", f"'{self.mode}' is not one of {LOGGER_MODES}")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: Optional[str] = None


@dataclass
class ClusterConfig:
    """The machines a plan is made for (pretrain-plan). Training reads its layout from the launcher
    and takes gpu_peak_tflops, when set, as the device peak for MFU."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    gpu_peak_tflops: Optional[float] = None  # None: looked up from the device name
    assumed_mfu: float = 0.40
    token_budget: Optional[float] = None
    # Inter-node bandwidth per GPU, Gb/s (NDR InfiniBand: 400), for the data-parallel traffic.
    network_gbps: float = 400.0

    def validate(self) -> None:
        _check(self.nodes >= 1, "cluster.nodes", "must be >= 1")
        _check(self.network_gbps > 0, "cluster.network_gbps", "must be positive")
        _check(self.gpus_per_node >= 1, "cluster.gpus_per_node", "must be >= 1")
        _check(self.gpu_memory_gb > 0, "cluster.gpu_memory_gb", "must be positive")
        _check(0 < self.assumed_mfu <= 1, "cluster.assumed_mfu", "must be in (0, 1]")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)

    def validate(self, world_size: Optional[int] = None, need_data: bool = True,
                 for_training: bool = True) -> "Config":
        """Check every component and the relations between them; world_size from the launcher.
        for_training=False (pretrain-plan) accepts layouts that can be planned but not yet run."""
        self.parallel.validate()
        self.model.validate(tp=self.parallel.tp)
        par, m = self.parallel, self.model
        _check(m.num_layers % par.pp == 0, "parallel.pp",
               f"pp={par.pp} must divide model.num_layers={m.num_layers} (equal stages)")
        _check(not par.sequence_parallel or m.seq_len % par.tp == 0, "parallel.sequence_parallel",
               f"model.seq_len={m.seq_len} must be divisible by parallel.tp={par.tp}")
        if for_training:
            # The pipeline step (pretrain.step.pipeline_step) runs megatron's 1F1B schedule with
            # DeepSpeed's ZeRO-1 doing the reduction and the update. Its fp32 ZeRO-0 clipping
            # counts replicated parameters on the first stage only, ZeRO-2 fails and ZeRO-3 hangs
            # under the schedule (FIELD-NOTES); fp16 would need the schedule to scale the loss.
            _check(par.pp == 1 or par.zero_stage == 1, "parallel.zero_stage",
                   f"parallel.pp={par.pp} runs with ZeRO-1 only, got parallel.zero_stage="
                   f"{par.zero_stage}: use parallel.zero_stage=1")
            _check(par.pp == 1 or self.trainer.precision != "fp16", "trainer.precision",
                   f"fp16 with parallel.pp={par.pp} is not supported: use trainer.precision=bf16")
            _check(par.pp == 1 or not self.trainer.compile, "trainer.compile",
                   f"torch.compile with parallel.pp={par.pp} is not supported: the pipeline "
                   f"schedule drives the stage's module itself; use trainer.compile=false")
            # Untested: DeepSpeed's ZeRO-3 partitions the SP-marked norms whose gradients the
            # step module sums over the TP group by a hook on the parameter.
            _check(not (par.sequence_parallel and par.zero_stage == 3), "parallel.sequence_parallel",
                   "sequence parallelism with parallel.zero_stage=3 is not supported; use ZeRO 0-2 "
                   "or parallel.sequence_parallel=false")
        if need_data:
            self.data.validate()
        self.optimizer.validate()
        self.schedule.validate()
        self.trainer.validate()
        self.logger.validate()
        self.cluster.validate()
        self.stability.validate()
        if world_size is not None:
            self.layout(world_size)
        return self

    def layout(self, world_size: int, vocab_size: Optional[int] = None,
               saved: Optional[Layout] = None) -> Layout:
        """The parallel layout of `world_size` processes under these settings (the one place they
        map to it); ConfigError naming the setting when it cannot be. vocab_size: the tokenizer's,
        for the embedding rows; saved: the layout of the checkpoint being resumed."""
        par, tr = self.parallel, self.trainer
        return Layout.build(world_size, tp=par.tp, zero_stage=par.zero_stage,
                            micro_batch_size=tr.micro_batch_size,
                            global_batch_size=tr.global_batch_size, pp=par.pp,
                            sequence_parallel=par.sequence_parallel,
                            vocab_size=vocab_size,
                            vocab_multiple=self.model.make_vocab_size_divisible_by, saved=saved)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "Config":
        """Build from a plain dict (a saved config.yaml); unknown keys are errors."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            section = dict(raw.get(f.name) or {})
            sub = f.default_factory()  # type: ignore[misc]
            names = {x.name for x in dataclasses.fields(sub)}
            unknown = set(section) - names
            if unknown:
                raise ConfigError(f"{f.name}: unknown keys {sorted(unknown)}")
            kwargs[f.name] = type(sub)(**section)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}")
        return cls(**kwargs)
