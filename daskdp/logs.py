"""Logging helpers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def silenced(*names: str) -> Iterator[None]:
    """Drop every record of the loggers ``names`` and of the loggers under them, in the block."""
    prefixes = tuple(f"{name}." for name in names)
    loggers = [logging.getLogger(name) for name in names] + [
        each
        for each_name, each in list(logging.root.manager.loggerDict.items())
        if each_name.startswith(prefixes) and isinstance(each, logging.Logger)
    ]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)
