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
from sweeps.overrides import apply_overrides, parse_set  # noqa: F401 - the CLI's --set (re-exported)
from trainers.errors import ConfigError

EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 1


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


def print_results(run_dir: Path, metric: str | None = None, top: int = 10, wide: bool = False,
                  fmt: str = "table") -> list[Any]:
    """Print the leaderboard (image scores with their gain over the baseline) and, for a
    multi-objective sweep, the Pareto front. ``fmt`` "csv" or "json" prints every trial's values
    and nothing else; the table fits 120 columns (``top`` rows, 0: all) unless ``wide``. Returns the rows."""
    from sweeps import board
    from sweeps.results import baseline_scores, find_checkpoint, format_best_per_method, image_metrics, leaderboard
    from sweeps.results import confirmation_headline, metric_and_mode, pareto_front, read_confirmation
    from trainers.metric_modes import natural_mode

    rows, state = leaderboard(run_dir, metric)
    name, mode = metric_and_mode(state, metric)
    base = baseline_scores(state)
    confirmation = read_confirmation(run_dir)
    columns = (rows, name, image_metrics(state), base, board.heldout_column(confirmation))
    if fmt != "table":
        write = board.format_csv if fmt == "csv" else board.format_json
        sys.stdout.write(write(rows, name, mode, *columns[2:]).rstrip("\n") + "\n")
        return rows
    lines: list[str] = []

    def say(text: str) -> None:  # prose lines wrap at the table's width unless --wide
        lines.extend([text] if wide else board.wrap(text))

    say(f"ranked by {name} ({mode}) over every evaluated checkpoint"
        + ("; (+x) = gain over the base model without adapter" if base else ""))
    lines.append(board.format_wide(*columns) if wide else
                 board.format_compact(*columns, top=top, run_dir=str(run_dir)))
    if len({r.method for r in rows if r.rank is not None}) > 1:
        for line in format_best_per_method(rows, name).splitlines():
            say(line)
        say("  (`sdsweep best RUN_DIR --method NAME --export DIR` exports one method's best)")
    if confirmation:
        say(confirmation_headline(confirmation))
        for line in confirmation["verdict"]:
            say(f"  {line}")
    objectives = state["config"]["evaluation"].get("objectives")
    if objectives:
        front = pareto_front(rows, list(objectives), [natural_mode(o) for o in objectives])
        lines.append("")
        say(f"Pareto front of {', '.join(objectives)} ({len(front)} checkpoints; "
            "`sdsweep best RUN_DIR --pareto K` exports point K; * = checkpoint kept):")
        paths = {r.trial_id: r.path for r in rows}
        for k, p in enumerate(front):
            vals = ", ".join(f"{o} {v:.4g}" for o, v in p.values.items())
            path = paths.get(p.trial_id)
            mark = "*" if path and find_checkpoint(path, p.step) else " "
            say(f" {mark}{k}: trial {p.trial_id} step {p.step}: {vals}")
    print("\n".join(lines))
    return rows


def _finish_sweep(run: Any, export: str | None) -> int:
    """Print the leaderboard, export the best checkpoint, write the report, say how to sync W&B."""
    from sweeps.report import write_report
    from sweeps.export import export_best

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
    run = run_sweep(cfg, sweep_file=str(Path(args.sweep).resolve()), verbose=args.verbose,
                    run_dir=Path(args.run_dir) if args.run_dir else None)
    return _finish_sweep(run, args.export)


def _cmd_resume(args: argparse.Namespace) -> int:
    from sweeps.driver import resume_sweep

    return _finish_sweep(resume_sweep(Path(args.run_dir), address=args.address, verbose=args.verbose), args.export)


