"""The ``map_partitions`` functions: one partition of prompts -> its rows with results.

A partition is generated in chunks on its worker's engine, which daskdp steps itself: for
live progress, for aborting a chunk that runs past its timeout, and for writing each chunk
as soon as it is done. Rows that cannot be generated (null, empty or non-text prompts,
prompts longer than the model allows, bad per-row sampling values, rows the engine rejects)
keep their place with ``error`` set; the rest of the chunk is generated.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp import checkpoint

if TYPE_CHECKING:
    from dask.typing import Key
    from distributed import Worker
    from vllm import LLM

RESULT_DTYPES = {
    "generated_text": "string",
    "prompt_tokens": "Int64",
    "output_tokens": "Int64",
    "finish_reason": "string",
    "rank": "Int64",
    "worker": "string",
    "error": "string",
    "started_at": "float64",
    "finished_at": "Float64",
    "time_to_first_token": "Float64",
    "queue_seconds": "Float64",
}
RECORD_DTYPES = {
    "chunk": "int64",
    "status": "object",
    "rows": "int64",
    "first_row": "int64",
    "last_row": "int64",
    "first_id": "object",
    "last_id": "object",
    "error_rows": "int64",
    "prompt_tokens": "int64",
    "output_tokens": "int64",
    "timed_out_rows": "int64",
    "timed_out_ids": "object",
    "prefix_cache_queries": "int64",
    "prefix_cache_hits": "int64",
    "rank": "int64",
    "worker": "object",
    "partition": "int64",
    "attempts": "int64",
    "started": "float64",
    "finished": "float64",
}
SKIPPED = "skipped"
SAMPLING_KEYS = ("temperature", "top-p", "top-k", "max-tokens", "seed", "stop", "ignore-eos")
OVERRIDE_COLUMNS = ("max_tokens", "temperature", "seed")
PROGRESS_TOPIC = "daskdp-progress"
GIVEN_AWAY = "daskdp-given-away"  # a task's metadata on the scheduler: chunks it gave away


@dataclass(frozen=True)
class GenerationRequest:
    """What every partition of one run is generated with."""

    sampling: dict[str, Any]
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    id_column: str = "id"
    run_id: str = ""
    chunk_rows: int = 1024
    chunk_timeout: float | None = None
    stall_timeout: float | None = None
    retries: int = 0
    progress_interval: float = 1.0


def result_meta(meta: pd.DataFrame) -> pd.DataFrame:
    """The empty frame that describes generated partitions of ``meta``."""
    return meta.assign(**{name: pd.Series(dtype=dtype) for name, dtype in RESULT_DTYPES.items()})


def record_meta() -> pd.DataFrame:
    """The empty frame of chunk records that ``generate_and_write`` returns."""
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in RECORD_DTYPES.items()})


class Chunk:
    """Rows generated and written together, and their results as they come from the engine."""

    def __init__(self, number: int, rows: pd.DataFrame, attempt: int = 1):
        self.number, self.rows, self.attempt = number, rows, attempt
        n = len(rows)
        self.errors = np.full(n, None, dtype=object)
        self.texts = np.full(n, None, dtype=object)
        self.finish_reasons = np.full(n, None, dtype=object)
        self.prompt_tokens = np.zeros(n, dtype=np.int64)
        self.output_tokens = np.zeros(n, dtype=np.int64)
        self.finished_at = np.full(n, np.nan)
        self.first_token = np.full(n, np.nan)
        self.queued = np.full(n, np.nan)
        self.pending: dict[str, int] = {}  # row by request id, while in the engine
        self.started = time.time()
        self.head_since: float | None = None  # when it became the oldest chunk in the engine
        self.prefix_cache = (0, 0)  # the engine's prefix-cache queries and hits, in tokens

    def enqueue(self, llm: LLM, request: GenerationRequest) -> None:
        """Render and check every row, then add the good ones to the engine."""
        self.started = time.time()
        token_ids = _tokenize(llm, self.rows, request, self.errors)
        self.prompt_tokens[:] = [len(ids) if ids is not None else 0 for ids in token_ids]
        params = _sampling_params(self.rows, request, self.errors)
        rows = [i for i in range(len(self.rows)) if self.errors[i] is None]
        self.pending = _enqueue(llm, rows, token_ids, params, self.errors)

    def finish_row(self, request_id: str, output: Any) -> int:
        """Take a finished request's output; return its number of output tokens."""
        i = self.pending.pop(request_id)
        completion = output.outputs[0]
        self.texts[i] = completion.text
        self.output_tokens[i] = len(completion.token_ids)
        self.finish_reasons[i] = completion.finish_reason
        self.finished_at[i] = time.time()
        if output.metrics is not None:  # with the engine's stats on (disable_log_stats=False)
            self.first_token[i] = output.metrics.first_token_latency
            self.queued[i] = output.metrics.scheduled_ts - output.metrics.queued_ts
        return len(completion.token_ids)

    def give_up(self, reason: str) -> None:
        """Mark the rows still in the engine as errors."""
        for i in self.pending.values():
            self.errors[i] = reason
        self.pending = {}

    def results(self, rank: int, worker: str) -> pd.DataFrame:
        """The chunk's rows with their result columns."""
        n = len(self.rows)
        columns = {
            "generated_text": self.texts,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "finish_reason": self.finish_reasons,
            "rank": np.full(n, rank),
            "worker": np.full(n, worker, dtype=object),
            "error": self.errors,
            "started_at": np.full(n, self.started),
            "finished_at": self.finished_at,
            "time_to_first_token": self.first_token,
            "queue_seconds": self.queued,
        }
        return self.rows.assign(
            **{name: pd.array(columns[name], dtype=dtype) for name, dtype in RESULT_DTYPES.items()}
        )

    def record(self, rank: int, worker: str, partition: int, id_column: str) -> dict[str, Any]:
        """What the manifest keeps of this chunk."""
        ids = self.rows[id_column]
        unfinished = sorted(self.pending.values())
        return {
            "chunk": self.number,
            "status": "",
            "rows": len(self.rows),
            "first_row": int(self.rows.index[0]),
            "last_row": int(self.rows.index[-1]),
            "first_id": str(ids.iloc[0]),
            "last_id": str(ids.iloc[-1]),
            "error_rows": int(sum(e is not None for e in self.errors)),
            "prompt_tokens": int(self.prompt_tokens.sum()),
            "output_tokens": int(self.output_tokens.sum()),
            "timed_out_rows": len(unfinished),
            "timed_out_ids": [str(ids.iloc[i]) for i in unfinished],
            "prefix_cache_queries": self.prefix_cache[0],
            "prefix_cache_hits": self.prefix_cache[1],
            "rank": rank,
            "worker": worker,
            "partition": partition,
            "attempts": self.attempt,
            "started": self.started,
            "finished": time.time(),
        }


