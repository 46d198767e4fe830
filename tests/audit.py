"""A Python audit hook that records files opened and classes a pickle would resolve, so
tests can check "never read" and "never unpickled" instead of assuming them."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

_EVENTS: list[tuple[str, str]] = []
_RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if _RECORDING[0] and event in ("open", "pickle.find_class"):
        _EVENTS.append((event, str(args[0]) if event == "open" else f"{args[0]}.{args[1]}"))


sys.addaudithook(_audit)  # hooks cannot be removed; this one only records while asked to


@contextmanager
def audited():
    """Yields the list of (event, what) seen while the block runs."""
    _EVENTS.clear()
    _RECORDING[0] = True
    try:
        yield _EVENTS
    finally:
        _RECORDING[0] = False


def opened(events: list[tuple[str, str]], path: Path) -> bool:
    target = str(path.resolve())
    return any(e == "open" and not what.isdigit() and str(Path(what).resolve()) == target for e, what in events)


def unpickled(events: list[tuple[str, str]]) -> list[str]:
    return [what for e, what in events if e == "pickle.find_class"]
