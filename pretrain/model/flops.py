"""FLOPs per token and MFU, by the one formula of BENCHMARKS.md.

MFU = tokens/s per GPU x (6 N + 12 L H Q T) / peak dense bf16 FLOP/s, where N counts parameters
used in matrix products (the LM head once even if tied; input embedding lookup and position
embeddings excluded), L layers, H heads, Q head dim, T sequence length.
"""

from __future__ import annotations

from typing import Optional

from pretrain.config import ModelConfig

# Peak dense bf16 FLOP/s by device-name fragment, most specific first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
)


def matmul_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters that take part in matrix products (weights only), whole model (all TP shards)."""
    h, f = cfg.hidden_size, cfg.ffn_size
    head_dim = h // cfg.num_attention_heads
    kv = (cfg.num_query_groups or cfg.num_attention_heads) * head_dim
    attn = h * (h + 2 * kv) + h * h  # qkv + output projection
    mlp = h * f * (2 if cfg.activation == "swiglu" else 1) + f * h
    return cfg.num_layers * (attn + mlp) + vocab_size * h  # + LM head


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: Optional[int] = None) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L H Q T."""
    t = seq_len or cfg.seq_len
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attention = 12 * cfg.num_layers * cfg.num_attention_heads * head_dim * t
    return 6.0 * matmul_params(cfg, vocab_size) + attention


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    """Peak dense bf16 FLOP/s of a device by name; None when unknown (then no MFU is reported)."""
    if not device_name:
        return None
    for fragment, peak in PEAK_BF16:
        if fragment.lower() in device_name.lower():
            return peak
    return None
