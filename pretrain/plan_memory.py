"""The planner's arithmetic per GPU: parameters, model states, DeepSpeed's buffers, activations
and start-up memory, for one pipeline stage of one tensor-parallel rank.

Parameters are counted analytically from ModelConfig, tensor by tensor as megatron-core builds
them (tests/test_plan.py builds the models and compares). Model-state memory follows the ZeRO
paper (Rajbhandari et al. 2020) for mixed-precision Adam: 2 bytes of 16-bit weights + 2 bytes of
gradients + 12 bytes of optimizer state (fp32 master weights, momentum, variance) per parameter;
fp32 training has 4 + 4 + 8 (no master copy). Activations follow Korthikanti et al. 2022 with
sequence and pipeline parallelism (see `activation_bytes`). What DeepSpeed allocates beyond the
paper's accounting is `DeepSpeedBuffers`; what construction needs before the first step is
`Startup`.

Pipeline stages are equal: stage i of pp holds num_layers / pp layers; the first also the input
embeddings, the last the final norm and the LM head (with tied embeddings a second copy of the
word table, which megatron-core keeps on the last stage and all-reduces its gradient with the
first's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict

from pretrain.config import Config, ModelConfig
from pretrain.errors import ConfigError

if TYPE_CHECKING:
    from pretrain.layout import Layout

GIB = float(1 << 30)
# DeepSpeed's engine all-reduces ZeRO-0 gradients in flat buckets of this many elements
# (deepspeed.runtime.constants: MEMORY_OPT_ALLREDUCE_SIZE).
ZERO0_ALLREDUCE_BUCKET = 500_000_000

# Bytes per parameter: (weights, gradients, optimizer state) -- the ZeRO paper's accounting.
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}

# How a rank builds its model, which decides its start-up memory (see startup_bytes):
#   tp_shard: today's code (pretrain.model.gpt): built on the meta device, the rank's whole TP shard
#             of its stage materialised on its GPU in fp32 and filled one row at a time from the
#             host (pretrain.model.init); DeepSpeed then casts and partitions it.
#   sharded:  ZeRO-3 (pretrain.step's zero.Init): each module allocated whole, then at once
#             partitioned over data parallel; the rank keeps and fills its partition only.
#   auto:     what pretrain-train does: sharded at ZeRO-3, tp_shard at ZeRO 0-2.
CONSTRUCTIONS = ("auto", "tp_shard", "sharded")


# ---- parameters ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCount:
    """Parameters of one tensor-parallel rank (tp=1: the whole model), by where they sit."""

    word_embeddings: int
    position_embeddings: int  # learned positions; 0 with RoPE (its inv_freq is a buffer)
    output_layer: int  # the LM head's own weight: untied, or the tied table's last-stage copy
    layers: int  # all transformer layers (of a stage: its layers)
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
    kv = _kv_width(m)
    bias = 1 if m.bias else 0
    norm = h * (2 if m.normalization == "LayerNorm" else 1)  # weight (+ bias for LayerNorm)
    gate = 2 if m.activation == "swiglu" else 1  # SwiGLU's fc1 holds the gate and up projections
    qkv = (h + 2 * kv) * (h + bias) // tp  # (h + 2 kv) x h weight, h + 2 kv bias
    proj = h * h // tp + bias * h
    fc1 = gate * f * (h + bias) // tp
    fc2 = f * h // tp + bias * h
    return 2 * norm + qkv + proj + fc1 + fc2  # input_layernorm + pre_mlp_layernorm


def _kv_width(m: ModelConfig) -> int:
    """Width of K (= V): key/value heads x head dim (grouped-query attention)."""
    return (m.num_query_groups or m.num_attention_heads) * (m.hidden_size // m.num_attention_heads)


def count_params(m: ModelConfig, vocab_rows: int, tp: int = 1) -> ParamCount:
    """Parameters per TP rank for an embedding of `vocab_rows` rows (the padded vocabulary)."""
    return stage_params(m, vocab_rows, tp, pp=1, stage=0)


def stage_params(m: ModelConfig, vocab_rows: int, tp: int, pp: int, stage: int) -> ParamCount:
    """Parameters of pipeline stage `stage` (0-based) of `pp` on one TP rank."""
    h = m.hidden_size
    if vocab_rows % tp:
        raise ConfigError(f"model.make_vocab_size_divisible_by: {vocab_rows} vocabulary rows "
                          f"do not split over tp={tp}")
    if m.num_layers % pp:
        raise ConfigError(f"parallel.pp: pp={pp} must divide model.num_layers={m.num_layers}")
    first, last = stage == 0, stage == pp - 1
    table = vocab_rows * h // tp  # vocab-parallel embedding / column-parallel LM head
    head = last and (not m.tie_embeddings or pp > 1)  # tied: the last stage's own copy
    return ParamCount(
        word_embeddings=table if first else 0,
        position_embeddings=m.max_positions * h if first and m.position_embedding == "learned"
        else 0,
        output_layer=table if head else 0,
        layers=m.num_layers // pp * layer_params(m, tp),
        final_norm=h * (2 if m.normalization == "LayerNorm" else 1) if last else 0,
    )


def largest_tensor(m: ModelConfig, vocab_rows: int, tp: int) -> int:
    """Elements of the largest single tensor on a TP rank (the vocabulary table or fc1)."""
    h, f = m.hidden_size, m.ffn_size
    gate = 2 if m.activation == "swiglu" else 1
    return max(vocab_rows * h, gate * f * h, (h + 2 * _kv_width(m)) * h) // tp


# ---- model states and DeepSpeed's buffers ----------------------------------------------------
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
    """What the engine of a GPU job at `layout` would hold besides the model states of `params`
    (this rank's stage), at `zero_stage`, read from the DeepSpeed config it would be given."""
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
        layer = layer_params(cfg.model, layout.tp)
        table = max(params.word_embeddings, params.output_layer)
        gathered = float(max(2 * layer, table) * STATE_BYTES[precision][0])
    return DeepSpeedBuffers(master, buckets, gathered)


# ---- activations -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Activations:
    """Bytes per GPU kept for the backward pass (see activation_bytes), all micro-batches that a
    pipeline stage holds in flight together."""

    micro_batch: int
    layers: float  # what this stage's layers keep (full recompute: their inputs only)
    recompute_working: float  # full recompute: one layer's activations, rebuilt in backward
    embeddings_and_head: float  # embedding dropout mask, final norm, LM head input, fp32 logits
    in_flight: int = 1  # micro-batches whose activations this stage holds at once (1F1B)

    @property
    def total(self) -> float:
        return self.layers + self.recompute_working + self.embeddings_and_head


def activation_bytes(m: ModelConfig, micro_batch: int, tp: int, precision: str,
                     vocab_rows: int, pp: int = 1, sequence_parallel: bool = False,
                     stage: int = 0) -> Activations:
    """Activation memory per GPU after Korthikanti et al. 2022, 'Reducing Activation Recomputation
    in Large Transformer Models', sections 4.2-4.3.

    Per layer, in bytes of 16-bit activations, sequence s, micro-batch b, hidden h, heads a:
        s b h (34 + 5 a s / h);  with tensor parallel t (no sequence parallel):
        s b h (10 + 24/t + 5 a s / (h t));  with tensor and sequence parallel:
        s b h (34/t + 5 a s / (h t)).
    The 5 a s / h term is the stored attention matrix (softmax, its dropout mask and output).
    Our core attention is SDPA (flash attention on GPU), which stores none: the term is dropped,
    which is also what selective recompute (model.recompute=selective) gives. That leaves
        s b h (10 + 24/t), and with sequence parallelism s b h (10 + 24)/t,
    where 10 s b h is what TP alone replicates (two norm inputs 4, attention and MLP inputs 4,
    two dropout masks 2; sequence parallelism splits it along s) and 24 s b h is split (Q, K, V
    6 + projection input 2; MLP 16, i.e. fc1's output and the activation's output, 2 x 2 bytes x
    4h). For other shapes the split part is generalized as 4 + 4 kv/h (grouped-query K and V of
    width kv) + 4 f/h (MLP of width f; 6 f/h for SwiGLU, whose fc1 output is 2f wide), which is
    exactly 24 for GPT-2 shapes.
    Full recompute (model.recompute=full) keeps only each layer's input, 2 s b h (/t with sequence
    parallelism), plus one layer's full working set while that layer is recomputed in backward.
    Outside the layers: the embedding dropout mask (s b h) on the first stage; the final norm's
    and the LM head's inputs (4 s b h) and the logits in fp32 for the cross entropy, 4 s b V / t
    bytes, on the last; sequence parallelism splits the s b h terms over t.
    Pipeline parallelism (section 4.2.3): under 1F1B stage i of p (0-based) holds p - i
    micro-batches in flight before its first backward, each with the activations of its L/p
    layers; the first stage thus holds L layers' worth, as without pipelining, plus p embedding
    masks, and the last stage one micro-batch and the logits.
    fp32 training doubles every 16-bit term.
    """
    s, b, h, t = m.seq_len, micro_batch, m.hidden_size, tp
    mlp = (6 if m.activation == "swiglu" else 4) * m.ffn_size / h
    split = 4 + 4 * _kv_width(m) / h + mlp  # 24 for GPT-2 shapes
    scale = 2 if precision == "fp32" else 1
    sp = t if sequence_parallel else 1  # what sequence parallelism divides the s b h terms by
    sbh = float(s * b * h) * scale
    in_flight, layers = pp - stage, m.num_layers // pp
    per_layer = sbh * ((10 + split) / t if sequence_parallel else 10 + split / t)
    if m.recompute == "full":
        kept, working = in_flight * layers * 2 * sbh / sp, per_layer
    else:
        kept, working = in_flight * layers * per_layer, 0.0
    outside = in_flight * sbh / sp if stage == 0 else 0.0  # embedding dropout masks
    if stage == pp - 1:
        outside += 4 * sbh / sp + 4.0 * s * b * vocab_rows / t
    return Activations(micro_batch, kept, working, outside, in_flight)


# ---- start-up --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Startup:
    """Memory a rank needs while it builds its model, before the first step (see startup_bytes)."""

    construction: str  # one of CONSTRUCTIONS
    gpu: float  # bytes per GPU at the start-up peak
    host_per_rank: float  # bytes of host RAM per rank process at the start-up peak
    ranks_per_node: int

    @property
    def host_per_node(self) -> float:
        return self.host_per_rank * self.ranks_per_node


def startup_bytes(params: ParamCount, largest: int, states: ModelStates, precision: str,
                  dp: int, ranks_per_node: int, construction: str = "tp_shard",
                  row: int = 0) -> Startup:
    """Start-up memory of a rank whose stage holds `params` (one TP rank), `largest` elements in
    its largest tensor, `states` at its ZeRO stage, and `row` elements in the widest row of a
    whole weight (max(hidden, ffn)).

    tp_shard (today): the model is built on the meta device and all of `params` materialised on
    the GPU in fp32 (4 B each), filled one row at a time from the host (pretrain.model.init: the
    host holds one fp32 row). DeepSpeed then casts them to 16-bit tensor by tensor (the largest
    tensor's 16-bit copy beside its fp32 original) and flattens the 16-bit weights into one
    buffer (2 + 2 B, within the 4 B already held). ZeRO-3 does not help: it partitions only after
    the whole shard is on the GPU. This is why the issue measured 257 GiB per GPU for a 70B model
    at TP1. (Before the meta device the host also held the whole fp32 shard: 257 GiB of host RAM
    per node for 70B at TP8, 651 GiB for 175B.)
    sharded (ZeRO-3, DeepSpeed's zero.Init): each module is allocated whole in fp32 and at once
    partitioned over data parallel, so the GPU holds its 16-bit weights and fp32 master
    partition, plus one module's whole fp32 tensor (the largest) while it is being built.
    auto: sharded at ZeRO-3, tp_shard below (what pretrain-train does).
    """
    if construction not in CONSTRUCTIONS:
        raise ConfigError(f"construction: '{construction}' is not one of {CONSTRUCTIONS}")
    if construction == "auto":
        construction = "sharded" if states.zero_stage == 3 else "tp_shard"
    cast = 0 if precision == "fp32" else STATE_BYTES[precision][0] * largest
    if construction == "tp_shard":
        return Startup(construction, 4.0 * params.total + cast, 4.0 * row, ranks_per_node)
    master = 4.0 * params.total / dp if precision != "fp32" else 0.0
    return Startup(construction, states.weights + master + 4.0 * largest, 4.0 * row,
                   ranks_per_node)
