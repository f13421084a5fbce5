"""Every benchmark behind one command, one table of figures and ratios against their peers.

    python -m bench.all [--quick | --smoke] [--skip step loader ...]     (make bench)

--quick: fewer rounds and smaller inputs (about 3 minutes on 2 cores). --smoke: the test
shapes and two rounds, to check that every section runs end to end (tests/test_bench.py); its
figures measure nothing.

Sections (each also runs alone, with its own detailed table: python -m bench.bench_<name>):
  step        CPU training step against Hugging Face GPT-2 (bench_step), two shapes
  throughput  tokens/s, TFLOP/s and MFU of gpt2-124m and gpt-1.3b on the device present
              (bench_throughput; on CPU the --tiny path check, with no MFU)
  loader      loader tokens/s per rank process and first batch after resume (bench_loader)
  checkpoint  Checkpointer.save/load against torch.save/torch.load of the same state, and a
              background save (trainer.async_save) against a synchronous one (bench_checkpoint)
  tokenizer   pretrain-data's tokenize + shard writing against HF tokenizers and tiktoken
              (bench_tokenizer's own variants, as it defines them)
  remote      shards over HTTP from nginx: bytes per epoch per simulated node count and loader
              tokens/s per rank with 20 ms per request, range and cache modes against
              wds.WebDataset streaming every shard on every rank (bench_remote_data; needs nginx)
A section that fails prints its error in the table and the others still run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import traceback
from typing import Callable, Dict, List

from bench.common import machine, quiet, table

HEADERS = ["section", "figure", "ours", "peer / anchor", "ours vs peer", "target"]
Row = List[object]
SIZES = ("full", "quick", "smoke")  # what a section is given: how long it may take


def _pick(size: str, full, quick, smoke):
    return {"full": full, "quick": quick, "smoke": smoke}[size]


def step_rows(size: str) -> List[Row]:
    from bench import bench_step as bs

    rows: List[Row] = []
    for name in _pick(size, ("baby", "mini"), ("baby", "mini"), ("test",)):
        shape = bs.SHAPES[name]
        # The main shape also runs ZeRO 0: what one rank gains without ZeRO-1's flat buffers.
        only = [*bs.variants(False), bs.ZERO0] if name == "baby" else None
        res = bs.run(shape, threads=1, rounds=_pick(size, 7, 3, 2),
                     repeat=_pick(size, 2, 1, 1), ablate=only is not None, only=only)
        t = res.timings
        rate = {k: round(v.rate(shape.tokens)) for k, v in t.items()}
        vocab = f"{shape.vocab // 1024}K" if shape.vocab >= 1024 else shape.vocab
        label = f"step {name} ({shape.layers}x{shape.hidden}, V={vocab})"
        ours, peer = bs.OURS, bs.HF_DEFAULT
        rows.append([label, "tokens/s, each in its default config", rate[ours], rate[peer],
                     str(res.ratio(ours)), ">= 1.4x"])
        rows.append([label, "  same, CPU-time ratio", "", "",
                     f"{res.ratio(ours, cpu=True).median:.2f}x", ""])
        rows.append([label, "  both dropout 0.1", rate[bs.OURS_DROPOUT], rate[peer],
                     str(res.ratio(bs.OURS_DROPOUT)), ""])
        rows.append([label, "  both dropout 0", rate[ours], rate[bs.HF_NO_DROPOUT],
                     str(res.ratio(ours, bs.HF_NO_DROPOUT)), ""])
        if bs.ZERO0 in t:
            rows.append([label, "  ours at ZeRO 0 (one rank)", rate[bs.ZERO0], rate[peer],
                         str(res.ratio(bs.ZERO0)), ""])
    return rows


def throughput_rows(size: str) -> List[Row]:
    import torch

    from bench import bench_throughput as bt

    rows: List[Row] = []
    on_gpu = torch.cuda.is_available()
    anchors = {"gpt2-124m": ("llm.c 471K, 41% MFU", ">= 520K tok/s, >= 45% MFU"),
               "gpt-1.3b": ("MPT-1b 45.5K, 41.8% MFU", ">= 51K tok/s, >= 47% MFU")}
    for preset in bt.PRESETS:
        res = bt.run(preset, tiny=not on_gpu, steps=None if on_gpu else 2)
        mfu = f"{res.mfu:.1%}" if res.mfu is not None else "n/a (peak unknown)"
        anchor, target = anchors[preset] if on_gpu else ("", "on GPU only")
        rows.append([f"throughput {res.preset}",
                     f"tokens/s, TFLOP/s, MFU; {res.device}, {res.precision}, micro "
                     f"{res.micro_batch}", f"{res.tokens_per_s:.0f}, {res.tflops:.3g}, {mfu}",
                     anchor, "", target])
    return rows


def loader_rows(size: str) -> List[Row]:
    from bench import bench_loader as bl

    small = dict(seq_len=64, micro=4, window=2, resume_reps=1) if size == "smoke" else {}
    res = bl.run(shards=_pick(size, 4, 2, 2), shard_mb=_pick(size, 64, 32, 0.5),
                 rounds=_pick(size, 5, 3, 2), **small)
    rows: List[Row] = []
    peer_rate = res.rate(bl.PEER) / 1e6
    for name in res.timings:
        if name == bl.PEER:
            continue
        rows.append(["loader", f"M tokens/s, {name}", f"{res.rate(name) / 1e6:.3g}",
                     f"{peer_rate:.3g}", str(res.ratio(name)), ">= 5M per rank"])
    for name, s in res.resume.items():
        rows.append(["loader", f"first batch after resume, {name[6:]}", f"{s:.3g} s",
                     f"{res.resume_peer:.3g} s (skip)", f"{res.resume_peer / s:.2f}x", "<= 2 s"])
    return rows


def checkpoint_rows(size: str) -> List[Row]:
    from bench import bench_checkpoint as bc
    from bench.bench_step import SHAPES

    res = bc.run(SHAPES[_pick(size, "baby", "baby", "test")], rounds=_pick(size, 9, 3, 2))
    ours = res.timings["ours"]
    rows: List[Row] = []
    for peer, target in zip(bc.PEERS, ("<= 1.1x", "")):
        r = res.ratio(peer)
        rows.append(["checkpoint", f"save seconds, {res.megabytes:.0f} MB (model + AdamW)",
                     f"{ours.median:.3g}", f"{res.timings[peer].median:.3g} ({peer})",
                     f"{1 / r.median:.2f}x the time [{1 / r.high:.2f}-{1 / r.low:.2f}]", target])
    ours = res.load_timings["ours"]
    for peer in bc.LOAD_PEERS:
        r = res.load_ratio(peer)
        rows.append(["checkpoint", f"load seconds, {res.megabytes:.0f} MB (page cache)",
                     f"{ours.median:.3g}", f"{res.load_timings[peer].median:.3g} ({peer})",
                     f"{1 / r.median:.2f}x the time [{1 / r.high:.2f}-{1 / r.low:.2f}]", ""])
    # trainer.async_save against a synchronous save of the same state
    shape = bc.ASYNC_SHAPES[_pick(size, "91m", "23m", "test")]
    res = bc.run_async(shape, rounds=_pick(size, 3, 2, 1))
    for figure, sync, asynchronous, ratio, target in res.rows():
        rows.append(["checkpoint", f"async save: {figure.strip()}, {res.megabytes:.0f} MB",
                     f"{asynchronous:.3g}", f"{sync:.3g}" if sync != "" else "", ratio, target])
    return rows


def tokenizer_rows(size: str) -> List[Row]:
    """bench_tokenizer's own variants, corpus and timing, in its interleaved order."""
    import os
    import shutil

    from bench import bench_tokenizer as btok
    from tokenizer import bpe
    from tokenizer.corpus import read_documents

    # 32 MB: enough that starting the workers and loading the tokenizer stop mattering
    mb, reps, vocab, seq_len = _pick(size, (32.0, 3, 8192, 2048), (2.0, 2, 8192, 2048),
                                     (0.3, 2, 300, 64))
    work = tempfile.mkdtemp(prefix="bench_all_tokenizer_")
    try:
        corpus = os.path.join(work, "corpus")
        os.makedirs(corpus)
        files = btok.make_corpus(corpus, mb)
        tok = os.path.join(work, "tokenizer.json")
        bpe.train_tokenizer((d for d, _ in read_documents(files)), vocab).save(tok)
        variants: Dict[str, Callable[[], int]] = {
            "ours1": btok.ours(corpus, f"{work}/o1", tok, 1, seq_len),
            "ours2": btok.ours(corpus, f"{work}/o2", tok, 2, seq_len),
            "encode": btok.ours_encode_only(corpus, tok, seq_len),
            "hf": btok.peer_hf(files, tok, os.path.join(work, "peer.bin")),
        }
        tt = btok.peer_tiktoken(files, tok, os.path.join(work, "tt.bin"))
        if tt is not None:
            variants["tiktoken"] = tt
        runs: Dict[str, list] = {k: [] for k in variants}
        for rep in range(reps + 1):  # round 0 is the warm-up, as in bench_tokenizer.main
            for name, fn in variants.items():
                r = btok.timed(fn)
                if rep:
                    runs[name].append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu = {k: statistics.median(b / btok.MB / c for _, c, b in v) for k, v in runs.items()}

    def vs(a: str, b: str, wall: bool = False) -> str:
        m, lo, hi = btok.paired(runs, a, b, wall)
        return f"{m:.2f}x [{lo:.2f}-{hi:.2f}]"

    rows = [["tokenizer", "MB/s per core, 1 worker", f"{cpu['ours1']:.3g}",
             f"{cpu['hf']:.3g} (HF tokenizers)", vs("ours1", "hf"), ""]]
    if "tiktoken" in cpu:
        rows.append(["tokenizer", "MB/s per core, 1 worker", f"{cpu['ours1']:.3g}",
                     f"{cpu['tiktoken']:.3g} (tiktoken)", vs("ours1", "tiktoken"), ">= 1.0x"])
    eff = btok.paired(runs, "ours2", "ours1", wall=True)
    rows.append(["tokenizer", "parallel efficiency, 1 -> 2 workers (wall)",
                 f"{eff[0] / 2:.0%}", "", "", ">= 80%"])
    rows.append(["tokenizer", "shard writing overhead (CPU)",
                 f"{1 - btok.paired(runs, 'ours1', 'encode')[0]:.1%}", "", "", "<= 10%"])
    return rows


