"""Sweep-level errors, standard library only: the command line catches them by class without
importing what raises them (``sweeps.results`` re-exports :class:`SweepError`)."""

from __future__ import annotations


class SweepError(ValueError):
    """A sweep-level problem a user can fix; the message names the run directory and the fix."""
