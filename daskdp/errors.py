"""Errors that reach the user as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or settings; the message names it and the fix."""


class RunError(Exception):
    """A run that could not finish: a timeout, lost ranks, or an engine that would not load."""


class PartitionTimeout(RunError):
    """A partition ran past its timeout; its requests were aborted so the rank is free."""

    def __init__(self, rank: int, partition: int, seconds: float, unfinished: int):
        self.rank, self.partition, self.seconds, self.unfinished = rank, partition, seconds, unfinished
        super().__init__(rank, partition, seconds, unfinished)

    def __str__(self) -> str:
        return (
            f"partition {self.partition} on rank {self.rank} timed out after {self.seconds:g} s "
            f"with {self.unfinished} rows unfinished; raise --partition-timeout"
        )
