"""Progress of the long steps inside a task (encoding the latent cache, drawing class images,
generating evaluation images), for whoever listens: the sweep's live console shows the cache
task's progress as bars (sweeps/live.py). Nothing listens by default and a report costs a
function call. Standard library only.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

Sink = Callable[[str, int, int], None]
_SINKS: list[Sink] = []


def advance(kind: str, done: int, total: int) -> None:
    """``done`` of ``total`` units of ``kind`` ("encode", "class images", "generate") are finished."""
    for sink in _SINKS:
        sink(kind, done, total)


@contextlib.contextmanager
def listening(sink: Sink) -> Iterator[None]:
    """Call ``sink(kind, done, total)`` for every report made while the block runs (any thread)."""
    _SINKS.append(sink)
    try:
        yield
    finally:
        _SINKS.remove(sink)
