"""What a configuration needs before it is submitted: parameters, FLOPs, memory, time.

A dry run with no process group. Everything is counted per GPU for a cluster of
`cluster.nodes x cluster.gpus_per_node` GPUs, tensor parallel `parallel.tp`, data parallel
world / tp, and the configured ZeRO stage (all four stages are tabulated).

Parameters are counted analytically from ModelConfig, tensor by tensor as megatron-core builds
them (tests/test_plan.py builds the models and compares). Model-state memory follows the ZeRO
paper (Rajbhandari et al. 2020) for mixed-precision Adam: 2 bytes of 16-bit weights + 2 bytes of
gradients + 12 bytes of optimizer state (fp32 master weights, momentum, variance) per parameter;
fp32 training has 4 + 4 + 8 (no master copy). Activations follow Korthikanti et al. 2022 (see
`activation_bytes`). What DeepSpeed allocates beyond the paper's accounting is `DeepSpeedBuffers`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from pretrain.config import Config, ModelConfig
from pretrain.errors import ConfigError
from pretrain.layout import Layout
from pretrain.model.flops import flops_per_token, peak_flops

if TYPE_CHECKING:
    from pretrain.data.manifest import Manifest

GIB = float(1 << 30)
# Of cluster.gpu_memory_gb only this fraction is planned for: the rest is left to the CUDA
# context, NCCL, the caching allocator's fragmentation and short-lived temporaries.
HEADROOM = 0.10
# The device whose peak (pretrain.model.flops) is assumed when cluster.gpu_peak_tflops is unset.
DEFAULT_DEVICE = "H100"
# DeepSpeed's engine all-reduces ZeRO-0 gradients in flat buckets of this many elements
# (deepspeed.runtime.constants: MEMORY_OPT_ALLREDUCE_SIZE).
ZERO0_ALLREDUCE_BUCKET = 500_000_000

# Bytes per parameter: (weights, gradients, optimizer state) -- the ZeRO paper's accounting.
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}


# ---- parameters ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCount:
    """Parameters of one tensor-parallel rank (tp=1: the whole model), by where they sit."""

    word_embeddings: int
    position_embeddings: int  # learned positions; 0 with RoPE (its inv_freq is a buffer)
    output_layer: int  # the untied LM head; 0 when tied to the word embeddings
    layers: int  # all transformer layers
    final_norm: int

    @property
    def embedding(self) -> int:
        """Vocabulary and position tables (Kaplan et al.'s 'embedding' parameters)."""
        return self.word_embeddings + self.position_embeddings + self.output_layer

    @property
    def non_embedding(self) -> int:
        return self.layers + self.final_norm

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding

    def to_dict(self) -> Dict[str, int]:
        return {**dataclasses.asdict(self), "embedding": self.embedding,
                "non_embedding": self.non_embedding, "total": self.total}


def layer_params(m: ModelConfig, tp: int = 1) -> int:
    """One transformer layer on one TP rank, as megatron-core's local/TE layer spec builds it.

    Column-parallel linears (linear_qkv, linear_fc1) split weight and bias across TP ranks;
    row-parallel ones (linear_proj, linear_fc2) split the weight and replicate the bias; norms
    are replicated. Biases exist on all four when model.bias (add_bias_linear, add_qkv_bias)."""
    h, f = m.hidden_size, m.ffn_size
    head_dim = h // m.num_attention_heads
    kv = (m.num_query_groups or m.num_attention_heads) * head_dim  # K (= V) width
    bias = 1 if m.bias else 0
    norm = h * (2 if m.normalization == "LayerNorm" else 1)  # weight (+ bias for LayerNorm)
    gate = 2 if m.activation == "swiglu" else 1  # SwiGLU's fc1 holds the gate and up projections
    qkv = (h + 2 * kv) * (h + bias) // tp  # (h + 2 kv) x h weight, h + 2 kv bias
    proj = h * h // tp + bias * h
    fc1 = gate * f * (h + bias) // tp
    fc2 = f * h // tp + bias * h
    return 2 * norm + qkv + proj + fc1 + fc2  # input_layernorm + pre_mlp_layernorm


def count_params(m: ModelConfig, vocab_rows: int, tp: int = 1) -> ParamCount:
    """Parameters per TP rank for an embedding of `vocab_rows` rows (the padded vocabulary)."""
    h = m.hidden_size
    if vocab_rows % tp:
        raise ConfigError(f"model.make_vocab_size_divisible_by: {vocab_rows} vocabulary rows "
                          f"do not split over tp={tp}")
    table = vocab_rows * h // tp  # vocab-parallel embedding / column-parallel LM head
    return ParamCount(
        word_embeddings=table,
        position_embeddings=m.max_positions * h if m.position_embedding == "learned" else 0,
        output_layer=0 if m.tie_embeddings else table,
        layers=m.num_layers * layer_params(m, tp),
        final_norm=h * (2 if m.normalization == "LayerNorm" else 1),
    )


# ---- memory ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of weights, gradients and optimizer state at one ZeRO stage."""

    zero_stage: int
    weights: float
    grads: float
    optimizer: float  # on the GPU (0 when offloaded)
    optimizer_cpu: float = 0.0  # in host memory, per GPU process (parallel.offload_optimizer)

    @property
    def gpu(self) -> float:
        return self.weights + self.grads + self.optimizer


def model_states(params: int, precision: str, zero_stage: int, dp: int,
                 offload: bool = False) -> ModelStates:
    """ZeRO's partitioning of `params` (one TP rank's parameters) over `dp` data-parallel ranks:
    stage 1 the optimizer state, stage 2 also the gradients, stage 3 also the weights."""
    w, g, o = (params * b for b in STATE_BYTES[precision])
    o = o / dp if zero_stage >= 1 else o
    g = g / dp if zero_stage >= 2 else g
    w = w / dp if zero_stage >= 3 else w
    if offload and zero_stage >= 1:
        return ModelStates(zero_stage, w, g, 0.0, o)
    return ModelStates(zero_stage, w, g, o)


@dataclass(frozen=True)
class DeepSpeedBuffers:
    """GPU bytes DeepSpeed 0.19 allocates beyond the ZeRO paper's accounting (read from its
    source, the master copy also measured in tests/test_plan.py).

    master_copy: with fp32 training and ZeRO >= 1, DeepSpeedZeroOptimizer still clones an fp32
        partition of the weights for its optimizer (single_partition_of_fp32_groups): 4 bytes per
        parameter / dp. (bf16: that copy *is* the paper's master weights; nothing extra.)
    reduce_buckets: gradient-reduction buckets. ZeRO 1-3: reduce_bucket_size elements in the
        gradient dtype, twice with overlap_comm (our config on CUDA), alive during backward;
        ZeRO 0: flat all-reduce buckets of up to 5e8 elements after backward.
    gathered_weights: ZeRO 3 gathers each layer's full weights (16-bit) before using it; counted
        as two layers (the current one and one prefetched) or the vocabulary table if larger.
    """

    master_copy: float = 0.0
    reduce_buckets: float = 0.0
    gathered_weights: float = 0.0

    @property
    def total(self) -> float:
        return self.master_copy + self.reduce_buckets + self.gathered_weights


def deepspeed_buffers(cfg: Config, layout: Layout, zero_stage: int,
                      params: ParamCount) -> DeepSpeedBuffers:
    """What the engine of a GPU job at `layout` would hold besides the model states, at
    `zero_stage`, read from the DeepSpeed config it would be given."""
    from pretrain.step.deepspeed_engine import deepspeed_config

    precision, dp = cfg.trainer.precision, layout.dp
    staged = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, zero_stage=zero_stage, offload_optimizer=cfg.parallel.offload_optimizer
        and zero_stage >= 1))
    zero = deepspeed_config(staged, dataclasses.replace(layout, zero_stage=zero_stage),
                            "cuda")["zero_optimization"]
    grad_bytes = STATE_BYTES[precision][1]
    offload = staged.parallel.offload_optimizer
    fp32_copy = precision == "fp32" and zero_stage >= 1 and not offload
    master = 4.0 * params.total / dp if fp32_copy else 0.0
    if zero_stage == 0:
        buckets = float(min(ZERO0_ALLREDUCE_BUCKET, params.total) * grad_bytes)
    else:
        copies = 2 if zero.get("overlap_comm") else 1
        buckets = float(zero["reduce_bucket_size"] * grad_bytes * copies)
    gathered = 0.0
    if zero_stage == 3:
        layer = params.layers / max(cfg.model.num_layers, 1)
        gathered = float(max(2 * layer, params.word_embeddings) * STATE_BYTES[precision][0])
    return DeepSpeedBuffers(master, buckets, gathered)


