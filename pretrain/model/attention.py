"""Core attention through PyTorch's scaled_dot_product_attention (flash attention on GPU).

Plugged into megatron-core's layer spec in place of its DotProductAttention. Shapes follow
megatron's contract: query [sq, b, heads/TP, d], key/value [sk, b, groups/TP, d] -> [sq, b, heads/TP*d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from torch import nn


class SDPACoreAttention(nn.Module):
    def __init__(self, config, layer_number, attn_mask_type, attention_type=None,
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, **_unused):
        super().__init__()
        self.config = config
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout
        self.softmax_scale = softmax_scale  # None: 1/sqrt(d), SDPA's default

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences / attention bias")
        sq, b, heads, d = query.shape
        groups = key.shape[2]
        q = query.permute(1, 2, 0, 3)  # (b, heads, sq, d)
        k = key.permute(1, 2, 0, 3)  # (b, groups, sk, d)
        v = value.permute(1, 2, 0, 3)  # (b, groups, sk, d)
        if groups != heads:  # grouped-query attention: each key/value head serves heads/groups queries
            k = k.repeat_interleave(heads // groups, dim=1)  # (b, heads, sk, d)
            v = v.repeat_interleave(heads // groups, dim=1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask  # megatron masks True where attention is *not* allowed
        p = self.dropout_p if self.training else 0.0
        if p > 0.0:
            # Dropout on attention probabilities happens inside a tensor-parallel region: fork the
            # tracker so each TP rank drops independently and reproducibly.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                     is_causal=causal, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 scale=self.softmax_scale)
        # (b, heads, sq, d) -> (sq, b, heads*d)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)
