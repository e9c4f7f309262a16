"""Names shared by the CLI, the driver, the trial workers and the results readers.

Standard library only, so importing it costs nothing: ``sweeps.results`` (read by ``sdsweep
results`` without Ray) must not import ``sweeps.trial`` (ray, torch) for a file name, and
``sweeps.trial`` must not import the CLI for the worker environment (an import cycle).
"""

from __future__ import annotations

# The file a trial that ended as errored leaves in its storage directory (sweeps/trial.py).
ERROR_FILE = "sdsweep_error.json"

# Library notices the CLI silences (sweeps.cli.quiet_libraries) and trial workers inherit
# (sweeps.trial.trial_env); values the user has set win.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",       # torchvision-fallback notices on every import
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",     # transformers' per-component "Loading weights" bars
    "WANDB_SILENT": "true",                  # per-trial offline banners; we print the sync command once
    # Tune warns when checkpoint-driven state snapshots come faster than every 5 s, which short
    # tiny-model trials always do; the snapshots themselves are wanted.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
