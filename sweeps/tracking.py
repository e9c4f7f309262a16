"""W&B tracking for a sweep: one W&B run per Ray Tune trial, logged from the driver.

Every trial of a sweep becomes one W&B run: ``group`` = the sweep's run id, ``job_type`` = the
trial's training method (trial config key ``method``), ``config`` = the trial's hyperparameters
(the flat, dotted trial config), metrics at the trial's training ``step`` (W&B's ``_step`` *and*
the chart x-axis via ``define_metric``). Trials stay free of wandb: ``WandbTrialCallback`` is a
``ray.tune.Callback`` that runs in the driver process. W&B files go to ``<run_dir>/wandb/``.

Why our own callback and not ``ray.air.integrations.wandb.WandbLoggerCallback`` (Ray 2.60):
  * the step axis is hard-coded: its logging actor calls
    ``wandb.log(result, step=result["training_iteration"])`` (``_WandbLoggingActor.run``), so
    W&B's step would be Tune's report counter (1, 2, 3 ...), not the training step (50, 100 ...);
    changing it means replacing that private actor's whole loop;
  * per-trial ``job_type`` and our deterministic id: ``log_trial_start`` builds the init kwargs
    with ``id=trial_id, resume=False`` and only the callback-wide ``**kwargs`` can override
    them, so a per-trial job_type needs an override of the private ``_start_logging_actor``;
  * automatic offline mode: its ``setup()`` raises "No WandB API key found" unless the
    *process environment* has ``WANDB_MODE=offline`` (a ``mode="offline"`` init kwarg is not
    consulted), so we would have to mutate ``os.environ`` of the driver;
  * ``images`` as file paths are dropped (``_is_allowed_type`` rejects lists of str);
  * it starts two Ray actors per trial (a logger and a queue) where sdsweep logs from the
    driver's own callback.
  Overriding setup, log_trial_start/_start_logging_actor, log_trial_result and the actor's run
  loop would leave nothing of it but the queue plumbing, so a small callback is simpler.

Resume: the run id is ``wandb_run_id(sweep run id, trial id)`` and runs are opened with
``resume="allow"``, so a trial resumed by ``Tuner.restore`` continues the same W&B run. A result
whose step is not above the last step already logged for that run is skipped (a restored trial
re-reports the steps between its checkpoint and the kill). The last step comes from this
callback's memory, from ``run.starting_step`` (online: the server's next step) and, offline,
from the earlier offline segments of the same run id on disk.

Offline resume (measured with wandb 0.31.0): every ``wandb.init`` of the same id in offline mode
writes a NEW directory ``offline-run-<time>-<id>[-N]/run-<id>.wandb``; in the second segment
``run.resumed`` is False and ``run.starting_step`` is 0 (no server to ask), which is why steps
are passed explicitly and earlier segments are read back for the last logged step. Nothing
merges the segments locally. ``wandb sync`` in 0.31 groups the ``.wandb`` files of one run id and
uploads them sequentially in order of their start time (``wandb sync --help``, option ``-n``;
wandb PR #10708), the later ones resuming the run; because each segment's ``_step`` values are
the training steps, the uploaded history is 1..3 then 4..6, not two overlapping 0-based ranges.
The upload itself could not be exercised here (no network); tests check the local segments.

Reading runs back: wandb 0.31 has no Python reader for ``.wandb`` files any more (the old
``wandb/sdk/internal/datastore.py`` is gone; W&B reads them in wandb-core, cf. the review of
wandb PR #11581). ``read_offline_run`` therefore runs W&B's own reader, ``wandb-core leet inspect --json``
(what ``wandb leet inspect --json`` runs), which prints one JSON object per record.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from hashlib import sha1
from pathlib import Path
from typing import Any, Literal

import wandb
from pydantic import BaseModel, ConfigDict
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import TBXLoggerCallback
from ray.tune.utils import flatten_dict
from wandb.sdk import wandb_setup
from wandb.sdk.lib import wbauth

from sweeps.rows import trial_rows

logger = logging.getLogger(__name__)

Mode = Literal["online", "offline", "disabled"]

# Tune's bookkeeping keys in every result: identity and control flags, not metrics.
_TUNE_KEYS = frozenset({
    "done", "should_checkpoint", "trial_id", "experiment_tag", "pid", "hostname", "node_ip",
    "date", "timestamp", "config", "checkpoint_dir_name",
})
IMAGES_KEY = "images"
SAMPLES_KEY = "samples"  # path of an evaluation's scores.json (trainers.evaluate.write_samples)
STEP_KEY = "step"
METHOD_KEY = "method"
# W&B run ids may not contain / \ # ? % : ; , ' (docs + wandb_settings.validate_run_id);
# we keep a conservative alphabet and hash ids longer than this (W&B ids are short slugs).
_RUN_ID_MAX = 64
# W&B's own WANDB_MODE values ("dryrun"/"run" are its legacy spellings); "shared" is not for us.
_WANDB_MODE_ENV: dict[str, Mode] = {"online": "online", "run": "online", "offline": "offline",
                                    "dryrun": "offline", "disabled": "disabled"}


class TrackingSettings(BaseModel):
    """The sweep file's ``tracking`` section.

    ``mode``: ``auto`` = W&B's own ``WANDB_MODE`` if set, else ``online`` when W&B credentials
    exist (``WANDB_API_KEY``, an identity token file, a .netrc entry or a settings-file key,
    checked the way ``wandb.init`` checks them, without prompting), else ``offline``.
    ``online``/``offline``/``disabled`` are used as given; ``wandb: false`` equals ``disabled``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    wandb: bool = True
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "sdsweep"
    entity: str | None = None
    tags: tuple[str, ...] = ()


