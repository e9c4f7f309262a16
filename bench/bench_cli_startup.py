"""How long the read-only commands take, for two checkouts side by side in one run.

Each command (``sdsweep --help``, ``results``, ``report``, ``best --export``) runs as a fresh
process, the way a user runs it, once per checkout per round; the checkouts alternate within a
round so both see the same machine load. ``PYTHONPATH`` points the console script at each
checkout (it wins over the editable install, docs/DEVELOPING.md). Printed: the median and range
of wall seconds per command and checkout, the ratio of the medians, and which heavy libraries
each command imported (``-X importtime``, one extra run each).

    python bench/bench_cli_startup.py RUN_DIR --before /tmp/head --after . --rounds 5

RUN_DIR is a finished sweep's run directory (any: e.g. ``sdsweep run sweeps/configs/demo-mixed.yaml
--set search.num_samples=5 --set base.train.max_train_steps=150 --set evaluation.every=50``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("ray", "torch", "transformers", "diffusers", "peft", "wandb", "optuna")


def commands(run_dir: Path, scratch: Path) -> dict[str, list[str]]:
    """The measured commands (argv after ``sdsweep``); their outputs go under ``scratch``."""
    return {"--help": ["--help"],
            "results": ["results", str(run_dir)],
            "report": ["report", str(run_dir), "--out", str(scratch / "report")],
            "best --export": ["best", str(run_dir), "--export", str(scratch / "best")]}


def run_once(checkout: Path, argv: list[str], importtime: bool = False) -> tuple[float, str]:
    """Wall seconds of one ``sdsweep ARGV`` process, and its stderr."""
    env = dict(os.environ, PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c",
           "import sys; from sweeps.cli import main; sys.exit(main())", *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=checkout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: sdsweep {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stderr


def imported(stderr: str) -> list[str]:
    """The heavy top-level packages an ``-X importtime`` trace shows."""
    tops = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in stderr.splitlines()
            if line.startswith("import time:")}
    return [h for h in HEAVY if h in tops]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--before", type=Path, required=True, help="checkout of the old code")
    ap.add_argument("--after", type=Path, required=True, help="checkout of the new code")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    times: dict[tuple[str, str], list[float]] = {}
    libs: dict[tuple[str, str], list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side, checkout in (sides.items() if r % 2 == 0 else reversed(sides.items())):
                for name, argv in commands(args.run_dir.resolve(), Path(tmp) / side).items():
                    wall, _ = run_once(checkout, argv)
                    times.setdefault((name, side), []).append(wall)
                shutil.rmtree(Path(tmp) / side, ignore_errors=True)
        for side, checkout in sides.items():
            for name, argv in commands(args.run_dir.resolve(), Path(tmp) / side).items():
                libs[(name, side)] = imported(run_once(checkout, argv, importtime=True)[1])
    print(f"{args.rounds} rounds, wall seconds per process (median [min, max]); run dir {args.run_dir}")
    print(f"| command | before | after | before / after | imports before | imports after |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in commands(args.run_dir, Path(".")):
        b, a = times[(name, "before")], times[(name, "after")]
        cell = lambda v: f"{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]"  # noqa: E731
        print(f"| `sdsweep {name}` | {cell(b)} | {cell(a)} | {statistics.median(b) / statistics.median(a):.1f}x "
              f"| {', '.join(libs[(name, 'before')]) or '-'} | {', '.join(libs[(name, 'after')]) or '-'} |")


if __name__ == "__main__":
    main()
