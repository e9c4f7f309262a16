"""W&B tracking of a sweep: real Ray Tune trials, real W&B offline runs read back from disk."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest
import ray
import ray.cloudpickle
import wandb
from PIL import Image
from ray import tune

from sweeps.tracking import (
    OfflineRun,
    TrackingSettings,
    WandbTrialCallback,
    make_callbacks,
    offline_run_paths,
    offline_sync_command,
    read_offline_run,
    resolve_mode,
    tensorboard_callbacks,
    wandb_run_id,
)

SWEEP_RUN_ID = "demo-20260101-000000"
# Trial workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
FAKE_KEY = "a" * 40  # W&B's format check wants 40+ word characters; never sent anywhere


def _isolate_wandb(mp: pytest.MonkeyPatch, root: Path) -> None:
    """No credentials, no ~/.config/wandb, no netrc, no network: W&B sees only `root`."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL",
                "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP"):
        mp.delenv(var, raising=False)
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    mp.setenv("HOME", str(home))
    mp.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    mp.setenv("WANDB_CACHE_DIR", str(home / "wandb-cache"))
    mp.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))
    mp.setenv("NETRC", str(home / "netrc"))  # absent file: no stored key
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("OMP_NUM_THREADS", "1")
    wandb.teardown()  # W&B caches env-derived settings in a per-process singleton


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ray_local: Any) -> Iterator[Path]:
    """Isolated W&B env on the session's shared Ray runtime (Ray start-up is the slow part)."""
    root = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, root)
        mp.chdir(root)  # W&B must write under run_dir, never the CWD: checked below
        try:
            yield root
        finally:
            wandb.teardown()


@pytest.fixture
def clean_wandb(tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, tmp_path)
        yield mp
    wandb.teardown()


# ---------------------------------------------------------------- mode decision


def test_auto_mode_is_offline_without_any_credentials(clean_wandb: pytest.MonkeyPatch) -> None:
    assert resolve_mode(TrackingSettings()) == "offline"


def test_auto_mode_is_online_with_an_api_key(clean_wandb: pytest.MonkeyPatch) -> None:
    clean_wandb.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_mode(TrackingSettings()) == "online"


def test_auto_mode_is_online_with_a_key_stored_in_netrc(clean_wandb: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    clean_wandb.setenv("WANDB_BASE_URL", "https://api.example.test")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.example.test\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    clean_wandb.setenv("NETRC", str(netrc))
    assert resolve_mode(TrackingSettings()) == "online"


def test_auto_mode_follows_wandb_mode_env(clean_wandb: pytest.MonkeyPatch) -> None:
    clean_wandb.setenv("WANDB_API_KEY", FAKE_KEY)
    clean_wandb.setenv("WANDB_MODE", "offline")
    assert resolve_mode(TrackingSettings()) == "offline"
    clean_wandb.setenv("WANDB_MODE", "nonsense")
    with pytest.raises(ValueError, match="WANDB_MODE='nonsense'"):
        resolve_mode(TrackingSettings())


@pytest.mark.parametrize("settings, expected", [
    (TrackingSettings(mode="offline"), "offline"),
    (TrackingSettings(mode="disabled"), "disabled"),
    (TrackingSettings(wandb=False), "disabled"),
    (TrackingSettings(wandb=False, mode="online"), "disabled"),
])
def test_explicit_settings_override_the_key(clean_wandb: pytest.MonkeyPatch,
                                            settings: TrackingSettings, expected: str) -> None:
    clean_wandb.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_mode(settings) == expected


def test_explicit_online_is_used_without_checking_for_a_key(
        clean_wandb: pytest.MonkeyPatch) -> None:
    assert resolve_mode(TrackingSettings(mode="online")) == "online"


def test_online_without_credentials_fails_before_any_trial(clean_wandb: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no W&B credentials"):
        make_callbacks(TrackingSettings(mode="online"), run_dir=tmp_path, sweep_name="s",
                       run_id="r")


def test_settings_are_frozen_and_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match="projekt"):
        TrackingSettings(projekt="x")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="frozen"):
        TrackingSettings().mode = "online"  # type: ignore[misc]


