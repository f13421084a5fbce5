"""Pipeline parallelism (pretrain/step/pipeline_step.py) through the real CLI in fresh processes:
PP=2 reproduces PP=1 and TP2 x PP2 (with sequence parallelism) reproduces TP=2, per-step losses,
gradient norms and validation losses, for GPT-2 (tied embeddings, learned positions) and Llama
(RoPE, SwiGLU, RMSNorm, GQA, untied) styles. Bitwise resume at PP=2 is a case of
tests/test_checkpoint.py, resharding to and from PP of tests/test_reshard.py, the export of a PP
checkpoint of tests/test_export.py."""

import numpy as np
import pytest

from tests.launch_helpers import run_train, tiny_overrides, train_records, read_metrics

pytestmark = pytest.mark.slow

LLAMA = dict(model__normalization="RMSNorm", model__activation="swiglu",
             model__position_embedding="rope", model__bias="false",
             model__tie_embeddings="false", model__num_query_groups=2)
STYLES = {"gpt2": {}, "llama": LLAMA}
# 4 micro-batches per step: the 1F1B schedule's warm-up, steady state and cool-down all run.
COMMON = dict(parallel__zero_stage=1, trainer__global_batch_size=16, trainer__eval_every=2,
              model__num_layers=4, model__dropout=0.0)


def _curves(run_dir):
    recs = train_records(run_dir)
    val = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    return (np.array([r["loss"] for r in recs]), np.array([r["grad_norm"] for r in recs]),
            np.array(val))


def _run(data, run_dir, nproc, **kw):
    run_train(tiny_overrides(data, run_dir, steps=4, **dict(COMMON, **kw)), nproc=nproc)
    return _curves(run_dir)


def _assert_same(a, b):
    (la, ga, va), (lb, gb, vb) = a, b
    assert len(la) == len(lb) == 4 and len(va) == len(vb) == 2
    assert la[-1] < la[0]  # it learns
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    np.testing.assert_allclose(gb, ga, rtol=1e-4)
    np.testing.assert_allclose(vb, va, rtol=1e-5)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_pp2_reproduces_pp1(tiny_dataset, tmp_path, style):
    one = _run(tiny_dataset, tmp_path / "pp1", 1, **STYLES[style])
    two = _run(tiny_dataset, tmp_path / "pp2", 2, parallel__pp=2, **STYLES[style])
    _assert_same(one, two)


def test_tp2_pp2_with_sequence_parallelism_reproduces_tp2(tiny_dataset, tmp_path):
    tp = dict(parallel__tp=2, parallel__sequence_parallel="true", **LLAMA)
    _assert_same(_run(tiny_dataset, tmp_path / "tp2", 2, **tp),
                 _run(tiny_dataset, tmp_path / "tp2pp2", 4, parallel__pp=2, **tp))
