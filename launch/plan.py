"""`pretrain-plan [--json] [--search] [OVERRIDES...]`: what a configuration needs, before it is
submitted; with --search, the fastest layout of its model on its cluster that fits.

Takes the overrides of `pretrain-train` plus `cluster.*` (nodes, gpus_per_node, gpu_memory_gb,
gpu_peak_tflops, assumed_mfu, token_budget). No process group; a second or two.
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from launch.config import compose_config, fail
from pretrain.errors import PretrainError
from pretrain.model.fallbacks import silence_library_warnings


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pretrain-plan", description="Parameters, FLOPs, per-GPU memory and time of a config.")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.add_argument("--search", action="store_true",
                        help="search TP, PP, sequence parallel, ZeRO, micro-batch and recompute "
                             "for the fastest layout that fits (with --json: "
                             '{"best": {...}, "rejected": [...]}); exit 1 when none fits')
    parser.add_argument("--construction", choices=("auto", "tp_shard", "sharded"),
                        default="auto",
                        help="how ranks build the model, for start-up memory: auto (what "
                             "pretrain-train does: sharded at ZeRO-3, else tp_shard), tp_shard "
                             "(each rank its whole fp32 TP shard) or sharded (only its ZeRO-3 "
                             "partition)")
    parser.add_argument("--host-memory-gib", type=float, default=None,
                        help="host RAM per node; layouts whose start-up needs more are rejected")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for pretrain-train")
    args = parser.parse_args(argv)
    silence_library_warnings()  # megatron-core's import-time notes about apex/TE
    from pretrain.plan import make_plan, render
    from pretrain.plan_search import render_search, search

    try:
        cfg = compose_config(args.overrides)
        if args.search:
            result = search(cfg, args.construction, args.host_memory_gib)
        else:
            plan = make_plan(cfg, construction=args.construction)
    except PretrainError as e:
        fail(e)
    if not args.search:
        print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
        return 0
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        if result.best is not None and result.best.plan is not None:
            print(render(result.best.plan) + "\n")
        print(render_search(result))
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
