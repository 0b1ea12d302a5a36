"""The plan of a run: how its rows are cut into chunks, which ranks get which chunks, and the
partitions that carry them there.

Chunk ``c`` is rows ``[c * chunk_rows, (c + 1) * chunk_rows)`` of the input, in input order or,
with prefix locality, in the order that puts rows sharing a prompt prefix together (a function
of the input alone), whatever the number of ranks, so a resumed run can skip exactly the
chunks that are done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from daskdp.errors import UserError

if TYPE_CHECKING:
    import dask.dataframe as dd

    from daskdp.inputs.read import Prompts
    from daskdp.inputs.survey import Survey

BALANCED, DYNAMIC = "balanced", "dynamic"
DYNAMIC_PARTITIONS_PER_RANK = 8
CHUNKS_PER_RANK = 8  # the fewest chunks per rank that costs may shrink the chunks to

MIN_CHUNK_ROWS = 64


@dataclass(frozen=True)
class Layout:
    """How a run's ``rows`` input rows are cut into chunks: in input order, or ``by_prefix``."""

    rows: int
    chunk_rows: int
    by_prefix: bool = False

    @property
    def chunks(self) -> int:
        return math.ceil(self.rows / self.chunk_rows)

    def chunk_size(self, chunk: int) -> int:
        return min(self.chunk_rows, self.rows - chunk * self.chunk_rows)


def chunk_layout(costs: np.ndarray, ranks: int, chunk_size: int, by_prefix: bool = False) -> Layout:
    """Chunks of at most ``chunk_size`` rows, as many per rank, and small enough in estimated
    cost for a balanced spread over the ranks.

    ``costs`` holds each row's estimated cost, in the order chunks are cut. With costs that vary (long outputs grouped at
    the end of the input), chunks shrink until none costs more than 1/``CHUNKS_PER_RANK`` of a
    rank's share, but not below ``MIN_CHUNK_ROWS`` rows.
    """
    if chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {chunk_size}")
    rows = len(costs)
    chunks = ranks * math.ceil(rows / (ranks * chunk_size))
    chunk_rows = max(1, math.ceil(rows / chunks))
    cap = costs.sum() / (ranks * CHUNKS_PER_RANK)

    def fits(size: int) -> bool:
        return np.add.reduceat(costs, np.arange(0, rows, size)).max() <= cap

    smallest, largest = min(chunk_rows, MIN_CHUNK_ROWS), chunk_rows
    while smallest < largest:  # the largest size that fits, by bisection
        middle = (smallest + largest + 1) // 2
        smallest, largest = (middle, largest) if fits(middle) else (smallest, middle - 1)
    return Layout(rows, smallest, by_prefix)


@dataclass
class Plan:
    """What is left to generate: the input, its chunks, the chunks not yet done, and how
    they are spread: ``balanced`` (one partition per rank, of about equal estimated cost) or
    ``dynamic`` (more, smaller partitions, handed out costliest first as ranks free up)."""

    prompts: Prompts
    survey: Survey
    layout: Layout
    todo: list[int]
    mode: str = BALANCED

    def __post_init__(self):
        if self.mode not in (BALANCED, DYNAMIC):
            raise UserError(f"--partitioning must be {BALANCED} or {DYNAMIC}, got {self.mode!r}")

    @property
    def rows(self) -> int:
        return sum(self.layout.chunk_size(chunk) for chunk in self.todo)

    def partitions(self, ranks: int, id_column: str) -> dd.DataFrame:
        """The chunks left to do, in partitions of about equal cost, costliest first.

        With the rows put together by prefix, each partition is a run of neighbouring chunks,
        so that rows sharing a prefix meet on one rank.
        """
        parts = ranks if self.mode == BALANCED else ranks * DYNAMIC_PARTITIONS_PER_RANK
        slots, costs = self.survey.arrangement(self.layout.by_prefix)
        costs = chunk_costs(costs, self.layout)
        groups = assign(costs, self.todo, parts, contiguous=self.layout.by_prefix)
        return partition(self.prompts.frame, self.survey.lengths, self.layout, groups, id_column, slots)


