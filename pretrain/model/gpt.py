"""Build the GPT from our ModelConfig with megatron-core's GPTModel.

The model file holds no distributed code: megatron-core's tensor-parallel layers read the TP group
(and, with pipeline parallelism, this rank's stage) from parallel_state, which
`pretrain.dist.Dist.initialize` set up.

Construction never holds more than this rank's shard: the GPTModel is built on the meta device
(no memory, no init), then materialised on its device (`to_empty`: the local shard only) and
filled by pretrain.model.init, whose per-row generators make the weights the same whatever the
TP/PP/DP layout (a rank draws only the rows it keeps). Under ZeRO-3 the modules are built inside
DeepSpeed's zero.Init instead and each rank fills only its partition.
"""

from __future__ import annotations

import contextlib
import functools
from typing import ContextManager, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model.init import initialize
from pretrain.model.spec import layer_spec


def use_fused_kernels(cfg: ModelConfig, device_type: str) -> bool:
    if cfg.fused_kernels == "auto":
        return device_type == "cuda"
    return cfg.fused_kernels == "on"


def _activation(cfg: ModelConfig, fused: bool):
    """(activation_func, bias_activation_fusion). megatron's fused bias-GeLU is the tanh form and
    is selected only when activation_func is exactly F.gelu, so erf-GeLU is never fused."""
    if cfg.activation == "swiglu":
        return F.silu, fused
    if cfg.activation == "gelu_tanh":
        if fused and cfg.bias:
            return F.gelu, True
        return functools.partial(F.gelu, approximate="tanh"), False
    return F.gelu, False


def _drawn_later(tensor: torch.Tensor) -> torch.Tensor:
    """megatron's init methods: nothing drawn (pretrain.model.init fills every parameter)."""
    return tensor


def transformer_config(cfg: ModelConfig, tp: int, device_type: str,
                       sequence_parallel: bool = False, pp: int = 1,
                       pipeline_dtype: Optional[torch.dtype] = None) -> TransformerConfig:
    fused = use_fused_kernels(cfg, device_type)
    act, act_fusion = _activation(cfg, fused)
    recompute = {}
    if cfg.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif cfg.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        add_bias_linear=cfg.bias,
        add_qkv_bias=cfg.bias,
        gated_linear_unit=cfg.activation == "swiglu",
        activation_func=act,
        bias_activation_fusion=act_fusion,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=False,  # attention goes through SDPA
        apply_rope_fusion=False,  # needs TransformerEngine
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=fused,
        cross_entropy_fusion_impl="native",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # The activations' dtype between stages (the engine's compute dtype).
        pipeline_dtype=(pipeline_dtype or torch.float32) if pp > 1 else None,
        # Point-to-point sends without torch.cuda.synchronize (also runs on CPU).
        batch_p2p_sync=False,
        sequence_parallel=sequence_parallel,
        # megatron's init runs (it marks the tensor-parallel attributes, partition_dim and
        # stride, that pretrain.model.init and DeepSpeed read) but draws nothing: the weights are
        # filled afterwards by pretrain.model.init.
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method=_drawn_later,
        output_layer_init_method=_drawn_later,
        embedding_init_method=_drawn_later,
        init_method_std=cfg.init_std,
        params_dtype=torch.float32,
        cuda_graph_scope=[],  # no CUDA graphs; megatron's default "full" is deprecated and warns
        **recompute,
    )


