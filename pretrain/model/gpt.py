"""Build the GPT from our ModelConfig with megatron-core's GPTModel.

The model file holds no distributed code: megatron-core's tensor-parallel layers read the TP group
from parallel_state, which `pretrain.dist.Dist.initialize` set up.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from pretrain.config import ModelConfig
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


def transformer_config(cfg: ModelConfig, tp: int, device_type: str,
                       sequence_parallel: bool = False) -> TransformerConfig:
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
        sequence_parallel=sequence_parallel,
        # Initialise full weights on the CPU generator, then split: the same model at any TP degree.
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method_std=cfg.init_std,
        params_dtype=torch.float32,
        cuda_graph_scope=[],  # no CUDA graphs; megatron's default "full" is deprecated and warns
        **recompute,
    )


class GPT(nn.Module):
    """megatron-core GPTModel plus the language-modelling loss: forward(tokens) -> mean loss."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, tp: int, device_type: str,
                 sequence_parallel: bool = False):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = padded_vocab_size
        self.gpt = GPTModel(
            config=transformer_config(cfg, tp, device_type, sequence_parallel),
            transformer_layer_spec=layer_spec(cfg.normalization, device_type == "cuda",
                                              sequence_parallel, cfg.num_layers),
            vocab_size=padded_vocab_size,
            max_sequence_length=cfg.max_positions,
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type="rope" if cfg.position_embedding == "rope" else "learned_absolute",
            rotary_base=cfg.rotary_base,
            parallel_output=True,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b, s+1) int: inputs are tokens[:, :-1], targets tokens[:, 1:]. Returns the mean
        cross entropy over all b*s positions (a scalar)."""
        inputs = tokens[:, :-1].long()  # (b, s)
        labels = tokens[:, 1:].long()  # (b, s)
        b, s = inputs.shape
        positions = torch.arange(s, device=inputs.device).unsqueeze(0).expand(b, s)  # (b, s)
        per_token = self.gpt(inputs, positions, attention_mask=None, labels=labels)  # (b, s)
        return per_token.float().mean()


def count_parameters(model: nn.Module) -> int:
    """Parameters of this rank's shard (shared/tied tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