def _cmd_results(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise ConfigError(f"--top {args.top}: give a number of trials (0 shows every trial)")
    print_results(Path(args.run_dir), args.metric, top=args.top, wide=args.wide, fmt=args.format)
    return 0


def _cmd_best(args: argparse.Namespace) -> int:
    from sweeps.export import export_best

    if args.trial is not None and (args.pareto is not None or args.method is not None):
        raise ConfigError("--trial picks one checkpoint by hand; --pareto and --method choose among many: give one "
                          "or the other")
    info = export_best(Path(args.run_dir), Path(args.export), metric=args.metric, pareto=args.pareto,
                       method=args.method, trial=args.trial, step=args.step)
    keys = ("trial_id", "method", "hyperparameters", "metric", "image_scores", "gain_over_baseline", "cost",
            "picked_by", "why", "files")
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
    run.add_argument("-v", "--verbose", action="store_true",
                     help="Ray Tune's own progress tables instead of sdsweep's live view")
    run.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                     help="override a sweep-file key, e.g. --set search.num_samples=4 (repeatable)")
    run.set_defaults(func=_cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted sweep")
    resume.add_argument("run_dir")
    resume.add_argument("--export", default=None)
    resume.add_argument("--address", default=None, help="the Ray cluster to continue on (default: the sweep's)")
    resume.add_argument("-v", "--verbose", action="store_true", help="Ray Tune's own progress tables (the view "
                        "the sweep started with is kept for its trials)")
    resume.set_defaults(func=_cmd_resume)

    results = sub.add_parser("results", help="print a sweep's leaderboard (and Pareto front)")
    results.add_argument("run_dir")
    results.add_argument("--metric", default=None, help="rank by this reported metric (default: the sweep's)")
    results.add_argument("--top", type=int, default=10, metavar="N",
                         help="show the best N trials (default 10; 0: every trial)")
    shape = results.add_mutually_exclusive_group()
    shape.add_argument("--wide", action="store_true",
                       help="every column of every trial, however wide (default: a table that fits 120 columns)")
    shape.add_argument("--format", choices=("table", "csv", "json"), default="table",
                       help="csv or json: every trial, hyperparameter, score, cost, status and error, for programs")
    results.set_defaults(func=_cmd_results)

    best = sub.add_parser("best", help="export a sweep's best checkpoint (or one you pick) with best.json")
    best.add_argument("run_dir")
    best.add_argument("--export", required=True, help="destination directory")
    pick = best.add_mutually_exclusive_group()
    pick.add_argument("--metric", default=None, help="pick by this reported metric (default: the sweep's)")
    pick.add_argument("--pareto", type=int, default=None, metavar="K",
                      help="export point K of the Pareto front (multi-objective sweeps; see `results`)")
    best.add_argument("--method", default=None, help="only this method's trials compete (sweeps across methods); "
                      "the export is in that method's formats")
    best.add_argument("--trial", default=None, metavar="ID",
                      help="export this trial's checkpoint instead of the automatic pick (best.json says: manual); "
                      "the report shows the command under every checkpoint's images")
    best.add_argument("--step", type=int, default=None, metavar="N",
                      help="with --trial: the checkpoint at step N (default: that trial's best kept one)")
    best.set_defaults(func=_cmd_best)

    confirm = sub.add_parser("confirm", help="(re)run the held-out confirmation of a sweep's top checkpoints")
    confirm.add_argument("run_dir")
    confirm.set_defaults(func=_cmd_confirm)

    report = sub.add_parser("report", help="write a static HTML report of a sweep (opens from disk)")
    report.add_argument("run_dir")
    report.add_argument("--out", default=None, help="report directory (default RUN_DIR/report)")
    report.set_defaults(func=_cmd_report)

    # light modules: each imports its heavy parts only when its command runs
    from sweeps.init import add_command as add_init
    from sweeps.plan import add_command as add_plan

    add_plan(sub)
    add_init(sub)
    return parser


def quiet_libraries() -> None:
    """Keep the terminal for our progress: library notices off unless the user asks.

    Environment variables, so Ray workers inherit them (sweeps.trial.trial_env forwards them);
    values the user has set win. transformers reads them when it is imported, so nothing is
    imported here (``sdsweep results`` never imports transformers at all); if it is imported
    already (a caller of :func:`main` in-process), its progress bars are turned off directly.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdsweep`` console script.

    Only the command's own imports are paid for: ``results``, ``report``, ``best`` and ``--help``
    never import Ray, and ``results``/``report``/``--help`` never import torch either (the error
    classes caught here are defined in standard-library-only modules).
    """
    args = build_parser().parse_args(argv)
    quiet_libraries()
    from sweeps.errors import SweepError
    from trainers.errors import ConfigError, DatasetError, ModelLoadError, NonFiniteLossError

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