@dataclass(frozen=True)
class Activations:
    """Bytes per GPU kept for the backward pass of one micro-batch (see activation_bytes)."""

    micro_batch: int
    layers: float  # what all transformer layers keep (full recompute: their inputs only)
    recompute_working: float  # full recompute: one layer's activations, rebuilt in backward
    embeddings_and_head: float  # embedding dropout mask, final norm, LM head input, fp32 logits

    @property
    def total(self) -> float:
        return self.layers + self.recompute_working + self.embeddings_and_head


def activation_bytes(m: ModelConfig, micro_batch: int, tp: int, precision: str,
                     vocab_rows: int) -> Activations:
    """Activation memory per GPU after Korthikanti et al. 2022, 'Reducing Activation Recomputation
    in Large Transformer Models', section 4.

    Per layer, in bytes of 16-bit activations, sequence s, micro-batch b, hidden h, heads a:
        s b h (34 + 5 a s / h);  with tensor parallel t (no sequence parallel):
        s b h (10 + 24/t + 5 a s / (h t)).
    The 5 a s / h term is the stored attention matrix (softmax, its dropout mask and output).
    Our core attention is SDPA (flash attention on GPU), which stores none: the term is dropped,
    which is also what selective recompute (model.recompute=selective) gives. That leaves
        s b h (10 + 24/t)
    where 10 s b h is replicated across TP ranks (two norm inputs 4, attention and MLP inputs 4,
    two dropout masks 2) and 24 s b h is split (Q, K, V 6 + projection input 2; MLP 16, i.e.
    fc1's output and the activation's output, 2 x 2 bytes x 4h). For other shapes the split part
    is generalized as 4 + 4 kv/h (grouped-query K and V of width kv) + 4 f/h (MLP of width f;
    6 f/h for SwiGLU, whose fc1 output is 2f wide), which is exactly 24 for GPT-2 shapes.
    Full recompute (model.recompute=full) keeps only each layer's input, 2 s b h, plus one
    layer's full working set while that layer is recomputed in the backward pass.
    Outside the layers: the embedding dropout mask (s b h), the final norm's and the LM head's
    inputs (4 s b h), and the logits in fp32 for the cross entropy, 4 s b V / t bytes.
    fp32 training doubles every 16-bit term.
    """
    s, b, h, t = m.seq_len, micro_batch, m.hidden_size, tp
    kv = (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    mlp = (6 if m.activation == "swiglu" else 4) * m.ffn_size / h
    split = 4 + 4 * kv / h + mlp  # 24 for GPT-2 shapes
    scale = 2 if precision == "fp32" else 1
    sbh = float(s * b * h)
    per_layer = sbh * (10 + split / t) * scale
    if m.recompute == "full":
        layers, working = m.num_layers * 2 * sbh * scale, per_layer
    else:
        layers, working = m.num_layers * per_layer, 0.0
    head = 5 * sbh * scale + 4.0 * s * b * vocab_rows / t
    return Activations(micro_batch, layers, working, head)


# ---- the plan --------------------------------------------------------------------------------
@dataclass
class Plan:
    model: str
    nodes: int
    gpus_per_node: int
    world: int
    tp: int
    dp: int
    zero_stage: int
    precision: str
    offload_optimizer: bool
    recompute: str
    seq_len: int
    micro_batch: int
    global_batch: int
    grad_accum: int
    vocab: int
    vocab_source: str
    padded_vocab: int
    params: ParamCount  # whole model, padded vocabulary
    params_unpadded: int  # whole model with the tokenizer's vocabulary
    params_per_rank: ParamCount
    flops_per_token: float
    tokens_per_step: int
    states: List[ModelStates]  # ZeRO 0..3
    buffers: List[DeepSpeedBuffers]  # ZeRO 0..3
    activations: Activations  # the configured micro-batch
    activation_per_sample: float
    gpu_memory_gib: float
    usable_gib: float
    max_micro_batch: List[int]  # per ZeRO stage: the largest that fits in usable_gib
    peak_tflops: float
    peak_source: str
    assumed_mfu: float
    tokens_per_s_gpu: float
    tokens_per_s: float
    step_s: float
    steps: int
    steps_source: str
    total_tokens: float
    total_s: float
    warnings: List[str] = field(default_factory=list)

    def gpu_bytes(self, zero_stage: int, micro_batch: Optional[int] = None) -> float:
        """Everything planned on one GPU at a ZeRO stage and micro-batch (default: configured)."""
        mb = self.micro_batch if micro_batch is None else micro_batch
        return (self.states[zero_stage].gpu + self.buffers[zero_stage].total
                + self.activations.total / self.micro_batch * mb)

    @property
    def fits(self) -> bool:
        return self.gpu_bytes(self.zero_stage) <= self.usable_gib * GIB

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["params"] = self.params.to_dict()
        out["params_per_rank"] = self.params_per_rank.to_dict()
        out["states"] = [{**dataclasses.asdict(s), "gpu": s.gpu} for s in self.states]
        out["buffers"] = [{**dataclasses.asdict(b), "total": b.total} for b in self.buffers]
        out["activations"] = {**dataclasses.asdict(self.activations),
                              "total": self.activations.total}
        out["gpu_bytes"] = [self.gpu_bytes(z) for z in range(4)]
        out["fits"] = self.fits
        return out


def vocab_for_dataset(cfg: Config, manifest: Manifest) -> int:
    """The vocabulary the model is built with: the dataset's tokenizer's, or model.vocab_size
    when that names a larger one (room for tokens added later); a smaller one cannot embed the
    data. Here, not in the run recipe, so that the planner and the run agree without importing
    each other (pretrain.run imports the builders, which import this module)."""
    if cfg.model.vocab_size is None:
        return manifest.vocab_size
    if cfg.model.vocab_size < manifest.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the dataset's tokenizer "
            f"({manifest.vocab_size} tokens, {manifest.root}); remove the override or retokenize")
    return cfg.model.vocab_size


