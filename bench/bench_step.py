"""Our full CPU training step against Hugging Face GPT-2 of the same shape, in the same run.

    python -m bench.bench_step [--shape baby|mini|both] [--threads 1] [--rounds 7] [--ablate]

Ours: megatron-core GPT (`pretrain.model.gpt.GPT`) inside the DeepSpeed engine
through the step module training uses (`pretrain.step.build_step_module`: ZeRO 1, fp32, one gloo
rank): one `train_step` = forward, backward, the all-rank loss, the veto and the update. Peer: `transformers.GPT2LMHeadModel`
built from `GPT2Config(n_embd, n_layer, n_head, n_positions, vocab_size)` in its default
configuration (SDPA attention, tanh-GeLU, dropout 0.1), loss through `labels=`, `torch.optim.AdamW`
with our hyperparameters and parameter groups, gradient clipping at our `optimizer.grad_clip`.
Same shape, same tokens, same thread count; interleaved A B A B, the first round dropped,
medians; ratios are taken round by round (peer time / our time) and reported as median
[min-max]. Wall time is the figure; the CPU-time ratio beside it is blind to the process being
descheduled, a second opinion on a loaded machine.

Both models default differently on dropout: ours to 0 (ModelConfig, as GPT pretraining runs do),
GPT-2 to 0.1. The target compares each in its own default; the rows "dropout 0.1" and
"HF, dropout 0" compare like with like.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from bench.common import Timing, cpu_dist, interleave, machine, paired_ratio, quiet, table

OURS = "ours (dropout 0)"  # as a run is configured by default
OURS_DROPOUT = "ours, dropout 0.1"  # GPT-2's dropout
HF_DEFAULT = "HF GPT-2 (default config)"  # the peer of every ratio
HF_NO_DROPOUT = "HF GPT-2, dropout 0"  # our dropout
ZERO0 = "ours, ZeRO 0"


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    batch: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def __str__(self) -> str:
        return (f"{self.layers} layers, {self.hidden} wide, {self.heads} heads, seq {self.seq}, "
                f"vocab {self.vocab}, batch {self.batch}")


SHAPES = {
    # nanoGPT's "baby GPT" (6 x 384, 6 heads, 256 context) with an 8K BPE vocabulary: the
    # smallest shape whose step is dominated by the same matrix products as a real GPT's.
    "baby": Shape(6, 384, 6, 256, 8192, 8),
    # Narrower, larger vocabulary: the LM head and the per-element work weigh more.
    "mini": Shape(4, 256, 4, 256, 16384, 8),
    # For tests only: seconds, not a measurement.
    "test": Shape(2, 64, 4, 32, 512, 2),
}


@dataclass(frozen=True)
class Ours:
    """One configuration of our step (values of our config that the ablation varies)."""

    dropout: float = 0.0  # ModelConfig's default
    zero_stage: int = 1
    compile: bool = False
    fused_kernels: str = "auto"
    engine: bool = True  # False: the bare megatron model, torch AdamW and clipping, no DeepSpeed


def our_config(shape: Shape, ours: Ours):
    from pretrain.config import Config, ModelConfig, ParallelConfig, ScheduleConfig, TrainerConfig

    model = ModelConfig(name="bench", num_layers=shape.layers, hidden_size=shape.hidden,
                        num_attention_heads=shape.heads, vocab_size=shape.vocab,
                        seq_len=shape.seq, max_position_embeddings=shape.seq,
                        activation="gelu_tanh",  # GPT-2's
                        dropout=ours.dropout, attention_dropout=ours.dropout,
                        fused_kernels=ours.fused_kernels)
    cfg = Config(model=model,
                 trainer=TrainerConfig(max_steps=10**9, micro_batch_size=shape.batch,
                                       precision="fp32", compile=ours.compile),
                 parallel=ParallelConfig(tp=1, zero_stage=ours.zero_stage, device="cpu"),
                 schedule=ScheduleConfig(warmup_steps=0))
    return cfg.validate(world_size=1, need_data=False)


def build_ours(shape: Shape, ours: Ours, tokens: torch.Tensor) -> Callable[[], float]:
    """Our step on `tokens` (batch, seq + 1), built as pretrain.builders.build_run builds it."""
    from pretrain.model.gpt import GPT
    from pretrain.step import build_step_module
    from pretrain.step.optim import build_optimizer

    quiet()
    cfg = our_config(shape, ours)
    dist = cpu_dist()
    model = GPT(cfg.model, cfg.model.padded_vocab_size(1), 1, "cpu").train()
    if cfg.trainer.compile:
        model = torch.compile(model)
    if not ours.engine:
        opt = build_optimizer(model, cfg.optimizer, "cpu", offload=False)
        params = [p for p in model.parameters() if p.requires_grad]

        def bare() -> float:
            loss = model(tokens)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return bare
    module = build_step_module(model, cfg, dist)
    count = 0

    def step() -> float:
        nonlocal count
        count += 1
        return module.train_step(iter([tokens]), count, veto=lambda loss: None).loss.item()

    return step


def build_peer(shape: Shape, tokens: torch.Tensor, dropout: Optional[float] = None,
               seed: int = 1234) -> Callable[[], float]:
    """HF GPT-2 in its default configuration (dropout None) or with all dropouts set."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pretrain.config import OptimizerConfig
    from pretrain.step.optim import param_groups

    quiet()
    torch.manual_seed(seed)
    extra = {} if dropout is None else dict(resid_pdrop=dropout, embd_pdrop=dropout,
                                            attn_pdrop=dropout)
    config = GPT2Config(n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads,
                        n_positions=shape.seq, vocab_size=shape.vocab, **extra)
    model = GPT2LMHeadModel(config).train()
    o = OptimizerConfig()  # our defaults, the same values our step uses
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                            eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = tokens[:, :-1]  # (b, s): labels are shifted inside the model

    def step() -> float:
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def variants(ablate: bool) -> Dict[str, Callable[[Shape, torch.Tensor], Callable[[], float]]]:
    """name -> builder of a step on given tokens."""
    v: Dict[str, Callable] = {
        OURS: lambda s, t: build_ours(s, Ours(), t),
        OURS_DROPOUT: lambda s, t: build_ours(s, Ours(dropout=0.1), t),
        HF_DEFAULT: lambda s, t: build_peer(s, t),
        HF_NO_DROPOUT: lambda s, t: build_peer(s, t, dropout=0.0),
    }
    if ablate:
        v.update({
            ZERO0: lambda s, t: build_ours(s, Ours(zero_stage=0), t),
            "ours, bare model (no engine)": lambda s, t: build_ours(s, Ours(engine=False), t),
            "ours, megatron fused kernels": lambda s, t: build_ours(s, Ours(fused_kernels="on"), t),
            "ours, torch.compile": lambda s, t: build_ours(s, Ours(compile=True), t),
        })
    return v