def test_disabled_tracking_makes_no_callbacks_and_no_sync_command(tmp_path: Path) -> None:
    assert make_callbacks(TrackingSettings(mode="disabled"), run_dir=tmp_path, sweep_name="s",
                          run_id="r") == []
    assert offline_sync_command(tmp_path) is None


def test_run_ids_are_deterministic_and_valid_for_wandb() -> None:
    assert wandb_run_id("demo-1", "a1b2c_00001") == "demo-1-a1b2c_00001"
    assert wandb_run_id("my sweep/2:x", "t1") == "my-sweep-2-x-t1"
    long_a, long_b = wandb_run_id("s" * 80, "t_00001"), wandb_run_id("s" * 80, "t_00002")
    assert len(long_a) <= 64 and long_a != long_b
    assert long_a == wandb_run_id("s" * 80, "t_00001")


# ---------------------------------------------------------------- a real sweep


def _trainable(config: dict[str, Any], image: str = "") -> None:
    """Reports steps 1..last_step (``image`` at the last); checkpoints at even steps; resumes."""
    start = 0
    if (ckpt := tune.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "state.json").read_text())["step"]
    lr = config["train.learning_rate"]
    for step in range(start + 1, config["last_step"] + 1):
        metrics: dict[str, Any] = {"step": step, "train_loss": lr * 1000 / step,
                                   "val_loss": lr * 2000 / step}
        if step == config["last_step"] and image:
            metrics["images"] = [image]
        if step % 2 == 0:
            ckpt_dir = Path(tune.get_context().get_trial_dir()) / f"ckpt-{step}"
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            (ckpt_dir / "state.json").write_text(json.dumps({"step": step}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
        else:
            tune.report(metrics)


def _run_sweep(run_dir: Path, param_space: dict[str, Any], *, image: str = "",
               extra: tuple[tune.Callback, ...] = ()) -> tune.ResultGrid:
    callbacks = make_callbacks(TrackingSettings(mode="offline", tags=("test",)), run_dir=run_dir,
                               sweep_name="demo", run_id=SWEEP_RUN_ID)
    trainable = tune.with_parameters(_trainable, image=image) if image else _trainable
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        run_config=tune.RunConfig(name="tune", storage_path=str(run_dir), verbose=0,
                                  callbacks=[*callbacks, *extra]),
    )
    return tuner.fit()


def _runs(run_dir: Path) -> list[OfflineRun]:
    return [read_offline_run(p) for p in offline_run_paths(run_dir)]


@pytest.fixture(scope="module")
def sweep(env: Path) -> Path:
    """Two LoRA trials, 3 steps each, offline W&B; each logs a sample image at step 3."""
    run_dir = env / "sweep-run"
    image = env / "sample.png"
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(image)
    grid = _run_sweep(run_dir, {"method": "lora", "last_step": 3,
                                "train.learning_rate": tune.grid_search([1e-4, 3e-4])},
                      image=str(image))
    assert not grid.errors
    return run_dir


def test_each_trial_is_one_run_in_the_sweep_group(sweep: Path) -> None:
    runs = _runs(sweep)
    assert len(runs) == 2
    assert {r.group for r in runs} == {SWEEP_RUN_ID}
    assert {r.job_type for r in runs} == {"lora"}
    assert all(r.run_id.startswith(f"{SWEEP_RUN_ID}-") for r in runs)
    assert len({r.run_id for r in runs}) == 2
    assert all(r.exit_code == 0 for r in runs)


def test_run_config_holds_the_trial_hyperparameters(sweep: Path) -> None:
    configs = [r.config for r in _runs(sweep)]
    assert sorted(c["train.learning_rate"] for c in configs) == [1e-4, 3e-4]
    assert all(c["method"] == "lora" and c["last_step"] == 3 for c in configs)


def test_metrics_are_logged_at_the_trial_steps(sweep: Path) -> None:
    for run in _runs(sweep):
        assert run.steps == [1, 2, 3]
        lr = run.config["train.learning_rate"]
        for row in run.history:
            assert row["step"] == row["_step"]
            assert row["train_loss"] == pytest.approx(lr * 1000 / row["_step"])
            assert row["val_loss"] == pytest.approx(lr * 2000 / row["_step"])
            assert "trial_id" not in row and "done" not in row  # Tune bookkeeping stays out


def test_sample_images_are_logged_as_wandb_images(sweep: Path) -> None:
    for run in _runs(sweep):
        rows = [row for row in run.history if "images.filenames" in row]
        assert [row["_step"] for row in rows] == [3]
        assert rows[0]["images._type"] == "images/separated"
        (name,) = rows[0]["images.filenames"]
        media = run.path / "files" / name
        assert media.is_file() and Image.open(media).size == (8, 8)


def test_wandb_files_live_under_the_run_dir_only(sweep: Path, env: Path) -> None:
    assert (sweep / "wandb").is_dir()
    assert not (env / "wandb").exists()  # the CWD during the sweep
    assert not (env / "home" / ".config" / "wandb").exists()


def test_sync_command_names_the_offline_run_dirs(sweep: Path) -> None:
    cmd = offline_sync_command(sweep)
    assert cmd == f"wandb sync {sweep / 'wandb'}/offline-run-*"
    assert len(list((sweep / "wandb").glob("offline-run-*"))) == 2


# ---------------------------------------------------------------- resume


class _InterruptOnce(tune.Callback):
    """Interrupts the driver (as Ctrl+C would) at a step, once: the marker survives restore."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if result["step"] == self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's graceful stop signal


def test_a_restored_trial_continues_the_same_run_with_increasing_steps(env: Path) -> None:
    run_dir = env / "resume-run"
    space = {"method": "lora", "last_step": 6, "train.learning_rate": 1e-4}
    _run_sweep(run_dir, space, extra=(_InterruptOnce(3, env / "interrupted"),))
    (first,) = _runs(run_dir)
    assert first.steps == [1, 2, 3]  # interrupted after step 3; last checkpoint at step 2

    grid = tune.Tuner.restore(str(run_dir / "tune"), _trainable).fit()
    assert not grid.errors
    # The restored trial resumed from the step-2 checkpoint and reported step 3 again ...
    reported = grid[0].metrics_dataframe
    assert reported is not None and list(reported["step"]) == [1, 2, 3, 3, 4, 5, 6]

    segments = sorted(_runs(run_dir), key=lambda r: r.start_time)
    assert len(segments) == 2  # offline: one directory per wandb.init, same run id
    assert {s.run_id for s in segments} == {first.run_id}
    assert {s.group for s in segments} == {SWEEP_RUN_ID}
    # ... which was not logged twice: across the segments the steps strictly increase.
    steps = [step for s in segments for step in s.steps]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert segments[1].exit_code == 0


def test_bad_results_fail_loudly_naming_the_trial(env: Path, tmp_path: Path) -> None:
    cb = WandbTrialCallback(mode="offline", project="p", entity=None, tags=(), run_dir=tmp_path,
                            group="g")
    no_method: Any = SimpleNamespace(trial_id="t0", config={"lr": 1.0})
    with pytest.raises(KeyError, match="trial t0: config has no 'method'"):
        cb.on_trial_start(0, [], no_method)
    trial: Any = SimpleNamespace(trial_id="t1", config={"method": "lora"})
    try:
        with pytest.raises(ValueError, match="trial t1: .* integer 'step'"):
            cb.on_trial_result(0, [], trial, {"train_loss": 1.0})
        with pytest.raises(TypeError, match="trial t1: .*list of image file paths"):
            cb.on_trial_result(0, [], trial, {"step": 1, "images": str(tmp_path / "a.png")})
        with pytest.raises(FileNotFoundError, match="missing.png"):
            cb.on_trial_result(0, [], trial, {"step": 1, "images": [str(tmp_path / "missing.png")]})
    finally:
        cb.on_experiment_end([trial])
    (run,) = _runs(tmp_path)
    assert run.history == [] and run.exit_code == 0


def test_callback_survives_pickling_without_open_runs(tmp_path: Path) -> None:
    import pickle

    cb = WandbTrialCallback(mode="offline", project="p", entity=None, tags=(), run_dir=tmp_path,
                            group="g")
    cb._runs["t"] = object()  # stands in for an open wandb Run, which cannot be pickled
    clone = pickle.loads(pickle.dumps(cb))
    assert clone._runs == {} and clone.run_dir == tmp_path and clone.group == "g"


def test_an_evaluation_becomes_a_per_prompt_table_with_its_images(tmp_path: Path) -> None:
    from sweeps.tracking import _samples_table

    rows = []
    for i, (prompt, seed) in enumerate([("a photo of sks toy", 0), ("sks toy on a beach", 0)]):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
        rows.append({"file": f"{i:02d}.png", "prompt": prompt, "seed": seed, "clip_t": 20.0 + i, "clip_i": 0.5})
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"scores": {"clip_t": 20.5}, "rows": rows}))
    table = _samples_table(scores)
    assert table.columns == ["prompt", "seed", "image", "clip_t", "clip_i"]
    assert [r[:2] + r[3:] for r in table.data] == [["a photo of sks toy", 0, 20.0, 0.5], ["sks toy on a beach", 0, 21.0, 0.5]]
    images = [r[2] for r in table.data]
    assert all(isinstance(im, wandb.Image) for im in images)
    assert [np.asarray(im.image).max() for im in images] == [0, 40]  # each row holds its own file


class _TbxTrial:
    """What Tune's TensorBoard logger reads of a trial: a folder and the sampled parameters."""

    def __init__(self, path: Path) -> None:
        self.local_path = str(path)
        self.evaluated_params = {"lr": 1e-3}

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def _tbx_scalars(folder: Path) -> dict[str, list[float]]:
    """Scalars from TensorBoard event files, read as TFRecords (no tensorboard package here)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[float]] = {}
    for f in folder.glob("events.out.tfevents.*"):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append(v.simple_value)
    return out


def test_tensorboard_logs_the_scores_without_warning_about_image_paths(
        tmp_path: Path) -> None:
    import logging

    from ray.tune.logger import TBXLoggerCallback
    from ray.util.debug import reset_log_once

    (ours,) = tensorboard_callbacks()
    assert isinstance(ours, TBXLoggerCallback)  # so Tune adds no default one beside it
    image = tmp_path / "grid.png"
    Image.new("RGB", (4, 4)).save(image)
    result = {"training_iteration": 1, "step": 10, "composite": 0.25, "images": [str(image)]}
    for name, cb in (("ours", ours), ("tune", TBXLoggerCallback())):
        reset_log_once("invalid_tbx_value")  # Tune warns once per process
        seen: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
        tbx_log = logging.getLogger("ray.tune.logger.tensorboardx")  # Ray's loggers do not propagate
        tbx_log.addHandler(handler)
        try:
            trial: Any = _TbxTrial(tmp_path / name)
            cb.log_trial_result(1, trial, dict(result))
            cb.log_trial_end(trial)
        finally:
            tbx_log.removeHandler(handler)
        assert any("invalid value" in m for m in seen) == (name == "tune"), (name, seen)
        scalars = _tbx_scalars(tmp_path / name)
        assert scalars["ray/tune/composite"] == [0.25] and scalars["ray/tune/step"] == [10.0], scalars
