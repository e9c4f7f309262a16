"""The static HTML report (``sdsweep report``), built from a real tiny sweep.

One real sweep (3 trials of the demo, image evaluation on, two objectives) runs once for the
module through the CLI in a subprocess, so Ray never starts in the pytest process. The report is
rendered by headless Debian Chromium from ``file://`` after being moved away from where it was
written: what a user gets when they zip the folder and open it elsewhere. The sweep-driven tests
are ``slow`` (they start Ray in a subprocess, like tests/test_sweep_e2e.py) and still run in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

import pytest
import run_files
from PIL import Image, ImageStat

from sweeps.charts import line_chart, nice_ticks
from sweeps.report import write_report

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "sweeps" / "configs" / "tiny-demo.yaml"
INSTALL_HINT = ("headless Chromium is needed to test the HTML report and was not found; install it with "
                "`bash tests/install_chromium.sh` (Debian: `apt-get install -y --no-install-recommends chromium`)")
Board = tuple[list[Any], dict[str, Any]]  # leaderboard(): (rows, state)
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# --- a small HTML tree, stdlib only ------------------------------------------------------------

@dataclass
class Node:
    """One parsed element: enough structure to query tables, figures and charts."""

    tag: str
    attrs: dict[str, str]
    children: list[Any] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self, tag: str | None = None, cls: str | None = None) -> Iterator["Node"]:
        for c in self.children:
            if isinstance(c, Node):
                if (tag is None or c.tag == tag) and (cls is None or cls in c.attrs.get("class", "").split()):
                    yield c
                yield from c.iter(tag, cls)

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> "Node":
        hits = [n for n in self.iter(tag, cls) if all(n.attrs.get(k) == v for k, v in attrs.items())]
        assert len(hits) == 1, f"expected one <{tag} class={cls} {attrs}>, found {len(hits)}"
        return hits[0]


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(page: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(page)
    return builder.root


def table_rows(doc: Node, table_id: str) -> list[tuple[dict[str, str], list[str]]]:
    """(attributes, cell texts) of each body row of the table with ``id``."""
    body = doc.find("table", id=table_id).find("tbody")
    return [(tr.attrs, [td.text().strip() for td in tr.iter("td")]) for tr in body.iter("tr")]


def table_head(doc: Node, table_id: str) -> list[str]:
    return [th.text().strip() for th in doc.find("table", id=table_id).iter("th")]


# --- the real sweep and its report -------------------------------------------------------------

def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WANDB_API_KEY", None)
    # One torch thread per trial: another process may be using the other core (docs/DEVELOPING.md).
    env.update(OMP_NUM_THREADS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", PYTHONUNBUFFERED="1",
               SDSWEEP_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    return env


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory,
              sdsweep_cache: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A finished 3-trial demo sweep with image evaluation and two objectives: (run dir, the CLI
    process with both streams)."""
    run_dir = tmp_path_factory.mktemp("report-sweep") / "run"
    cmd = [sys.executable, "-m", "sweeps.cli", "run", str(DEMO), "--run-dir", str(run_dir),
           "--set", "search.num_samples=3", "--set", "base.train.max_train_steps=40",
           "--set", "evaluation.objectives=[clip_t, clip_i]", "--set", "tracking.wandb=false",
           # 4 report seeds, not the demo's 16: what is checked here does not depend on how many
           # (a third of the confirmation's images; ~1 min of the suite's CPU)
           "--set", "evaluation.confirm.seeds=[1000, 1001, 1002, 1003]",
           "--set", f"search.storage=sqlite:///{run_dir.parent / 'optuna.db'}"]  # for optuna-dashboard
    env = _env(sdsweep_cache)
    # A newcomer's shell has no RAY_AUTH_MODE; an in-process Ray started earlier in this pytest
    # process (the ray_local fixture) sets it in os.environ, which would hide Ray's notice.
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"sdsweep run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return run_dir, proc


