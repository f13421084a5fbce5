"""`pretrain-export CHECKPOINT OUT_DIR`: a committed checkpoint as a Hugging Face model directory."""

from __future__ import annotations

import argparse
from typing import List, Optional

from launch.config import fail
from pretrain.errors import PretrainError


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain-export",
        description="Write a committed checkpoint (any TP degree, any ZeRO stage) as a Hugging Face "
                    "GPT2LMHeadModel or LlamaForCausalLM with its tokenizer.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a step_XXXXXXXX checkpoint, a run's checkpoints/ directory (its latest), "
                        "or a run directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face model directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (the checkpoint's fp32 weights are cast)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    from pretrain.export import export

    try:
        info = export(args.checkpoint, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    except PretrainError as e:
        fail(e)
    print(f"exported step {info['step']} of {info['source']} to {args.out_dir}: "
          f"{info['architecture']}, vocab {info['vocab_size']}, {info['dtype']}")


if __name__ == "__main__":
    main()
