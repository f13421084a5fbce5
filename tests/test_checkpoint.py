"""Checkpoints never lose a run: resume is bitwise exact in fresh processes, a crash in the
middle of a save leaves the previous checkpoint as latest, keep-last-N keeps exactly N."""

from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import MARKER, committed, find_latest
from tests.launch_helpers import run_train, tiny_overrides, train_records

pytestmark = pytest.mark.slow


def final_params(run_dir: Path) -> dict:
    """The full fp32 parameters of the latest checkpoint, per TP rank file."""
    ckpt = find_latest(run_dir / "checkpoints")
    if list(ckpt.glob("zero_pp_rank_*_model_states.pt")):  # ZeRO 3: weights live partitioned
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return {"fp32": get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)}
    return {f.name: torch.load(f, weights_only=False)["module"]
            for f in sorted(ckpt.glob("mp_rank_*_model_states.pt"))}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for f in a:
        for k, v in a[f].items():
            if torch.is_tensor(v):
                assert torch.equal(v, b[f][k]), f"{f}:{k} differs"


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in train_records(run_dir)}


CASES = {
    # name: (processes, extra overrides, segment ends)
    "zero1_dp2_resumed_twice": (2, dict(parallel__zero_stage=1), [2, 4, 6]),
    "zero2_dp2": (2, dict(parallel__zero_stage=2), [3, 6]),
    "zero3_dp2": (2, dict(parallel__zero_stage=3), [3, 6]),
    "tp2_zero1_grad_accum": (2, dict(parallel__tp=2, trainer__global_batch_size=8), [3, 6]),
    # Pipeline stages (megatron's 1F1B schedule), dropout on both, 2 micro-batches per step.
    "pp2_zero1": (2, dict(parallel__pp=2, parallel__zero_stage=1,
                          trainer__global_batch_size=8), [3, 6]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bitwise_exact(tiny_dataset, tmp_path, case):
    nproc, extra, segments = CASES[case]
    total = segments[-1]
    common = dict(extra, schedule__total_steps=total, model__dropout=0.1)

    straight = tmp_path / "straight"
    run_train(tiny_overrides(tiny_dataset, straight, steps=total, **common), nproc=nproc)
    pieces = tmp_path / "pieces"
    for end in segments:  # each segment is a new set of processes resuming the same run dir
        run_train(tiny_overrides(tiny_dataset, pieces, steps=end, **common), nproc=nproc)

    a, b = losses(straight), losses(pieces)
    assert list(a) == list(range(1, total + 1)) and list(b) == list(a)
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise, every step
    assert_same_params(final_params(straight), final_params(pieces))
    assert len(committed(pieces / "checkpoints")) == min(len(segments), 3)


def test_crash_during_save_keeps_previous_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(tiny_dataset, run, steps=6, trainer__checkpoint_every=2,
                          schedule__total_steps=6)
    proc = run_train(args, nproc=2, check=False, env={"PRETRAIN_FAULTS": "crash_in_save@4:1"})
    assert proc.returncode != 0
    assert "CheckpointError" in proc.stderr and "saving step_00000004 failed" in proc.stderr
    root = run / "checkpoints"
    assert find_latest(root).name == "step_00000002"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert (root / "step_00000004.tmp").exists() and not (root / "step_00000004").exists()

    # The same command resumes from step 2, cleans the stale save and ends like a clean run.
    run_train(args, nproc=2)
    assert not (root / "step_00000004.tmp").exists()
    clean = tmp_path / "clean"
    run_train(tiny_overrides(tiny_dataset, clean, steps=6, trainer__checkpoint_every=2,
                             schedule__total_steps=6), nproc=2)
    assert losses(run)[6] == losses(clean)[6]
    assert_same_params(final_params(run), final_params(clean))


def test_keep_last_n_and_markers(tiny_dataset, tmp_path):
    run_train(tiny_overrides(tiny_dataset, tmp_path, steps=7, trainer__checkpoint_every=1,
                             trainer__keep_last=2))
    kept = committed(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step_00000006", "step_00000007"]
    for p in kept:
        assert (p / MARKER).exists() and (p / "config.yaml").exists() and (p / "tokenizer.json").exists()


def test_changed_model_shape_or_dataset_refuses_to_resume(tiny_dataset, indexed_dataset, tmp_path):
    run_train(tiny_overrides(tiny_dataset, tmp_path, steps=2))
    proc = run_train(tiny_overrides(tiny_dataset, tmp_path, steps=4, model__hidden_size=128),
                     check=False)
    assert proc.returncode == 2 and "model.hidden_size: 64 -> 128" in proc.stderr
    other = tmp_path.parent / (tmp_path.name + "_other_data")
    import shutil

    shutil.copytree(tiny_dataset, other)
    (other / "manifest.json").write_text(
        (other / "manifest.json").read_text().replace('"fingerprint": "', '"fingerprint": "0'))
    proc = run_train(tiny_overrides(other, tmp_path, steps=4), check=False)
    assert proc.returncode == 2 and "fingerprint" in proc.stderr
    # Reading a subset of the shards is another dataset: refused, naming data.shards.
    subset = f"'{tiny_dataset}/train/shard-{{000000..000002}}.tar'"  # quoted for Hydra
    proc = run_train(tiny_overrides(tiny_dataset, tmp_path, steps=4, data__shards=subset),
                     check=False)
    assert proc.returncode == 2 and "data.shards: None -> " in proc.stderr
    # What may change does: more steps, other logging.
    run_train(tiny_overrides(tiny_dataset, tmp_path, steps=3, trainer__log_every=3))
    assert losses(tmp_path)[3] > 0


def test_a_load_reads_the_model_file_once_and_restores_the_state(dist, tmp_path):
    """DeepSpeed reads mp_rank_00_model_states.pt twice per load (once only to check the TP size);
    Checkpointer.load hands the first read back. The state still comes back exactly."""
    from bench.bench_step import SHAPES, Ours, our_config
    from pretrain.checkpoint import Checkpointer
    from pretrain.client_state import ClientState
    from pretrain.model.gpt import GPT
    from pretrain.step import build_step_module

    shape = SHAPES["test"]
    cfg = our_config(shape, Ours())
    module = build_step_module(GPT(cfg.model, cfg.model.padded_vocab_size(1), 1, "cpu"), cfg, dist)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1))

    def step():
        return module.train_step(iter([tokens]), 1, veto=lambda loss: None).loss.item()

    step()
    ckpt = Checkpointer(tmp_path, dist, keep_last=2)
    saved = ckpt.save(module, 1, ClientState(trainer={"trainer": {"step": 1}}))
    after = [step(), step()]
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    torch.load = counting_load
    try:
        ckpt.load(module, saved)
    finally:
        torch.load = real_load
    assert reads.count("mp_rank_00_model_states.pt") == 1, reads
    assert [step(), step()] == after  # model, optimizer and schedule came back bit for bit
