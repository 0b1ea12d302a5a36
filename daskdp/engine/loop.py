"""The one chunk loop: a partition of rows generated chunk by chunk on its worker's engine.

Both ``daskdp run`` (`generate_and_write`: each chunk written as it finishes, chunks already
written skipped) and the lazy ``daskdp.generate`` (`generate_partition`: the rows returned) run
`chunk_loop`. daskdp steps the engine itself: for live progress, for aborting a chunk
that runs past its timeout (and retrying it), and for writing each chunk as soon as it is done.
Rows that cannot be generated (null, empty or non-text prompts, prompts longer than the model
allows, bad per-row sampling values, rows the engine rejects) keep their place with ``error``
set; the rest of the chunk is generated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp.engine.requests import GenerationRequest
from daskdp.engine.rows import Chunk
from daskdp.engine.stealing import GIVEN_AWAY, ChunkQueue, unstarted
from daskdp.output.chunks import done_chunks, write_chunk, write_timed_out
from daskdp.output.schema import LOGPROB_COLUMNS, RECORD_DTYPES, SKIPPED, record_meta, result_meta

if TYPE_CHECKING:
    from distributed import Worker
    from vllm import LLM

    from daskdp.engine.engine import Engine

__all__ = ["GenerationRequest", "generate_and_write", "generate_partition"]

PROGRESS_TOPIC = "daskdp-progress"
IN_ENGINE_SHARE = 4  # with work stealing, at most 1/4 of a task's unfinished rows in the engine


def generate_partition(
    part: pd.DataFrame, request: GenerationRequest, partition_info: dict | None = None
) -> pd.DataFrame:
    """``daskdp.generate``'s ``map_partitions`` function: one partition and its results.

    Every input row comes back once; rows a chunk timeout stopped (after ``request.retries``
    further attempts) come back with ``error`` set.
    """
    return chunk_loop(part, request, partition_info)


def generate_and_write(
    part: pd.DataFrame,
    request: GenerationRequest,
    output: str,
    partition_info: dict | None = None,
    chunks: list[int] | None = None,
) -> pd.DataFrame:
    """``daskdp run``'s task: generate one partition chunk by chunk, writing each chunk as it finishes.

    ``chunks``: only these chunks of the partition (given away by the rank that holds the
    partition, `give_away`). Chunks not yet started may be given away in turn; a task run
    again (its worker died) leaves out the chunks it gave away (`GIVEN_AWAY`).

    Returns one record per chunk: done, timed out (after ``request.retries`` further
    attempts), or skipped because an earlier attempt at this task, on a worker that died,
    already wrote it.
    """
    return chunk_loop(part, request, partition_info, output=output, chunks=chunks)


def chunk_loop(
    part: pd.DataFrame,
    request: GenerationRequest,
    partition_info: dict | None = None,
    *,
    output: str | None = None,
    chunks: list[int] | None = None,
) -> pd.DataFrame:
    """Generate one partition on this worker's engine, chunk by chunk, with retries.

    With an ``output``: chunks already written there are skipped, each chunk is written as it
    finishes, and the chunk records are returned. Without: the rows with their results.
    """
    from distributed import get_client, get_worker

    from daskdp.engine.plugin import gang_engine, get_engine

    if part.empty:
        if (engine := gang_engine()) is not None:  # gang mode: a rank without rows steps along
            engine.call(step_with_gang)
        return record_meta() if output is not None else result_meta(part, request.task, request.dimension)
    partition = partition_info["number"] if partition_info else (0 if output is not None else -1)
    engine, rank = get_engine()
    worker = get_worker()
    key = worker.get_current_task()
    if output is None:  # chunks by position in the partition
        numbers = np.arange(len(part)) // request.chunk_rows
        written: set[int] = set()
        given: set[int] = set()
    else:  # chunks of the run's layout: the index is each row's place
        numbers = part.index.to_numpy() // request.chunk_rows
        written = done_chunks(output)
        given = set(get_client().get_metadata([key, GIVEN_AWAY], default=[]))
    wanted = set(chunks) if chunks is not None else None
    mine = [
        (int(number), rows)
        for number, rows in part.groupby(numbers, sort=True)
        if number not in given and (wanted is None or number in wanted)
    ]
    report = ProgressReporter(worker, request, partition, rank, sum(len(rows) for _, rows in mine))
    report.send()  # started: from here the client expects progress (run.stall-timeout)
    todo, records = [], []
    for number, rows in mine:
        if number in written:
            skipped = Chunk(number, rows).record(rank, worker.address, partition, request.id_column)
            records.append(skipped | {"status": SKIPPED})
            report.advance(len(rows), 0)
        else:
            todo.append((number, rows))

    def write(chunk: Chunk) -> dict[str, Any]:
        record = chunk.record(rank, worker.address, partition, request.id_column)
        return write_chunk(chunk.results(rank, worker.address), output, record, request.id_column)

    finished: list[Chunk] = []
    with (
        ThreadPoolExecutor(1, thread_name_prefix="daskdp-write") as writer,
        ChunkQueue(todo).shared(key) as queue,
    ):
        writes = []
        if output is None:
            on_finished = finished.append
        else:  # a finished chunk is freed once it is written
            on_finished = lambda chunk: writes.append(writer.submit(write, chunk))  # noqa: E731
        # Only independent ranks of `daskdp run` give work away (`daskdp.strategies.independent`).
        shared = output is not None and gang_engine() is None
        stopped = generate_chunks(engine, queue, request, report, on_finished, shared=shared)
        if output is not None:
            for chunk in stopped:
                record = chunk.record(rank, worker.address, partition, request.id_column)
                records.append(write_timed_out(output, record))
            records.extend(write.result() for write in writes)
    report.send(final=True)
    if output is not None:
        return pd.DataFrame(records)[list(RECORD_DTYPES)].astype(RECORD_DTYPES)
    for chunk in stopped:
        chunk.give_up(f"stopped by the chunk timeout of {request.chunk_timeout:g} s")
    done = sorted(finished + stopped, key=lambda chunk: chunk.number)
    results = pd.concat([chunk.results(rank, worker.address) for chunk in done])
    nested = [name for name in LOGPROB_COLUMNS if name in results.columns]
    return results.astype(dict.fromkeys(nested, object))  # as the meta says (result_dtypes)


def generate_chunks(
    engine: Engine,
    chunks: Iterable[tuple[int, pd.DataFrame]],
    request: GenerationRequest,
    report: ProgressReporter,
    on_finished: Callable[[Chunk], Any],
    shared: bool = False,
) -> list[Chunk]:
    """Generate ``chunks`` (number, rows) on ``engine``, giving each finished one to ``on_finished``;
    a chunk stopped by the chunk timeout is tried ``request.retries`` more times.

    ``shared``: ``chunks`` is a `ChunkQueue` other ranks may take from (`step_chunks`).

    Returns the chunks stopped at their last attempt.
    """
    waiting: Iterable[tuple[int, pd.DataFrame]] = chunks
    stopped: list[Chunk] = []
    for attempt in range(1, request.retries + 2):
        # Made as the engine takes them: a finished chunk is freed once it is handed on.
        made = (Chunk(number, rows, attempt) for number, rows in waiting)
        stopped = engine.call(
            step_chunks,
            made,
            request,
            report,
            on_finished,
            waiting if shared and isinstance(waiting, ChunkQueue) else None,  # retries: the stopped chunks
        )
        if not stopped:
            break
        waiting = [(chunk.number, chunk.rows) for chunk in stopped]
    return stopped


class ProgressReporter:
    """Sends a partition's progress to the client as Dask events, at most once an interval."""

    def __init__(self, worker: Worker, request: GenerationRequest, partition: int, rank: int, total: int):
        self.worker = worker
        self.interval = request.progress_interval
        self.message = {
            "run": request.run_id,
            "task": str(worker.get_current_task()),
            "partition": partition,
            "rank": rank,
            "worker": worker.address,
            "total": total,
        }
        self.done = self.tokens = 0  # tokens: output tokens when generating, prompt tokens when pooling
        self.last = 0.0

    def advance(self, rows: int, tokens: int) -> None:
        self.done += rows
        self.tokens += tokens

    def due(self) -> bool:
        """Whether `send` would send now."""
        return time.monotonic() - self.last >= self.interval

    def send(self, final: bool = False) -> None:
        if final or self.due():
            self.last = time.monotonic()
            message = {**self.message, "done": self.done, "tokens": self.tokens, "final": final}
            self.worker.log_event(PROGRESS_TOPIC, message)