def resolve_vocab(cfg: Config) -> Tuple[int, str]:
    """(vocabulary size, where it came from): model.vocab_size, else data.path's manifest."""
    if cfg.data.path is not None:
        from pretrain.data.manifest import Manifest

        manifest = Manifest.load(cfg.data.path, check_files=False)
        source = "model.vocab_size" if cfg.model.vocab_size is not None else manifest.path
        return vocab_for_dataset(cfg, manifest), source
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size: unknown (this preset takes it from the dataset); "
                          "pass model.vocab_size=N or data.path=DIR (a pretrain-data dataset)")
    return cfg.model.vocab_size, "model.vocab_size"


def make_plan(cfg: Config) -> Plan:
    """Validate cfg for the cluster it names and work out the plan (ConfigError if it can't run)."""
    cl, tr, par = cfg.cluster, cfg.trainer, cfg.parallel
    world = cl.nodes * cl.gpus_per_node
    cfg.validate(need_data=False)
    vocab, vocab_source = resolve_vocab(cfg)
    layout = cfg.layout(world, vocab)
    padded = layout.padded_vocab_size
    per_rank = count_params(cfg.model, padded, par.tp)
    states = [model_states(per_rank.total, tr.precision, z, layout.dp,
                           par.offload_optimizer) for z in range(4)]
    buffers = [deepspeed_buffers(cfg, layout, z, per_rank) for z in range(4)]
    acts = activation_bytes(cfg.model, tr.micro_batch_size, par.tp, tr.precision, padded)
    per_sample = acts.total / tr.micro_batch_size
    usable = cl.gpu_memory_gb * (1 - HEADROOM)
    max_mb = [max(0, math.floor((usable * GIB - states[z].gpu - buffers[z].total) / per_sample))
              for z in range(4)]

    fpt = flops_per_token(cfg.model, padded)
    peak, peak_source = _peak(cl.gpu_peak_tflops)
    tok_gpu = cl.assumed_mfu * peak * 1e12 / fpt  # MFU = tokens/s per GPU x FLOPs/token / peak
    tok_step = layout.global_batch_size * cfg.model.seq_len
    step_s = tok_step / (tok_gpu * world)
    if cl.token_budget:
        steps, steps_source = math.ceil(cl.token_budget / tok_step), "cluster.token_budget"
    else:
        steps, steps_source = tr.max_steps, "trainer.max_steps"
    plan = Plan(
        model=cfg.model.name, nodes=cl.nodes, gpus_per_node=cl.gpus_per_node, world=world,
        tp=par.tp, dp=layout.dp, zero_stage=par.zero_stage, precision=tr.precision,
        offload_optimizer=par.offload_optimizer, recompute=cfg.model.recompute,
        seq_len=cfg.model.seq_len, micro_batch=tr.micro_batch_size,
        global_batch=layout.global_batch_size, grad_accum=layout.grad_accum,
        vocab=vocab, vocab_source=vocab_source, padded_vocab=padded,
        params=count_params(cfg.model, padded),
        params_unpadded=count_params(cfg.model, vocab).total,
        params_per_rank=per_rank, flops_per_token=fpt, tokens_per_step=tok_step,
        states=states, buffers=buffers, activations=acts, activation_per_sample=per_sample,
        gpu_memory_gib=cl.gpu_memory_gb, usable_gib=usable, max_micro_batch=max_mb,
        peak_tflops=peak, peak_source=peak_source, assumed_mfu=cl.assumed_mfu,
        tokens_per_s_gpu=tok_gpu, tokens_per_s=tok_gpu * world, step_s=step_s, steps=steps,
        steps_source=steps_source, total_tokens=float(steps * tok_step), total_s=steps * step_s)
    plan.warnings = _warnings(plan)
    return plan


