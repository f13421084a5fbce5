"""Checkpoint save and load time against `torch.save` / `torch.load` of the same state, in one run.

    python -m bench.bench_checkpoint [--shape baby] [--rounds 7]

Ours: `pretrain.checkpoint.Checkpointer.save` of a DeepSpeed engine (ZeRO 1, fp32, one gloo
rank) after one training step: DeepSpeed's model and optimizer files, the RNG state,
trainer.json, the FILES listing, the COMMITTED marker, the rename and the `latest` pointer, and
pruning the previous checkpoint (keep_last=1). Peers: one `torch.save({"model": ...,
"optimizer": ...})` of the engine's module and optimizer state dicts (the same tensors: weights,
fp32 master copy and Adam moments) to a fresh file, as is ("torch.save") and followed by an fsync
of that file ("torch.save + fsync"). Our save fsyncs its small files, which on ext4 (data=ordered)
also writes out the new checkpoint's data: its durable peer is the second. Before every save,
outside the timing, the peers' previous file is deleted and the page cache is synced, so that no
save waits for another's dirty pages. Interleaved, warm-up dropped, medians; the figure is our
time over each peer's (target <= 1.1x torch.save). The disk is shared: expect a wide spread.

Loads, timed after the saves: ours is `Checkpointer.load` of the newest committed checkpoint into
the engine (DeepSpeed's model and optimizer files, the LR schedule, the marker check and the RNG
state); the peers read the peer file back with `torch.load` ("torch.load"), and also put it into
the module and optimizer with `load_state_dict` ("torch.load + load_state_dict": what restoring
the state costs). Both read from the page cache (the files were just written): this measures
deserialising and restoring, not the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from bench.bench_step import SHAPES, Ours, Shape, our_config
from bench.common import Timing, cpu_dist, interleave, machine, paired_ratio, quiet, table

MB = 1 << 20


PEERS = ("torch.save", "torch.save + fsync")
LOAD_PEERS = ("torch.load", "torch.load + load_state_dict")


@dataclass
class CheckpointResult:
    shape: Shape
    megabytes: float  # size of our committed checkpoint
    peer_megabytes: float
    timings: Dict[str, Timing]  # "ours" and PEERS: saves
    load_timings: Dict[str, Timing]  # "ours" and LOAD_PEERS

    def ratio(self, peer: str = PEERS[0]):
        """Peer save time / our save time, round by round (below 1: ours slower)."""
        return paired_ratio(self.timings["ours"], self.timings[peer])

    def load_ratio(self, peer: str = LOAD_PEERS[1]):
        """Peer load time / our load time, round by round (below 1: ours slower)."""
        return paired_ratio(self.load_timings["ours"], self.load_timings[peer])

    def rows(self) -> List[List[object]]:
        rows: List[List[object]] = []
        for what, timings, peers, ratio in (("save", self.timings, PEERS, self.ratio),
                                            ("load", self.load_timings, LOAD_PEERS,
                                             self.load_ratio)):
            ours = timings["ours"]
            rows.append([f"Checkpointer.{what} (ours)", self.megabytes, ours.median,
                         f"{ours.spread:.0%}", "", ""])
            for peer in peers:
                t, r = timings[peer], ratio(peer)
                rows.append([peer, self.peer_megabytes, t.median, f"{t.spread:.0%}",
                             f"{1 / r.median:.2f}x", f"[{1 / r.high:.2f}-{1 / r.low:.2f}]"])
        return rows


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MB


def run(shape: Shape, rounds: int = 7, workdir: Optional[str] = None) -> CheckpointResult:
    from pretrain.checkpoint import Checkpointer
    from pretrain.client_state import ClientState
    from pretrain.model.gpt import GPT
    from pretrain.step import build_step_module

    quiet()
    cfg = our_config(shape, Ours())
    dist = cpu_dist()
    model = GPT(cfg.model, cfg.model.padded_vocab_size(1), 1, "cpu")
    module = build_step_module(model, cfg, dist)
    engine = module.engine
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1))
    # One step, so that the optimizer holds its moments.
    module.train_step(iter([tokens]), 1, veto=lambda loss: None)

    tmp = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=workdir))
    try:
        ckpt = Checkpointer(tmp / "ours", dist, keep_last=1)
        count = {"ours": 0, "peer": 0}
        peer_dir = tmp / "peer"
        peer_dir.mkdir()

        def ours() -> None:
            count["ours"] += 1
            ckpt.save(module, count["ours"], ClientState(trainer={"trainer": {"step": count["ours"]}}))

        def peer(durable: bool):
            def save() -> None:
                count["peer"] += 1
                path = peer_dir / f"step_{count['peer']:08d}.pt"
                torch.save({"model": engine.module.state_dict(),
                            "optimizer": engine.optimizer.state_dict()}, path)
                if durable:
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
            return save

        def clean() -> None:
            for f in peer_dir.iterdir():
                f.unlink()
            os.sync()

        timings = interleave({"ours": ours, PEERS[0]: peer(False), PEERS[1]: peer(True)},
                             rounds=rounds, warmup=1,
                             setup={"ours": clean, PEERS[0]: clean, PEERS[1]: clean})
        newest = ckpt.root / f"step_{count['ours']:08d}"
        ours_mb = _dir_mb(newest)
        peer_mb = _dir_mb(peer_dir)
        peer_file = next(peer_dir.iterdir())

        def peer_load(restore: bool):
            def load() -> None:
                state = torch.load(peer_file, weights_only=False)
                if restore:
                    engine.module.load_state_dict(state["model"])
                    # DeepSpeed's ZeRO optimizer takes one state dict per data-parallel rank
                    engine.optimizer.load_state_dict([state["optimizer"]])
            return load

        load_timings = interleave({"ours": lambda: ckpt.load(module, newest),
                                   LOAD_PEERS[0]: peer_load(False),
                                   LOAD_PEERS[1]: peer_load(True)},
                                  rounds=rounds, warmup=1)
        return CheckpointResult(shape, ours_mb, peer_mb, timings, load_timings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- asynchronous saves (trainer.async_save) ----------------------------------------------------
# The target is 350M parameters on 2 ranks (GPT-2 medium: "350m", run under torchrun:
#   torchrun --nproc_per_node 2 -m bench.bench_checkpoint --only-async --async-shape 350m
# about 10 minutes on the 2-core machine). The default is the largest size that runs in about a
# minute on one rank: ~91M (12 x 768, GPT-2 small's body with an 8K vocabulary), 1.4 GB of
# model + AdamW state.
ASYNC_SHAPES = {"350m": Shape(24, 1024, 16, 256, 50304, 1),
                "91m": Shape(12, 768, 12, 256, 8192, 1), "23m": Shape(6, 512, 8, 256, 8192, 1),
                "test": Shape(2, 64, 4, 32, 512, 2)}


@dataclass
class AsyncResult:
    shape: Shape
    megabytes: float  # one checkpoint
    ranks: int
    blocked: Dict[str, List[float]]  # "sync", "async": seconds the loop stood still per save
    durable: Dict[str, List[float]]  # seconds of writing per save (async: staging + the thread's)
    step_after: Dict[str, List[float]]  # the step right after the save began; "none": no save
    copying: List[float]  # async: the thread copying the state to host memory
    waiting: List[float]  # of the async block: the next update waiting for those copies

    def median(self, what: Dict[str, List[float]], name: str) -> float:
        return statistics.median(what[name])

    def rows(self) -> List[List[object]]:
        b, d, a = self.blocked, self.durable, self.step_after
        m = self.median
        return [
            ["loop blocked by a save (s)", m(b, "sync"), m(b, "async"),
             f"{m(b, 'async') / m(b, 'sync'):.0%} of sync", "<= 10%"],
            ["  of it: the next update waiting for the copies (s)", "",
             statistics.median(self.waiting), "", ""],
            ["copying the state to host memory, in the background (s)", "",
             statistics.median(self.copying), "", ""],
            ["step after the save began (s)", m(a, "none"), m(a, "async"),
             f"{m(a, 'async') / m(a, 'none'):.2f}x a step without", "<= 1.1x"],
            ["writing one checkpoint (s)", m(d, "sync"), m(d, "async"),
             f"{m(d, 'sync') / m(d, 'async'):.2f}x sync's throughput", ">= 0.9x"],
        ]


def run_async(shape: Shape, rounds: int = 3, workdir: Optional[str] = None,
              device: str = "cpu") -> AsyncResult:
    """Rounds of: a synchronous save then one step; a background save then steps until it is
    committed (polled at every step end, as the checkpoint callback does); one step without a
    save. The page cache is synced before each, outside the timing. One gloo rank, or the ranks
    torchrun started (ZeRO-1 data parallel: each stages and writes its own files at the same
    time); the figures are rank 0's (the loop of every rank stops for the slowest). On
    device="cuda" (one GPU, bench.gpu_check): bf16 with fp32 master weights, as GPU runs train."""
    from bench.bench_throughput import device_dist
    from pretrain.checkpoint import Checkpointer, committed
    from pretrain.client_state import ClientState
    from pretrain.model.gpt import GPT
    from pretrain.step import build_step_module

    quiet()
    cfg = our_config(shape, Ours())
    if device == "cuda":
        cfg.parallel.device, cfg.trainer.precision = "cuda", "bf16"
        cfg = cfg.validate(world_size=1, need_data=False)
    dist = device_dist(device)
    model = GPT(cfg.model, cfg.model.padded_vocab_size(1), 1, device, device=dist.device)
    module = build_step_module(model, cfg, dist)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), device=dist.device)
    count = [0]

    def step() -> float:
        count[0] += 1
        t0 = time.perf_counter()
        module.train_step(iter([tokens]), count[0], veto=lambda loss: None)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step()
    tmp = Path(dist.broadcast_object(tempfile.mkdtemp(prefix="bench_async_checkpoint_", dir=workdir)
                                     if dist.is_main else None))
    blocked: Dict[str, List[float]] = {"sync": [], "async": []}
    durable: Dict[str, List[float]] = {"sync": [], "async": []}
    after: Dict[str, List[float]] = {"sync": [], "async": [], "none": []}
    copying: List[float] = []
    waiting: List[float] = []
    try:
        ckpts = {"sync": Checkpointer(tmp / "sync", dist, keep_last=1),
                 "async": Checkpointer(tmp / "async", dist, keep_last=1, background=True)}
        for r in range(rounds + 1):  # the first round warms up (allocations, staging buffers)
            keep = r > 0
            for name, ckpt in ckpts.items():
                os.sync()
                ckpt.save(module, count[0], ClientState(trainer={"trainer": {"step": count[0]}}),
                          background=name == "async")
                first_step = step()
                while ckpt.in_flight is not None:
                    ckpt.poll()
                    if ckpt.in_flight is not None:
                        step()
                report = ckpt.take_reports()[-1]
                if keep:
                    blocked[name].append(report.block_seconds)
                    background = report.write_seconds + ckpt.writer.staging_seconds \
                        if report.background else report.write_seconds
                    durable[name].append(background)
                    after[name].append(first_step)
                    if report.background:
                        copying.append(ckpt.writer.copy_seconds)
                        waiting.append(ckpt.writer.staging_wait_seconds)
            os.sync()
            seconds = step()
            if keep:
                after["none"].append(seconds)
        megabytes = _dir_mb(committed(tmp / "async")[-1])
        for ckpt in ckpts.values():
            ckpt.close()
        dist.barrier()
        return AsyncResult(shape, megabytes, dist.world_size, blocked, durable, after, copying,
                           waiting)
    finally:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def print_async(res: AsyncResult, rounds: int) -> None:
    ranks = "one rank" if res.ranks == 1 else f"{res.ranks} ranks (ZeRO-1), rank 0's figures"
    print(table(["asynchronous save", "sync / no save", "async", "async vs it", "target"],
                res.rows(),
                title=f"trainer.async_save, {res.shape} model + AdamW state ({res.megabytes:.0f} "
                      f"MB), fp32, {ranks}; median of {rounds} rounds; {machine()}"))


def print_result(res: CheckpointResult, rounds: int) -> None:
    print(table(["checkpoint", "MB", "seconds", "spread", "ours' time vs it", "range"],
                res.rows(),
                title=f"checkpoint save and load, {res.shape} model + AdamW state, fp32; median of "
                      f"{rounds} interleaved rounds; {machine()}"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="baby")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--workdir", default=os.environ.get("BENCH_WORKDIR"))
    p.add_argument("--async-shape", choices=list(ASYNC_SHAPES), default="91m",
                   help="the model of the asynchronous-save comparison")
    p.add_argument("--async-rounds", type=int, default=3)
    p.add_argument("--only-async", action="store_true")
    args = p.parse_args(argv)
    if not args.only_async:
        print_result(run(SHAPES[args.shape], args.rounds, args.workdir), args.rounds)
    res = run_async(ASYNC_SHAPES[args.async_shape], args.async_rounds, args.workdir)
    if int(os.environ.get("RANK", "0")) == 0:
        print_async(res, args.async_rounds)


if __name__ == "__main__":
    main()
