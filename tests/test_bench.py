"""The benchmarks' CPU paths run at tiny sizes and produce sane numbers. Speed is not judged here
(BENCHMARKS.md: benchmarks live apart from the tests' pass/fail); only that every figure is
computed from real runs of both sides and is finite and positive."""

import math
import os

import pytest
import torch

from bench import common
from bench.common import Ratio, Timing, interleave, paired_ratio, table


def test_interleave_runs_every_variant_in_turn_and_drops_the_warmup():
    calls = []
    timings = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                         rounds=3, warmup=1, repeat=2, setup={"b": lambda: calls.append("s")})
    assert calls == ["a", "a", "s", "b", "b"] * 4
    assert {k: len(t.seconds) for k, t in timings.items()} == {"a": 3, "b": 3}
    assert all(len(t.cpu_seconds) == 3 for t in timings.values())


def test_paired_ratio_is_per_round_and_counts_units():
    fast, slow = Timing([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]), Timing([2.0, 2.0, 3.0], [2.0, 2.0, 3.0])
    r = paired_ratio(fast, slow)
    assert r.per_round == [2.0, 1.0, 3.0] and r.median == 2.0 and (r.low, r.high) == (1.0, 3.0)
    # ours makes 1 unit per round, the peer 4: per unit, ours is half as fast in round 1
    assert paired_ratio(fast, slow, ours_units=1, peer_units=4).per_round[0] == 0.5
    assert str(Ratio([1.5, 1.4, 1.6])) == "1.50x [1.40-1.60]"


def test_table_aligns_numbers_right():
    text = table(["name", "x"], [["a", 1.0], ["bb", 12345.0]])
    lines = text.splitlines()
    assert lines[1].endswith("-: |") and lines[3].endswith(" 12.3K |")


def test_step_bench_runs_both_sides(dist):
    from bench import bench_step as bs

    res = bs.run(bs.SHAPES["test"], threads=1, rounds=2, repeat=1,
                 only=[bs.OURS, bs.HF_NO_DROPOUT])
    assert set(res.timings) == {bs.OURS, bs.HF_DEFAULT, bs.HF_NO_DROPOUT}
    for t in res.timings.values():
        assert len(t.seconds) == 2 and all(s > 0 for s in t.seconds + t.cpu_seconds)
    r = res.ratio(bs.OURS)
    assert 0.01 < r.median < 100 and math.isfinite(r.median)
    assert len(res.rows()) == 3


def test_both_steps_train_the_same_shape(dist):
    """Same parameter count up to GPT-2's parameters we do not have (none: same shape, tied)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.bench_step import SHAPES, Ours, our_config
    from pretrain.model.gpt import GPT, count_parameters

    shape = SHAPES["test"]
    cfg = our_config(shape, Ours())
    ours = count_parameters(GPT(cfg.model, cfg.model.padded_vocab_size(1), 1, "cpu"))
    hf = GPT2LMHeadModel(GPT2Config(n_embd=shape.hidden, n_layer=shape.layers,
                                    n_head=shape.heads, n_positions=shape.seq,
                                    vocab_size=shape.vocab))
    theirs = sum(p.numel() for p in hf.parameters())  # tied: lm_head is the embedding
    assert ours == theirs


def test_step_losses_start_near_log_vocab(dist):
    from bench import bench_step as bs

    shape = bs.SHAPES["test"]
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1))
    for step in (bs.build_ours(shape, bs.Ours(), tokens), bs.build_peer(shape, tokens)):
        loss = step()
        assert abs(loss - math.log(shape.vocab)) < 1.0


def test_throughput_bench_cpu_path(dist):
    from bench import bench_throughput as bt
    from launch.config import compose_config
    from pretrain.model.flops import flops_per_token

    res = bt.run("gpt2-124m", tiny=True, steps=2, warmup=1)
    assert res.device == "cpu" and res.precision == "fp32" and res.mfu is None
    assert res.tokens_per_s > 0 and math.isfinite(res.loss)
    cfg = compose_config(["model=gpt2-small", *bt.TINY])
    assert res.flops_per_token == flops_per_token(cfg.model, cfg.model.padded_vocab_size(1), 128)
    assert res.tflops == pytest.approx(res.tokens_per_s * res.flops_per_token / 1e12)
    with pytest.raises(SystemExit, match="--tiny"):
        bt.run("gpt2-124m", tiny=False)
    assert res.peak_memory_gib is None and res.planned_gib > 0  # measured on a GPU only


def test_gpu_check_script_dry_path(tmp_path):
    """bench/gpu_check.sh --dry: the GPU readiness script's whole path on tiny models on CPU."""
    import json
    import subprocess
    import sys

    from tests.launch_helpers import REPO, cpu_env

    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry"], cwd=REPO,
                          env=cpu_env({"PYTHON": sys.executable}), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["preset"] for r in results] == ["gpt2-124m (tiny)", "gpt-1.3b (tiny)"]
    assert all(r["tokens_per_s"] > 0 and r["planned_gib"] > 0 for r in results)
    assert "sequence parallelism: skipped, it needs 2 GPUs" in proc.stdout
    assert "trainer.async_save," in proc.stdout and "loop blocked by a save" in proc.stdout


