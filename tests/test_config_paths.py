"""Every path in a sweep file is made absolute at load, by one rule (trainers/paths.py): Ray runs
trials and the sweep's tasks in working directories of their own, where a relative path would
point elsewhere."""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path

import pydantic
import yaml

from sweeps.config import SweepConfig, load_sweep
from trainers.paths import path_kind

# Field names that hold a file, folder, model or Hub id; any such field must be marked.
_PATHLIKE = re.compile(r"(path|dir|source|single_file_config|references|checker|^clip$|vision_model)$")
# An Optuna storage URL (made absolute by its own rule) and a choice of caption source.
_NOT_PATHS = {("SearchSettings", "storage"), ("DataConfig", "caption_source")}


def _models(cls: type, seen: set[type]) -> None:
    if cls in seen:
        return
    seen.add(cls)
    for f in cls.model_fields.values():
        for arg in [f.annotation, *typing.get_args(f.annotation)]:
            for inner in [arg, *typing.get_args(arg)]:
                if isinstance(inner, type) and issubclass(inner, pydantic.BaseModel):
                    _models(inner, seen)


def test_every_path_like_field_of_a_sweep_file_is_marked_as_a_path():
    from trainers.config import DreamBoothSettings, LoraSettings, TextualInversionSettings

    seen: set[type] = set()
    for cls in (SweepConfig, LoraSettings, TextualInversionSettings, DreamBoothSettings):
        _models(cls, seen)
    unmarked = [f"{cls.__name__}.{name}" for cls in seen for name, f in cls.model_fields.items()
                if _PATHLIKE.search(name) and (cls.__name__, name) not in _NOT_PATHS and path_kind(f) is None]
    assert not unmarked, f"path-like fields without LOCAL_PATH / MAYBE_PATH: {unmarked}"
    assert len(seen) > 10  # the walk reached the nested sections


def test_relative_paths_everywhere_in_a_sweep_become_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("imgs", "val", "classes", "refs", "cache"):
        (tmp_path / d).mkdir()
    sweep = {
        "name": "paths",
        "base": {"model": "builtin:tiny-sd", "method": "lora",
                 "data": {"path": "imgs", "validation_path": "val", "resolution": 64},
                 "cache_dir": "cache",
                 "dreambooth": {"prior_loss_weight": 1.0, "class_data_path": "classes", "num_class_images": 4}},
        "search": {"spaces": ["lora", "dreambooth"]},
        "evaluation": {"images": {"generation": {"prompts": ["a {token}"], "token": "sks"}, "references": "refs",
                                  "clip": "builtin:tiny-clip", "metrics": ["clip_t", "clip_i"]}},
        "storage_path": "out",
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    cfg = load_sweep("sweep.yaml")
    expect = {name: os.path.abspath(name) for name in ("imgs", "val", "classes", "refs", "cache", "out")}
    assert cfg.base.data.path == expect["imgs"] and cfg.base.data.validation_path == expect["val"]
    assert cfg.base.cache_dir == expect["cache"] and cfg.storage_path == expect["out"]
    assert cfg.evaluation.images.references == expect["refs"]
    assert cfg.method_sections["dreambooth"]["class_data_path"] == expect["classes"]
    assert cfg.method_sections["dreambooth"]["num_class_images"] == 4  # other keys untouched
    # Names that are not local paths stay as they are: built-ins, and a Hub id with no such folder.
    assert cfg.base.model.source == "builtin:tiny-sd" and cfg.evaluation.images.clip == "builtin:tiny-clip"
    # A trial's run config (built in a Ray worker, whose working directory is another) keeps them.
    from sweeps.config import trial_run_config

    monkeypatch.chdir(Path("/"))
    run = trial_run_config(cfg, {"method": "dreambooth"})
    assert run.settings.class_data_path == expect["classes"] and run.data.path == expect["imgs"]


def test_a_home_relative_path_is_expanded_once_at_load():
    from trainers.paths import absolute_path

    assert absolute_path("~/photos", Path("/elsewhere")) == os.path.expanduser("~/photos")
    assert absolute_path("builtin:demo", Path("/elsewhere")) == "builtin:demo"
