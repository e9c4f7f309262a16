"""A method's own refusals of a sweep come before anything starts: textual inversion's placeholder
and captions fail ``sdsweep run`` before Ray, the run directory, the cache build or the baseline
(``Trainer.check_run``, called by ``sweeps.preflight``), and ``sdsweep init`` writes nothing it
would refuse.

The sweeps run through the real ``run_sweep`` (and ``sdsweep init`` through the real command line,
in-process); ``ensure_ray`` and ``build_cache`` are replaced by tripwires that fail the test if the
sweep gets that far, so a regression fails at once instead of after a Ray start and a cache build.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from sweeps.config import load_sweep
from trainers.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO_TI = REPO / "sweeps" / "configs" / "demo-ti.yaml"


def _ti_sweep(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(DEMO_TI.read_text())
    raw["storage_path"] = str(tmp_path / "runs")
    mutate(raw)
    path = tmp_path / "ti.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _placeholder(value: str):
    return lambda raw: raw["base"].update(textual_inversion={"placeholder_token": value})


def _searched_vectors(high: int):
    def mutate(raw: dict) -> None:
        raw["search"]["spaces"][0]["params"]["textual_inversion.vectors_per_token"]["high"] = high
    return mutate


@pytest.fixture
def tripwires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the sweep starts Ray or the cache task; keep the environment `_prepare` sets."""
    import sweeps.driver as driver
    from sweeps.console import QUIET_TRIAL_ERRORS

    for key in ("TUNE_DISABLE_STRICT_METRIC_CHECKING", "RAY_AIR_NEW_OUTPUT", *QUIET_TRIAL_ERRORS):
        monkeypatch.delenv(key, raising=False)  # restored afterwards

    def started(*_: object, **__: object) -> None:
        raise AssertionError("the sweep went on to start Ray / build the cache")

    monkeypatch.setattr(driver, "ensure_ray", started)
    monkeypatch.setattr(driver, "build_cache", started)


@pytest.mark.parametrize("mutate, words", [
    # "s" is a token of the toy world's byte-level vocabulary.
    (_placeholder("s"), ["textual_inversion.placeholder_token 's'", "already a token", "'<my-concept>'"]),
    (_placeholder("<zorp>"), ["textual_inversion.placeholder_token '<zorp>'", "appears in none of the training "
                              "captions", "put it in the captions"]),
    # Base and default say 1 vector; the space reaches 60, which no caption fits (checked at its largest).
    (_searched_vectors(60), ["textual_inversion.vectors_per_token=60", "more than the text encoder's 77",
                             "lower textual_inversion.vectors_per_token"]),
], ids=["placeholder-in-vocabulary", "captions-lack-placeholder", "searched-vectors-too-many"])
def test_a_textual_inversion_problem_fails_run_before_anything_starts(tmp_path, tripwires, mutate, words) -> None:
    from sweeps.driver import run_sweep

    cfg = load_sweep(_ti_sweep(tmp_path, mutate))  # the file itself is valid
    run_dir = tmp_path / "runs" / "the-run"
    with pytest.raises(ConfigError) as err:
        run_sweep(cfg, run_dir=run_dir)
    msg = str(err.value)
    for w in words:
        assert w in msg, (w, msg)
    assert not run_dir.exists() and not (tmp_path / "runs").exists(), "the sweep wrote a run directory"


def test_a_good_sweep_passes_the_checks_loading_only_the_tokenizer(tmp_path, monkeypatch) -> None:
    import trainers.models as models
    from sweeps.preflight import preflight_sweep

    def no_weights(*_: object, **__: object) -> None:
        raise AssertionError("the preflight loaded the base model's weights")

    monkeypatch.setattr(models, "load_base_model", no_weights)
    preflight_sweep(load_sweep(DEMO_TI))  # placeholder "sks shape", vectors up to 8: all fit


# ----- sdsweep init: checked before it writes -------------------------------------------------


def _photos(folder: Path, caption: str | None) -> Path:
    folder.mkdir(parents=True)
    for i in range(4):
        im = Image.new("RGB", (80 + 8 * i, 72), (40 * i, 120, 200))
        ImageDraw.Draw(im).ellipse((10 + i, 10, 60 + i, 60), fill=(250, 200, 0))
        im.save(folder / f"ball_{i}.png")
        if caption is not None:
            (folder / f"ball_{i}.txt").write_text(caption + "\n")
    return folder


def _init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
          ) -> tuple[int, str]:
    from sweeps.cli import main
    from sweeps.constants import QUIET_ENV

    monkeypatch.chdir(tmp_path)
    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)  # main() sets quiet defaults; restored afterwards
    code = main(["init", "--model", "builtin:tiny-sd", "--out", "sweep.yaml", *args])
    return code, capsys.readouterr().err


def test_init_writes_nothing_it_would_refuse(tmp_path, monkeypatch, capsys) -> None:
    data = _photos(tmp_path / "photos", caption="a photo of a yellow ball")
    for args, words in [
        # The folder's captions never name the textual-inversion placeholder (init's default "<sks>").
        (["--method", "textual_inversion"], ["textual_inversion.placeholder_token '<sks>'",
                                             "appears in none of the training captions"]),
        # A value the sweep file refuses when loaded.
        (["--trials", "-1"], ["sweep.yaml", "search.num_samples"]),
    ]:
        code, err = _init(tmp_path, monkeypatch, capsys, "--data", str(data), *args)
        assert code == 2, err
        for w in words:
            assert w in err, (w, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"], "init wrote a file it refused"
    # Captions that name the token: the file is written, and loads as written.
    good = _photos(tmp_path / "named", caption="a photo of <sks> ball")
    code, err = _init(tmp_path, monkeypatch, capsys, "--data", str(good), "--method", "textual_inversion")
    assert code == 0, err
    assert load_sweep(tmp_path / "sweep.yaml").base.settings.placeholder_token == "<sks>"
