"""The DeepSpeed step module on one gloo rank in this process: a vetoed update is discarded
bit for bit at every ZeRO stage, the pre-clip gradient norm is the same number whoever computes it,
the evaluation loss is the mean over the batches and leaves the model training."""

import pytest
import torch

from bench.bench_step import SHAPES, Ours, our_config
from pretrain.model.gpt import GPT
from pretrain.reasons import SkipReason
from pretrain.step import build_step_module

SHAPE = SHAPES["test"]


def build(dist, zero_stage: int, grad_clip: float = 1.0):
    cfg = our_config(SHAPE, Ours(zero_stage=zero_stage))
    cfg.optimizer.grad_clip = grad_clip
    dist.seed(0)
    model = GPT(cfg.model, cfg.model.padded_vocab_size(1), 1, "cpu")
    return build_step_module(model, cfg, dist)


def batches(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE.vocab, (SHAPE.batch, SHAPE.seq + 1), generator=g)
            for _ in range(n)]


def snapshot(module):
    """Everything an update changes: the parameters, the optimizer state, the LR schedule."""
    import deepspeed

    engine = module.engine
    # ZeRO 3 brings its partitions into the parameters at the next forward: gather them now.
    gather = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(list(module.module.parameters()), enabled=gather):
        params = [p.detach().clone() for p in module.module.parameters()]
    opt = engine.optimizer.state_dict()
    flat = torch.cat([t.flatten().float() for t in _tensors(opt)]) if _tensors(opt) else None
    return params, flat, engine.lr_scheduler.state_dict()["last_epoch"], engine.get_lr()[0]


def _tensors(obj):
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def same(a, b) -> bool:
    params = all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    opt = (a[1] is None and b[1] is None) or torch.equal(a[1], b[1])
    return params and opt and a[2:] == b[2:]


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_a_vetoed_update_is_discarded_bit_for_bit(dist, zero_stage):
    module = build(dist, zero_stage)
    data = iter(batches(1))
    first = module.train_step(data, 1, veto=lambda loss: None)
    assert first.skipped is None
    before = snapshot(module)
    seen = []

    def veto(loss):
        seen.append(loss)
        return SkipReason.LOSS_SPIKE

    vetoed = module.train_step(data, 2, veto)
    assert vetoed.skipped == "loss_spike" and seen == [vetoed.global_loss]
    assert same(before, snapshot(module)), "the vetoed update changed the state"
    applied = module.train_step(data, 3, veto=lambda loss: None)
    assert applied.skipped is None and not same(before, snapshot(module))


def test_the_gradient_norm_is_the_same_at_every_stage(dist):
    """ZeRO 0 in fp32 computes it here, ZeRO 1-3 take DeepSpeed's: one number, before clipping
    (clipping at 1e-3, far below it)."""
    norms = []
    for zero_stage in (0, 1, 2, 3):
        module = build(dist, zero_stage, grad_clip=1e-3)
        module.train_step(iter(batches(2)), 1, veto=lambda loss: None)
        norms.append(module.grad_norm())
    assert norms[0] > 1e-2
    assert norms == pytest.approx([norms[0]] * 4, rel=1e-5)


def test_eval_loss_is_the_mean_over_the_batches_and_training_resumes(dist):
    module = build(dist, 1)
    val = batches(3, n=3)
    with torch.no_grad():
        module.engine.eval()
        expected = sum(float(module.engine(b)) for b in val) / len(val)
        module.engine.train()
    assert module.eval_loss(iter(val)) == pytest.approx(expected, rel=1e-6)
    assert module.module.training


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_nan_gradients_with_a_finite_loss_are_discarded(dist, zero_stage):
    """DeepSpeed's ZeRO optimizers find them themselves; fp32 ZeRO 0 is checked by the step
    module on the norm it computes (DeepSpeed would apply them)."""
    module = build(dist, zero_stage)
    data = iter(batches(4))
    module.train_step(data, 1, veto=lambda loss: None)
    before = snapshot(module)
    weight = next(p for p in module.module.parameters() if p.ndim == 2)
    hook = weight.register_hook(lambda g: g * float("nan"))
    try:
        result = module.train_step(data, 2, veto=lambda loss: None)
    finally:
        hook.remove()
    assert result.skipped == SkipReason.NONFINITE_GRAD and torch.isfinite(result.loss)
    assert same(before, snapshot(module)), "NaN gradients were applied"
    assert module.train_step(data, 3, veto=lambda loss: None).skipped is None
