"""`pretrain-plan [--json] [OVERRIDES...]`: what a configuration needs, before it is submitted.

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
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for pretrain-train")
    args = parser.parse_args(argv)
    silence_library_warnings()  # megatron-core's import-time notes about apex/TE
    from pretrain.plan import make_plan, render

    try:
        plan = make_plan(compose_config(args.overrides))
    except PretrainError as e:
        fail(e)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
