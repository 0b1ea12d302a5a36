"""Errors that reach the user as one line, without a traceback."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A mistake in the user's input or settings; the message names it and the fix."""


class RunError(Exception):
    """A run that could not finish: a timeout, lost ranks, or an engine that would not load.

    ``resumable``: the output holds a manifest, and ``--resume`` continues from its finished
    chunks. ``summary``: the run's summary, when the run got as far as writing one.
    """

    def __init__(self, message: str, *, resumable: bool = False, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.resumable = resumable
        self.summary = summary


class Terminated(BaseException):
    """SIGTERM arrived; like ``KeyboardInterrupt``, it unwinds the run and shuts the cluster down."""
