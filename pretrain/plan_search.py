"""`pretrain-plan --search`: the fastest layout of a model on a cluster that fits, and why each
other one does not win.

Every candidate is a full configuration planned by `make_plan`, so it passes the same validation
(Config.validate, Layout.build) as any other plan: a layout that cannot be built is rejected with
that ConfigError as its reason. The candidates:
    tp                 powers of two up to cluster.gpus_per_node (tensor parallelism all-reduces
                       in every layer, so it stays inside a node's NVLink domain);
    pp                 divisors of world / tp up to model.num_layers;
    sequence_parallel  false, and true where tp > 1;
    zero_stage         0-3;
    micro_batch_size   1, 2, 4, 8;
    recompute          none, selective, full.
A layout fits when its training peak on its fullest stage and its start-up memory (the model's
construction, see plan_memory.startup_bytes) both fit in the usable memory, and, when a host
limit is given, its start-up host RAM per node fits that.

Speed: every layout is assumed to reach the same MFU while computing (cluster.assumed_mfu), so
layouts differ in tokens/s only by the recomputed FLOPs and the 1F1B bubble (plan.make_plan).
Layouts within TIE (0.1%) of the fastest count as equally fast (the vocabulary padding alone,
which grows with TP, moves FLOPs per token by less). What the model does not price,
communication, breaks ties: no ZeRO-3 first (it moves 1.5x the bytes of ZeRO-0/1/2, which move
the same, Rajbhandari et al. 2020), then the smaller TP (an all-reduce or reduce-scatter in every
layer), then fewer pipeline stages, then sequence parallelism on (less memory, same traffic),
then the larger micro-batch (larger matrix products), then the lower ZeRO stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from pretrain.config import Config
from pretrain.errors import ConfigError
from pretrain.plan import GIB, HEADROOM, Plan, make_plan, resolve_vocab

MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTES = ("none", "selective", "full")
TIE = 1e-3  # relative tokens/s difference below which two layouts count as equally fast


@dataclass(frozen=True)
class Candidate:
    tp: int
    pp: int
    sequence_parallel: bool
    zero_stage: int
    micro_batch_size: int
    recompute: str

    def apply(self, cfg: Config) -> Config:
        """cfg with this layout (a copy; cfg is not changed)."""
        return dataclasses.replace(
            cfg,
            parallel=dataclasses.replace(cfg.parallel, tp=self.tp, pp=self.pp,
                                         sequence_parallel=self.sequence_parallel,
                                         zero_stage=self.zero_stage),
            trainer=dataclasses.replace(cfg.trainer, micro_batch_size=self.micro_batch_size),
            model=dataclasses.replace(cfg.model, recompute=self.recompute))

    def overrides(self) -> List[str]:
        """The command-line overrides that select this layout."""
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"parallel.zero_stage={self.zero_stage}",
                f"trainer.micro_batch_size={self.micro_batch_size}",
                f"model.recompute={self.recompute}"]


@dataclass
class Verdict:
    candidate: Candidate
    plan: Optional[Plan]  # None when the layout cannot be built
    reason: str = ""  # why it is not the best ("" for the best)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dataclasses.asdict(self.candidate)
        p = self.plan
        if p is not None:
            out.update(dp=p.dp, peak_memory_gib=round(p.gpu_bytes(p.zero_stage) / GIB, 3),
                       startup_memory_gib=round(p.startup().gpu / GIB, 3),
                       host_memory_per_node_gib=round(p.startup().host_per_node / GIB, 1),
                       tokens_per_s=round(p.tokens_per_s))
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class SearchResult:
    best: Optional[Verdict]
    rejected: List[Verdict]
    usable_gib: float
    construction: str

    def to_dict(self) -> Dict[str, Any]:
        best = None
        if self.best is not None and self.best.plan is not None:
            p = self.best.plan
            best = {**self.best.to_dict(), "usable_memory_gib": p.usable_gib,
                    "construction": p.startup().construction, "grad_accum": p.grad_accum,
                    "global_batch_size": p.global_batch,
                    "bubble_fraction": p.bubble_fraction, "tokens_per_s_gpu": p.tokens_per_s_gpu,
                    "step_s": p.step_s, "total_s": p.total_s,
                    "overrides": self.best.candidate.overrides()}
        return {"best": best, "rejected": [v.to_dict() for v in self.rejected]}


def candidates(cfg: Config) -> Iterator[Candidate]:
    cl, m = cfg.cluster, cfg.model
    world = cl.nodes * cl.gpus_per_node
    tp = 1
    while tp <= cl.gpus_per_node:
        stages = [p for p in range(1, min(world // tp, m.num_layers) + 1) if (world // tp) % p == 0]
        for pp in stages:
            for sp in ((False, True) if tp > 1 else (False,)):
                for zero in range(4):
                    for mb in MICRO_BATCHES:
                        for rc in RECOMPUTES:
                            yield Candidate(tp, pp, sp, zero, mb, rc)
        tp *= 2


def search(cfg: Config, construction: str = "auto",
           host_memory_gib: Optional[float] = None) -> SearchResult:
    """Plan every candidate layout of cfg's model on cfg's cluster; pick the fastest that fits."""
    cfg.cluster.validate()
    vocab = resolve_vocab(cfg)
    verdicts = [_judge(c, cfg, vocab, construction, host_memory_gib) for c in candidates(cfg)]
    fitting = [v for v in verdicts if not v.reason]
    usable = cfg.cluster.gpu_memory_gb * (1 - HEADROOM)
    if not fitting:
        return SearchResult(None, verdicts, usable, construction)
    fastest = max(v.plan.tokens_per_s for v in fitting)  # type: ignore[union-attr]
    fitting.sort(key=lambda v: _rank(v, fastest))
    best = fitting[0]
    for v in fitting[1:]:
        v.reason = _slower(v, best, fastest)
    unfit = [v for v in verdicts if v.reason and v not in fitting]
    return SearchResult(best, fitting[1:] + unfit, usable, construction)


def _judge(c: Candidate, cfg: Config, vocab: Tuple[int, str], construction: str,
           host_memory_gib: Optional[float]) -> Verdict:
    try:
        layout_cfg = c.apply(cfg)
        layout_cfg.validate(need_data=False)  # only layouts that pretrain-train runs
        p = make_plan(layout_cfg, vocab, construction)
    except ConfigError as e:
        return Verdict(c, None, f"invalid: {e}")
    usable = p.usable_gib
    why = []
    if not p.fits_training:
        stage = p.stages[p.peak_stage].stage
        where = f" on stage {stage}" if p.pp > 1 else ""
        why.append(f"training peak {p.gpu_bytes(p.zero_stage) / GIB:.1f} GiB{where} > "
                   f"{usable:.1f} GiB usable")
    if not p.fits_startup:
        why.append(f"start-up {p.startup().gpu / GIB:.1f} GiB "
                   f"(construction={p.startup().construction}) > "
                   f"{usable:.1f} GiB usable")
    host = p.startup().host_per_node / GIB
    if host_memory_gib is not None and host > host_memory_gib:
        why.append(f"start-up host RAM {host:.0f} GiB per node > {host_memory_gib:g} GiB")
    if c.recompute == "selective" and not why:
        # SDPA keeps no attention matrix, so selective recompute saves no memory here.
        return Verdict(c, p, "never the best: model.recompute=selective saves no memory with "
                       "SDPA (no attention matrix is stored) and recomputes attention")
    return Verdict(c, p, ("does not fit: " + "; ".join(why)) if why else "")


def _rank(v: Verdict, fastest: float) -> tuple:
    c, p = v.candidate, v.plan
    assert p is not None
    slower = p.tokens_per_s < fastest * (1 - TIE)
    return (slower, -p.tokens_per_s if slower else 0.0, c.zero_stage == 3, c.tp, c.pp,
            not c.sequence_parallel, -c.micro_batch_size, c.zero_stage)


def _slower(v: Verdict, best: Verdict, fastest: float) -> str:
    p, b = v.plan, best.plan
    assert p is not None and b is not None
    if p.tokens_per_s < fastest * (1 - TIE):
        causes = []
        if p.recompute_factor > 1:
            causes.append(f"recompute={v.candidate.recompute} x{p.recompute_factor:.2f} FLOPs")
        if p.pp > 1:
            causes.append(f"bubble {p.bubble_fraction:.1%}")
        return (f"fits, but slower: {p.tokens_per_s:,.0f} tokens/s vs {b.tokens_per_s:,.0f} "
                f"({', '.join(causes) or 'see the plan'})")
    return ("fits, as fast as the best (within 0.1%); the tie goes to less communication: "
            "no ZeRO-3, smaller TP, fewer stages, sequence parallel, larger micro-batch, lower "
            "ZeRO stage")


def _kind(reason: str) -> str:
    """A reason's class for the summary: 'does not fit: start-up', 'invalid: parallel.pp', ..."""
    head, _, rest = reason.partition(": ")
    if head == "invalid":
        return f"invalid: {rest.split(':')[0]}"
    if head == "does not fit":
        return "does not fit: " + " and ".join(
            part.split(" ")[0] + (" host RAM" if "host RAM" in part else "")
            for part in rest.split("; "))
    return head.split(",")[0] if head.startswith("fits") else head


