"""Resharding: a checkpoint saved at one parallel layout resumes, in fresh processes, at another
(TP=2 x DP=1 -> TP=1 x DP=2; DP=1 -> DP=2), and the first loss after the resume equals the loss
the original layout computes on the same batch; the next one shows the optimizer state survived."""

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.checkpoint import MARKER, damaged, file_sizes, universal_dir
from pretrain.config import Config, ModelConfig, ParallelConfig
from pretrain.dist import Dist
from pretrain.errors import CheckpointError
from pretrain.export import _canonical, merged_state, read_config
from pretrain.layout import Layout
from pretrain.reshard import needs_universal, prepare, read_layout
from tests.launch_helpers import run_train, tiny_overrides, train_records

# Global batch 8 at every layout (micro 4: TP=2 x DP=1 accumulates 2, TP=1 x DP=2 does not), a
# schedule that does not depend on max_steps, no dropout (a resharded run reseeds its RNG), and a
# checkpoint at step 2 of 4.
COMMON = dict(trainer__global_batch_size=8, schedule__total_steps=6, model__dropout=0.0,
              model__attention_dropout=0.0, trainer__checkpoint_every=2)
# SwiGLU's fc1 and grouped-query attention's qkv: the two fused layouts a wrong merge rule breaks
# silently (without its SwiGLU rule the first loss after TP=2 -> 1 is off by 5e-3).
SWIGLU_GQA = dict(model__activation="swiglu", model__ffn_hidden_size=128, model__num_query_groups=2)
STEP2 = "step_00000002"


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in train_records(run_dir)}


def resume_at(data: Path, original: Path, dest: Path, nproc: int, **layout):
    """Resume a copy of `original` from its step-2 checkpoint at another layout, to step 4."""
    shutil.copytree(original, dest)
    (dest / "metrics.jsonl").unlink()  # keep only the resumed run's records
    ckpt = dest / "checkpoints" / STEP2
    before = file_sizes(ckpt)
    proc = run_train(tiny_overrides(data, dest, steps=4, trainer__resume_from=ckpt,
                                    **{**COMMON, **layout}), nproc=nproc)
    assert file_sizes(ckpt) == before and damaged(ckpt) is None  # the original is untouched
    assert (universal_dir(ckpt) / MARKER).exists()
    assert "reseeded every generator" in proc.stdout
    return ckpt


def assert_loss_continues(original: Path, resharded: Path) -> None:
    a, b = losses(original), losses(resharded)
    assert list(b) == [3, 4]
    print(f"step 3: {a[3]!r} vs {b[3]!r}; step 4: {a[4]!r} vs {b[4]!r}")
    assert b[3] == pytest.approx(a[3], rel=1e-5, abs=0)  # same weights, same batch
    assert b[4] == pytest.approx(a[4], rel=1e-4, abs=0)  # and the optimizer state survived


@pytest.fixture(scope="module")
def tp2_run(tiny_dataset, tmp_path_factory) -> Path:
    """4 steps straight at TP=2 x DP=1, ZeRO 1; its step-3 and -4 losses are the reference."""
    run = tmp_path_factory.mktemp("tp2") / "run"
    run_train(tiny_overrides(tiny_dataset, run, steps=4, parallel__tp=2, **COMMON, **SWIGLU_GQA),
              nproc=2)
    return run


@pytest.mark.slow
def test_tp2_to_tp1_dp2_zero1(tiny_dataset, tp2_run, tmp_path):
    # ZeRO 2 loads through the same code (and was seen to continue bitwise too); ZeRO 3 below.
    dest = tmp_path / "run"
    ckpt = resume_at(tiny_dataset, tp2_run, dest, nproc=2, parallel__tp=1, **SWIGLU_GQA)
    assert_loss_continues(tp2_run, dest)
    # The universal form holds exactly the TP=1 weights the exporter merges from the TP shards.
    expected = merged_state(ckpt, read_config(ckpt))
    zero = universal_dir(ckpt) / "zero"
    for name in os.listdir(zero):
        if name != "optimizer_state.pt":
            got = torch.load(zero / name / "fp32.pt", weights_only=False)["param"]
            assert torch.equal(got, expected[_canonical(name)]), name


def assert_universal_holds_the_exported_weights(ckpt: Path) -> None:
    """The universal form holds exactly the whole-model weights pretrain-export merges (for a
    PP checkpoint: its stages' layers under global numbers, one word table)."""
    expected = merged_state(ckpt, read_config(ckpt))
    zero = universal_dir(ckpt) / "zero"
    names = [n for n in os.listdir(zero) if n != "optimizer_state.pt"]
    assert sorted(_canonical(n) for n in names) == sorted(expected)
    for name in names:
        got = torch.load(zero / name / "fp32.pt", weights_only=False)["param"]
        assert torch.equal(got, expected[_canonical(name)]), name


@pytest.mark.slow
def test_pp2_to_pp1_dp2_tied(tiny_dataset, tmp_path):
    """Pipeline stages (layers numbered from 0 on each, the word table on the first and the last)
    into one model: the stages are converted one by one under global names."""
    original = tmp_path / "pp2"
    run_train(tiny_overrides(tiny_dataset, original, steps=4, parallel__pp=2,
                             parallel__zero_stage=1, **COMMON, **SWIGLU_GQA), nproc=2)
    dest = tmp_path / "dp2"
    ckpt = resume_at(tiny_dataset, original, dest, nproc=2, parallel__pp=1, parallel__zero_stage=1,
                     **SWIGLU_GQA)
    assert_loss_continues(original, dest)
    assert_universal_holds_the_exported_weights(ckpt)