class GPT(nn.Module):
    """megatron-core GPTModel plus the language-modelling loss: forward(tokens) -> mean loss.

    With pipeline parallelism (pp > 1) this is the rank's stage: the first stage embeds, the last
    one has the output layer and the loss; forward(tokens) returns the hidden states for the next
    stage on every stage but the last (whose input comes from `set_input_tensor`)."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, tp: int, device_type: str,
                 sequence_parallel: bool = False, *, pp: int = 1, seed: int = 0,
                 device: Optional[torch.device] = None,
                 pipeline_dtype: Optional[torch.dtype] = None,
                 partitioned: Optional[ContextManager] = None):
        """partitioned: a context in which modules are built already partitioned (DeepSpeed's
        ZeRO-3 `zero.Init`, from pretrain.step); otherwise the model is built on the meta device
        and this rank's shard allocated on `device`."""
        super().__init__()
        self.cfg = cfg
        self.vocab_size = padded_vocab_size
        self.pp = pp
        first, last, tp_rank = _position(pp)
        self.is_first_stage, self.is_last_stage = first, last
        where = partitioned if partitioned is not None else torch.device("meta")
        with where, _no_embedding_sync():
            self.gpt = GPTModel(
                config=transformer_config(cfg, tp, device_type, sequence_parallel, pp,
                                          pipeline_dtype),
                transformer_layer_spec=layer_spec(cfg.normalization, device_type == "cuda",
                                                  sequence_parallel, cfg.num_layers // pp),
                vocab_size=padded_vocab_size,
                max_sequence_length=cfg.max_positions,
                pre_process=first,
                post_process=last,
                share_embeddings_and_output_weights=cfg.tie_embeddings,
                position_embedding_type=("rope" if cfg.position_embedding == "rope"
                                         else "learned_absolute"),
                rotary_base=cfg.rotary_base,
                parallel_output=True,
            )
        if partitioned is None:
            _materialize(self.gpt, torch.device(device or "cpu"))
        initialize(self.gpt.named_parameters(), seed=seed, init_std=cfg.init_std,
                   num_layers=cfg.num_layers, tp=tp, tp_rank=tp_rank,
                   layer_offset=self.layer_offset, tied=cfg.tie_embeddings)
        if pp > 1 and last and cfg.tie_embeddings:
            # The last stage's copy of the tied embedding: its gradient is summed with the first
            # stage's (pretrain.step.pipeline_step), and the gradient norm counts it once.
            self.gpt.output_layer.weight.ds_pipe_replicated = True

    @property
    def config(self) -> TransformerConfig:
        return self.gpt.config  # megatron's pipeline schedule reads it, and model_type

    @property
    def model_type(self):
        return self.gpt.model_type

    @property
    def layer_offset(self) -> int:
        """The global number of this stage's first layer (0 without pipeline stages)."""
        layers = self.gpt.decoder.layers
        return layers[0].layer_number - 1 if len(layers) else 0

    def set_input_tensor(self, tensor) -> None:
        self.gpt.set_input_tensor(tensor)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b, s+1) int: inputs are tokens[:, :-1], targets tokens[:, 1:]. Returns the mean
        cross entropy over all b*s positions (a scalar); on a pipeline stage other than the last,
        the hidden states (s, b, h) for the next stage."""
        inputs = tokens[:, :-1].long()  # (b, s)
        labels = tokens[:, 1:].long() if self.is_last_stage else None  # (b, s)
        b, s = inputs.shape
        positions = torch.arange(s, device=inputs.device).unsqueeze(0).expand(b, s)  # (b, s)
        out = self.gpt(inputs, positions, attention_mask=None, labels=labels)
        if not self.is_last_stage:
            return out  # (s, b, h), or its sequence-parallel slice
        return out.float().mean()  # out: per-token loss (b, s)


def _position(pp: int):
    """(first stage, last stage, tensor-parallel rank) of this rank, from megatron's state."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True, True, 0
    tp_rank = ps.get_tensor_model_parallel_rank()
    if pp == 1:
        return True, True, tp_rank
    return ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), tp_rank


@contextlib.contextmanager
def _no_embedding_sync():
    """megatron copies the tied embedding from the first stage to the last at construction (an
    all-reduce of the weights); on the meta device there is nothing to copy, and pretrain.model.init
    gives both copies the same values."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule._is_in_embd_group
    LanguageModule._is_in_embd_group = lambda self: False
    try:
        yield
    finally:
        LanguageModule._is_in_embd_group = original


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate the meta module's parameters on `device` (uninitialised), keeping the attributes
    megatron sets on them (tensor_model_parallel, partition_dim, sequence_parallel, shared, ...)."""
    attrs = {name: dict(vars(p)) for name, p in module.named_parameters()}
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        for key, value in attrs[name].items():
            if not hasattr(p, key):
                setattr(p, key, value)


def count_parameters(model: nn.Module) -> int:
    """Parameters of this rank's shard (shared/tied tensors counted once; a ZeRO-3 partitioned
    parameter counted whole)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())
    return total
