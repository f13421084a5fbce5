"""Watching a run: one W&B run id for the whole run directory (also across fresh processes and
a lost `wandb_id` file), every dashboard metric in metrics.jsonl with sane values, rank 0 alone
writes, and pretrain-report draws a real run. W&B runs offline in temporary directories."""

import math
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launch.config import compose_config
from launch.report import main as report_main
from pretrain.callbacks.metrics import MetricsLogger
from pretrain.config import LoggerConfig
from pretrain.step.optim import lr_lambda
from pretrain.model.flops import flops_per_token
from pretrain.tracking import ID_FILE, Tracker
from pretrain.trainer import StepOutput, TrainState
from tests.launch_helpers import read_metrics, run_train, tiny_overrides, train_records

# W&B adds "-1", "-2" to a folder started in the same second as another of the same run.
OFFLINE = re.compile(r"^offline-run-\d{8}_\d{6}-(\w+?)(?:-\d+)?$")
STEP_KEYS = ("step", "tokens_seen", "loss", "ppl", "lr", "grad_norm", "skipped_steps",
             "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu",
             "step_time", "data_time", "compute_time", "fwd_bwd_time", "optimizer_time",
             "peak_memory_gb", "consumed_samples", "dataset", "epoch", "shard", "elapsed_s", "time")


def offline_ids(run_dir: Path) -> list:
    """The run id of every offline W&B directory under RUN_DIR/wandb, oldest first."""
    names = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    return [OFFLINE.match(n).group(1) for n in names]


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout alone


# ---- in-process ------------------------------------------------------------------------------
def test_run_id_survives_restarts_and_a_lost_id_file(tmp_path, wandb_offline):
    cfg = LoggerConfig(mode="offline", project="test", tags=["a"])
    first = Tracker(tmp_path, cfg, {"model": {"hidden_size": 64}})
    first.update_config({"parameters": 1234})
    first.start(step=0)
    saved = first.state_dict()  # what every checkpoint's client state carries
    assert dict(first.wandb_run.config)["parameters"] == 1234
    assert dict(first.wandb_run.config)["model"] == {"hidden_size": 64}
    sent = []  # what reaches W&B: grouped names, both x-axes, W&B's step = the trainer's step
    real_log = first.wandb_run.log
    first.wandb_run.log = lambda data, step: sent.append((data, step)) or real_log(data, step=step)
    first.log({"step": 7, "tokens_seen": 10, "loss": 2.0, "mfu": None, "time": 1.0},
              {"loss": "train/loss"})
    assert sent == [({"train/loss": 2.0, "trainer/step": 7, "train/tokens_seen": 10}, 7)]
    first.close()
    run_id = (tmp_path / ID_FILE).read_text()
    assert saved == {"wandb_id": run_id} and len(run_id) == 8

    (tmp_path / ID_FILE).unlink()  # a run directory rebuilt from its checkpoints
    second = Tracker(tmp_path, cfg, {})
    second.load_state_dict(saved)
    second.start(step=1)
    second.close()
    assert offline_ids(tmp_path) == [run_id, run_id]
    assert (tmp_path / ID_FILE).read_text() == run_id

    third = Tracker(tmp_path, cfg, {})  # the file wins over a checkpoint of another run
    third.load_state_dict({"wandb_id": "0ther1d0"})
    assert third.run_id == run_id and third.state_dict() == saved
    third.close()


def test_other_ranks_write_nothing(tmp_path, wandb_offline):
    quiet = Tracker(tmp_path / "run", LoggerConfig(mode="offline"), {}, enabled=False)
    quiet.start(step=0)
    quiet.log({"step": 1, "tokens_seen": 1, "loss": 1.0})
    quiet.update_config({"x": 1})
    quiet.close()
    assert not (tmp_path / "run").exists() and quiet.wandb_run is None


def stub_trainer(step: int, world_size: int = 1):
    module = SimpleNamespace(grad_norm=lambda: 3.0)  # the step module's last pre-clip norm
    dist = SimpleNamespace(world_size=world_size, is_main=True, device_type="cpu")
    return SimpleNamespace(module=module, dist=dist, state=TrainState(step=step), max_steps=100,
                           stop_reason=None)


@pytest.mark.parametrize("peak", [None, 2e9])
def test_step_record_times_and_mfu(tmp_path, peak):
    tracker = Tracker(tmp_path, LoggerConfig(mode="disabled"), {})
    logger = MetricsLogger(tracker, log_every=2, flops_per_token=1e6, peak_flops=peak,
                           data_position=lambda c: {"epoch": c / 100, "shard": 0}, progress="off")
    trainer = stub_trainer(step=0, world_size=1)
    for loss in (2.0, math.nan):  # a skipped step's loss is left out of the mean
        trainer.state.step += 1
        trainer.state.tokens_seen += 1000
        out = StepOutput(loss=torch.tensor(2.0), data_seconds=0.1, compute_seconds=0.4,
                         step_seconds=0.5, lr=1e-3, samples=8, tokens=1000, global_loss=loss,
                         extras={"optimizer_seconds": 0.15})
        logger.on_step_end(trainer, out)
    tracker.close()
    [r] = read_metrics(tmp_path)
    assert r["step"] == 2 and r["tokens_per_s"] == pytest.approx(2000)  # 2000 tokens in 1 s
    assert r["data_time"] == pytest.approx(0.1) and r["compute_time"] == pytest.approx(0.4)
    assert r["fwd_bwd_time"] == pytest.approx(0.25) and r["optimizer_time"] == pytest.approx(0.15)
    assert r["tflops_per_device"] == pytest.approx(2000 * 1e6 / 1e12)
    assert r["mfu"] == (None if peak is None else pytest.approx(2000 * 1e6 / peak))
    assert r["loss"] == 2.0 and r["grad_norm"] == 3.0