def generate_partition(
    part: pd.DataFrame, request: GenerationRequest, partition_info: dict | None = None
) -> pd.DataFrame:
    """Generate one partition on this worker's engine and return it with its results.

    Every input row comes back once; rows a chunk timeout stopped come back with ``error`` set.
    """
    from distributed import get_worker

    from daskdp.plugin import get_engine

    if part.empty:
        return result_meta(part)
    engine, rank = get_engine()
    worker = get_worker()
    partition = partition_info["number"] if partition_info else -1
    report = ProgressReporter(worker, request, partition, rank, len(part))
    step = request.chunk_rows
    chunks = [Chunk(i, part.iloc[start : start + step]) for i, start in enumerate(range(0, len(part), step))]
    for chunk in engine.call(generate_chunks, chunks, request, report, lambda chunk: None):
        chunk.give_up(f"stopped by the chunk timeout of {request.chunk_timeout:g} s")
    report.send(final=True)
    return pd.concat([chunk.results(rank, worker.address) for chunk in chunks])


def generate_and_write(
    part: pd.DataFrame,
    request: GenerationRequest,
    output: str,
    partition_info: dict | None = None,
    chunks: list[int] | None = None,
) -> pd.DataFrame:
    """Generate one partition chunk by chunk, writing each chunk as it finishes.

    ``chunks``: only these chunks of the partition (given away by the rank that holds the
    partition, `give_away`). Chunks not yet started may be given away in turn; a task run
    again (its worker died) leaves out the chunks it gave away (`GIVEN_AWAY`).

    Returns one record per chunk: done, timed out (after ``request.retries`` further
    attempts), or skipped because an earlier attempt at this task, on a worker that died,
    already wrote it.
    """
    from distributed import get_client, get_worker

    from daskdp.plugin import gang_engine, get_engine

    if part.empty:
        if (engine := gang_engine()) is not None:  # gang mode: a rank without rows steps along
            engine.call(step_with_gang)
        return record_meta()
    partition = partition_info["number"] if partition_info else 0
    engine, rank = get_engine()
    worker = get_worker().address
    key = get_worker().get_current_task()
    written = checkpoint.done_chunks(output)
    given = set(get_client().get_metadata([key, GIVEN_AWAY], default=[]))
    wanted = set(chunks) if chunks is not None else None
    mine = [
        (number, rows)
        for number, rows in part.groupby(part.index.to_numpy() // request.chunk_rows, sort=True)
        if number not in given and (wanted is None or number in wanted)
    ]
    report = ProgressReporter(get_worker(), request, partition, rank, sum(len(rows) for _, rows in mine))
    report.send()  # started: from here the client expects progress (run.stall-timeout)
    todo, records = [], []
    for number, rows in mine:
        if number in written:
            skipped = Chunk(int(number), rows).record(rank, worker, partition, request.id_column)
            records.append(skipped | {"status": SKIPPED})
            report.advance(len(rows), 0)
        else:
            todo.append((int(number), rows))

    def write(chunk: Chunk) -> dict[str, Any]:
        record = chunk.record(rank, worker, partition, request.id_column)
        return checkpoint.write_chunk(chunk.results(rank, worker), output, record, request.id_column)

    queue = ChunkQueue(todo)
    with ThreadPoolExecutor(1, thread_name_prefix="daskdp-write") as writer, queue.shared(key):
        writes = []
        waiting: Iterable[tuple[int, pd.DataFrame]] = queue
        for attempt in range(1, request.retries + 2):
            # Made as the engine takes them: a finished chunk is freed once it is written.
            made = (Chunk(number, rows, attempt) for number, rows in waiting)
            stopped = engine.call(
                generate_chunks, made, request, report, lambda c: writes.append(writer.submit(write, c))
            )
            waiting = [(chunk.number, chunk.rows) for chunk in stopped]
            if not stopped:
                break
        for chunk in stopped:
            record = chunk.record(rank, worker, partition, request.id_column)
            records.append(checkpoint.write_timed_out(output, record))
        records.extend(write.result() for write in writes)
    report.send(final=True)
    return pd.DataFrame(records)[list(RECORD_DTYPES)].astype(RECORD_DTYPES)


class ChunkQueue:
    """The chunks of a running task that its engine has not taken yet.

    The engine takes them from the front; a rank that has run out of work is given the back
    half (`give_away`), so that each side keeps neighbouring chunks (rows sharing a prefix).
    """

    running: dict[Key, ChunkQueue] = {}  # the queues of the tasks running in this process

    def __init__(self, chunks: Iterable[tuple[int, pd.DataFrame]]):
        self.chunks = collections.deque(chunks)
        self.lock = threading.Lock()

    def __iter__(self):
        while True:
            with self.lock:
                if not self.chunks:
                    return
                chunk = self.chunks.popleft()
            yield chunk

    @contextlib.contextmanager
    def shared(self, key: Key):
        """Let other ranks take chunks from this queue while task ``key`` runs."""
        ChunkQueue.running[key] = self
        try:
            yield
        finally:
            ChunkQueue.running.pop(key, None)

    def rows(self) -> int:
        with self.lock:
            return sum(len(rows) for _, rows in self.chunks)

    def give_away(self) -> list[int]:
        """Remove the back half of the chunks (rounded up); their numbers."""
        with self.lock:
            given = [self.chunks.pop()[0] for _ in range((len(self.chunks) + 1) // 2)]
        return sorted(given)


def queued_rows(keys: list[Key]) -> dict[Key, int]:
    """Run on a worker (``client.run``): rows not yet started by those of ``keys`` running there."""
    return {key: queue.rows() for key in keys if (queue := ChunkQueue.running.get(key)) is not None}


def give_away(key: Key) -> list[int]:
    """Run on a worker (``client.run``): take half the unstarted chunks of task ``key``, for
    another rank to generate; their numbers (none when the task has finished).

    The caller records them in the task's metadata under `GIVEN_AWAY`, so that the task, run
    again after its worker died, leaves them out.
    """
    queue = ChunkQueue.running.get(key)
    return queue.give_away() if queue is not None else []


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
        self.done = self.output_tokens = 0
        self.last = 0.0

    def advance(self, rows: int, output_tokens: int) -> None:
        self.done += rows
        self.output_tokens += output_tokens

    def send(self, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.last >= self.interval:
            self.last = now
            message = {**self.message, "done": self.done, "output_tokens": self.output_tokens, "final": final}
            self.worker.log_event(PROGRESS_TOPIC, message)


def generate_chunks(
    llm: LLM,
    chunks: Iterable[Chunk],
    request: GenerationRequest,
    report: ProgressReporter,
    on_finished: Callable[[Chunk], Any],
) -> list[Chunk]:
    """Runs on the engine's thread: generate ``chunks``, handing each to ``on_finished`` when done.

    The engine is kept full across chunk boundaries: the next chunk is added while fewer
    than two batches' worth of requests are in it. The oldest unfinished chunk is stopped
    (its requests aborted, so the rank moves on) once it has been oldest for longer than
    ``request.chunk_timeout``; stopped chunks are returned. Each finished chunk is given the
    engine's prefix-cache counts since the chunk before it finished.
    """
    counted = prefix_cache_counts(llm)

    def finished(chunk: Chunk) -> None:
        nonlocal counted
        now = prefix_cache_counts(llm)
        chunk.prefix_cache = (now[0] - counted[0], now[1] - counted[1])
        counted = now
        on_finished(chunk)

    engine = llm.llm_engine
    lookahead = 2 * engine.vllm_config.scheduler_config.max_num_seqs
    waiting = iter(chunks)
    exhausted = False
    running: dict[int, Chunk] = {}  # in the order they were added
    owners: dict[str, Chunk] = {}
    stopped = []
    try:
        while not exhausted or running:
            while not exhausted and len(owners) < lookahead:
                chunk = next(waiting, None)
                if chunk is None:
                    exhausted = True
                    break
                chunk.enqueue(llm, request)
                report.advance(len(chunk.rows) - len(chunk.pending), 0)
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
                report.advance(1, chunk.finish_row(output.request_id, output))
                if not chunk.pending:
                    del running[chunk.number]
                    finished(chunk)
            report.send()
            timeout = request.chunk_timeout
            if timeout is not None and oldest.pending and time.monotonic() - oldest.head_since > timeout:
                engine.abort_request(list(oldest.pending))
                for request_id in oldest.pending:
                    del owners[request_id]
                del running[oldest.number]
                stopped.append(oldest)
    finally:
        if owners:  # an error, or the worker closing: leave the engine empty for the next task
            engine.abort_request(list(owners))
    step_with_gang(llm)
    return stopped


def step_with_gang(llm: LLM) -> None:
    """Gang mode (`daskdp.gang`): step until no rank of the engine's data-parallel group has work.

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


def _tokenize(llm: LLM, part: pd.DataFrame, request: GenerationRequest, errors: np.ndarray) -> list:
    """Token ids of every row's prompt (chat messages rendered first); errors where it cannot."""
    tokenizer = llm.get_tokenizer()
    max_model_len = llm.llm_engine.model_config.max_model_len
    nothing = np.full(len(part), None, dtype=object)
    prompts = part[request.prompt_column].to_numpy(dtype=object) if request.prompt_column in part else nothing
    messages = (
        part[request.messages_column].to_numpy(dtype=object) if request.messages_column in part else nothing
    )
    plain: dict[int, str] = {}
    chat: dict[int, str] = {}
    for i in range(len(part)):
        conversation = messages[i]
        if not _is_missing(conversation):
            try:
                chat[i] = tokenizer.apply_chat_template(
                    _as_messages(conversation), tokenize=False, add_generation_prompt=True
                )
            except Exception as e:
                errors[i] = f"messages cannot be rendered: {_first_line(e)}"
            continue
        prompt = prompts[i]
        if _is_missing(prompt):
            errors[i] = "prompt is null"
        elif not isinstance(prompt, str):
            errors[i] = f"prompt is {type(prompt).__name__}, not text"
        elif not prompt.strip():
            errors[i] = "prompt is empty"
        else:
            plain[i] = prompt
    token_ids: list = [None] * len(part)
    for texts, special in ((plain, True), (chat, False)):
        if texts:
            encoded = tokenizer(list(texts.values()), add_special_tokens=special)["input_ids"]
            for i, ids in zip(texts, encoded, strict=True):
                token_ids[i] = list(ids)
    for i, ids in enumerate(token_ids):
        if ids is not None and len(ids) >= max_model_len:
            errors[i] = f"prompt has {len(ids)} tokens, too long for max_model_len {max_model_len}"
    return token_ids


def _sampling_params(part: pd.DataFrame, request: GenerationRequest, errors: np.ndarray) -> list:
    """One ``SamplingParams`` per row, shared between rows with the same per-row overrides."""
    from vllm import SamplingParams

    base = {key.replace("-", "_"): request.sampling[key] for key in SAMPLING_KEYS}
    base["stop"] = list(base["stop"] or []) or None
    overrides = [column for column in OVERRIDE_COLUMNS if column in part]
    values = [part[column].to_numpy(dtype=object) for column in overrides]
    cache: dict[tuple, Any] = {}
    params: list = [None] * len(part)
    for i in range(len(part)):
        if errors[i] is not None:
            continue
        key = tuple(None if _is_missing(v[i]) else v[i] for v in values)
        if key not in cache:
            try:
                cache[key] = SamplingParams(**{**base, **_row_overrides(overrides, key)})
            except (TypeError, ValueError) as e:
                cache[key] = f"bad sampling value: {_first_line(e)}"
        if isinstance(cache[key], str):
            errors[i] = cache[key]
        else:
            params[i] = cache[key]
    return params


def _row_overrides(columns: list[str], values: tuple) -> dict[str, Any]:
    overrides = {}
    for column, value in zip(columns, values, strict=True):
        if value is None:
            continue
        if column in ("max_tokens", "seed"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{column} must be an integer, got {value}")
            value = int(value)
        else:
            value = float(value)
        overrides[column] = value
    if overrides.get("max_tokens", 1) < 1:
        raise ValueError(f"max_tokens must be at least 1, got {overrides['max_tokens']}")
    return overrides


def _enqueue(llm: LLM, rows: list[int], token_ids: list, params: list, errors: np.ndarray) -> dict[str, int]:
    """Add the rows' requests in one batch; if the batch is refused, row by row.

    Returns the rows by request id, as the engine's outputs name them.
    """
    prompts = [{"prompt_token_ids": token_ids[i]} for i in rows]
    try:
        request_ids = llm.enqueue(prompts, [params[i] for i in rows], use_tqdm=False)
        return {_output_id(request_id): i for request_id, i in zip(request_ids, rows, strict=True)}
    except Exception:
        pass
    pending = {}
    for i, prompt in zip(rows, prompts, strict=True):
        try:
            (request_id,) = llm.enqueue([prompt], [params[i]], use_tqdm=False)
        except Exception as e:
            errors[i] = f"rejected by the engine: {_first_line(e)}"
        else:
            pending[_output_id(request_id)] = i
    return pending


def _output_id(request_id: str) -> str:
    """The id outputs carry: ``enqueue`` returns it with an internal ``-suffix`` appended."""
    return request_id.rsplit("-", 1)[0]


def _as_messages(conversation: Any) -> list[dict[str, str]]:
    if isinstance(conversation, str):
        raise ValueError("expected a list of {role, content}, got a string")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in conversation]


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]