@pytest.fixture(scope="module")
def sweep(sweep_run: tuple[Path, subprocess.CompletedProcess[str]]) -> tuple[Path, str]:
    """(run dir, CLI stdout) of the sweep above."""
    return sweep_run[0], sweep_run[1].stdout


@pytest.fixture(scope="module")
def board(sweep: tuple[Path, str]) -> Board:
    from sweeps.results import leaderboard

    return leaderboard(sweep[0])


@pytest.fixture(scope="module")
def report(sweep: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report written outside the run dir, then moved: its index.html."""
    written = tmp_path_factory.mktemp("written") / "report"
    write_report(sweep[0], written)
    moved = tmp_path_factory.mktemp("moved") / "zipped-and-unpacked"
    shutil.move(str(written), str(moved))
    return moved / "index.html"


@pytest.fixture(scope="module")
def doc(report: Path) -> Node:
    return parse(report.read_text())


def chromium(page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on the file ``page`` (see ``run_files.chromium``)."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.fail(INSTALL_HINT)
    return run_files.chromium(page.as_uri(), *args)


def _best_samples(rows: list[Any]) -> dict[str, Any]:
    best = next(r for r in rows if r.rank == 1)
    path = best.path / "samples" / f"step-{best.best_step:06d}" / "scores.json"
    scores: dict[str, Any] = json.loads(path.read_text())
    return scores


@pytest.mark.slow
def test_sweep_run_writes_the_report_into_the_run_dir(sweep: tuple[Path, str]) -> None:
    run_dir, stdout = sweep
    index = run_dir / "report" / "index.html"
    assert f"report: {index}" in stdout
    assert index.is_file() and (run_dir / "report" / "images" / "baseline" / "grid.png").is_file()


@pytest.mark.slow
def test_a_newcomers_sweep_prints_no_ray_token_notice(
        sweep_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """`sdsweep run` with RAY_AUTH_MODE unset: Ray's "Token authentication is enabled" WARNING
    (logged when ray.init starts a Ray and no mode is set) is on neither stream: sdsweep turns
    token auth on itself (sweeps/ray_auth.py; that it stays on is checked in
    tests/test_cluster_connect.py)."""
    _, proc = sweep_run
    for stream in (proc.stdout, proc.stderr):
        assert "Token authentication" not in stream and "RAY_AUTH_MODE" not in stream, stream[-3000:]


@pytest.mark.slow
def test_chromium_loads_every_image_of_the_moved_report(report: Path, board: Board) -> None:
    rows, _ = board
    ranked = [r for r in rows if r.rank]
    assert len(ranked) == 3, [(r.trial_id, r.status, r.error) for r in rows]
    # Baseline grid + each ranked trial's grid + a baseline and a trial thumbnail per generated image.
    expected = 1 + len(ranked) + 2 * len(_best_samples(rows)["rows"])
    body = parse(chromium(report, "--dump-dom").stdout).find("body")
    assert "data-images-total" in body.attrs, "the load script did not run: " + str(body.attrs)
    assert int(body.attrs["data-images-total"]) == expected
    assert int(body.attrs["data-images-loaded"]) == expected


@pytest.mark.slow
def test_screenshot_of_the_report_is_not_blank(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(report, f"--screenshot={shot}", "--window-size=1280,2400")
    with Image.open(shot) as im:
        grey = im.convert("L")
        assert im.size == (1280, 2400)
        assert ImageStat.Stat(grey).stddev[0] > 10, "screenshot is one flat colour"
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 200, "screenshot has almost no content"


@pytest.mark.slow
def test_leaderboard_table_has_leaderboard_order_and_values(doc: Node, board: Board) -> None:
    from sweeps.results import baseline_scores

    rows, state = board
    base = baseline_scores(state)
    head = table_head(doc, "leaderboard")
    shown = [(a, cells) for a, cells in table_rows(doc, "leaderboard") if "trial" in a.get("class", "")]
    assert [a["data-trial"] for a, _ in shown] == [r.trial_id for r in rows]
    for (attrs, cells), r in zip(shown, rows):
        assert attrs["data-rank"] == str(r.rank or "")
        assert float(attrs["data-best"]) == r.best  # repr() round-trips the exact float
        col = dict(zip(head, cells))
        assert col["composite"] == f"{r.best:.4g}{r.best - base['composite']:+.3g}"
        for m in ("clip_t", "clip_i"):
            assert col[m] == f"{r.best_metrics[m]:.4g}{r.best_metrics[m] - base[m]:+.3g}"
        assert (col["best step"], col["status"]) == (str(r.best_step), r.status)
    base_row = table_rows(doc, "leaderboard")[-1][1]
    assert base_row[0] == "base" and f"{base['composite']:.4g}" in base_row


@pytest.mark.slow
def test_every_link_is_relative_and_inside_the_report(doc: Node, report: Path) -> None:
    links = [n.attrs[a] for n in doc.iter() for a in ("src", "href") if a in n.attrs]
    assert len(links) > 10
    for link in links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        target = (report.parent / unquote(parts.path)).resolve()
        assert target.is_relative_to(report.parent.resolve()) and target.is_file(), link
    assert not list(doc.iter("link")) and "url(" not in doc.find("style").text()


@pytest.mark.slow
def test_charts_draw_one_line_per_trial_and_the_baseline_dashed(doc: Node, board: Board) -> None:
    rows, _ = board
    charts = {n.attrs["data-metric"]: n for n in doc.iter("div", "chart")}
    assert list(charts) == ["clip_t", "clip_i", "composite", "fixed_train_loss", "train_loss"]
    for metric, chart in charts.items():
        series = {g.attrs["data-label"]: g for g in chart.iter("g", "series")}
        assert list(series) == [r.trial_id for r in rows]
        for r in rows:
            points = series[r.trial_id].find("polyline").attrs["points"].split()
            assert len(points) == sum(1 for h in r.history if metric in h)
        assert len(list(chart.iter("line", "baseline"))) == (0 if metric.endswith("_loss") else 1)


@pytest.mark.slow
def test_grids_show_the_baseline_first_then_each_trial_at_its_best_step(doc: Node,
                                                                       board: Board) -> None:
    rows, _ = board
    figures = list(doc.iter("figure", "grid"))
    assert "baseline" in figures[0].attrs["class"]
    assert [f.attrs["data-trial"] for f in figures[1:]] == [r.trial_id for r in rows if r.rank]
    for fig, r in zip(figures[1:], [r for r in rows if r.rank]):
        assert f"step-{r.best_step:06d}/grid.png" in fig.find("img").attrs["src"]
        assert f"#{r.rank} {r.trial_id} step {r.best_step}" in " ".join(fig.find("figcaption").text().split())


@pytest.mark.slow
def test_per_prompt_table_lists_every_image_of_the_best_trial(doc: Node, board: Board) -> None:
    samples = _best_samples(board[0])
    shown = table_rows(doc, "prompts")
    assert [(c[0], c[1]) for _, c in shown] == [(r["prompt"], str(r["seed"])) for r in samples["rows"]]
    assert table_head(doc, "prompts")[-2:] == ["clip_t", "clip_i"]
    assert [c[-2].startswith(f"{r['clip_t']:.4g}") for (_, c), r in zip(shown, samples["rows"])] == \
        [True] * len(shown)


@pytest.mark.slow
def test_pareto_table_lists_the_front_of_the_objectives(doc: Node, board: Board) -> None:
    from sweeps.results import pareto_front

    front = pareto_front(board[0], ["clip_t", "clip_i"], ["max", "max"])
    assert [(a["data-trial"], int(a["data-step"])) for a, _ in table_rows(doc, "pareto")] == \
        [(p.trial_id, p.step) for p in front]


@pytest.mark.slow
def test_optuna_dashboard_draws_the_pareto_front_of_what_the_leaderboard_told_optuna(
        sweep: tuple[Path, str], board: Board) -> None:
    """The two-objective sweep's study in optuna-dashboard (headless Chromium): its Pareto-front
    plot is on sdsweep's objectives, and its best trials are Optuna's own front (``best_trials``)
    of the values sdsweep told it -- each trial's objectives at its best checkpoint by the
    leaderboard's metric."""
    import optuna

    storage = f"sqlite:///{sweep[0].parent / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    rows = {r.trial_id: r for r in board[0]}
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done, [t.state for t in study.trials]
    for t in done:  # told: the leaderboard's best checkpoint's value of each objective
        best = rows[t.user_attrs["sdsweep_trial_id"]].best_metrics
        assert t.values == pytest.approx([best["clip_t"], best["clip_i"]]), (t.number, t.values, best)
    front = {t.number for t in study.best_trials}
    with run_files.optuna_dashboard(storage) as base:
        page = run_files.chromium_text(f"{base}/dashboard/studies/{study._study_id}")
    assert "Pareto Front" in page and "Objective X: clip_t" in page and "Objective Y: clip_i" in page, page[:3000]
    # One best trial: "Best Trial (number=N) Objective Values = ..."; several: "Best Trials Trial N
    # Objective Values = ... Trial M ...".
    several = page.split("Best Trials ", 1)[1] if "Best Trials " in page else ""
    shown = {int(n) for n in re.findall(r"Best Trial \(number=(\d+)\)", page)
             + re.findall(r"Trial (\d+) Objective Values", several)}
    assert shown == front, (shown, front, page[:3000])


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("report", "best"))
    return dest


