"""`pretrain-report RUN_DIR`: a run's metrics.jsonl as PNG plots and a short text summary,
for people without W&B (or who would rather look than read).

Writes `RUN_DIR/report/report.png` (loss and validation loss against tokens, learning rate,
throughput and MFU, gradient norm, step time split, peak memory) and
`RUN_DIR/report/summary.txt`. A resumed run has written some steps twice (those after its last
checkpoint, before the interruption): the last record of each step wins, and each job's start is
marked on the step plots.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pretrain.errors import PretrainError
from pretrain.tracking import METRICS_FILE, read_metrics

STEADY_AFTER = 10  # steps: throughput and MFU medians leave out the first ones (BENCHMARKS.md)


class ReportError(PretrainError):
    """The run directory has no metrics to report on."""


@dataclass
class Metrics:
    train: List[Dict[str, Any]] = field(default_factory=list)  # one per step, by step
    val: List[Dict[str, Any]] = field(default_factory=list)
    starts: List[Dict[str, Any]] = field(default_factory=list)  # one per job (segment)
    bad_lines: int = 0  # e.g. a line cut short by a crash


def load_metrics(run_dir: Path) -> Metrics:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"{path} does not exist: RUN_DIR must be the run.dir of a training run "
                          f"(it holds config.yaml, metrics.jsonl and checkpoints/)")
    records, bad_lines = read_metrics(run_dir)
    m, train, val = Metrics(bad_lines=bad_lines), {}, {}
    for r in records:
        if r.get("event") == "start":
            m.starts.append(r)
        elif "loss" in r:
            train[r["step"]] = r
        elif "val_loss" in r:
            val[r["step"]] = r
    m.train = [train[s] for s in sorted(train)]
    m.val = [val[s] for s in sorted(val)]
    if not m.train:
        raise ReportError(f"{path} holds no training records yet: wait for the first log line "
                          f"(trainer.log_every steps) and run pretrain-report again")
    return m


def _values(records: Sequence[Dict[str, Any]], key: str) -> List[float]:
    """Values as floats, NaN where missing (matplotlib leaves a gap)."""
    return [float(r[key]) if r.get(key) is not None else math.nan for r in records]


def _present(records: Sequence[Dict[str, Any]], key: str) -> List[float]:
    return [float(r[key]) for r in records if r.get(key) is not None]


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def summarize(m: Metrics, run_dir: Path) -> Dict[str, Any]:
    from pretrain.checkpoint import committed

    first, last = m.train[0], m.train[-1]
    losses = _present(m.train, "loss")
    steady = [r for r in m.train if r["step"] > first["step"] + STEADY_AFTER] or m.train
    tps, tps_dev, mfu = (_present(steady, k) for k in ("tokens_per_s", "tokens_per_s_per_device", "mfu"))
    times = _present(m.train + m.val + m.starts, "time")
    best = min((r for r in m.train if r.get("loss") is not None), key=lambda r: r["loss"], default=None)
    return {
        "run_dir": str(run_dir), "steps": last["step"], "first_step": first["step"],
        "tokens": last.get("tokens_seen"), "jobs": max(1, len(m.starts)),
        "loss_first": first.get("loss"), "loss_last": last.get("loss"),
        "loss_min": best["loss"] if best else None, "loss_min_step": best["step"] if best else None,
        "val_loss_last": m.val[-1]["val_loss"] if m.val else None,
        "val_step_last": m.val[-1]["step"] if m.val else None,
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "tokens_per_s_per_device_median": statistics.median(tps_dev) if tps_dev else None,
        "mfu_median": statistics.median(mfu) if mfu else None,
        "grad_norm_last": last.get("grad_norm"),
        "wall_seconds": max(times) - min(times) if len(times) > 1 else None,
        "train_seconds": last.get("elapsed_s"),
        "checkpoints": [p.name for p in committed(Path(run_dir) / "checkpoints")],
        "finite": all(math.isfinite(x) for x in losses) and len(losses) == len(m.train),
        "bad_lines": m.bad_lines,
    }


def render_summary(s: Dict[str, Any]) -> str:
    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = [
        f"run          {s['run_dir']}",
        f"steps        {s['first_step']}..{s['steps']} logged, {s['jobs']} job(s)",
        f"tokens       {num(s['tokens'], ',')}",
        f"loss         first {num(s['loss_first'], '.4f')}  last {num(s['loss_last'], '.4f')}  "
        f"min {num(s['loss_min'], '.4f')} (step {s['loss_min_step']})"
        + ("" if s["finite"] else "  [some losses are not finite]"),
        f"val loss     {num(s['val_loss_last'], '.4f')}"
        + (f" (step {s['val_step_last']}, ppl {math.exp(min(s['val_loss_last'], 50)):.2f})"
           if s["val_loss_last"] is not None else ""),
        f"tokens/s     {num(s['tokens_per_s_median'], ',.0f')} total, "
        f"{num(s['tokens_per_s_per_device_median'], ',.0f')} per device (median, steady state)",
        "MFU          " + (f"{s['mfu_median']:.1%} (median)" if s["mfu_median"] is not None
                           else "n/a (device peak unknown; set cluster.gpu_peak_tflops)"),
        f"grad norm    {num(s['grad_norm_last'], '.4f')} (last, before clipping)",
        f"wall time    {_fmt_seconds(s['wall_seconds']) if s['wall_seconds'] is not None else 'n/a'}"
        + (f" (training {_fmt_seconds(s['train_seconds'])})" if s["train_seconds"] else ""),
        "checkpoints  " + (", ".join(s["checkpoints"]) or "none"),
    ]
    if s["bad_lines"]:
        lines.append(f"skipped      {s['bad_lines']} unreadable line(s) in {METRICS_FILE}")
    return "\n".join(lines) + "\n"


def plot(m: Metrics, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    t, steps = m.train, [r["step"] for r in m.train]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8), dpi=80)
    (loss, lr, perf), (gnorm, times, mem) = ax

    loss.plot(_values(t, "tokens_seen"), _values(t, "loss"), label="train")
    if m.val:
        loss.plot(_values(m.val, "tokens_seen"), _values(m.val, "val_loss"), "o-", label="validation")
    loss.set(title="Loss", xlabel="tokens seen", ylabel="cross entropy")
    loss.xaxis.set_major_formatter(EngFormatter())
    loss.legend()

    lr.plot(steps, _values(t, "lr"))
    lr.set(title="Learning rate", xlabel="step")

    perf.plot(steps, _values(t, "tokens_per_s"))
    perf.set(title="Throughput", xlabel="step", ylabel="tokens/s (all devices)")
    _second_scale(perf, t)

    gnorm.plot(steps, _values(t, "grad_norm"))
    g = _present(t, "grad_norm")
    if g and min(g) > 0 and max(g) / min(g) > 100:
        gnorm.set_yscale("log")
    gnorm.set(title="Gradient norm (before clipping)", xlabel="step")

    split = (("data_time", "fwd_bwd_time", "optimizer_time") if _present(t, "optimizer_time")
             else ("data_time", "compute_time"))
    times.stackplot(steps, *[[0.0 if math.isnan(v) else v for v in _values(t, k)] for k in split],
                    labels=[k.replace("_time", "").replace("_", "+") for k in split])
    times.set(title="Step time", xlabel="step", ylabel="seconds per step")
    times.legend(loc="upper right")

    mem.plot(steps, _values(t, "peak_memory_gb"))
    mem.set(title="Peak memory (rank 0)", xlabel="step", ylabel="GiB")

    for a in (lr, perf, gnorm, times, mem):
        for s in m.starts[1:]:  # where a later job resumed
            a.axvline(s["step"], color="grey", linestyle=":", linewidth=1)
    for a in ax.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _second_scale(ax, records: Sequence[Dict[str, Any]]) -> None:
    """MFU (or, without a known peak, TFLOP/s per device) as a right-hand scale of the tokens/s
    axis: both are tokens/s times a constant of the run, so one curve shows all three."""
    for key, label, factor in (("mfu", "MFU %", 100.0),
                               ("tflops_per_device", "TFLOP/s per device (peak unknown: no MFU)", 1.0)):
        pairs = [(r[key], r["tokens_per_s"]) for r in records
                 if r.get(key) is not None and r.get("tokens_per_s")]
        if pairs:
            k = factor * pairs[-1][0] / pairs[-1][1]
            right = ax.secondary_yaxis("right", functions=(lambda x: x * k, lambda y: y / k))
            right.set_ylabel(label)
            return


def make_report(run_dir: Path, out_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Plots and summary of run_dir; returns {"summary": text, "files": [paths]}."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    m = load_metrics(run_dir)
    text = render_summary(summarize(m, run_dir))
    png = plot(m, out_dir / "report.png")
    txt = out_dir / "summary.txt"
    txt.write_text(text)
    return {"summary": text, "files": [png, txt]}
