"""The transformer layer spec: megatron-core's own layers, with SDPA as the core attention.

TransformerEngine's spec is used when TransformerEngine is installed and the run is on CUDA
(its fused LayerNorm-linear and attention kernels); otherwise the local spec.
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from pretrain.model.attention import SDPACoreAttention


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def layer_spec(normalization: str, on_cuda: bool) -> ModuleSpec:
    if on_cuda and transformer_engine_available():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=SDPACoreAttention)
    return spec
