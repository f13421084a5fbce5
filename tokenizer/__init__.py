"""pretrain-data: train a byte-level BPE tokenizer and pack token sequences into WebDataset shards.

The trainer never imports this package; it reads the result through `pretrain.data.manifest`.
"""

from tokenizer.pipeline import PrepareConfig, PrepareResult, prepare

__all__ = ["PrepareConfig", "PrepareResult", "prepare"]