def has_wandb_credentials() -> bool:
    """True when W&B would find credentials for its server without prompting.

    Uses W&B's own lookup (``wbauth.authenticate_session``, what ``wandb.login`` and
    ``wandb.init`` call) with ``prompt=False`` and ``update_session=False``: environment
    variables, the .netrc file (``NETRC`` or ``~/.netrc``) and the settings-file key. Never
    prompts, never contacts the server. A malformed key raises W&B's ``AuthenticationError``.
    """
    base_url = wandb_setup.singleton().settings.base_url
    auth = wbauth.authenticate_session(host=base_url, source="sdsweep", prompt=False,
                                       update_session=False)
    return auth is not None


def resolve_mode(settings: TrackingSettings) -> Mode:
    """The W&B mode a sweep uses: ``"online"``, ``"offline"`` or ``"disabled"``."""
    if not settings.wandb or settings.mode == "disabled":
        return "disabled"
    if settings.mode != "auto":
        return settings.mode
    env = os.environ.get("WANDB_MODE")
    if env:
        if env not in _WANDB_MODE_ENV:
            raise ValueError(f"WANDB_MODE={env!r} is not supported by sdsweep tracking; use one of "
                             f"{sorted(_WANDB_MODE_ENV)} or unset it (tracking.mode: auto)")
        return _WANDB_MODE_ENV[env]
    return "online" if has_wandb_credentials() else "offline"


def wandb_run_id(sweep_run_id: str, trial_id: str) -> str:
    """The deterministic W&B run id of one trial: ``<sweep run id>-<trial id>``, made safe.

    Characters outside ``[A-Za-z0-9._-]`` become ``-``; an id longer than 64 characters keeps
    its first 47 and a 16-hex-digit hash of the full pair, so distinct pairs stay distinct.
    """
    raw = f"{sweep_run_id}-{trial_id}"
    slug = re.sub(r"[^A-Za-z0-9._-]", "-", raw)
    if len(slug) <= _RUN_ID_MAX:
        return slug
    digest = sha1(raw.encode()).hexdigest()[:16]
    return f"{slug[:_RUN_ID_MAX - 17]}-{digest}"