def test_progress_bar_when_asked(tmp_path, capsys):
    tracker = Tracker(tmp_path, LoggerConfig(mode="disabled"), {})
    logger = MetricsLogger(tracker, 1, 1e6, None, lambda c: {}, progress="on")
    trainer = stub_trainer(step=3)  # a resumed run: the bar starts at 3 of 100
    logger.on_train_start(trainer)
    trainer.state.step += 1
    logger.on_step_end(trainer, StepOutput(torch.tensor(2.5), 0.0, 0.1, 0.1, 1e-3, 8, 1000, 2.5))
    logger.on_train_end(trainer)
    tracker.close()
    err = capsys.readouterr().err
    assert "\r" in err and "4/100" in err and "loss 2.5000 tok/s 10,000" in err


# ---- the real CLI in fresh processes ---------------------------------------------------------
def test_offline_run_resumed_in_a_new_process(tiny_dataset, tmp_path):
    """Two jobs of one run: the second resumes from the checkpoint after its wandb_id file was
    lost, and is told a device peak. One W&B run id; every metric present and sane."""
    run = tmp_path / "run"
    common = dict(logger__mode="offline", schedule__total_steps=6, trainer__eval_every=3)
    # Clipping at 0.01 while the gradient norm is ~0.7: a logged norm above 0.01 is pre-clip.
    first = run_train(tiny_overrides(tiny_dataset, run, steps=3, optimizer__grad_clip=0.01,
                                     trainer__progress_bar="auto", **common))
    # Not a terminal (a batch job): plain lines with loss, tokens/s and ETA, no carriage returns.
    assert "\r" not in first.stdout + first.stderr
    assert re.search(r"step 3/3 loss \d\.\d{4} lr .* tok/s [\d,]+ eta 0h00m00s", first.stdout)
    run_id = (run / ID_FILE).read_text()
    (run / ID_FILE).unlink()
    overrides = tiny_overrides(tiny_dataset, run, steps=6, cluster__gpu_peak_tflops=0.5, **common)
    run_train(overrides)

    assert offline_ids(run) == [run_id, run_id] and (run / ID_FILE).read_text() == run_id
    records = read_metrics(run)
    starts = [r for r in records if r.get("event") == "start"]
    assert [(s["step"], s["wandb_id"]) for s in starts] == [(0, run_id), (3, run_id)]
    train = train_records(run)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        assert set(STEP_KEYS) <= set(r), set(STEP_KEYS) - set(r)

    cfg = compose_config(overrides)
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(x) for x in losses)
    assert statistics.mean(losses[3:]) < statistics.mean(losses[:3])  # it learns
    assert all(r["ppl"] == pytest.approx(math.exp(r["loss"])) for r in train)
    schedule = lr_lambda(cfg.schedule, cfg.trainer.max_steps)
    assert [r["lr"] for r in train] == pytest.approx(
        [cfg.optimizer.lr * schedule(r["step"] - 1) for r in train])
    assert all(r["grad_norm"] > 0.1 for r in train[:3])  # clip was 0.01: the norm before clipping
    assert [r["tokens_seen"] for r in train] == [512 * s for s in range(1, 7)]
    assert [r["consumed_samples"] for r in train] == [4 * s for s in range(1, 7)]
    assert train[-1]["epoch"] == pytest.approx(24 / 640) and train[-1]["shard"] in range(4)
    assert all(r["skipped_steps"] == 0 and r["dataset"] == 0 for r in train)
    assert all(r["peak_memory_gb"] > 0 and r["data_time"] < r["step_time"] for r in train)
    assert train[-1]["elapsed_s"] == pytest.approx(sum(r["step_time"] for r in train))

    # MFU: null on a CPU; with a peak, BENCHMARKS.md's formula.
    assert all(r["mfu"] is None for r in train[:3])
    fpt = flops_per_token(cfg.model, cfg.model.padded_vocab_size(1, 256), 128)
    for r in train[3:]:
        assert r["tflops_per_device"] == pytest.approx(r["tokens_per_s_per_device"] * fpt / 1e12)
        assert r["mfu"] == pytest.approx(r["tokens_per_s_per_device"] * fpt / 0.5e12)

    val = [r for r in records if "val_loss" in r]
    assert [v["step"] for v in val] == [3, 6]
    assert all(math.isfinite(v["val_loss"]) and v["val_ppl"] == pytest.approx(math.exp(v["val_loss"]))
               for v in val)

    # pretrain-report on this real run's metrics.jsonl.
    assert report_main([str(run)]) == 0
    png, summary = run / "report" / "report.png", (run / "report" / "summary.txt").read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "steps        1..6 logged, 2 job(s)" in summary and "step_00000006" in summary
    assert "MFU          " in summary and "tokens       3,072" in summary


def test_only_rank_0_logs(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    # ZeRO 0 in fp32, where DeepSpeed reports no gradient norm and the logger computes it.
    run_train(tiny_overrides(tiny_dataset, run, steps=2, logger__mode="offline",
                             parallel__zero_stage=0), nproc=2)
    records = read_metrics(run)
    assert all(r["grad_norm"] > 0 for r in train_records(run))
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # one writer: no duplicates
    assert len([r for r in records if r.get("event") == "start"]) == 1
    assert offline_ids(run) == [(run / ID_FILE).read_text()]
    assert train_records(run)[-1]["tokens_per_s"] == pytest.approx(
        2 * train_records(run)[-1]["tokens_per_s_per_device"])