def _edit_state(run_dir: Path, edit: Any) -> None:
    path = run_dir / "sweep.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


@pytest.mark.slow
def test_text_from_the_run_dir_is_escaped(sweep: tuple[Path, str], board: Board,
                                          tmp_path: Path) -> None:
    run = _copy_run(sweep[0], tmp_path / "run")
    name, prompt, error = "<script>alert(1)</script>", '<img src=x onerror="alert(2)">', "<b>boom</b> & co"
    _edit_state(run, lambda s: s["config"].update(name=name))
    best = next(r for r in board[0] if r.rank == 1)
    scores = run / best.path.name / "samples" / f"step-{best.best_step:06d}" / "scores.json"
    data = json.loads(scores.read_text())
    data["rows"][0]["prompt"] = prompt
    scores.write_text(json.dumps(data))
    last = board[0][-1]
    (run / last.path.name / "sdsweep_error.json").write_text(json.dumps({"error_type": "ValueError", "error": error}))

    page = write_report(run).read_text()
    parsed = parse(page)
    assert name not in page and prompt not in page and "<b>boom" not in page
    assert parsed.find("h1").text() == name
    assert table_rows(parsed, "prompts")[0][1][0] == prompt
    assert table_rows(parsed, "leaderboard")[len(board[0]) - 1][1][-1] == f"ValueError: {error}"
    assert len(list(parsed.iter("script"))) == 1
    assert not [n for n in parsed.iter() if any(a.startswith("on") for a in n.attrs)]


