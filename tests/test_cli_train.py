"""`sdsweep train`: config validation up front, a real run, resume, and clean failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeps.cli import main
from trainers.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sweeps" / "configs" / "train-demo.yaml"


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _base(tmp_path: Path, **over) -> dict:
    cfg = {"model": "builtin:tiny-sd", "data": {"path": "builtin:demo", "resolution": 64},
           "train": {"max_train_steps": 4, "train_batch_size": 2}, "output_dir": str(tmp_path / "out")}
    cfg.update(over)
    return cfg


def test_the_demo_config_validates():
    cfg = load_config(DEMO, RunConfig)
    assert cfg.method == "lora" and cfg.model.source == "builtin:tiny-sd"


@pytest.mark.parametrize("mutate, key, words", [
    (lambda c: c["train"].update(learning_rat=1e-4), "train.learning_rat", "unknown key"),
    (lambda c: c.update(optimiser="adam"), "optimiser", "unknown key"),
    (lambda c: c["train"].update(learning_rate=-1), "train.learning_rate", "greater than 0"),
    (lambda c: c["data"].update(resolution=60), "data", "multiple of 8"),
    (lambda c: c.update(lora={"rank": 0}), "lora.rank", "greater than 0"),
    (lambda c: c["train"].update(lr_warmup_steps=10), "lr_warmup_steps", "max_train_steps"),
    (lambda c: c.update(method="hypernetwork"), "method", "lora"),
    (lambda c: c.pop("model"), "model", "missing"),
])
def test_bad_config_is_rejected_naming_the_file_and_key(tmp_path, capsys, mutate, key, words):
    cfg = _base(tmp_path)
    mutate(cfg)
    path = _write(tmp_path, cfg)
    assert main(["train", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and key in err and words in err
    assert not (tmp_path / "out").exists(), "something was trained or written despite a bad config"


def test_yaml_syntax_error_names_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(p, RunConfig)


def test_bad_dataset_exits_non_zero_and_trains_nothing(tmp_path, capsys):
    data = tmp_path / "imgs"
    data.mkdir()
    (data / "a.png").write_bytes(b"not an image")
    (data / "b.jpg").write_bytes(b"")
    path = _write(tmp_path, _base(tmp_path, data={"path": str(data), "resolution": 64,
                                                  "caption_source": "instance", "instance_prompt": "sks"}))
    assert main(["train", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "b.jpg" in err
    assert not (tmp_path / "out").exists()


def test_train_runs_checkpoints_and_resumes_from_latest(tmp_path, capsys):
    path = _write(tmp_path, _base(tmp_path))
    assert main(["train", str(path), "-q", "--set", "train.checkpointing_steps=2"]) == 0
    out = tmp_path / "out"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    run = json.loads((out / "run.json").read_text())
    assert run["final_step"] == 4 and run["resumed_from"] is None
    assert main(["train", str(path), "-q", "--resume", "latest", "--set", "train.max_train_steps=6",
                 "--set", "train.checkpointing_steps=2"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["final_step"] == 6 and run["resumed_from"].endswith("checkpoint-4")
    assert run["cache"]["images_encoded"] == 0, "the resumed run re-encoded the dataset"


def test_resume_latest_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    path = _write(tmp_path, _base(tmp_path))
    assert main(["train", str(path), "-q", "--resume", "latest"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_console_script_runs_with_a_progress_bar(tmp_path):
    path = _write(tmp_path, _base(tmp_path, train={"max_train_steps": 3, "train_batch_size": 1}))
    env = {**os.environ, "SDSWEEP_CACHE": os.environ["SDSWEEP_CACHE"]}
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "train", str(path)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "3/3" in proc.stderr and "loss=" in proc.stderr  # tqdm writes to stderr
    assert "done: step 3" in proc.stdout


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize("item", ["train.max_train_steps", "=5"])
def test_set_without_key_and_value_is_an_error_naming_it(tmp_path, capsys, command, item):
    # `sdsweep run --set train.max_train_steps` used to set the key to null without a word.
    config = DEMO if command == "train" else REPO / "sweeps" / "configs" / "tiny-demo.yaml"
    assert main([command, str(config), "--set", item]) == 2
    err = capsys.readouterr().err
    assert f"--set {item!r}: expected KEY=VALUE" in err


def test_progress_bar_starts_only_after_preflight_and_loading(tmp_path, monkeypatch, capsys):
    import tqdm

    import trainers.run as run

    events: list[str] = []

    class Bar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            events.append("bar")
            super().__init__(*args, **kwargs)

    def after(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            events.append(name)
            return out
        return wrapped

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr(run, "load_model", after("model loaded", run.load_model))
    monkeypatch.setattr(run, "prepare_data", after("preflight and cache done", run.prepare_data))
    path = _write(tmp_path, _base(tmp_path, train={"max_train_steps": 2, "train_batch_size": 1}))
    assert main(["train", str(path)]) == 0
    assert events == ["model loaded", "preflight and cache done", "bar"]
    assert "2/2" in capsys.readouterr().err

    # A dataset that fails preflight prints its error with no bar above it.
    data = tmp_path / "imgs"
    data.mkdir()
    (data / "a.png").write_bytes(b"not an image")
    bad = _write(tmp_path, _base(tmp_path, data={"path": str(data), "resolution": 64,
                                                 "caption_source": "instance", "instance_prompt": "sks"}))
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "train lora" not in err and "0/4" not in err
