"""Whether long work shows itself: a call that asked for progress (Unlearner.forget(progress=True), the command
line) turns it on for everything under it, so that a deep loop (the preserved text's moments: ~60 s the first
time in replace mode) can show a bar without every function passing a flag down."""
from __future__ import annotations

import contextvars
from contextlib import contextmanager

_ON = contextvars.ContextVar("lune_fast_progress", default=False)


@contextmanager
def shown(on: bool):
    token = _ON.set(bool(on))
    try:
        yield
    finally:
        _ON.reset(token)


def bar(total: int, desc: str, unit: str, least: int = 1):
    """A tqdm bar when progress is on and there are at least `least` items; else a silent stand-in."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not _ON.get() or total < least)
