"""Whole runs through the CLI: a blended run trains, and its blend is part of what resume checks."""

import pytest
import yaml

from tests.launch_helpers import run_train, tiny_overrides, train_records

pytestmark = pytest.mark.slow


def test_blended_run_trains_and_guards_its_blend(tiny_dataset, indexed_dataset, tmp_path):
    # indexed_dataset has seq_len 16: blending it with tiny_dataset (128) is refused up front.
    proc = run_train(tiny_overrides(tiny_dataset, tmp_path / "bad", data__blend=f"[{indexed_dataset}]",
                                    data__blend_weights="[0.5]"), check=False)
    assert proc.returncode == 2 and "--seq-len" in proc.stderr

    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    run = tmp_path / "run"
    blend = dict(data__weight=0.75, data__blend=f"[{other}]", data__blend_weights="[0.25]")
    run_train(tiny_overrides(tiny_dataset, run, steps=3, **blend))
    assert len(train_records(run)) == 3
    saved = yaml.safe_load((run / "data.yaml").read_text())
    assert [w for _, w in saved["blend"]] == [0.75, 0.25]

    changed = dict(blend, data__blend_weights="[0.5]")
    proc = run_train(tiny_overrides(tiny_dataset, run, steps=4, **changed), check=False)
    assert proc.returncode == 2 and "fingerprint" in proc.stderr
    run_train(tiny_overrides(tiny_dataset, run, steps=4, **blend))
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4]