def step_chunks(
    llm: LLM,
    chunks: Iterable[Chunk],
    request: GenerationRequest,
    report: ProgressReporter,
    on_finished: Callable[[Chunk], Any],
    queue: ChunkQueue | None = None,
) -> list[Chunk]:
    """Runs on the engine's thread: generate ``chunks``, handing each to ``on_finished`` when done.

    The engine is kept full across chunk boundaries: the next chunk is added while fewer
    than two batches' worth of requests are in it (with a shared ``queue``, fewer than a
    quarter of the task's unfinished rows, but at least a batch: `lookahead`). The oldest
    unfinished chunk is stopped (its requests aborted, so the rank moves on) once it has been
    oldest for longer than ``request.chunk_timeout``; stopped chunks are returned. Each
    finished chunk is given the engine's prefix-cache counts since the chunk before it finished.

    ``queue``: the task's `ChunkQueue` (first attempts), shared with other ranks; the chunks
    are taken from it, not from ``chunks``.
    Between two steps the loop answers its requests to give work away: the newest chunks none
    of whose requests the engine has started (`unstarted`) leave the engine (their requests
    aborted, so they can never finish here) and go back to the front of the queue, then the
    back half of the queue is given away, all under the queue's lock; what stays is added to
    the engine again as it makes room. A chunk with a started request is never given away.
    """
    counted = prefix_cache_counts(llm)

    def finished(chunk: Chunk) -> None:
        nonlocal counted
        now = prefix_cache_counts(llm)
        chunk.prefix_cache = (now[0] - counted[0], now[1] - counted[1])
        counted = now
        on_finished(chunk)

    engine = llm.llm_engine
    batch = engine.vllm_config.scheduler_config.max_num_seqs

    def lookahead() -> int:
        """Requests to keep in the engine: two batches, but with a shared queue at most a
        quarter of the task's unfinished rows, so that a small task, or the end of a large one,
        keeps work unstarted for a rank that runs dry; never under one batch, which the engine
        steps at once (fewer would slow every task's end)."""
        if queue is None:
            return 2 * batch
        unfinished = len(owners) + queue.queued_rows()
        return min(2 * batch, max(batch, -(-unfinished // IN_ENGINE_SHARE)))

    waiting = iter(chunks)

    def take() -> Chunk | None:
        """The next chunk: with a ``queue``, taken from it (chunks put back in it come out
        again, even after it was found empty); else from ``chunks``."""
        if queue is None:
            return next(waiting, None)
        taken = queue.take()
        return Chunk(*taken) if taken is not None else None

    exhausted = False
    running: dict[int, Chunk] = {}  # in the order they were added
    owners: dict[str, Chunk] = {}
    stopped = []

    def unstarted_tail() -> list[Chunk]:
        """The newest chunks in the engine none of whose requests it has started, oldest first."""
        tail: list[Chunk] = []
        for chunk in reversed(running.values()):
            if (
                not chunk.pending
                or not np.isnan(chunk.finished_at).all()
                or chunk.halves  # score by cosine: one text of a pair is in
                or not unstarted(llm, chunk.pending)
            ):
                break
            tail.append(chunk)
        return tail[::-1]

    def give_back() -> list[tuple[int, pd.DataFrame]]:
        """Take the unstarted chunks out of the engine; their (number, rows), for the queue."""
        nonlocal exhausted
        back = unstarted_tail()
        for chunk in back:
            engine.abort_request(list(chunk.pending))
            for request_id in chunk.pending:
                del owners[request_id]
            del running[chunk.number]
            errors = len(chunk.rows) - len(set(chunk.pending.values()))
            report.advance(-errors, 0)  # counted again when re-added
        exhausted = exhausted and not back
        return [(chunk.number, chunk.rows) for chunk in back]

    if queue is not None:
        queue.start()
    try:
        while not exhausted or running:
            if queue is not None:
                queue.answer(give_back)
            while not exhausted and len(owners) < lookahead():
                chunk = take()
                if chunk is None:
                    exhausted = True
                    break
                report.advance(chunk.enqueue(llm, request), 0)
                if chunk.pending:
                    running[chunk.number] = chunk
                    owners.update(dict.fromkeys(chunk.pending, chunk))
                else:
                    finished(chunk)
            if not running:
                continue
            if not engine.has_unfinished_requests():  # never expected: the engine lost requests
                for chunk in running.values():
                    chunk.give_up("the engine returned no output")
                    finished(chunk)
                running.clear()
                owners.clear()
                continue
            oldest = next(iter(running.values()))
            oldest.head_since = oldest.head_since or time.monotonic()
            for output in engine.step():
                chunk = owners.pop(output.request_id, None) if output.finished else None
                if chunk is None:
                    continue
                report.advance(*chunk.finish_row(output.request_id, output))
                if not chunk.pending:
                    del running[chunk.number]
                    finished(chunk)
            if queue is not None and report.due():  # as often as progress: it asks the scheduler
                queue.unstarted_in_engine = sum(len(chunk.rows) for chunk in unstarted_tail())
            report.send()
            timeout = request.chunk_timeout
            if timeout is not None and oldest.pending and time.monotonic() - oldest.head_since > timeout:
                engine.abort_request(list(oldest.pending))
                for request_id in oldest.pending:
                    del owners[request_id]
                del running[oldest.number]
                stopped.append(oldest)
    finally:
        if queue is not None:  # requests from now on are answered from the queue alone
            queue.answer(None, stop=True)
        if owners:  # an error, or the worker closing: leave the engine empty for the next task
            engine.abort_request(list(owners))
    step_with_gang(llm)
    return stopped


def step_with_gang(llm: LLM) -> None:
    """Gang mode (`daskdp.strategies.gang`): step until no rank of the engine's data-parallel group has work.

    The ranks of a gang step together: one with nothing left runs vLLM's dummy batches while
    the others finish, and one that stopped stepping would leave them waiting in a collective.
    An independent engine (no data-parallel group) returns at once.
    """
    engine = llm.llm_engine
    if getattr(engine, "dp_group", None) is None:
        return
    while engine.has_unfinished_requests():
        engine.step()


def prefix_cache_counts(llm: LLM) -> tuple[int, int]:
    """Prompt tokens the engine has looked up in its prefix cache so far, and found there."""
    counts = {"vllm:prefix_cache_queries": 0, "vllm:prefix_cache_hits": 0}
    if not llm.llm_engine.log_stats:  # engine.disable-log-stats: true
        return 0, 0
    for metric in llm.get_metrics():
        if metric.name in counts:
            counts[metric.name] += int(metric.value)
    return counts["vllm:prefix_cache_queries"], counts["vllm:prefix_cache_hits"]