def remote_rows(size: str) -> List[Row]:
    from bench import bench_remote_data as br
    from tests.helpers.httpd import why_no_nginx

    if why_no_nginx():
        return [["remote", "skipped", why_no_nginx(), "", "", ""]]
    res = br.run(shards=_pick(size, 16, 8, 4), shard_mb=_pick(size, 16, 4, 0.25),
                 seq_len=_pick(size, 2048, 2048, 64), rounds=_pick(size, 3, 2, 1),
                 dps=_pick(size, (1, 2, 4), (1, 2, 4), (1, 2)),
                 nodes=_pick(size, (1, 2, 4, 8), (1, 2, 4), (1, 2)))
    rows: List[Row] = []
    for mode, target, worst in (("cache", "<= 1.05x per node", max), ("range", "<= 1.10x total", sum)):
        for n in sorted({n for m, n in res.node_bytes if m == mode}):
            ours = worst(res.node_bytes[mode, n]) / res.dataset_bytes
            peer = worst(res.node_bytes[br.PEER, n]) / res.dataset_bytes
            what = "per node" if worst is max else "all nodes"
            rows.append(["remote", f"bytes/epoch / dataset, {mode}, {n} node(s) x 2 ranks, {what}",
                         f"{ours:.3f}x", f"{peer:.3g}x", f"{peer / ours:.2f}x fewer", target])
    for (variant, dp) in sorted(res.timings, key=lambda k: (k[1], k[0])):
        if variant == br.PEER:
            continue
        rows.append(["remote", f"M tokens/s per rank, {variant[6:]}, DP={dp}, "
                               f"{res.latency_ms:g} ms/request", f"{res.rate(variant, dp) / 1e6:.3g}",
                     f"{res.rate(br.PEER, dp) / 1e6:.3g}", str(res.ratio(variant, dp)),
                     ">= 5M per rank"])
    return rows