class WandbTrialCallback(tune.Callback):
    """Opens one W&B run per trial in the driver and logs every result at the trial's step.

    Result handling: numbers (nested dicts flattened with ``/``) are logged except Tune's
    bookkeeping keys; ``step`` (an int, required) is the x-axis. Sample-image hooks: a result key
    ``images`` holding a list of image file paths is logged as ``wandb.Image``s (the evaluation's
    grid), and ``samples`` naming a ``scores.json`` as a per-prompt ``wandb.Table``; the files must
    be readable from the driver (on a cluster: shared storage or the synced trial dir).
    """

    def __init__(self, *, mode: Mode, project: str, entity: str | None, tags: tuple[str, ...],
                 run_dir: Path, group: str, metric: str | None = None, metric_mode: str = "max") -> None:
        if mode == "disabled":
            raise ValueError("WandbTrialCallback needs mode 'online' or 'offline'; "
                             "make_callbacks returns no callback for 'disabled'")
        self.mode = mode
        self.project, self.entity, self.tags = project, entity, tags
        self.run_dir = Path(run_dir)
        self.group = group
        self._runs: dict[str, Any] = {}  # trial id -> wandb Run (not picklable)
        self._last_step: dict[str, int] = {}
        self._errored: set[str] = set()  # trials whose code raised (reported as trial_status error)
        # What the leaderboard ranks by: each run's summary keeps its best value and step of it.
        self.metric, self.metric_mode = metric, metric_mode
        self._best: dict[str, tuple[float, int]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A callback pickled by an sdsweep before runs kept their best (resume).
        state.setdefault("metric", None)
        state.setdefault("metric_mode", "max")
        state.setdefault("_best", {})
        self.__dict__.update(state)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into the experiment state (Tuner.restore unpickles them):
        # open runs belong to this process only.
        state = self.__dict__.copy()
        state["_runs"] = {}
        return state

    @property
    def wandb_dir(self) -> Path:
        """Where W&B writes this sweep's run directories."""
        return self.run_dir / "wandb"

    def _open_run(self, trial: Trial) -> Any:
        run = self._runs.get(trial.trial_id)
        if run is not None:
            return run
        if METHOD_KEY not in trial.config:
            raise KeyError(f"trial {trial.trial_id}: config has no {METHOD_KEY!r} key (needed as "
                           f"the W&B job_type); keys: {sorted(trial.config)}")
        run_id = wandb_run_id(self.group, trial.trial_id)
        earlier = _max_step(read_offline_run(p) for p in self._segments(run_id))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self.project, entity=self.entity, group=self.group,
            job_type=str(trial.config[METHOD_KEY]), name=str(trial), id=run_id,
            config=dict(trial.config), tags=list(self.tags), dir=str(self.run_dir),
            mode=self.mode, resume="allow", reinit="create_new", settings=_driver_settings(self.run_dir),
        )
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY)
        known = [s for s in (self._last_step.get(trial.trial_id), earlier,
                             run.starting_step - 1 if run.starting_step else None) if s is not None]
        if known:
            self._last_step[trial.trial_id] = max(known)
        self._runs[trial.trial_id] = run
        self._backfill(trial, run)
        return run

    def _backfill(self, trial: Trial, run: Any) -> None:
        """Log the steps the trial reported (its ``result.json``) that no segment of its W&B run
        holds. An offline segment whose writer was killed with the driver (SIGKILL) loses what it
        had not flushed; on resume the trial continues from its checkpoint, so without this its
        W&B run would have a gap before that step."""
        trial_dir = getattr(trial, "path", None)  # a Trial without storage yet has nothing to backfill
        if not trial_dir:
            return
        for row in trial_rows(Path(str(trial_dir))):
            if STEP_KEY in row and row.get("trial_status") != "error":
                self._log(trial, run, row)

    def _segments(self, run_id: str) -> list[Path]:
        if self.mode != "offline" or not self.wandb_dir.is_dir():
            return []
        return sorted(p.parent for p in self.wandb_dir.glob(f"offline-run-*/run-{run_id}.wandb"))

    def _finish(self, trial: Trial, exit_code: int, preempted: bool = False) -> None:
        run = self._runs.pop(trial.trial_id, None)
        if run is None:
            return
        if preempted:
            run.mark_preempting()  # resumable: Tuner.restore continues this run id
        run.finish(exit_code=exit_code)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._open_run(trial)

    def on_trial_restore(self, iteration: int, trials: list[Trial], trial: Trial,
                         **info: Any) -> None:
        self._open_run(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict[str, Any], **info: Any) -> None:
        run = self._open_run(trial)
        if result.get("trial_status") == "error":  # sweeps/trial.py's errored ending: no metrics
            run.summary["error"] = f"{result.get('error_type')}: {result.get('error')}"
            self._errored.add(trial.trial_id)
            return
        self._log(trial, run, result)

    def _log(self, trial: Trial, run: Any, result: dict[str, Any]) -> None:
        """Log one evaluation's result at its training step, unless that step is logged already."""
        step = _result_step(trial, result)
        last = self._last_step.get(trial.trial_id)
        if last is not None and step <= last:
            logger.info("W&B: trial %s re-reported step %d (last logged %d), not logged again",
                        trial.trial_id, step, last)
            return
        data = _metrics(result)
        if images := _images(trial, result.get(IMAGES_KEY, [])):
            data[IMAGES_KEY] = images
        if result.get(SAMPLES_KEY):
            data[SAMPLES_KEY] = _samples_table(Path(result[SAMPLES_KEY]))
        run.log(data, step=step)
        self._last_step[trial.trial_id] = step
        self._keep_best(trial.trial_id, run, result, step)

    def _keep_best(self, trial_id: str, run: Any, result: dict[str, Any], step: int) -> None:
        """The run's summary holds its best value of the sweep's metric and that step, so the W&B
        runs table and parallel-coordinates panels rank trials as the leaderboard does (a run's
        default summary is its *last* value)."""
        value = result.get(self.metric) if self.metric else None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
            return
        best = self._best.get(trial_id)
        if best is None or (value > best[0] if self.metric_mode == "max" else value < best[0]):
            self._best[trial_id] = (float(value), step)
            run.summary[f"best_{self.metric}"] = float(value)
            run.summary["best_step"] = step

    def _end(self, trial: Trial, status: str) -> None:
        run = self._runs.get(trial.trial_id)
        if run is not None:
            run.summary["trial_status"] = status

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        errored = trial.trial_id in self._errored
        done = (trial.last_result or {}).get("trial_status") == "completed"
        self._end(trial, "error" if errored else "completed" if done else "stopped")  # stopped: by the scheduler
        self._finish(trial, exit_code=1 if errored else 0)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._end(trial, "error")
        self._finish(trial, exit_code=1)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # Trials still open here were interrupted (Ctrl+C / SIGUSR1): Tuner.restore resumes them.
        by_id = {t.trial_id: t for t in trials}
        for trial_id in list(self._runs):
            if trial_id in by_id:
                self._finish(by_id[trial_id], exit_code=0, preempted=True)
            else:
                self._runs.pop(trial_id).finish()


