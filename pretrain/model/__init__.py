"""The GPT model (gpt.py: megatron-core GPTModel from our config), its layer spec and attention,
and FLOPs accounting (flops.py, importable without megatron-core)."""
