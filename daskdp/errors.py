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


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of ``error``'s message, or its type's name when it has none."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if limit is None else line[:limit]


def exception_chain(error: BaseException | None, *, context: bool = True) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (or, with ``context``, during), outermost
    first, each once."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or (error.__context__ if context else None)
    return chain


def find_cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` in the chain of ``error``."""
    return next((each for each in exception_chain(error) if isinstance(each, kind)), None)