def render_search(r: SearchResult) -> str:
    """The search's answer: the best layout's overrides and a count of the rejected by reason."""
    kinds: Dict[str, int] = {}
    for v in r.rejected:
        kinds[_kind(v.reason)] = kinds.get(_kind(v.reason), 0) + 1
    lines = [f"searched {len(r.rejected) + (r.best is not None)} layouts "
             f"(construction={r.construction}, {r.usable_gib:.1f} GiB usable per GPU):"]
    lines += [f"  {n:>5} rejected, {k}" for k, n in sorted(kinds.items(), key=lambda x: -x[1])]
    if r.best is None:
        return "\n".join(lines + ["NO layout fits; the reasons are in --json's rejected list"])
    b = r.best.plan
    assert b is not None
    lines.append(f"best: {' '.join(r.best.candidate.overrides())}  (dp={b.dp}, peak "
                 f"{b.gpu_bytes(b.zero_stage) / GIB:.1f} GiB, start-up {b.startup().gpu / GIB:.1f}"
                 f" GiB of {b.usable_gib:.1f} usable; {b.tokens_per_s:,.0f} tokens/s)")
    runners = [v for v in r.rejected if v.reason.startswith("fits")][:3]
    lines += [f"  next: {' '.join(v.candidate.overrides())}: {v.reason}" for v in runners]
    return "\n".join(lines)
