"""Errors of model loading, in a module of their own so that every loader can raise them
(``trainers.models``, ``trainers.pickles``, ``trainers.scoring_models``) without importing each
other. ``trainers.models`` re-exports them; import them from there or from here."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A base model or CLIP model could not be loaded; the message names the input and the fix."""


class PickleRefusedError(ModelLoadError):
    """A pickle-format weight file was refused (or could not be read safely)."""