def test_loader_bench_reads_what_the_peer_reads(tmp_path):
    from bench import bench_loader as bl

    res = bl.run(shards=2, shard_mb=0.5, seq_len=64, micro=4, window=2, rounds=2,
                 resume_reps=1, workdir=str(tmp_path))
    tokens = res.tokens_per_epoch
    assert tokens["ours, rank 0 of DP=1"] == tokens[bl.PEER]  # the whole epoch
    assert tokens["ours, rank 0 of DP=8"] == pytest.approx(tokens[bl.PEER] / 8, rel=0.05)
    assert all(res.rate(name) > 0 for name in res.timings)
    assert all(0 < s < 60 for s in res.resume.values()) and res.resume_peer > 0
    assert list(tmp_path.iterdir()) == []  # the dataset is removed


def test_checkpoint_bench_saves_the_same_state(dist, tmp_path):
    from bench import bench_checkpoint as bc
    from bench.bench_step import SHAPES

    res = bc.run(SHAPES["test"], rounds=2, workdir=str(tmp_path))
    assert res.megabytes == pytest.approx(res.peer_megabytes, rel=0.2)
    assert all(res.ratio(peer).median > 0 for peer in bc.PEERS)
    assert all(res.load_ratio(peer).median > 0 for peer in bc.LOAD_PEERS) and len(res.rows()) == 6


def test_tokenizer_bench_compares_every_variant_round_by_round(capsys):
    from bench import bench_tokenizer as btok

    btok.main(["--mb", "0.3", "--reps", "2", "--vocab-size", "300", "--seq-len", "64"])
    out = capsys.readouterr().out
    for name in (btok.ONE, btok.TWO, btok.ENCODE, btok.HF_PEER, btok.TIKTOKEN_PEER,
                 "pretrain-data, tokenizers engine"):
        assert f"| {name}" in out
    assert "per core vs tiktoken (CPU, paired by round)" in out and "nan" not in out


@pytest.mark.slow
def test_bench_all_runs_every_section_end_to_end():
    """`make bench`'s command, in a fresh process at its smallest size: every section's rows,
    each with its ratio against the peer, in one table."""
    import re
    import subprocess
    import sys

    from bench.all import SECTIONS
    from tests.launch_helpers import REPO, cpu_env

    proc = subprocess.run([sys.executable, "-m", "bench.all", "--smoke"], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "bench.all (smoke, " in out and "FAILED" not in out, out[-4000:]
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    cells = {name: [r for r in rows if r[0].strip().split(" ")[0] == name] for name in SECTIONS}
    assert all(cells.values()), cells  # every section put rows in the table
    ratio = re.compile(r"^\d+\.\d\dx")
    for name in ("step", "loader", "checkpoint", "tokenizer"):  # throughput has no peer on CPU
        assert any(ratio.match(r[4].strip()) for r in cells[name]), (name, cells[name])
    assert not any(re.search(r"\b(nan|inf)\b", c) for r in rows for c in r), out[-4000:]
