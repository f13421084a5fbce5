"""megatron-core's activation recompute on CPU (pretrain/cpu_shims.py): it saves the generator
states before the forward and restores them for the recomputation; on CPU those are the CPU
generator and our tensor-parallel tracker. With dropout on, a wrong restore draws other masks in
the backward pass and the losses drift from the second step."""

import pytest

from tests.launch_helpers import run_train, tiny_overrides, train_records

pytestmark = pytest.mark.slow


def test_recompute_reproduces_no_recompute_bitwise_with_dropout(tiny_dataset, tmp_path):
    curves = {}
    for mode in ("none", "full", "selective"):
        run = tmp_path / mode
        run_train(tiny_overrides(tiny_dataset, run, steps=3, model__recompute=mode,
                                 model__dropout=0.1, model__attention_dropout=0.1))
        curves[mode] = [(r["loss"], r["grad_norm"]) for r in train_records(run)]
    assert len(curves["none"]) == 3
    # Recompute changes what is kept, not what is computed: same masks, same numbers, bitwise.
    assert curves["full"] == curves["none"]
    assert curves["selective"] == curves["none"]