def chunk_costs(costs: np.ndarray, layout: Layout) -> np.ndarray:
    """The estimated cost of each chunk of ``layout``, from the costs of its rows in order."""
    return np.add.reduceat(costs, np.arange(layout.chunks) * layout.chunk_rows).astype(float)


def assign(
    chunk_costs: np.ndarray, chunks: list[int], parts: int, contiguous: bool = False
) -> list[list[int]]:
    """Spread ``chunks`` over at most ``parts`` groups of about equal estimated cost.

    By default longest processing time first: each chunk, costliest first, joins the cheapest
    group so far. ``contiguous``: each group is a run of neighbouring chunks (rows that were
    put together stay together), cut where the running cost crosses a group's share. Groups
    are returned costliest first, each with its chunks in order.
    """
    chunks = sorted(chunks)
    costs = chunk_costs[chunks]
    parts = min(parts, len(chunks))
    if contiguous:
        middles = np.cumsum(costs) - costs / 2
        owner = np.minimum((middles * parts / max(costs.sum(), 1e-9)).astype(int), parts - 1)
    else:
        owner, totals = np.zeros(len(chunks), dtype=int), np.zeros(parts)
        for i in sorted(range(len(chunks)), key=lambda i: -costs[i]):
            owner[i] = int(np.argmin(totals))
            totals[owner[i]] += costs[i]
    groups = [[chunk for chunk, o in zip(chunks, owner, strict=True) if o == g] for g in range(parts)]
    totals = [costs[owner == g].sum() for g in range(parts)]
    return [groups[g] for g in sorted(range(parts), key=lambda g: (-totals[g], g)) if groups[g]]


def partition(
    df: dd.DataFrame,
    lengths: list[int],
    layout: Layout,
    groups: list[list[int]],
    id_column: str,
    slots: np.ndarray | None = None,
) -> dd.DataFrame:
    """A Dask DataFrame with one partition per group of chunks, holding those chunks' rows.

    Chunks are cut from the rows in input order, or in the order of ``slots`` (each input
    row's place). The index is each row's place; the ``position`` column is its place in the
    input, which the output keeps; without an ``id_column`` that position is also its id.
    """
    import dask
    import dask.dataframe as dd
    from dask import delayed

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    total = int(offsets[-1])
    positioned = df.map_partitions(
        _add_positions, offsets, meta=df._meta.assign(position=np.int64(0), row=np.int64(0))
    )
    if id_column not in positioned.columns:
        positioned = positioned.assign(**{id_column: positioned["position"]})
    bounds = [chunk * layout.chunk_rows for chunk in range(layout.chunks)] + [total - 1]
    if slots is None:
        known = [int(offsets[i]) for i, n in enumerate(lengths) if n] + [total - 1]
        nonempty = positioned.partitions[[i for i, n in enumerate(lengths) if n]]
        by_chunk = nonempty.set_index("row", sorted=True, divisions=known).repartition(divisions=bounds)
    else:  # a shuffle: rows move to their slot's chunk
        slotted = positioned.map_partitions(
            _to_slots, delayed(slots), meta=positioned._meta.drop(columns="row").assign(slot=np.int64(0))
        )
        # Tasks, not P2P: P2P goes through Arrow, which refuses columns of mixed types.
        by_chunk = slotted.set_index("slot", divisions=bounds, shuffle_method="tasks")
    pieces = by_chunk.to_delayed()
    parts = [delayed(pd.concat)([pieces[chunk] for chunk in group]) for group in groups]
    # As in read_prompts: Dask's string conversion would turn numbers among the prompts into
    # text and chat messages into their repr.
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_delayed(parts, meta=by_chunk._meta, verify_meta=False)


def _to_slots(part: pd.DataFrame, slots: np.ndarray) -> pd.DataFrame:
    return part.assign(slot=slots[part["row"].to_numpy()]).drop(columns="row")


def _add_positions(part: pd.DataFrame, offsets, partition_info=None) -> pd.DataFrame:
    start = int(offsets[partition_info["number"]])
    positions = np.arange(start, start + len(part), dtype=np.int64)
    return part.assign(position=positions, row=positions)  # row: the index to be