@pytest.mark.slow
def test_sweep_without_image_evaluation_reports_losses_only(sweep: tuple[Path, str], tmp_path: Path) -> None:
    from sweeps.results import leaderboard

    run = _copy_run(sweep[0], tmp_path / "run")

    def losses_only(state: dict[str, Any]) -> None:
        state.pop("baseline")
        state["config"]["evaluation"].update(images=None, metric="fixed_train_loss", mode=None, objectives=None)

    _edit_state(run, losses_only)
    shutil.rmtree(run / "baseline")
    for samples in run.glob("*/samples"):
        shutil.rmtree(samples)
    rows, _ = leaderboard(run)

    parsed = parse(write_report(run, tmp_path / "out").read_text())
    assert [a["data-trial"] for a, _ in table_rows(parsed, "leaderboard")] == [r.trial_id for r in rows]
    assert [n.attrs["data-metric"] for n in parsed.iter("div", "chart")] == ["fixed_train_loss", "train_loss"]
    assert not list(parsed.iter("img")) and not list(parsed.iter("line", "baseline"))
    assert [h.text() for h in parsed.iter("h2")] == ["Leaderboard", "Metric curves"]
    assert "clip_t" not in table_head(parsed, "leaderboard")


# --- chart helpers, no sweep needed ------------------------------------------------------------