@pytest.mark.slow
def test_tp2_pp2_to_tp1_dp2_untied(tiny_dataset, tmp_path):
    untied = dict(SWIGLU_GQA, model__tie_embeddings="false")
    original = tmp_path / "tp2pp2"
    run_train(tiny_overrides(tiny_dataset, original, steps=4, parallel__pp=2, parallel__tp=2,
                             parallel__zero_stage=1, **COMMON, **untied), nproc=4)
    dest = tmp_path / "dp2"
    ckpt = resume_at(tiny_dataset, original, dest, nproc=2, parallel__zero_stage=1, **untied)
    assert_loss_continues(original, dest)
    assert_universal_holds_the_exported_weights(ckpt)


@pytest.mark.slow
def test_tp2_to_pp2(tiny_dataset, tp2_run, tmp_path):
    """The other way: each stage loads its layers (and, tied, the last one its copy of the word
    table) from the whole model's universal form."""
    dest = tmp_path / "pp2"
    resume_at(tiny_dataset, tp2_run, dest, nproc=2, parallel__tp=1, parallel__pp=2,
              **SWIGLU_GQA)
    assert_loss_continues(tp2_run, dest)


@pytest.mark.slow
def test_dp1_to_dp2_zero3(tiny_dataset, tmp_path):
    """ZeRO 3's universal load needs two repairs of DeepSpeed's (see Checkpointer.load)."""
    original = tmp_path / "original"
    run_train(tiny_overrides(tiny_dataset, original, steps=4, parallel__zero_stage=3, **COMMON))
    dest = tmp_path / "resharded"
    resume_at(tiny_dataset, original, dest, nproc=2, parallel__zero_stage=3)
    assert_loss_continues(original, dest)


@pytest.mark.slow
def test_universal_form_is_made_once_per_save(tp2_run, tmp_path):
    """In process: reused while its source is the same save, made again after a re-save."""
    ckpt = tmp_path / STEP2
    shutil.copytree(tp2_run / "checkpoints" / STEP2, ckpt)
    saved = read_layout(ckpt, {}, 256)
    assert (saved.tp, saved.dp, saved.zero_stage, saved.padded_vocab_size) == (2, 1, 1, 256)
    dist = Dist(SimpleNamespace(rank=0, world_size=1, local_rank=0), Layout(1, 1, 1, 256), "cpu",
                "gloo")
    target = prepare(ckpt, saved, Layout(1, 1, 1, 256), dist)
    assert target == universal_dir(ckpt) and (target / "zero" / "optimizer_state.pt").exists()
    made = (target / MARKER).stat().st_mtime_ns
    assert prepare(ckpt, saved, Layout(1, 2, 2, 256), dist) == target
    assert (target / MARKER).stat().st_mtime_ns == made
    (ckpt / MARKER).write_text(ckpt.name)  # a re-save of the same step
    prepare(ckpt, saved, Layout(1, 1, 1, 256), dist)
    assert (target / MARKER).stat().st_mtime_ns != made
    assert prepare(ckpt, saved, saved, dist) == ckpt  # the same layout loads as saved


def test_which_layouts_need_the_universal_form(tmp_path):
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()
    z1 = Layout(tp=2, dp=1, zero_stage=1, padded_vocab_size=256)
    assert not needs_universal(tmp_path, z1, z1)
    assert not needs_universal(tmp_path, z1, Layout(2, 1, 2, 256))  # ZeRO 1 <-> 2: same files
    assert needs_universal(tmp_path, z1, Layout(2, 2, 1, 256))
    assert needs_universal(tmp_path, z1, Layout(1, 2, 1, 256))
    with pytest.raises(CheckpointError, match="only 1 <-> 2 may change"):
        needs_universal(tmp_path, z1, Layout(1, 2, 3, 256))
    z3 = Layout(2, 1, 3, 256)
    assert needs_universal(tmp_path, z3, Layout(1, 2, 3, 256))
    with pytest.raises(CheckpointError, match="ZeRO-3 universal loader"):
        needs_universal(tmp_path, z3, Layout(2, 2, 3, 256))
    fp32_zero0 = tmp_path / "zero0"
    fp32_zero0.mkdir()
    z0 = Layout(1, 1, 0, 256)
    assert not needs_universal(fp32_zero0, z0, Layout(1, 4, 0, 256))  # optimizer state is whole
    with pytest.raises(CheckpointError, match="fp32 ZeRO 0"):
        needs_universal(fp32_zero0, z0, Layout(2, 1, 0, 256))
    with pytest.raises(CheckpointError, match="only 1 <-> 2"):
        needs_universal(fp32_zero0, z0, Layout(1, 1, 1, 256))


def test_vocabulary_rows_are_kept_where_the_new_tp_divides_them():
    cfg = Config(model=ModelConfig(make_vocab_size_divisible_by=128))
    assert cfg.layout(2, 300, None).padded_vocab_size == 384  # a fresh run, TP=1 x DP=2
    saved_tp2 = Layout(2, 1, 1, cfg.model.padded_vocab_size(2, 300))
    assert saved_tp2.padded_vocab_size == 512
    assert cfg.layout(2, 300, saved_tp2).padded_vocab_size == 512
    odd = Config(model=ModelConfig(make_vocab_size_divisible_by=1), parallel=ParallelConfig(tp=2))
    saved_tp1 = Layout(1, 1, 1, 50257)
    grown = odd.layout(2, 50257, saved_tp1)  # TP=2 x DP=1
    assert grown.padded_vocab_size == 50258  # never fewer rows: the loader zero-pads
