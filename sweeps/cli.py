"""The ``sdsweep`` command line.

``sdsweep train CONFIG.yaml`` runs one training job in-process (no Ray) for trying a recipe.
Errors a user can fix (config, dataset, model loading, a diverging loss) print one clear message
and exit non-zero without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from sweeps.constants import QUIET_ENV

EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 1


def apply_overrides(data: Any, overrides: Sequence[str], source: str) -> Any:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to a raw config mapping."""
    from trainers.config import ConfigError

    for key, value in parse_set(overrides).items():
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            if isinstance(node.get(p), str) and p == "model":
                node[p] = {"source": node[p]}
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: --set {key}: {p} is not a mapping")
        node[parts[-1]] = value
    return data


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as ``{dotted key: value parsed as YAML}``; an item without ``=``
    or with an empty key is an error (it would otherwise set the key to null, silently)."""
    from trainers.config import ConfigError, yaml_load

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_train_steps=20")
        out[key.strip()] = yaml_load(raw)
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainers.config import RunConfig, read_yaml, validate_mapping
    from trainers.run import train_from_config

    raw = apply_overrides(read_yaml(args.config) or {}, args.set, args.config)
    cfg = validate_mapping(raw, RunConfig, args.config)
    bars: list[Any] = []

    def on_ready(trainer: Any) -> None:
        # The bar starts here, once preflight, model loading and the cache are done: those take
        # minutes on a real model, under a 0% bar they read as a hang, and an error they raise
        # should not print below a bar that never moved.
        bar = tqdm(total=cfg.train.max_train_steps, initial=trainer.global_step, desc=f"train {cfg.method}",
                   unit="step", disable=args.quiet, dynamic_ncols=True)
        bars.append(bar)
        d = trainer.data
        bar.write(f"dataset {len(d)} images, cache {d.key[:12]}: {d.report.images_encoded} encoded, "
                  f"{d.report.entries_reused} reused; device {trainer.device}, "
                  f"precision {trainer.accelerator.mixed_precision}")

    def on_step(stats: Any) -> None:
        bars[0].update(1)
        bars[0].set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}")

    try:
        result = train_from_config(cfg, resume=args.resume, callback=on_step, on_ready=on_ready)
    finally:
        for bar in bars:
            bar.close()
    print(f"done: step {result.final_step}, final loss {result.final_loss:.4f}; "
          f"weights: {result.weights}" if result.final_loss is not None else
          f"done: step {result.final_step}; weights: {result.weights}")
    return 0


def print_results(run_dir: Path, metric: str | None = None) -> list[Any]:
    """Print the leaderboard (image scores with their gain over the baseline) and, for a
    multi-objective sweep, the Pareto front. Returns the rows."""
    from sweeps.config import natural_mode
    from sweeps.results import baseline_scores, format_leaderboard, image_metrics, leaderboard, metric_and_mode
    from sweeps.results import find_checkpoint, format_best_per_method, pareto_front

    from sweeps.confirm import heldout_column
    from sweeps.results import read_confirmation

    rows, state = leaderboard(run_dir, metric)
    name, mode = metric_and_mode(state, metric)
    base = baseline_scores(state)
    confirmation = read_confirmation(run_dir)
    print(f"ranked by {name} ({mode}) over every evaluated checkpoint"
          + ("; (+x) = gain over the base model without adapter" if base else ""))
    print(format_leaderboard(rows, name, image_metrics(state), base, heldout_column(confirmation)))
    if len({r.method for r in rows if r.rank is not None}) > 1:
        print(format_best_per_method(rows, name)
              + "\n  (`sdsweep best RUN_DIR --method NAME --export DIR` exports one method's best)")
    if confirmation:
        print(f"held-out confirmation ({confirmation['images_per_model']} images per model on seeds never used "
              f"for picking), winner {confirmation['winner']}:")
        for line in confirmation["verdict"]:
            print(f"  {line}")
    objectives = state["config"]["evaluation"].get("objectives")
    if objectives:
        front = pareto_front(rows, list(objectives), [natural_mode(o) for o in objectives])
        print(f"\nPareto front of {', '.join(objectives)} ({len(front)} checkpoints; "
              "`sdsweep best RUN_DIR --pareto K` exports point K; * = checkpoint kept):")
        paths = {r.trial_id: r.path for r in rows}
        for k, p in enumerate(front):
            vals = ", ".join(f"{o} {v:.4g}" for o, v in p.values.items())
            path = paths.get(p.trial_id)
            mark = "*" if path and find_checkpoint(path, p.step) else " "
            print(f" {mark}{k}: trial {p.trial_id} step {p.step}: {vals}")
    return rows


def _finish_sweep(run: Any, export: str | None) -> int:
    """Print the leaderboard, export the best checkpoint, write the report, say how to sync W&B."""
    from sweeps.report import write_report
    from sweeps.results import export_best

    print(f"\nrun directory: {run.run_dir}")
    print(f"latent cache: {run.cache_report['images_encoded']} images encoded, "
          f"{run.cache_report['entries_reused']} reused")
    rows = print_results(run.run_dir)
    if any(r.rank for r in rows):
        dest = Path(export) if export else run.run_dir / "best"
        info = export_best(run.run_dir, dest)
        print(f"best: trial {info['trial_id']} at step {info['metric']['step']} "
              f"({info['metric']['name']} {info['metric']['value']:.5f}) -> {dest}")
    print(f"report: {write_report(run.run_dir)}")
    if run.sync_command:
        print(f"W&B ran offline; to upload: {run.sync_command}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from sweeps.config import load_sweep
    from sweeps.driver import run_sweep

    overrides = parse_set(args.set)
    if args.address:
        overrides["ray_address"] = args.address
    cfg = load_sweep(args.sweep, overrides)
    run = run_sweep(cfg, sweep_file=str(Path(args.sweep).resolve()),
                    run_dir=Path(args.run_dir) if args.run_dir else None)
    return _finish_sweep(run, args.export)


def _cmd_resume(args: argparse.Namespace) -> int:
    from sweeps.driver import resume_sweep

    return _finish_sweep(resume_sweep(Path(args.run_dir), address=args.address), args.export)


def _cmd_results(args: argparse.Namespace) -> int:
    print_results(Path(args.run_dir), args.metric)
    return 0


def _cmd_best(args: argparse.Namespace) -> int:
    from sweeps.results import export_best

    info = export_best(Path(args.run_dir), Path(args.export), metric=args.metric, pareto=args.pareto,
                       method=args.method)
    keys = ("trial_id", "method", "hyperparameters", "metric", "image_scores", "gain_over_baseline", "cost", "why",
            "files")
    print(json.dumps({k: info[k] for k in keys}, indent=1))
    if "not_kept" in info:
        print(f"note: {info['not_kept']}", file=sys.stderr)
    return 0


def _cmd_confirm(args: argparse.Namespace) -> int:
    import ray

    from sweeps.config import SweepConfig
    from sweeps.confirm import confirm_sweep
    from sweeps.driver import ensure_ray
    from sweeps.results import read_state

    cfg = SweepConfig.model_validate(read_state(Path(args.run_dir))["config"])
    started = ensure_ray(cfg)  # the sweep's cluster (ray_address) or a local Ray with the trials' env
    try:
        summary = confirm_sweep(cfg, Path(args.run_dir))
    finally:
        if started:
            ray.shutdown()
    if summary is None:
        print("nothing to confirm: the sweep has no image evaluation, confirmation is off, or no "
              "trial was evaluated", file=sys.stderr)
        return EXIT_USER_ERROR
    print_results(Path(args.run_dir))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from sweeps.report import write_report

    print(write_report(Path(args.run_dir), Path(args.out) if args.out else None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="sdsweep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run one training job without Ray")
    train.add_argument("config", help="run config YAML (see sweeps/configs/train-demo.yaml)")
    train.add_argument("--resume", metavar="CHECKPOINT", default=None,
                       help="a checkpoint-N directory, or 'latest' for the newest in output_dir")
    train.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                       help="override a config key, e.g. --set train.max_train_steps=20 (repeatable)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    run = sub.add_parser("run", help="run a sweep (Ray Tune + Optuna) from a sweep file")
    run.add_argument("sweep", help="sweep YAML (see sweeps/configs/demo.yaml)")
    run.add_argument("--run-dir", default=None, help="where the run goes (default storage_path/NAME-TIME)")
    run.add_argument("--export", default=None, help="export the best checkpoint here (default RUN_DIR/best)")
    run.add_argument("--address", default=None, help="run on this Ray cluster (host:port, ray://host:port or auto; "
                     "default: RAY_ADDRESS, else a local Ray started for the sweep)")
    run.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                     help="override a sweep-file key, e.g. --set search.num_samples=4 (repeatable)")
    run.set_defaults(func=_cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted sweep")
    resume.add_argument("run_dir")
    resume.add_argument("--export", default=None)
    resume.add_argument("--address", default=None, help="the Ray cluster to continue on (default: the sweep's)")
    resume.set_defaults(func=_cmd_resume)

    results = sub.add_parser("results", help="print a sweep's leaderboard (and Pareto front)")
    results.add_argument("run_dir")
    results.add_argument("--metric", default=None, help="rank by this reported metric (default: the sweep's)")
    results.set_defaults(func=_cmd_results)

    best = sub.add_parser("best", help="export a sweep's best checkpoint with best.json")
    best.add_argument("run_dir")
    best.add_argument("--export", required=True, help="destination directory")
    pick = best.add_mutually_exclusive_group()
    pick.add_argument("--metric", default=None, help="pick by this reported metric (default: the sweep's)")
    pick.add_argument("--pareto", type=int, default=None, metavar="K",
                      help="export point K of the Pareto front (multi-objective sweeps; see `results`)")
    best.add_argument("--method", default=None, help="only this method's trials compete (sweeps across methods); "
                      "the export is in that method's formats")
    best.set_defaults(func=_cmd_best)

    confirm = sub.add_parser("confirm", help="(re)run the held-out confirmation of a sweep's top checkpoints")
    confirm.add_argument("run_dir")
    confirm.set_defaults(func=_cmd_confirm)

    report = sub.add_parser("report", help="write a static HTML report of a sweep (opens from disk)")
    report.add_argument("run_dir")
    report.add_argument("--out", default=None, help="report directory (default RUN_DIR/report)")
    report.set_defaults(func=_cmd_report)
    return parser


def quiet_libraries() -> None:
    """Keep the terminal for our progress: library notices off unless the user asks.

    Environment variables, so Ray workers inherit them (sweeps.trial.trial_env forwards them);
    values the user has set win.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdsweep`` console script."""
    args = build_parser().parse_args(argv)
    quiet_libraries()
    from trainers.base import NonFiniteLossError
    from trainers.config import ConfigError
    from trainers.data import DatasetError
    from sweeps.results import SweepError
    from trainers.models import ModelLoadError

    try:
        return int(args.func(args))
    except (ConfigError, DatasetError, ModelLoadError, SweepError, FileNotFoundError) as err:
        print(f"sdsweep: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLossError as err:
        print(f"sdsweep: training failed: {err}", file=sys.stderr)
        return EXIT_TRAINING_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