def _peak(tflops: Optional[float]) -> Tuple[float, str]:
    if tflops:
        return float(tflops), "cluster.gpu_peak_tflops"
    return peak_flops(DEFAULT_DEVICE) / 1e12, (
        f"{DEFAULT_DEVICE} SXM dense bf16, assumed; set cluster.gpu_peak_tflops for another GPU")


def _warnings(p: Plan) -> List[str]:
    out = []
    if not p.fits:
        need = p.gpu_bytes(p.zero_stage) / GIB
        fixes = [f"trainer.micro_batch_size<={p.max_micro_batch[p.zero_stage]}"
                 if p.max_micro_batch[p.zero_stage] else None]
        fixes += [f"parallel.zero_stage={z}" for z in range(p.zero_stage + 1, 4)
                  if p.max_micro_batch[z] >= p.micro_batch][:1]
        if p.recompute != "full":
            fixes.append("model.recompute=full")
        fixes.append(f"parallel.tp={2 * p.tp}")
        out.append(f"micro-batch {p.micro_batch} does NOT fit: it needs {need:.1f} GiB per GPU at "
                   f"ZeRO-{p.zero_stage}, {p.usable_gib:.1f} GiB usable; try "
                   + ", ".join(f for f in fixes if f))
    return out


# ---- rendering -------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(p: Plan) -> str:
    """The plan as a readable table."""
    pc, pr = p.params, p.params_per_rank
    head = f"untied LM head {pc.output_layer:,}" if pc.output_layer else "LM head tied"
    lines = [
        f"pretrain-plan: {p.model} on {p.nodes} node(s) x {p.gpus_per_node} GPUs = {p.world}; "
        f"tp={p.tp} dp={p.dp} ZeRO-{p.zero_stage} {p.precision} recompute={p.recompute}",
        f"vocabulary {p.vocab:,} ({p.vocab_source}), padded to {p.padded_vocab:,}",
        "",
        "parameters",
        f"  total            {pc.total:>15,}   (unpadded vocabulary: {p.params_unpadded:,})",
        f"  embedding        {pc.embedding:>15,}   (word {pc.word_embeddings:,}, positions "
        f"{pc.position_embeddings:,}, {head})",
        f"  non-embedding    {pc.non_embedding:>15,}",
        f"  per TP rank      {pr.total:>15,}",
        "",
        "compute",
        f"  FLOPs per token  {p.flops_per_token:>15.4g}   (6N + 12LHQT, forward + backward)",
        f"  tokens per step  {p.tokens_per_step:>15,}   = global batch {p.global_batch} x seq "
        f"{p.seq_len} (micro {p.micro_batch} x dp {p.dp} x accumulation {p.grad_accum})",
        "",
        f"memory per GPU (GiB): {pr.total:,} parameters per TP rank x "
        + ("(4 B weights + 4 B grads + 8 B Adam m, v)" if p.precision == "fp32" else
           "(2 B weights + 2 B grads + 12 B fp32 master, m, v)"),
        "  ZeRO  weights    grads optimizer   states  DS bufs activations  total  max micro-batch",
    ]
    for z in range(4):
        s, b = p.states[z], p.buffers[z]
        mark = "*" if z == p.zero_stage else " "
        lines.append(f"  {mark}{z}  {_gib(s.weights)} {_gib(s.grads)} {_gib(s.optimizer)}  "
                     f"{_gib(s.gpu)} {_gib(b.total)} {_gib(p.activations.total)} "
                     f"{_gib(p.gpu_bytes(z))}   {p.max_micro_batch[z]:>6}")
    lines.append("  (* configured; ZeRO 1 partitions optimizer state over dp, 2 also gradients, "
                 "3 also weights)")
    if p.offload_optimizer:
        cpu = p.states[p.zero_stage].optimizer_cpu
        lines.append(f"  optimizer offloaded to CPU: {cpu / GIB:.2f} GiB per GPU process, "
                     f"{cpu * p.gpus_per_node / GIB:.1f} GiB host memory per node")
    b, a = p.buffers[p.zero_stage], p.activations
    lines += [
        f"  DeepSpeed buffers (ZeRO-{p.zero_stage}): reduce buckets {b.reduce_buckets / GIB:.2f}"
        + (f", fp32 master copy {b.master_copy / GIB:.2f}" if b.master_copy else "")
        + (f", gathered weights {b.gathered_weights / GIB:.2f}" if b.gathered_weights else ""),
        f"  activations, micro-batch {p.micro_batch} x {p.seq_len} (SDPA, recompute={p.recompute}):"
        f" layers {a.layers / GIB:.2f}"
        + (f" + recomputed layer {a.recompute_working / GIB:.2f}" if a.recompute_working else "")
        + f" + embeddings/logits {a.embeddings_and_head / GIB:.2f}"
        f" = {a.total / GIB:.2f} ({p.activation_per_sample / GIB:.3f} per sequence)",
        f"  usable {p.usable_gib:.1f} of {p.gpu_memory_gib:g} GiB (cluster.gpu_memory_gb; "
        f"{HEADROOM:.0%} left for the CUDA context, NCCL and allocator fragmentation)",
        f"  micro-batch {p.micro_batch}: "
        + (f"fits ({p.gpu_bytes(p.zero_stage) / GIB:.1f} GiB)" if p.fits else "DOES NOT FIT")
        + f"; largest that fits at ZeRO-{p.zero_stage}: {p.max_micro_batch[p.zero_stage]}",
        "",
        f"throughput at {p.assumed_mfu:.0%} MFU (cluster.assumed_mfu) of {p.peak_tflops:g} "
        f"TFLOP/s ({p.peak_source})",
        f"  tokens/s         {p.tokens_per_s_gpu:>15,.0f} per GPU, {p.tokens_per_s:,.0f} total",
        f"  time per step    {_duration(p.step_s):>15}",
        f"  {p.steps:,} steps ({p.steps_source}) = {p.total_tokens:,.0f} tokens in "
        f"{_duration(p.total_s)}",
    ]
    lines += [f"WARNING: {w}" for w in p.warnings]
    return "\n".join(lines)
