"""The one exception type of the package, and the helper that formats its messages."""

from __future__ import annotations


class SearchSpaceError(ValueError):
    """A search space, sampler setting or storage URL that cannot be used.

    The message names the source (a file path, or ``inline``), the parameter and the field, and
    says how to fix it (docs/ARCHITECTURE.md rule 1).
    """


def problem(field: str, what: str, fix: str) -> ValueError:
    """A validator error naming ``field``; pydantic wraps it and the loader re-words it.

    Validators raise these from pydantic ``model_validator``s, whose errors carry no field
    location of their own, so the field name travels in the text.
    """
    return ValueError(f"field `{field}`: {what}. Fix: {fix}")
