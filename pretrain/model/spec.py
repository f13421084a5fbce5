"""The transformer layer spec: megatron-core's own layers, with SDPA as the core attention.

TransformerEngine's spec is used when TransformerEngine is installed and the run is on CUDA
(its fused LayerNorm-linear and attention kernels); otherwise the local spec.

Sequence parallelism with the local spec: megatron refuses its torch-norm wrapper under SP, so
the norms (every layer's two and the final one) are torch's LayerNorm/RMSNorm built here, their
parameters marked `sequence_parallel` like megatron's own SP-aware norms. Each TP rank then
normalises its slice of the sequence; the gradients of SP-marked parameters are partial sums that
the step module adds up over the TP group (pretrain.step.deepspeed_step).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from pretrain.model.attention import SDPACoreAttention


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


class SequenceParallelNorm:
    """torch's LayerNorm or RMSNorm (config.normalization) with its parameters marked
    `sequence_parallel`: built where megatron's spec asks for a norm."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm


def layer_spec(normalization: str, on_cuda: bool, sequence_parallel: bool = False,
               num_layers: int = 0):
    """The layer spec; with sequence parallelism on the local spec, the whole block's
    (`num_layers` layers and the final norm) as TransformerBlockSubmodules."""
    if on_cuda and transformer_engine_available():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()  # its norms handle SP themselves
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=SDPACoreAttention)
    if not sequence_parallel:
        return spec
    spec.submodules.input_layernorm = SequenceParallelNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers,
                                      layer_norm=SequenceParallelNorm)