def _result_step(trial: Trial, result: dict[str, Any]) -> int:
    step = result.get(STEP_KEY)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValueError(f"trial {trial.trial_id}: every reported result needs an integer "
                         f"{STEP_KEY!r} (the training step, W&B's x-axis); got {step!r}")
    return int(step)


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    flat = flatten_dict({k: v for k, v in result.items()
                         if k not in _TUNE_KEYS and k != IMAGES_KEY}, delimiter="/")
    return {k: v for k, v in flat.items()
            if isinstance(v, numbers.Number) and not isinstance(v, bool)}


def _images(trial: Trial, paths: Any) -> list[Any]:
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, (list, tuple)):
        raise TypeError(f"trial {trial.trial_id}: result[{IMAGES_KEY!r}] must be a list of image "
                        f"file paths, got {type(paths).__name__}")
    images = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"trial {trial.trial_id}: result[{IMAGES_KEY!r}] names "
                                    f"{path}, which is not a file readable from the driver")
        images.append(wandb.Image(str(path), caption=path.name))
    return images


def _samples_table(scores_file: Path) -> Any:
    """One row per generated image: prompt, seed, the image and its per-image scores."""
    info = json.loads(scores_file.read_text())
    rows = info["rows"]
    metrics = [k for k in rows[0] if k not in ("file", "prompt", "seed")] if rows else []
    table = wandb.Table(columns=["prompt", "seed", "image", *metrics])
    for row in rows:
        image = wandb.Image(str(scores_file.parent / row["file"]), caption=f"{row['prompt']} (seed {row['seed']})")
        table.add_data(row["prompt"], row["seed"], image, *[row[m] for m in metrics])
    return table


