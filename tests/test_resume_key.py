"""`sdsweep resume` refuses a changed dataset or model before encoding or scoring anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainers.data import DataConfig, preflight
from trainers.latents import build_latent_cache, dataset_key

REPO = Path(__file__).resolve().parents[1]


def test_the_key_computed_without_encoding_is_the_built_caches_key(tiny_model, demo_dir, tmp_path,
                                                                  encode_counter) -> None:
    cfg = DataConfig(path=str(demo_dir), resolution=64, random_flip=True)
    records = preflight(cfg)
    counter = encode_counter(tiny_model.vae)
    keys = {flag: dataset_key(records, cfg, tiny_model, cache_text=flag) for flag in (True, False)}
    assert counter.calls == 0
    for flag, key in keys.items():
        assert build_latent_cache(records, cfg, tiny_model, root=tmp_path, cache_text=flag).key == key
    assert keys[True] != keys[False]


def test_resume_with_a_changed_dataset_is_refused_before_any_encode(ray_local, tmp_path, demo_dir,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeps.config import load_sweep
    from sweeps.driver import resume_sweep, write_sweep_state
    from sweeps.results import SWEEP_STATE, SweepError

    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # resume sets it; undo afterwards
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    cfg = load_sweep(REPO / "sweeps" / "configs" / "tiny-demo.yaml")
    base = cfg.base.model_copy(update={"cache_dir": str(tmp_path / "cache"),
                                       "data": cfg.base.data.model_copy(update={"path": str(data)})})
    cfg = cfg.model_copy(update={"base": base})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    # The sweep started on other data (its key differs) and never scored its baseline.
    write_sweep_state(run_dir, {"run_id": "run", "config": cfg.model_dump(mode="json"), "cache_key": "0" * 64,
                                "base_model_identity": "x", "cache_builds": []})
    before = (run_dir / SWEEP_STATE).read_text()
    with pytest.raises(SweepError, match=r"run: the dataset or base model changed.*start a new sweep"):
        resume_sweep(run_dir)
    assert not list((tmp_path / "cache").rglob("*.safetensors")), "the dataset was encoded before the refusal"
    assert not (run_dir / "baseline").exists(), "the baseline was scored before the refusal"
    assert (run_dir / SWEEP_STATE).read_text() == before
    assert json.loads(before)["cache_builds"] == []


def test_resume_names_what_changed_among_the_data_configurations(tmp_path) -> None:
    from sweeps.driver import _refuse_changed_data
    from sweeps.results import SweepError

    recorded = {"a": ["k1", None], "b": ["k2", None]}
    with pytest.raises(SweepError, match="data configurations the search space produces changed"):
        _refuse_changed_data(tmp_path, recorded, {"a": ["k1", None]})
    with pytest.raises(SweepError, match=r"dataset or base model changed .*cache key k3"):
        _refuse_changed_data(tmp_path, recorded, {"a": ["k1", None], "b": ["k3", None]})
    with pytest.raises(SweepError, match="validation images .* changed"):
        _refuse_changed_data(tmp_path, recorded, {"a": ["k1", None], "b": ["k2", "v"]})
    _refuse_changed_data(tmp_path, recorded, {"a": ["k1", None], "b": ["k2", None]})  # nothing changed
    # A sweep from before data variants recorded its base data's keys only.
    with pytest.raises(SweepError, match=r"started before searched data.\* keys took effect .* 2 data configurations"):
        _refuse_changed_data(tmp_path, {"a": ["k1", None]}, recorded, recorded=False)