# The order of the table; each entry takes one of SIZES and returns its rows.
SECTIONS: Dict[str, Callable[[str], List[Row]]] = {
    "step": step_rows,
    "throughput": throughput_rows,
    "loader": loader_rows,
    "checkpoint": checkpoint_rows,
    "tokenizer": tokenizer_rows,
    "remote": remote_rows,
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rounds and smaller inputs")
    size.add_argument("--smoke", action="store_true",
                      help="test shapes, two rounds: checks that every section runs, "
                           "measures nothing")
    p.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS))
    p.add_argument("--only", nargs="*", choices=list(SECTIONS))
    args = p.parse_args(argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    quiet()  # before any section imports megatron-core
    rows: List[Row] = []
    t0 = time.perf_counter()
    for name, fn in SECTIONS.items():
        if name in args.skip or (args.only and name not in args.only):
            continue
        t = time.perf_counter()
        try:
            rows += fn(size)
        except Exception as e:  # one broken section must not hide the others' figures
            traceback.print_exc()
            rows.append([name, "FAILED", f"{type(e).__name__}: {e}"[:80], "", "", ""])
        print(f"[bench.all] {name}: {time.perf_counter() - t:.0f} s", flush=True)
    print(table(HEADERS, rows, title=f"bench.all ({size}, "
                                     f"{time.perf_counter() - t0:.0f} s); ratios are median "
                                     f"[min-max] of interleaved rounds; {machine()}"))


if __name__ == "__main__":
    main()
