"""``python -m trainers.toyworld {build,verify,gates}``: rebuild, check or measure the toy world."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trainers.toyworld import weights_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainers.toyworld", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="render scenes, pretrain every component, write DIR with a manifest")
    b.add_argument("--out", type=Path, default=weights_dir(), help="output directory (default: the shipped weights)")
    b.add_argument("--quick", action="store_true", help="CI's shortened build: a few steps per stage, gates not expected to pass")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=1, help="torch threads; hashes are reproducible for a fixed count (default 1)")
    b.add_argument("--overwrite", action="store_true", help="replace --out once the new build has succeeded")
    v = sub.add_parser("verify", help="check every file of DIR against its manifest")
    v.add_argument("dir", nargs="?", type=Path, default=weights_dir())
    g = sub.add_parser("gates", help="measure the quality gates of DIR with its checker")
    g.add_argument("dir", nargs="?", type=Path, default=weights_dir())
    g.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default 4)")
    g.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (1 on a failed verify or a missed gate)."""
    args = _parser().parse_args(argv)
    if args.command == "verify":
        from trainers.toyworld.manifest import ManifestError, verify

        try:
            n = verify(args.dir)
        except ManifestError as e:
            print(f"verify FAILED: {e}", file=sys.stderr)
            return 1
        print(f"{args.dir}: all {n} files match the manifest")
        return 0
    import torch

    from trainers.toyworld.build import FULL, QUICK, build, measure_gates
    from trainers.toyworld.scenes import make_scenes

    if args.command == "build":
        recipe = QUICK if args.quick else FULL
        if args.seed != recipe.seed:
            import dataclasses

            recipe = dataclasses.replace(recipe, seed=args.seed)
        t0 = time.perf_counter()
        manifest = build(args.out, recipe, threads=args.threads, overwrite=args.overwrite)
        print(json.dumps({"timings_s": manifest["timings_s"], "measured": manifest["measured"]}, indent=2))
        print(f"built {args.out} in {time.perf_counter() - t0:.0f}s")
        return 0
    torch.set_num_threads(args.threads)
    eval_scenes = make_scenes(2, 5)  # the full recipe's evaluation scenes (seed 0 * 100 + 5)
    result = measure_gates(args.dir, tuple(range(args.seeds)), eval_scenes)
    print(json.dumps(result, indent=2))
    return 0 if all(result["passed"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