def make_callbacks(settings: TrackingSettings, *, run_dir: Path, sweep_name: str,
                   run_id: str, metric: str | None = None, metric_mode: str = "max") -> list[tune.Callback]:
    """The Tune callbacks that track a sweep in W&B (none when tracking is disabled).

    ``run_id`` (unique per sweep run) is the W&B group and the prefix of every run id;
    ``sweep_name`` becomes a tag. Online mode without credentials fails here, before any trial
    starts, instead of letting ``wandb.init`` prompt for a key.
    """
    mode = resolve_mode(settings)
    if mode == "disabled":
        return []
    if mode == "online" and not has_wandb_credentials():
        raise ValueError("tracking.mode is 'online' but no W&B credentials were found: set "
                         "WANDB_API_KEY or run `wandb login`, or use mode 'auto'/'offline'")
    return [WandbTrialCallback(mode=mode, project=settings.project, entity=settings.entity,
                               tags=_tags(settings, sweep_name), run_dir=Path(run_dir), group=run_id, metric=metric, metric_mode=metric_mode)]


def _tags(settings: TrackingSettings, sweep_name: str) -> tuple[str, ...]:
    """``tracking.tags`` plus the sweep's name."""
    return settings.tags if sweep_name in settings.tags else (*settings.tags, sweep_name)


def _driver_settings(run_dir: Path) -> Any:
    """W&B settings of every run the driver opens: the driver's console and system stats are not
    a trial's, so they stay out; ``root_dir`` is the run directory, not ``os.getcwd()`` (under
    `ray job submit` the driver's working directory, the uploaded package, can be gone by then)."""
    return wandb.Settings(console="off", x_disable_stats=True, quiet=True, root_dir=str(run_dir))


SWEEP_JOB_TYPE = "sweep"  # the job_type of the one sweep-level run beside the trials' runs


def log_sweep_run(settings: TrackingSettings, *, run_dir: Path, sweep_name: str, run_id: str) -> str | None:
    """Open (or, after a resume, continue) the sweep-level W&B run of ``run_dir`` and log the
    leaderboard as a table (``leaderboard``: one row per trial, the values ``sdsweep results
    --format json`` gives) and the baseline's images (``baseline``: the base model without any
    adapter, on the evaluation's prompts and seeds); its summary names the pick. Same group as the
    trials' runs, ``job_type`` "sweep". Returns the run id (None with tracking disabled)."""
    from sweeps.board import heldout_column, records
    from sweeps.results import baseline_scores, image_metrics, leaderboard, metric_and_mode, read_confirmation

    mode = resolve_mode(settings)
    if mode == "disabled":
        return None
    rows, state = leaderboard(run_dir)
    metric, metric_mode = metric_and_mode(state)
    board = records(rows, metric, metric_mode, image_metrics(state), baseline_scores(state),
                    heldout_column(read_confirmation(run_dir)))
    flat = [flatten_dict(t, delimiter="/") for t in board["trials"]]
    first = ["rank", "trial_id", "method", "status", metric, "best_step"]
    columns = [c for c in first if any(c in r for r in flat)] + sorted({k for r in flat for k in r} - set(first))
    table = wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in flat])
    wandb_id = wandb_run_id(run_id, "sweep")
    run = wandb.init(project=settings.project, entity=settings.entity, group=run_id, job_type=SWEEP_JOB_TYPE,
                     name=f"{sweep_name} (sweep)", id=wandb_id, config=flatten_dict(state["config"], delimiter="."),
                     tags=list(_tags(settings, sweep_name)), dir=str(run_dir), mode=mode, resume="allow",
                     reinit="create_new", settings=_driver_settings(run_dir))
    data: dict[str, Any] = {"leaderboard": table}
    baseline = state.get("baseline")
    if baseline:
        grid = Path(run_dir) / baseline["dir"] / "grid.png"
        if grid.is_file():
            data["baseline"] = [wandb.Image(str(grid), caption="base model, no adapter")]
        run.summary.update({f"baseline_{k}": v for k, v in baseline["scores"].items()})
    run.log(data)
    best = next((r for r in rows if r.rank == 1), None)
    if best is not None:
        run.summary.update({"best_trial": best.trial_id, "best_method": best.method, "best_step": best.best_step,
                            f"best_{metric}": best.best})
    run.summary["trials"] = len(rows)
    run.finish()
    return wandb_id


def _cell(value: Any) -> Any:
    """A table cell W&B accepts: numbers and strings as they are, anything else as JSON."""
    if value is None or isinstance(value, (bool, numbers.Real, str)):
        return value
    return json.dumps(value, default=str, sort_keys=True)