def test_chart_ticks_are_several_round_numbers_within_the_range() -> None:
    assert nice_ticks(0.4871, 0.4942) == pytest.approx([0.488, 0.49, 0.492, 0.494])
    assert nice_ticks(0, 100, 6) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0.952, 1.039) == pytest.approx([0.96, 0.98, 1.0, 1.02])  # not a lone 1.0
    assert nice_ticks(3.0, 3.0) == [3.0]


def test_chart_of_one_flat_evaluation_still_draws_its_point_and_baseline() -> None:
    svg = parse(line_chart([("t<1>", "#000", [(20.0, 0.5)])], baseline=0.5))
    circle = svg.find("circle")
    assert 0 < float(circle.attrs["cx"]) < 400 and 0 < float(circle.attrs["cy"]) < 230
    assert svg.find("line", "baseline").attrs["y1"] == circle.attrs["cy"]
    assert svg.find("g", "series").attrs["data-label"] == "t<1>"  # escaped in the markup, intact when parsed


@pytest.mark.slow
def test_heldout_confirmation_rescores_the_pick_and_the_base_model_on_unseen_seeds(sweep: tuple[Path, str],
                                                                                  board: Board) -> None:
    from sweeps.export import select_checkpoint
    from trainers.metrics import composite

    run_dir, stdout = sweep
    rows, state = board
    conf = json.loads((run_dir / "confirm" / "confirm.json").read_text())
    picked_row, picked_eval, _, _ = select_checkpoint(run_dir)
    assert conf["winner"] == f"{picked_row.trial_id}@{int(picked_eval['step'])}"  # the product's pick
    lb_row, lb_eval, _, _ = select_checkpoint(run_dir, confirmed=False)
    labels_by_leaderboard = [f"{lb_row.trial_id}@{int(lb_eval['step'])}"]
    ranked = [r for r in rows if r.rank]
    labels = [m["label"] for m in conf["models"]]
    assert len(labels) == min(3, len(ranked)) + 1 and labels[-1] == "baseline"
    ev = state["config"]["evaluation"]
    assert set(conf["seeds"]).isdisjoint(ev["images"]["generation"]["seeds"])
    n = len(ev["images"]["generation"]["prompts"]) * len(conf["seeds"])
    assert conf["images_per_model"] == n
    weights = ev["images"]["weights"]
    for m in conf["models"]:
        scores = json.loads((run_dir / m["dir"] / "scores.json").read_text())
        assert len(scores["rows"]) == n and {r["seed"] for r in scores["rows"]} == set(conf["seeds"])
        means = {k: sum(r[k] for r in scores["rows"]) / n for k in weights}
        means["clip_t"] = max(means["clip_t"], 0.0)  # torchmetrics' CLIPScore clamps its mean at 0
        assert m["heldout"]["composite"] == pytest.approx(composite(means, weights), rel=1e-6)  # fp32 sums
    for name in ("runner_up", "baseline") if len(ranked) > 1 else ("baseline",):
        mg = conf["margins"][name]
        assert mg["low"] <= mg["margin"] <= mg["high"] and mg["images"] == n
        assert mg["call"] in ("better", "worse", "too close to call", "no meaningful difference")
    # The pick: the best of the top K on seeds that neither the sweep nor the margins used.
    assert len(ranked) > 1 and conf["picked_by"] == "confirmation"
    assert conf["leaderboard_pick"] == labels_by_leaderboard[0]
    pick_seeds = set(conf["pick_seeds"])
    assert pick_seeds and pick_seeds.isdisjoint(conf["seeds"]) and pick_seeds.isdisjoint(ev["images"]["generation"]["seeds"])
    on_pick = {}
    for m in conf["models"][:-1]:
        scores = json.loads((run_dir / m["pick_dir"] / "scores.json").read_text())
        assert {r["seed"] for r in scores["rows"]} == pick_seeds
        means = {k: sum(r[k] for r in scores["rows"]) / len(scores["rows"]) for k in weights}
        means["clip_t"] = max(means["clip_t"], 0.0)
        on_pick[m["label"]] = composite(means, weights)
    assert conf["winner"] == max(on_pick, key=on_pick.get) == labels[0]
    assert conf["margins"].get("runner_up", {}).get("other") == labels[1]
    assert "held-out confirmation" in stdout and "held-out composite" in stdout
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert f"{best['trial_id']}@{best['metric']['step']}" == conf["winner"] and best["chosen_by"] == "confirmation"
    assert best["heldout"]["scores"] == conf["models"][0]["heldout"]
    assert best["heldout"]["baseline"] == conf["models"][-1]["heldout"]
    assert best["heldout"]["margins"] == conf["margins"]
    page = (run_dir / "report" / "index.html").read_text()
    assert 'id="heldout"' in page and all(m["label"] in page for m in conf["models"])


