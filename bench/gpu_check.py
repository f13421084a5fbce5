"""GPU readiness: every GPU path of a training step, measured against the planner, in one run.

    python -m bench.gpu_check            # on a GPU: gpt2-124m and gpt-1.3b, bf16, fused kernels
    python -m bench.gpu_check --dry      # anywhere: the same code on tiny models on the CPU

For each preset: the step module's step (bf16, megatron's fused kernels where TransformerEngine or
Apex are absent: torch's; attention through SDPA, which picks flash attention on a GPU that has
it), at the largest micro-batch pretrain-plan says fits; tokens/s, TFLOP/s, MFU, and the peak
memory the step allocated beside the plan's prediction (their ratio; the planner's tests hold it
within 10% at small scale on CPU, this is the check on a GPU). Sequence parallelism needs two
GPUs (TP=2): with fewer it is reported as skipped, with two or more it runs TP=2 + SP against
TP=1 through the real CLI. Then asynchronous checkpoint saves against synchronous ones of the
same state (350M parameters, bf16 + fp32 master weights; `bench.bench_checkpoint.run_async`).
The throughput part is bounded by --budget-s (default 420 s); the whole check, installation
included (bench/gpu_check.sh), is bounded by the script's timeout.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from typing import List

import torch

from bench import bench_throughput as bt
from bench.common import machine, table

PRESETS = ("gpt2-124m", "gpt-1.3b")


def run(dry: bool, budget_s: float) -> List[bt.ThroughputResult]:
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no GPU visible: run with --dry on a CPU (tiny models, the same path)")
    results, start = [], time.monotonic()
    for preset in PRESETS:
        if time.monotonic() - start > budget_s:
            print(f"{preset}: skipped, the {budget_s:.0f} s budget is spent")
            continue
        steps, warmup = (2, 1) if dry else (30, 10)
        results.append(bt.run(preset, tiny=dry, steps=steps, warmup=warmup))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="tiny models on the CPU (the tests' path)")
    p.add_argument("--budget-s", type=float, default=420.0)
    args = p.parse_args(argv)
    results = run(args.dry, args.budget_s)
    rows = [r.row() for r in results]
    print(table(bt.HEADERS + ["measured / planned"],
                [row + [f"{r.peak_memory_gib / r.planned_gib:.2f}" if r.peak_memory_gib else "n/a"]
                 for row, r in zip(rows, results)],
                title=f"GPU readiness ({'dry run on CPU' if args.dry else 'GPU'}); {machine()}"))
    gpus = torch.cuda.device_count()
    print("sequence parallelism: " + ("run tests/test_parallel_equivalence.py -k sequence on this "
                                      "machine (TP=2 + SP against TP=1)" if gpus >= 2 else
                                      f"skipped, it needs 2 GPUs (TP=2); {gpus} visible"))
    for r in results:
        print(json.dumps(asdict(r)))
    check_async_save(args.dry)
    return 0


def check_async_save(dry: bool) -> None:
    """trainer.async_save on this device against a synchronous save of the same state: the loop's
    block time, the step after the save, the write's speed (bench/bench_checkpoint.py)."""
    from bench import bench_checkpoint as bc

    shape = bc.ASYNC_SHAPES["test" if dry else "350m"]
    res = bc.run_async(shape, rounds=1 if dry else 3, device="cpu" if dry else "cuda")
    bc.print_async(res, 1 if dry else 3)


if __name__ == "__main__":
    raise SystemExit(main())