class _ScalarTBXLogger(TBXLoggerCallback):
    """Tune's TensorBoard logger without the result's image paths.

    Tune's own logger tries to log every list in a result as a histogram and warns, once per sweep
    and with the whole path, that the evaluation's ``images`` list is invalid. The scalars (loss,
    every score) are logged exactly as Tune logs them; the images go to W&B and the HTML report.
    """

    def log_trial_result(self, iteration: int, trial: Trial, result: dict[str, Any]) -> None:
        super().log_trial_result(iteration, trial, {k: v for k, v in result.items() if k != IMAGES_KEY})


def tensorboard_callbacks() -> list[tune.Callback]:
    """Our TensorBoard logger, which replaces Tune's default one (none without tensorboardX)."""
    try:
        return [_ScalarTBXLogger()]
    except ImportError:  # tensorboardX missing: Tune would skip its own logger too
        return []


def offline_run_paths(run_dir: Path) -> list[Path]:
    """The offline W&B run directories under ``<run_dir>/wandb``, sorted by name (= time)."""
    wandb_dir = Path(run_dir) / "wandb"
    return sorted(p.parent for p in wandb_dir.glob("offline-run-*/*.wandb"))


def offline_sync_command(run_dir: Path) -> str | None:
    """The shell command that uploads this sweep's offline runs, or None if there are none.

    ``wandb sync`` skips runs already synced and uploads the segments of a resumed run in
    order of start time.
    """
    if not offline_run_paths(run_dir):
        return None
    return f"wandb sync {shlex.quote(str(Path(run_dir) / 'wandb'))}/offline-run-*"


@dataclass(frozen=True)
class OfflineRun:
    """What one offline run directory (one segment of a W&B run) recorded."""

    path: Path
    run_id: str
    group: str
    job_type: str
    start_time: str
    config: dict[str, Any]
    history: list[dict[str, Any]]  # rows with _step, _runtime, _timestamp and the metrics
    exit_code: int | None  # None: no exit record (still running, or the driver was killed)
    summary: dict[str, Any] = field(default_factory=dict)  # the run's summary as its records left it

    @property
    def steps(self) -> list[int]:
        """The ``_step`` of every history row, in logged order."""
        return [int(row["_step"]) for row in self.history]


def read_offline_run(run_path: Path) -> OfflineRun:
    """Read an offline run directory (or its ``.wandb`` file) with W&B's own reader.

    Runs ``wandb-core leet inspect --json`` (wandb 0.31 ships no Python reader). Nested history
    values appear flattened with ``.`` (e.g. ``images.filenames``). A truncated file (killed
    writer) is read up to its last complete record.
    """
    run_path = Path(run_path)
    files = [run_path] if run_path.suffix == ".wandb" else sorted(run_path.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{run_path}: expected exactly one run-*.wandb file, found "
                                f"{len(files)}")
    cmd = [wandb.util.get_core_path(), "leet", "inspect", "--json", "--no-observability",
           "--run-file", str(files[0]), str(files[0].parent.parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"reading {files[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    fields: dict[str, Any] = {"run_id": "", "group": "", "job_type": "", "start_time": "",
                              "exit_code": None}
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        kind, body = rec.get("type"), rec.get(rec.get("type"), {})
        if kind == "run":
            fields.update(run_id=body.get("run_id", ""), group=body.get("run_group", ""),
                          job_type=body.get("job_type", ""), start_time=body.get("start_time", ""))
            config.update(body.get("config", {}).get("update", {}))
        elif kind == "config":
            config.update(body.get("update", {}))
            for key in body.get("remove", []):
                config.pop(key if isinstance(key, str) else key.get("key", ""), None)
        elif kind == "history":
            history.append(body.get("item", {}))
        elif kind == "summary":
            summary.update(body.get("update", {}))
            for key in body.get("remove", []):
                summary.pop(key if isinstance(key, str) else key.get("key", ""), None)
        elif kind == "exit":
            fields["exit_code"] = int(body.get("exit_code", 0))
    config.pop("_wandb", None)
    return OfflineRun(path=files[0].parent, config=config, history=history, summary=summary, **fields)


def _max_step(runs: Any) -> int | None:
    steps = [s for run in runs for s in run.steps]
    return max(steps) if steps else None