@pytest.mark.slow
def test_heldout_images_are_what_the_exported_lora_draws_in_a_plain_diffusers_pipeline(
        sweep: tuple[Path, str]) -> None:
    """What was confirmed is what is shipped: a user's pipeline + load_lora_weights(best export)
    draws the confirmation's image for the same prompt and seed."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from trainers.models import builtin_dir

    run_dir, _ = sweep
    conf = json.loads((run_dir / "confirm" / "confirm.json").read_text())
    scores = json.loads((run_dir / conf["models"][0]["dir"] / "scores.json").read_text())
    row = scores["rows"][0]
    gen = scores["identity"]["settings"]["generation"]

    def draw(with_lora: bool) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(builtin_dir("builtin:tiny-sd", "base model"),
                                                       safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if with_lora:
            pipe.load_lora_weights(str(run_dir / "best"), weight_name="pytorch_lora_weights.safetensors")
        pipe.set_progress_bar_config(disable=True)
        size = gen["resolution"] or pipe.unet.config.sample_size * 8
        image = pipe(row["prompt"], num_inference_steps=gen["steps"], guidance_scale=gen["guidance_scale"],
                     height=size, width=size, generator=torch.Generator().manual_seed(row["seed"])).images[0]
        return np.asarray(image, dtype=float)

    ours = np.asarray(Image.open(run_dir / conf["models"][0]["dir"] / row["file"]), dtype=float)
    shipped, base = np.abs(draw(True) - ours).mean(), np.abs(draw(False) - ours).mean()
    # Measured: ~1 level of 255 (batched vs single-image float rounding over the DDIM steps) for
    # the shipped LoRA, ~4.5 for the base model without it.
    assert shipped < 2.5 and shipped < 0.5 * base, (shipped, base)


# --- any checkpoint, picked by hand (sdsweep best --trial ID --step N) ------------------------

def _run_cli(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], capture_output=True, text=True,
                          env={**_env(cache), "PYTHONPATH": str(REPO)}, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_the_report_gives_each_grid_its_scores_and_the_command_that_exports_it(doc: Node, board: Board,
                                                                              sweep: tuple[Path, str]) -> None:
    import shlex

    from sweeps.results import baseline_scores, find_checkpoint

    rows, state = board
    ranked = {r.trial_id: r for r in rows if r.rank}
    figures = [f for f in doc.iter("figure", "grid") if "baseline" not in f.attrs["class"]]
    assert sorted(f.attrs["data-trial"] for f in figures) == sorted(ranked)
    base = baseline_scores(state)
    for fig in figures:
        r = ranked[fig.attrs["data-trial"]]
        caption = " ".join(fig.find("figcaption").text().split())
        for m in ("clip_t", "clip_i", "composite"):  # each score at that step, with its gain over the base model
            assert f"{m} {r.best_metrics[m]:.4g}{r.best_metrics[m] - base[m]:+.3g}" in caption, (m, caption)
        assert find_checkpoint(r.path, r.best_step) is not None  # the sweep keeps each trial's best
        cmd = fig.find("code", "cmd")
        assert (cmd.attrs["data-trial"], int(cmd.attrs["data-step"])) == (r.trial_id, r.best_step)
        assert shlex.split(cmd.text()) == ["sdsweep", "best", str(sweep[0].resolve()), "--trial", r.trial_id,
                                           "--step", str(r.best_step), "--export", f"{r.trial_id}-step{r.best_step}"]


@pytest.mark.slow
def test_a_checkpoint_picked_by_hand_exports_with_manual_provenance_and_loads(
        doc: Node, board: Board, sweep: tuple[Path, str], sdsweep_cache: Path, tmp_path: Path) -> None:
    """Run the command the report shows under a non-winning trial's grid; its export is that
    checkpoint (a user's pipeline draws the trial's own samples of that step with it), marked manual."""
    import shlex

    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sweeps.results import find_checkpoint
    from trainers.models import builtin_dir

    rows, _ = board
    run_dir, _ = sweep
    winner = json.loads((run_dir / "best" / "best.json").read_text())
    assert winner["picked_by"] == "auto"
    other = next(r for r in rows if r.rank and r.trial_id != winner["trial_id"])
    fig = next(f for f in doc.iter("figure", "grid") if f.attrs.get("data-trial") == other.trial_id)
    argv = shlex.split(fig.find("code", "cmd").text())
    assert argv[0] == "sdsweep"
    proc = _run_cli(argv[1:], tmp_path, sdsweep_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dest = tmp_path / argv[-1]
    info = json.loads((dest / "best.json").read_text())
    assert info["picked_by"] == "manual" and info["picked"] == {"trial_id": other.trial_id, "step": other.best_step}
    assert info["trial_id"] == other.trial_id and info["metric"]["step"] == other.best_step
    assert info["metric"]["value"] == pytest.approx(other.best) and info["hyperparameters"] == other.params
    assert info["auto_pick"]["trial_id"] == winner["trial_id"] and info["auto_pick"]["step"] == winner["metric"]["step"]
    assert f"--trial {other.trial_id} --step {other.best_step}" in info["why"] and "by hand" in info["why"]
    for key in ("base_model", "base_model_identity", "cache_key", "evaluator", "run_dir", "sweep_file"):
        assert info[key] == winner[key], key  # the same provenance as the automatic pick
    assert Path(info["checkpoint"]) == find_checkpoint(other.path, other.best_step)

    samples = other.path / "samples" / f"step-{other.best_step:06d}"
    scores = json.loads((samples / "scores.json").read_text())
    row, gen = scores["rows"][0], scores["identity"]["settings"]["generation"]

    def draw(export: Path | None) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(builtin_dir("builtin:tiny-sd", "base model"),
                                                       safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if export is not None:
            pipe.load_lora_weights(str(export), weight_name="pytorch_lora_weights.safetensors")
        pipe.set_progress_bar_config(disable=True)
        size = gen["resolution"] or pipe.unet.config.sample_size * 8
        image = pipe(row["prompt"], num_inference_steps=gen["steps"], guidance_scale=gen["guidance_scale"],
                     height=size, width=size, generator=torch.Generator().manual_seed(row["seed"])).images[0]
        return np.asarray(image, dtype=float)

    ours = np.asarray(Image.open(samples / row["file"]), dtype=float)
    picked, base = np.abs(draw(dest) - ours).mean(), np.abs(draw(None) - ours).mean()
    # As for the held-out images above: ~1 level of 255 of float rounding for the checkpoint itself.
    assert picked < 2.5 and picked < 0.5 * base, (picked, base)


@pytest.mark.slow
def test_picking_an_unknown_trial_or_a_step_without_checkpoint_names_what_exists(
        board: Board, sweep: tuple[Path, str], sdsweep_cache: Path, tmp_path: Path) -> None:
    from sweeps.results import kept_steps

    rows, _ = board
    run_dir, _ = sweep
    proc = _run_cli(["best", str(run_dir), "--trial", "nosuch", "--step", "20", "--export", "x"], tmp_path,
                    sdsweep_cache)
    assert proc.returncode == 2 and "--trial nosuch: no such trial" in proc.stderr
    assert all(r.trial_id in proc.stderr for r in rows) and "Traceback" not in proc.stderr
    r = rows[0]
    proc = _run_cli(["best", str(run_dir), "--trial", r.trial_id, "--step", "7", "--export", "x"], tmp_path,
                    sdsweep_cache)
    kept = kept_steps(r.path)
    assert kept and proc.returncode == 2, proc.stderr
    assert f"no kept checkpoint at step 7; its kept steps: {kept}" in proc.stderr
    proc = _run_cli(["best", str(run_dir), "--step", "20", "--export", "x"], tmp_path, sdsweep_cache)
    assert proc.returncode == 2 and "--step 20 needs --trial" in proc.stderr
    assert not (tmp_path / "x").exists()


# --- read-only commands stay light ---------------------------------------------------------------

IMPORTS = """import sys
from sweeps.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as stop:  # --help
    rc = stop.code
