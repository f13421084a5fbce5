"""`pretrain-report RUN_DIR [--out DIR]`: plots and a text summary of a run's metrics.jsonl."""

from __future__ import annotations

import argparse
from typing import List, Optional

from launch.config import fail
from pretrain.errors import PretrainError


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="pretrain-report",
        description="Turn RUN_DIR/metrics.jsonl into RUN_DIR/report/report.png (loss, validation "
                    "loss, learning rate, throughput and MFU, gradient norm, step time, memory) "
                    "and RUN_DIR/report/summary.txt. Works on a run in progress.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's run.dir")
    p.add_argument("--out", default=None, help="write here instead of RUN_DIR/report")
    args = p.parse_args(argv)
    from pretrain.report import make_report

    try:
        report = make_report(args.run_dir, args.out)
    except PretrainError as e:
        fail(e)
    print(report["summary"], end="")
    print("wrote " + ", ".join(str(f) for f in report["files"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