@dataclass
class StepResult:
    shape: Shape
    threads: int
    timings: Dict[str, Timing]

    def rows(self) -> List[List[object]]:
        peer = self.timings[HF_DEFAULT]
        out = []
        for name, t in self.timings.items():
            wall = paired_ratio(t, peer)
            cpu = paired_ratio(t, peer, cpu=True)
            out.append([name, round(t.rate(self.shape.tokens)), f"{t.spread:.0%}",
                        round(1e3 * t.cpu_median), str(wall), f"{cpu.median:.2f}x"])
        return out

    def ratio(self, name: str, peer: str = HF_DEFAULT, cpu: bool = False):
        return paired_ratio(self.timings[name], self.timings[peer], cpu=cpu)


HEADERS = ["variant", "tokens/s", "spread", "CPU ms/step", "vs HF default (wall)",
           "(CPU time)"]


def run(shape: Shape, threads: int, rounds: int, repeat: int, ablate: bool = False,
        only: Optional[List[str]] = None, seed: int = 1234) -> StepResult:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=gen)
    builders = variants(ablate)
    if only:
        builders = {k: v for k, v in builders.items() if k in only or k == HF_DEFAULT}
    steps = {name: build(shape, tokens) for name, build in builders.items()}
    return StepResult(shape, threads, interleave(steps, rounds=rounds, warmup=1, repeat=repeat))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=[*SHAPES, "both"], default="baby")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (1: the steadiest on a shared machine)")
    p.add_argument("--rounds", type=int, default=7, help="kept rounds (one warm-up round more)")
    p.add_argument("--repeat", type=int, default=2, help="steps per variant per round")
    p.add_argument("--ablate", action="store_true",
                   help="also: ZeRO 0, the bare model, megatron fused kernels, torch.compile")
    p.add_argument("--only", nargs="*", help="variant names to run (the HF default always runs)")
    args = p.parse_args(argv)
    shapes = ["baby", "mini"] if args.shape == "both" else [args.shape]
    for name in shapes:
        shape = SHAPES[name]
        res = run(shape, args.threads, args.rounds, args.repeat, args.ablate, args.only)
        print(table(HEADERS, res.rows(),
                    title=f"CPU training step, fp32, {args.threads} thread(s), {shape} "
                          f"({shape.tokens} tokens/step); median of {args.rounds} interleaved "
                          f"rounds x {args.repeat} steps, warm-up dropped; {machine()}"))


if __name__ == "__main__":
    main()