print("IMPORTED", ",".join(sorted(m for m in ("ray", "torch", "transformers", "diffusers", "wandb", "optuna")
                                  if m in sys.modules)))
sys.exit(rc)
"""


@pytest.mark.slow
@pytest.mark.parametrize("command, allowed", [
    (["--help"], set()), (["results", "{run}"], set()), (["results", "{run}", "--format", "json"], set()),
    (["report", "{run}", "--out", "{tmp}/report"], set()),
    # Writing the export converts tensors with the method's trainer (torch, diffusers, transformers); never Ray.
    (["best", "{run}", "--export", "{tmp}/best"], {"torch", "transformers", "diffusers"})])
def test_read_only_commands_do_not_import_ray_or_more_than_they_need(command: list[str], allowed: set[str],
                                                                    sweep: tuple[Path, str], tmp_path: Path,
                                                                    sdsweep_cache: Path) -> None:
    argv = [a.format(run=sweep[0], tmp=tmp_path) for a in command]
    proc = subprocess.run([sys.executable, "-c", IMPORTS, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**_env(sdsweep_cache), "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = set(proc.stdout.rsplit("IMPORTED ", 1)[1].strip().split(",")) - {""}
    assert imported <= allowed, f"sdsweep {' '.join(command)} imported {sorted(imported - allowed)}"


@pytest.mark.slow
def test_trials_read_without_ray_are_what_tunes_experiment_analysis_reads(sweep: tuple[Path, str]) -> None:
    from ray.tune import ExperimentAnalysis

    from sweeps.tune_state import read_trials

    run_dir = sweep[0]
    ours = read_trials(run_dir)
    tune = ExperimentAnalysis(str(run_dir.resolve())).trials
    assert [(t.trial_id, t.status, t.config, str(t.path)) for t in ours] == \
        [(t.trial_id, t.status, dict(t.config), str(t.path)) for t in tune]
    assert len(ours) == 3 and all(t.path.is_dir() for t in ours)


@pytest.mark.slow
def test_results_of_the_two_objective_sweep_fit_120_columns(sweep: tuple[Path, str], capsys) -> None:
    from sweeps.cli import main

    assert main(["results", str(sweep[0])]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of clip_t, clip_i" in out and "lr=train.learning_rate" in out
    assert max(len(line) for line in out.splitlines()) <= 120, out


@pytest.mark.slow
def test_the_export_command_survives_a_run_dir_that_needs_quoting_and_escaping(sweep: tuple[Path, str],
                                                                               tmp_path: Path) -> None:
    import shlex

    run = _copy_run(sweep[0], tmp_path / "it's <b>a</b> & run")
    page = write_report(run, tmp_path / "report").read_text()
    assert "<b>a</b>" not in page  # escaped in the markup ...
    commands = [shlex.split(code.text()) for code in parse(page).iter("code", "cmd")]
    assert commands and all(argv[:3] == ["sdsweep", "best", str(run.resolve())] for argv in commands)  # ... intact
