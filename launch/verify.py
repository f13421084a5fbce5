"""`pretrain-verify`: check that this cluster and config resume exactly, before a long run.

    pretrain-verify --nproc 8 --steps 20 experiment=gpt2-124m data.path=/data/web
    pretrain-verify --launcher "srun --ntasks=16" --steps 20 experiment=... data.path=...

Runs the training twice in fresh processes with the given Hydra overrides:
  straight   steps 1..N in one go, saving a checkpoint at step N/2;
  resumed    a new run that loads that checkpoint (trainer.resume_from) and trains N/2+1..N;
then compares the losses of steps N/2+1..N and prints PASS when they are bitwise identical,
FAIL (exit status 1) with the first difference otherwise. The runs are kept under --workdir.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from pretrain.tracking import METRICS_FILE, read_metrics

# Overrides this tool sets itself; the same keys given by the user are dropped.
OWN_KEYS = ("run.dir", "trainer.max_steps", "trainer.checkpoint_every", "trainer.log_every",
            "trainer.resume", "trainer.resume_from", "trainer.checkpoint_every_min",
            "trainer.keep_last")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pretrain-verify", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="steps of the straight run (>= 2)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this node (torchrun)")
    p.add_argument("--launcher", default=None,
                   help="command that starts the ranks instead of torchrun, e.g. 'srun --ntasks=16'")
    p.add_argument("--workdir", type=Path, default=None, help="where the two runs go (a temp dir)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for pretrain-train")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2")
    return args


def launch_prefix(nproc: int, launcher: Optional[str]) -> List[str]:
    train = [sys.executable, "-m", "launch.train"]
    if launcher:
        return shlex.split(launcher) + train
    if nproc == 1:
        return train
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), "-m", "launch.train"]


def losses(run_dir: Path) -> Dict[int, float]:
    """step -> training loss from a run's metrics.jsonl (the last record of a step wins)."""
    out: Dict[int, float] = {}
    records = read_metrics(run_dir)[0] if (run_dir / METRICS_FILE).exists() else []
    for rec in records:
        if rec.get("loss") is not None:
            out[int(rec["step"])] = rec["loss"]
    return out


def compare(straight: Dict[int, float], resumed: Dict[int, float], steps: range) -> Tuple[bool, str]:
    for s in steps:
        a, b = straight.get(s), resumed.get(s)
        if a is None or b is None:
            return False, f"step {s} has no loss in the {'straight' if a is None else 'resumed'} run"
        if a != b:
            return False, f"step {s}: straight {a!r} != resumed {b!r} (difference {b - a:.3g})"
    return True, f"steps {steps.start}..{steps.stop - 1}: losses bitwise identical"


def run(cmd: List[str], timeout: Optional[float]) -> None:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    proc = subprocess.run(cmd, timeout=timeout)
    if proc.returncode != 0:
        print(f"FAIL: the run exited with {proc.returncode} (see its output above)", flush=True)
        sys.exit(1)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    user = [o for o in args.overrides if o.lstrip("+~").split("=", 1)[0] not in OWN_KEYS]
    for dropped in sorted(set(args.overrides) - set(user)):
        print(f"pretrain-verify: ignoring {dropped} (set by this tool)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pretrain-verify-"))
    n, half = args.steps, args.steps // 2
    straight, resumed = work / "straight", work / "resumed"
    prefix = launch_prefix(args.nproc, args.launcher)
    common = [f"trainer.max_steps={n}", "trainer.log_every=1", "trainer.checkpoint_every_min=0",
              "trainer.keep_last=3"]  # the straight run's saves: N/2, 2 x N/2, N
    run(prefix + user + common + [f"run.dir={straight}", f"trainer.checkpoint_every={half}",
                                  "trainer.resume=false"], args.timeout)
    checkpoint = straight / "checkpoints" / f"step_{half:08d}"
    run(prefix + user + common + [f"run.dir={resumed}", "trainer.checkpoint_every=0",
                                  f"trainer.resume_from={checkpoint}"], args.timeout)
    ok, detail = compare(losses(straight), losses(resumed), range(half + 1, n + 1))
    print(f"{'PASS' if ok else 'FAIL'}: resume at step {half} of {n}: {detail} (runs in {work})",
          flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
