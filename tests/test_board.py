"""The leaderboard's text forms (sweeps/board.py) on rows built in code: the compact table stays
within its width whatever the sweep, short names stay unique, numbers stay short. The same forms
on real sweeps: tests/test_mixed_sweep.py and tests/test_report.py."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from sweeps.board import compact, format_compact, format_csv, format_json, format_wide, short_names
from sweeps.results import TrialRow

PARAMS = {"train.learning_rate": 4.7159e-4, "lora.rank": 16, "lora.alpha": 8, "lora.dropout": 0.05,
          "train.snr_gamma": None, "train.lr_scheduler": "cosine_with_restarts", "train.gradient_accumulation_steps": 4,
          "dreambooth.prior_loss_weight": 0.5, "dreambooth.num_class_images": 200,
          "dreambooth.train_text_encoder": True, "textual_inversion.vectors_per_token": 8,
          "method": "lora"}


def _rows(n: int, params: dict[str, object] = PARAMS) -> list[TrialRow]:
    rows = []
    for i in range(n):
        r = TrialRow(trial_id=f"t{i:07d}", status="completed" if i % 3 else "stopped",
                     method=("lora", "textual_inversion", "dreambooth")[i % 3], params=dict(params),
                     best=0.2 - i * 0.01, best_step=100 + i, steps=150, wall_s=12.0, path=Path("/nowhere"),
                     best_metrics={"composite": 0.2 - i * 0.01, "clip_t": 70.123 + i, "clip_i": 0.0329,
                                   "concept_rate": 0.25, "prior_kept": 1.0},
                     rank=i + 1, cost={"trainer_s": 8.5, "images_seen": 600.0, "peak_memory_mb": 703.6,
                                       "artifact_bytes": 520896.0})
        rows.append(r)
    rows[-1].error = "ValueError: " + "a very long message about lora.rank " * 10
    rows[-1].status = "error"
    return rows


def test_compact_numbers_are_short_and_exact_enough() -> None:
    assert [compact(v) for v in (0.003, 4.7159e-4, 6.380556e-3, 5.0, 1e-5, 0.05, 0.25, 16, None, True, "cosine")] \
        == ["3e-3", "4.7e-4", "6.4e-3", "5", "1e-5", "0.05", "0.25", "16", "none", "true", "cosine"]


def test_short_names_are_unique_and_fall_back_to_the_section_then_the_key() -> None:
    names = short_names(["train.learning_rate", "lora.rank", "lora.dropout", "unet.dropout", "x.dropout.y",
                         "train.gradient_accumulation_steps"])
    assert names["train.learning_rate"] == "lr" and names["lora.rank"] == "r"
    assert names["train.gradient_accumulation_steps"] == "gas"
    assert len(set(names.values())) == len(names), names
    assert names["lora.dropout"] == "l.drop" and names["unet.dropout"] == "u.drop" and names["x.dropout.y"] == "y"


def test_compact_table_fits_its_width_with_many_parameters_trials_and_a_long_error() -> None:
    rows = _rows(14)
    text = format_compact(rows, "composite", ["clip_t", "clip_i", "concept_rate", "prior_kept", "composite"],
                          {"composite": 0.15, "clip_t": 68.0, "clip_i": 0.027, "concept_rate": 0.0, "prior_kept": 1.0},
                          ("composite", {"t0000000": 0.25, "baseline": 0.2}), run_dir="/runs/x")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, text
    shown = [r for r in rows if any(line.split()[:2] == [str(r.rank), r.trial_id] for line in lines)]
    assert shown == rows[:10]  # the top 10 by default
    assert "4 more trial(s) not shown: `sdsweep results /runs/x --top 0`" in text
    assert "lr=train.learning_rate" in text and "ti=textual_inversion" in text and "sched=train.lr_scheduler" in text
    every = format_compact(rows, "composite", top=0, width=80)
    assert max(len(line) for line in every.splitlines()) <= 80, every
    assert all(r.trial_id in every for r in rows) and "t0000013: ValueError" in every  # the error, cut to fit


def test_wide_csv_and_json_hold_every_trial_and_parameter() -> None:
    rows = _rows(12)
    keys = sorted(k for k in PARAMS if k != "method")
    wide = format_wide(rows, "composite", ["clip_t"])
    assert all(k in wide.splitlines()[0].split() for k in keys) and all(r.trial_id in wide for r in rows)
    table = list(csv.DictReader(io.StringIO(format_csv(rows, "composite", "max", ["clip_t"]))))
    assert [t["trial_id"] for t in table] == [r.trial_id for r in rows]
    assert table[0]["train.lr_scheduler"] == "cosine_with_restarts" and table[0]["train.snr_gamma"] == ""
    assert table[-1]["error"] == rows[-1].error and table[0]["clip_t"] == "70.123"
    data = json.loads(format_json(rows, "composite", "max", ["clip_t"]))
    assert len(data["trials"]) == 12 and data["trials"][0]["hyperparameters"]["train.snr_gamma"] is None
    assert data["trials"][-1]["error"] == rows[-1].error and data["baseline"] is None
