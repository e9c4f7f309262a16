"""Shared fixtures. Every test runs offline against a private cache directory."""

from __future__ import annotations

import os

# Offline before anything imports huggingface_hub / wandb: tests must never reach a network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def sdsweep_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide cache root so built-in models are built once per test run."""
    root = tmp_path_factory.mktemp("sdsweep-cache")
    old = os.environ.get("SDSWEEP_CACHE")
    os.environ["SDSWEEP_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SDSWEEP_CACHE", None)
    else:
        os.environ["SDSWEEP_CACHE"] = old
