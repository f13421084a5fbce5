"""What a configuration needs before it is submitted: parameters, FLOPs, memory, time.

A dry run with no process group. Everything is counted per GPU for a cluster of
`cluster.nodes x cluster.gpus_per_node` GPUs at the configuration's layout (pretrain.layout:
tensor parallel `parallel.tp`, pipeline stages `parallel.pp`, sequence parallelism, data
parallel world / (tp x pp)) and the configured ZeRO stage (all four stages are tabulated).
With pipeline stages each stage is planned on its own (pretrain.plan_memory: the first holds
the embeddings and the most micro-batches in flight, the last the LM head and the logits) and
the plan is the worst stage. Start-up memory (building the model) is planned beside the
training peak: a layout fits when both do. `pretrain.plan_search` finds the fastest layout
that fits.

Time: tokens/s per GPU = cluster.assumed_mfu x peak / FLOPs per token while a GPU computes,
slowed by the recomputed forward FLOPs (model.recompute) and by the 1F1B pipeline bubble: with m
micro-batches per step and p stages a stage idles (p - 1) / (m + p - 1) of the step (Narayanan
et al. 2021, 'Efficient Large-Scale Language Model Training on GPU Clusters', section 2.2).
Across nodes the data-parallel traffic of a step is priced at cluster.network_gbps per GPU and
assumed to overlap the computation (the step takes the longer of the two): ZeRO 0-2 all-reduce
the gradients once per step (2 x the GPU's shard of 16-bit gradients, x (dp - 1) / dp), ZeRO-3
gathers the weights for every micro-batch's forward and backward and reduce-scatters its
gradients (3 x the shard per micro-batch) -- which is why it rarely wins at scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from pretrain.config import Config
from pretrain.errors import ConfigError
from pretrain.layout import Layout
from pretrain.model.flops import flops_per_token, matmul_params, peak_flops
from pretrain.plan_memory import (GIB, STATE_BYTES, Activations,  # noqa: F401 (re-exported)
                                  DeepSpeedBuffers, ModelStates, ParamCount, Startup,
                                  activation_bytes, count_params, deepspeed_buffers,
                                  largest_tensor, model_states, stage_params,
                                  startup_bytes)

if TYPE_CHECKING:
    from pretrain.data.manifest import Manifest

# Of cluster.gpu_memory_gb only this fraction is planned for: the rest is left to the CUDA
# context, NCCL, the caching allocator's fragmentation and short-lived temporaries.
HEADROOM = 0.10
# The device whose peak (pretrain.model.flops) is assumed when cluster.gpu_peak_tflops is unset.
DEFAULT_DEVICE = "H100"


# ---- the plan --------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """One pipeline stage on one GPU: its parameters and memory at each ZeRO stage."""

    stage: int
    layers: int
    params: ParamCount  # one TP rank of this stage
    states: List[ModelStates]  # ZeRO 0..3
    buffers: List[DeepSpeedBuffers]  # ZeRO 0..3
    activations: Activations  # the configured micro-batch, all in flight
    startup: List[Startup]  # ZeRO 0..3

    def gpu_bytes(self, zero_stage: int, micro_batch: int) -> float:
        per_sample = self.activations.total / self.activations.micro_batch
        fixed = self.states[zero_stage].gpu + self.buffers[zero_stage].total
        return fixed + per_sample * micro_batch

    def max_micro_batch(self, zero_stage: int, usable_bytes: float) -> int:
        per_sample = self.activations.total / self.activations.micro_batch
        free = usable_bytes - self.states[zero_stage].gpu - self.buffers[zero_stage].total
        return max(0, math.floor(free / per_sample))

    def to_dict(self) -> Dict[str, Any]:
        return {"stage": self.stage, "layers": self.layers, "params": self.params.to_dict(),
                "states": [{**dataclasses.asdict(s), "gpu": s.gpu} for s in self.states],
                "buffers": [{**dataclasses.asdict(b), "total": b.total} for b in self.buffers],
                "activations": {**dataclasses.asdict(self.activations),
                                "total": self.activations.total},
                "startup": [{**dataclasses.asdict(s), "host_per_node": s.host_per_node}
                            for s in self.startup]}


@dataclass
class Plan:
    model: str
    nodes: int
    gpus_per_node: int
    world: int
    tp: int
    pp: int
    sequence_parallel: bool
    dp: int
    zero_stage: int
    precision: str
    offload_optimizer: bool
    recompute: str
    construction: str  # how start-up memory was counted (pretrain.plan_memory.CONSTRUCTIONS)
    seq_len: int
    micro_batch: int
    global_batch: int
    grad_accum: int
    vocab: int
    vocab_source: str
    padded_vocab: int
    params: ParamCount  # whole model, padded vocabulary
    params_unpadded: int  # whole model with the tokenizer's vocabulary
    stages: List[StagePlan]  # pp=1: one; else the first and the last (middle ones need less)
    peak_stage: int  # index into stages of the one with the most GPU memory at zero_stage
    flops_per_token: float
    tokens_per_step: int
    activation_per_sample: float  # of the peak stage
    gpu_memory_gib: float
    usable_gib: float
    max_micro_batch: List[int]  # per ZeRO stage: the largest that fits in usable_gib
    peak_tflops: float
    peak_source: str
    assumed_mfu: float
    recompute_factor: float  # FLOPs done per model FLOP: 1 + recomputed forward / (6N + 12LHQT)
    bubble_fraction: float  # (pp - 1) / (grad_accum + pp - 1)
    dp_traffic_bytes: float  # data-parallel bytes a GPU sends per step across nodes
    comm_s: float  # their time at network_gbps (overlapping the computation)
    network_gbps: float
    tokens_per_s_gpu: float
    tokens_per_s: float
    step_s: float
    steps: int
    steps_source: str
    total_tokens: float
    total_s: float
    warnings: List[str] = field(default_factory=list)

    # The peak stage's figures (pp=1: the only stage), as the one-stage plan always had them.
    @property
    def params_per_rank(self) -> ParamCount:
        return self.stages[self.peak_stage].params

    @property
    def states(self) -> List[ModelStates]:
        return self.stages[self.peak_stage].states

    @property
    def buffers(self) -> List[DeepSpeedBuffers]:
        return self.stages[self.peak_stage].buffers

    @property
    def activations(self) -> Activations:
        return self.stages[self.peak_stage].activations

    def gpu_bytes(self, zero_stage: int, micro_batch: Optional[int] = None) -> float:
        """Training peak on the fullest GPU at a ZeRO stage and micro-batch (default: the
        configured one)."""
        mb = self.micro_batch if micro_batch is None else micro_batch
        return max(s.gpu_bytes(zero_stage, mb) for s in self.stages)

    def startup(self, zero_stage: Optional[int] = None) -> Startup:
        """Start-up memory of the stage that needs the most GPU memory to build its model."""
        z = self.zero_stage if zero_stage is None else zero_stage
        return max((s.startup[z] for s in self.stages), key=lambda x: x.gpu)

    @property
    def fits_training(self) -> bool:
        return self.gpu_bytes(self.zero_stage) <= self.usable_gib * GIB

    @property
    def fits_startup(self) -> bool:
        return self.startup().gpu <= self.usable_gib * GIB

    @property
    def fits(self) -> bool:
        return self.fits_training and self.fits_startup

    def to_dict(self) -> Dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("params", "stages")}
        out["params"] = self.params.to_dict()
        out["stages"] = [s.to_dict() for s in self.stages]
        peak = out["stages"][self.peak_stage]
        out.update(params_per_rank=peak["params"], states=peak["states"],
                   buffers=peak["buffers"], activations=peak["activations"])
        out["gpu_bytes"] = [self.gpu_bytes(z) for z in range(4)]
        start = self.startup()
        out.update(peak_memory_gib=self.gpu_bytes(self.zero_stage) / GIB,
                   startup_memory_gib=start.gpu / GIB, usable_memory_gib=self.usable_gib,
                   host_memory_per_node_gib=start.host_per_node / GIB,
                   fits_training=self.fits_training, fits_startup=self.fits_startup,
                   fits=self.fits)
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


def make_plan(cfg: Config, vocab: Optional[Tuple[int, str]] = None,
              construction: str = "auto") -> Plan:
    """Validate cfg for the cluster it names and work out the plan (ConfigError if it can't run).
    vocab: (size, source) when already resolved (the search plans many layouts of one config);
    construction: how the model is built, for its start-up memory (plan_memory.startup_bytes)."""
    cl, tr, par = cfg.cluster, cfg.trainer, cfg.parallel
    world = cl.nodes * cl.gpus_per_node
    cfg.validate(need_data=False, for_training=False)
    vocab_size, vocab_source = vocab or resolve_vocab(cfg)
    layout = cfg.layout(world, vocab_size)
    padded = layout.padded_vocab_size
    usable = cl.gpu_memory_gb * (1 - HEADROOM)
    stages = [_plan_stage(cfg, layout, s, construction) for s in sorted({0, layout.pp - 1})]
    peak_stage = max(range(len(stages)), key=lambda i: stages[i].gpu_bytes(par.zero_stage,
                                                                           tr.micro_batch_size))
    max_mb = [min(s.max_micro_batch(z, usable * GIB) for s in stages) for z in range(4)]

    fpt = flops_per_token(cfg.model, padded)
    peak, peak_source = _peak(cl.gpu_peak_tflops)
    recompute = _recompute_factor(cfg, padded, fpt)
    m, p = layout.grad_accum, layout.pp
    bubble = (p - 1) / (m + p - 1)
    # MFU = tokens/s per GPU x FLOPs/token / peak, while computing; recompute and bubble slow it.
    tok_gpu = cl.assumed_mfu * peak * 1e12 / fpt / recompute * (1 - bubble)
    tok_step = layout.global_batch_size * cfg.model.seq_len
    compute_s = tok_step / (tok_gpu * world)
    traffic = dp_traffic_bytes(stages[peak_stage].params.total, tr.precision, par.zero_stage,
                               layout.dp, m) if cl.nodes > 1 else 0.0
    comm_s = traffic / (cl.network_gbps * 1e9 / 8)
    step_s = max(compute_s, comm_s)
    tok_gpu = tok_step / (step_s * world)
    if cl.token_budget:
        steps, steps_source = math.ceil(cl.token_budget / tok_step), "cluster.token_budget"
    else:
        steps, steps_source = tr.max_steps, "trainer.max_steps"
    plan = Plan(
        model=cfg.model.name, nodes=cl.nodes, gpus_per_node=cl.gpus_per_node, world=world,
        tp=layout.tp, pp=layout.pp, sequence_parallel=layout.sequence_parallel, dp=layout.dp,
        zero_stage=par.zero_stage, precision=tr.precision,
        offload_optimizer=par.offload_optimizer, recompute=cfg.model.recompute,
        construction=construction, seq_len=cfg.model.seq_len, micro_batch=tr.micro_batch_size,
        global_batch=layout.global_batch_size, grad_accum=layout.grad_accum,
        vocab=vocab_size, vocab_source=vocab_source, padded_vocab=padded,
        params=count_params(cfg.model, padded),
        params_unpadded=count_params(cfg.model, vocab_size).total,
        stages=stages, peak_stage=peak_stage, flops_per_token=fpt, tokens_per_step=tok_step,
        activation_per_sample=stages[peak_stage].activations.total / tr.micro_batch_size,
        gpu_memory_gib=cl.gpu_memory_gb, usable_gib=usable, max_micro_batch=max_mb,
        peak_tflops=peak, peak_source=peak_source, assumed_mfu=cl.assumed_mfu,
        recompute_factor=recompute, bubble_fraction=bubble, dp_traffic_bytes=traffic,
        comm_s=comm_s, network_gbps=cl.network_gbps,
        tokens_per_s_gpu=tok_gpu, tokens_per_s=tok_gpu * world, step_s=step_s, steps=steps,
        steps_source=steps_source, total_tokens=float(steps * tok_step), total_s=steps * step_s)
    plan.warnings = _warnings(plan)
    return plan


def dp_traffic_bytes(params: int, precision: str, zero_stage: int, dp: int,
                     micro_batches: int) -> float:
    """Bytes a GPU sends per optimizer step for data parallelism (ring collectives move
    (dp - 1) / dp of the buffer): ZeRO 0-2 all-reduce the 16-bit (fp32: 4 B) gradients of its
    `params` once per step; ZeRO-3 all-gathers the weights twice (forward, backward) and
    reduce-scatters the gradients for every micro-batch."""
    if dp == 1:
        return 0.0
    width = 4 if precision == "fp32" else 2
    shard = params * width * (dp - 1) / dp
    return 3 * shard * micro_batches if zero_stage == 3 else 2 * shard


def _plan_stage(cfg: Config, layout: Layout, stage: int, construction: str) -> StagePlan:
    """Memory of pipeline stage `stage` on one GPU at every ZeRO stage."""
    m, tr, par = cfg.model, cfg.trainer, cfg.parallel
    rows, tp, pp = layout.padded_vocab_size, layout.tp, layout.pp
    params = stage_params(m, rows, tp, pp, stage)
    states = [model_states(params.total, tr.precision, z, layout.dp, par.offload_optimizer)
              for z in range(4)]
    buffers = [deepspeed_buffers(cfg, layout, z, params) for z in range(4)]
    acts = activation_bytes(m, tr.micro_batch_size, tp, tr.precision, rows, pp,
                            layout.sequence_parallel, stage)
    largest = largest_tensor(m, rows, tp)
    startup = [startup_bytes(params, largest, states[z], tr.precision, layout.dp,
                             cfg.cluster.gpus_per_node, construction,
                             max(m.hidden_size, m.ffn_size)) for z in range(4)]
    return StagePlan(stage, m.num_layers // pp, params, states, buffers, acts, startup)


def _recompute_factor(cfg: Config, padded: int, fpt: float) -> float:
    """FLOPs a GPU does per model FLOP (6N + 12LHQT) under model.recompute: full recompute runs
    each layer's forward again (2 N_layers + 4 LHQT per token, the LM head is not recomputed);
    selective recomputes the core attention (4 LHQT)."""
    m = cfg.model
    attention_fwd = 4.0 * m.num_layers * m.hidden_size * m.seq_len  # 4 L (H Q) T
    if m.recompute == "full":
        layers = matmul_params(m, padded) - padded * m.hidden_size
        return 1 + (2.0 * layers + attention_fwd) / fpt
    if m.recompute == "selective":
        return 1 + attention_fwd / fpt
    return 1.0


def _peak(tflops: Optional[float]) -> Tuple[float, str]:
    if tflops:
        return float(tflops), "cluster.gpu_peak_tflops"
    return peak_flops(DEFAULT_DEVICE) / 1e12, (
        f"{DEFAULT_DEVICE} SXM dense bf16, assumed; set cluster.gpu_peak_tflops for another GPU")


def _warnings(p: Plan) -> List[str]:
    out = []
    zero_ok = range(p.zero_stage + 1, 4 if p.pp == 1 else 2)  # ZeRO-2/3 do not run with pp > 1
    if not p.fits_training:
        need = p.gpu_bytes(p.zero_stage) / GIB
        fixes = [f"trainer.micro_batch_size<={p.max_micro_batch[p.zero_stage]}"
                 if p.max_micro_batch[p.zero_stage] else None]
        fixes += [f"parallel.zero_stage={z}" for z in zero_ok
                  if p.max_micro_batch[z] >= p.micro_batch][:1]
        if p.recompute != "full":
            fixes.append("model.recompute=full")
        fixes.append(f"parallel.tp={2 * p.tp}")
        out.append(f"micro-batch {p.micro_batch} does NOT fit: it needs {need:.1f} GiB per GPU at "
                   f"ZeRO-{p.zero_stage}, {p.usable_gib:.1f} GiB usable; try "
                   + ", ".join(f for f in fixes if f) + " (or pretrain-plan --search)")
    if not p.fits_startup:
        need = p.startup().gpu / GIB
        out.append(f"start-up does NOT fit: building the model takes {need:.1f} GiB per GPU "
                   f"(construction={p.startup().construction}: "
                   + ("each rank holds its stage's whole TP shard in fp32 before DeepSpeed "
                      "partitions it" if p.startup().construction == "tp_shard" else
                      "each rank its ZeRO-3 partition") + "), "
                   f"{p.usable_gib:.1f} GiB usable; raise parallel.tp or parallel.pp "
                   f"(pretrain-plan --search finds the fastest layout that fits)")
    return out


# ---- rendering -------------------------------------------------------------------------------
def _bytes(x: float) -> str:
    """GiB, or MiB below a tenth of one."""
    return f"{x / GIB:.1f} GiB" if x >= GIB / 10 else f"{x / 2**20:.1f} MiB"


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
    pp = f" pp={p.pp}" if p.pp > 1 else ""
    sp = " sequence-parallel" if p.sequence_parallel else ""
    where = f" (stage {p.stages[p.peak_stage].stage}, the fullest)" if p.pp > 1 else ""
    lines = [
        f"pretrain-plan: {p.model} on {p.nodes} node(s) x {p.gpus_per_node} GPUs = {p.world}; "
        f"tp={p.tp}{pp} dp={p.dp}{sp} ZeRO-{p.zero_stage} {p.precision} recompute={p.recompute}",
        f"vocabulary {p.vocab:,} ({p.vocab_source}), padded to {p.padded_vocab:,}",
        "",
        "parameters",
        f"  total            {pc.total:>15,}   (unpadded vocabulary: {p.params_unpadded:,})",
        f"  embedding        {pc.embedding:>15,}   (word {pc.word_embeddings:,}, positions "
        f"{pc.position_embeddings:,}, {head})",
        f"  non-embedding    {pc.non_embedding:>15,}",
        f"  per GPU          {pr.total:>15,}   (one TP rank{' of one stage' if p.pp > 1 else ''}"
        f"{where})",
        "",
        "compute",
        f"  FLOPs per token  {p.flops_per_token:>15.4g}   (6N + 12LHQT, forward + backward)",
        f"  tokens per step  {p.tokens_per_step:>15,}   = global batch {p.global_batch} x seq "
        f"{p.seq_len} (micro {p.micro_batch} x dp {p.dp} x accumulation {p.grad_accum})",
        "",
    ]
    lines += _memory_lines(p) + [""] + _time_lines(p)
    lines += [f"WARNING: {w}" for w in p.warnings]
    return "\n".join(lines)


def _memory_lines(p: Plan) -> List[str]:
    pr = p.params_per_rank
    lines = [
        f"memory per GPU (GiB): {pr.total:,} parameters x "
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
                 "3 also weights" + ("; ZeRO 2-3 cannot run with pp > 1)" if p.pp > 1 else ")"))
    if p.pp > 1:
        lines.append(f"  pipeline stages ({p.pp}, {p.stages[0].layers} layers each; 1F1B):")
        for st in p.stages:
            role = "first (embeddings)" if st.stage == 0 else "last (final norm, LM head)"
            lines.append(f"    stage {st.stage:>3} {role:<27} {st.params.total:>14,} parameters, "
                         f"{st.activations.in_flight} micro-batch(es) in flight, "
                         f"{st.gpu_bytes(p.zero_stage, p.micro_batch) / GIB:.2f} GiB")
    if p.offload_optimizer:
        cpu = p.states[p.zero_stage].optimizer_cpu
        lines.append(f"  optimizer offloaded to CPU: {cpu / GIB:.2f} GiB per GPU process, "
                     f"{cpu * p.gpus_per_node / GIB:.1f} GiB host memory per node")
    b, a, start = p.buffers[p.zero_stage], p.activations, p.startup()
    lines += [
        f"  DeepSpeed buffers (ZeRO-{p.zero_stage}): reduce buckets {b.reduce_buckets / GIB:.2f}"
        + (f", fp32 master copy {b.master_copy / GIB:.2f}" if b.master_copy else "")
        + (f", gathered weights {b.gathered_weights / GIB:.2f}" if b.gathered_weights else ""),
        f"  activations, micro-batch {p.micro_batch} x {p.seq_len} (SDPA, recompute={p.recompute}"
        + (", sequence parallel" if p.sequence_parallel else "")
        + (f", {a.in_flight} in flight" if a.in_flight > 1 else "")
        + f"): layers {a.layers / GIB:.2f}"
        + (f" + recomputed layer {a.recompute_working / GIB:.2f}" if a.recompute_working else "")
        + f" + embeddings/logits {a.embeddings_and_head / GIB:.2f}"
        f" = {a.total / GIB:.2f} ({p.activation_per_sample / GIB:.3f} per sequence)",
        f"  start-up (construction={start.construction}): {start.gpu / GIB:.2f} GiB per GPU, "
        f"host RAM {_bytes(start.host_per_node)} per node ({start.ranks_per_node} ranks x "
        f"{_bytes(start.host_per_rank)})",
        f"  usable {p.usable_gib:.1f} of {p.gpu_memory_gib:g} GiB (cluster.gpu_memory_gb; "
        f"{HEADROOM:.0%} left for the CUDA context, NCCL and allocator fragmentation)",
        f"  micro-batch {p.micro_batch}: "
        + (f"fits ({p.gpu_bytes(p.zero_stage) / GIB:.1f} GiB)" if p.fits_training
           else "DOES NOT FIT")
        + f"; largest that fits at ZeRO-{p.zero_stage}: {p.max_micro_batch[p.zero_stage]}; "
        + ("start-up fits" if p.fits_startup else "START-UP DOES NOT FIT"),
    ]
    return lines


def _time_lines(p: Plan) -> List[str]:
    slow = []
    if p.recompute_factor > 1:
        slow.append(f"recompute x{p.recompute_factor:.3f} FLOPs")
    if p.pp > 1:
        slow.append(f"pipeline bubble {p.bubble_fraction:.1%} = (pp-1)/(m+pp-1), "
                    f"m={p.grad_accum} micro-batches")
    if p.comm_s >= p.step_s:
        slow.append(f"bound by data-parallel traffic: {p.dp_traffic_bytes / GIB:,.0f} GiB per GPU "
                    f"per step at {p.network_gbps:g} Gb/s (cluster.network_gbps)")
    return [
        f"throughput at {p.assumed_mfu:.0%} MFU (cluster.assumed_mfu) of {p.peak_tflops:g} "
        f"TFLOP/s ({p.peak_source})" + (f"; {', '.join(slow)}" if slow else ""),
        f"  tokens/s         {p.tokens_per_s_gpu:>15,.0f} per GPU, {p.tokens_per_s:,.0f} total",
        f"  time per step    {_duration(p.step_s):>15}"
        + (f"   (data-parallel traffic {p.dp_traffic_bytes / GIB:,.1f} GiB per GPU, "
           f"{_duration(p.comm_s)} at {p.network_gbps:g} Gb/s, overlapped)"
           if p.dp_traffic_bytes else ""),
        f"  {p.steps:,} steps ({p.steps_source}) = {p.total_tokens:,.0f} tokens in "
        f"{_duration(p.total_s)}",
    ]
