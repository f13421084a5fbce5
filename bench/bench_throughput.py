"""Training throughput and MFU of a model preset on whatever device is present.

    python -m bench.bench_throughput --preset gpt2-124m      # GPU: bf16, T=1024
    python -m bench.bench_throughput --preset gpt-1.3b       # GPU: bf16, T=2048
    python -m bench.bench_throughput --preset gpt2-124m --tiny   # CPU: exercises the same path

Our full step, through the step module training uses (`pretrain.step.build_step_module`:
megatron-core GPT inside the DeepSpeed engine; forward, backward, the all-rank loss, the update)
on random tokens already on the device, so the figure is the model's and the engine's, not the
loader's. bf16 on GPU (fp32 on CPU), ZeRO 1, one rank. The first `--warmup` steps are dropped;
then `--steps` steps (>= 50 on GPU) are timed between two device synchronisations; inside the
window the one synchronisation per step is training's own (the loss the veto reads). TFLOP/s per device =
tokens/s x (6 N + 12 L H Q T) (pretrain.model.flops, BENCHMARKS.md); MFU divides by the
device's peak dense bf16 FLOP/s, printed only for a device whose peak is known.

The micro-batch defaults to the largest that `pretrain-plan` says fits the device's memory
(capped at --max-micro); `--tiny` shrinks the preset to a few layers for a CPU check. The peak
memory the step allocated on the GPU is printed beside what pretrain-plan predicts for it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

from bench.common import cpu_dist, machine, quiet, table

PRESETS = {"gpt2-124m": "gpt2-small", "gpt-1.3b": "gpt-1.3b"}
TINY = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4",
        "model.seq_len=128", "model.max_position_embeddings=128", "model.vocab_size=4096"]


@dataclass
class ThroughputResult:
    preset: str
    device: str
    precision: str
    micro_batch: int
    seq_len: int
    steps: int
    seconds: float
    tokens_per_s: float
    flops_per_token: float
    tflops: float  # achieved, per device
    peak_tflops: Optional[float]
    mfu: Optional[float]
    loss: float
    peak_memory_gib: Optional[float] = None  # allocated by the step on the GPU (None on CPU)
    planned_gib: Optional[float] = None  # what pretrain-plan predicts for this step

    def row(self) -> List[object]:
        measured = f"{self.peak_memory_gib:.2f}" if self.peak_memory_gib is not None else "n/a"
        return [self.preset, self.device, self.precision, self.micro_batch, self.seq_len,
                round(self.tokens_per_s), self.tflops,
                f"{self.mfu:.1%}" if self.mfu is not None else "n/a (peak unknown)",
                f"{measured} / {self.planned_gib:.2f}"]


HEADERS = ["preset", "device", "precision", "micro", "seq", "tokens/s", "TFLOP/s", "MFU",
           "peak GiB / planned"]


def configure(preset: str, device: str, tiny: bool, micro: Optional[int], max_micro: int,
              compile_model: bool, recompute: Optional[str], extra: List[str]):
    from launch.config import compose_config
    from pretrain.plan import make_plan

    if preset not in PRESETS:
        raise SystemExit(f"--preset: one of {sorted(PRESETS)}")
    precision = "bf16" if device == "cuda" else "fp32"
    overrides = [f"model={PRESETS[preset]}", f"trainer.precision={precision}",
                 "parallel.zero_stage=1", f"parallel.device={device}", "cluster.nodes=1",
                 "cluster.gpus_per_node=1", f"trainer.compile={compile_model}",
                 "schedule.warmup_steps=0"]
    if tiny:
        overrides += TINY
    if recompute:
        overrides.append(f"model.recompute={recompute}")
    if device == "cuda":
        gib = torch.cuda.get_device_properties(0).total_memory / (1 << 30)
        overrides.append(f"cluster.gpu_memory_gb={gib:.1f}")
    cfg = compose_config(overrides + list(extra))
    if micro is None and device == "cpu":
        micro = 4  # a check of the path, not a measurement
    elif micro is None:
        fitting = make_plan(cfg).max_micro_batch[cfg.parallel.zero_stage]
        micro = max(1, min(max_micro, fitting))
    cfg.trainer.micro_batch_size = micro
    cfg.trainer.global_batch_size = None
    return cfg.validate(world_size=1, need_data=False)


def run(preset: str, tiny: bool = False, steps: Optional[int] = None, warmup: Optional[int] = None,
        micro: Optional[int] = None, max_micro: int = 32, compile_model: bool = False,
        recompute: Optional[str] = None, extra: Optional[List[str]] = None) -> ThroughputResult:
    from pretrain.step import build_step_module
    from pretrain.model.flops import flops_per_token, peak_flops
    from pretrain.model.gpt import GPT

    quiet()
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not tiny:
        raise SystemExit("no GPU: run with --tiny on CPU (the full presets would take hours)")
    device_type = "cuda" if on_gpu else "cpu"
    steps = steps or (50 if on_gpu else 4)
    warmup = warmup if warmup is not None else (20 if on_gpu else 1)
    cfg = configure(preset, device_type, tiny, micro, max_micro, compile_model, recompute,
                    extra or [])
    dist = device_dist(device_type)
    padded = cfg.model.padded_vocab_size(1)
    model = GPT(cfg.model, padded, 1, device_type, device=dist.device)  # built in place
    if cfg.trainer.compile:
        model = torch.compile(model)
    module = build_step_module(model, cfg, dist)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(dist.device)
    m, s = cfg.trainer.micro_batch_size, cfg.model.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (m, s + 1), device=dist.device)

    def step() -> torch.Tensor:
        return module.train_step(iter([tokens]), 1, veto=lambda loss: None).loss

    for _ in range(warmup):
        step()
    _sync(on_gpu)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(on_gpu)
    seconds = time.perf_counter() - t0
    tok_s = steps * m * s / seconds
    fpt = flops_per_token(cfg.model, padded, s)
    name = torch.cuda.get_device_name(dist.device) if on_gpu else "cpu"
    peak = peak_flops(name) if on_gpu else None
    achieved = tok_s * fpt
    from pretrain.plan import GIB, make_plan

    measured = torch.cuda.max_memory_allocated(dist.device) / GIB if on_gpu else None
    planned = make_plan(cfg).gpu_bytes(cfg.parallel.zero_stage, m) / GIB
    return ThroughputResult(preset + (" (tiny)" if tiny else ""), name, cfg.trainer.precision, m,
                            s, steps, seconds, tok_s, fpt, achieved / 1e12,
                            peak / 1e12 if peak else None, achieved / peak if peak else None,
                            float(loss), measured, planned)


def device_dist(device_type: str):
    """One rank on the CPU (gloo) or on this machine's first GPU."""
    if device_type == "cpu":
        return cpu_dist()
    from pretrain.config import ParallelConfig
    from pretrain.dist import Dist

    return Dist.from_env(ParallelConfig(tp=1, device="cuda"), env={}).initialize(1234)


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), action="append",
                   help="repeatable; default: both")
    p.add_argument("--tiny", action="store_true", help="a few layers of the preset (CPU check)")
    p.add_argument("--steps", type=int, help="timed steps (default 50 on GPU, 4 on CPU)")
    p.add_argument("--warmup", type=int, help="dropped steps (default 20 on GPU, 1 on CPU)")
    p.add_argument("--micro", type=int, help="micro-batch (default: the largest that fits)")
    p.add_argument("--max-micro", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--recompute", choices=["none", "selective", "full"])
    p.add_argument("--json", action="store_true", help="one JSON object per preset as well")
    p.add_argument("overrides", nargs="*", help="more config overrides, e.g. model.seq_len=512")
    args = p.parse_args(argv)
    rows, results = [], []
    for preset in args.preset or list(PRESETS):
        res = run(preset, args.tiny, args.steps, args.warmup, args.micro, args.max_micro,
                  args.compile, args.recompute, args.overrides)
        results.append(res)
        rows.append(res.row())
    print(table(HEADERS, rows, title=f"training throughput, one device, steady state "
                                     f"({results[0].steps} timed steps); {machine()}"))
    if args.json:
        import json

        for res in results:
            print(json.dumps(asdict(res)))


if __name__ == "__main__":
    main()
