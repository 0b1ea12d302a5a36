"""The ``map_partitions`` function: one partition of prompts -> the same rows with results.

A partition goes to its worker's engine in one batched call. Rows that cannot be generated
(null, empty or non-text prompts, prompts longer than the model allows, bad per-row sampling
values) keep their place with ``error`` set; the rest of the partition is generated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp.errors import PartitionTimeout
from daskdp.io import write_shard

if TYPE_CHECKING:
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
SUMMARY_DTYPES = {
    "partition": "int64",
    "rank": "int64",
    "worker": "object",
    "path": "object",
    "rows": "int64",
    "error_rows": "int64",
    "prompt_tokens": "int64",
    "output_tokens": "int64",
    "timed_out_rows": "int64",
    "started": "float64",
    "finished": "float64",
}
SAMPLING_KEYS = ("temperature", "top-p", "top-k", "max-tokens", "seed", "stop", "ignore-eos")
OVERRIDE_COLUMNS = ("max_tokens", "temperature", "seed")
PROGRESS_TOPIC = "daskdp-progress"


@dataclass(frozen=True)
class GenerationRequest:
    """What every partition of one run is generated with."""

    sampling: dict[str, Any]
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    run_id: str = ""
    partition_timeout: float | None = None
    progress_interval: float = 1.0


def result_meta(meta: pd.DataFrame) -> pd.DataFrame:
    """The empty frame that describes generated partitions of ``meta``."""
    return meta.assign(**{name: pd.Series(dtype=dtype) for name, dtype in RESULT_DTYPES.items()})


def summary_meta() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in SUMMARY_DTYPES.items()})


def generate_partition(
    part: pd.DataFrame, request: GenerationRequest, partition_info: dict | None = None
) -> pd.DataFrame:
    """Generate one partition on this worker's engine; every input row comes back once."""
    from distributed import get_worker

    from daskdp.plugin import get_engine

    if part.empty:
        return result_meta(part)
    engine, rank = get_engine()
    worker = get_worker()
    partition = partition_info["number"] if partition_info else -1
    report = ProgressReporter(worker, request, partition, rank, len(part))
    columns = engine.call(_generate, part, request, report, rank, partition)
    columns.update(rank=np.full(len(part), rank), worker=np.full(len(part), worker.address, dtype=object))
    return part.assign(
        **{name: pd.array(columns[name], dtype=dtype) for name, dtype in RESULT_DTYPES.items()}
    )


def generate_and_write(
    part: pd.DataFrame, request: GenerationRequest, output: str, partition_info: dict | None = None
) -> pd.DataFrame:
    """Generate one partition and write it as its own shard; return a one-row summary.

    A partition that times out writes nothing; its summary counts the rows left unfinished.
    """
    started = time.time()
    partition = partition_info["number"] if partition_info else 0
    summary = dict.fromkeys(SUMMARY_DTYPES, 0) | {
        "partition": partition,
        "rows": len(part),
        "started": started,
    }
    try:
        results = generate_partition(part, request, partition_info)
    except PartitionTimeout as timeout:
        summary.update(rank=timeout.rank, timed_out_rows=timeout.unfinished, worker="", path="")
    else:
        summary.update(
            rank=int(results["rank"].iloc[0]) if len(results) else -1,
            worker=str(results["worker"].iloc[0]) if len(results) else "",
            path=write_shard(results, output, partition),
            error_rows=int(results["error"].notna().sum()),
            prompt_tokens=int(results["prompt_tokens"].sum()),
            output_tokens=int(results["output_tokens"].sum()),
        )
    summary["finished"] = time.time()
    return pd.DataFrame([summary]).astype(SUMMARY_DTYPES)


class ProgressReporter:
    """Sends a partition's progress to the client as Dask events, at most once an interval."""

    def __init__(self, worker: Worker, request: GenerationRequest, partition: int, rank: int, total: int):
        self.worker = worker
        self.interval = request.progress_interval
        self.message = {"run": request.run_id, "partition": partition, "rank": rank, "total": total}
        self.last = 0.0

    def __call__(self, done: int, output_tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.last >= self.interval:
            self.last = now
            message = {**self.message, "done": done, "output_tokens": output_tokens, "final": final}
            self.worker.log_event(PROGRESS_TOPIC, message)


def _generate(
    llm: LLM,
    part: pd.DataFrame,
    request: GenerationRequest,
    report: Callable[..., None],
    rank: int,
    partition: int,
) -> dict[str, np.ndarray]:
    """Runs on the engine's thread: render, validate, enqueue, step until done."""
    n = len(part)
    errors = np.full(n, None, dtype=object)
    token_ids = _tokenize(llm, part, request, errors)
    params = _sampling_params(part, request, errors)
    texts = np.full(n, None, dtype=object)
    finish = np.full(n, None, dtype=object)
    output_tokens = np.zeros(n, dtype=np.int64)
    started_at = time.time()
    finished_at = np.full(n, np.nan)
    first_token = np.full(n, np.nan)
    queued = np.full(n, np.nan)
    prompt_tokens = np.array([len(ids) if ids is not None else 0 for ids in token_ids], dtype=np.int64)

    rows = [i for i in range(n) if errors[i] is None]
    pending = _enqueue(llm, rows, token_ids, params, errors)
    engine = llm.llm_engine
    deadline = time.monotonic() + request.partition_timeout if request.partition_timeout else None
    done = n - len(pending)
    produced = 0
    report(done, produced)
    try:
        while pending and engine.has_unfinished_requests():
            for output in engine.step():
                if not output.finished or output.request_id not in pending:
                    continue
                i = pending.pop(output.request_id)
                completion = output.outputs[0]
                texts[i] = completion.text
                output_tokens[i] = len(completion.token_ids)
                finish[i] = completion.finish_reason
                finished_at[i] = time.time()
                if output.metrics is not None:  # with the engine's stats on (disable_log_stats=False)
                    first_token[i] = output.metrics.first_token_latency
                    queued[i] = output.metrics.scheduled_ts - output.metrics.queued_ts
                done += 1
                produced += len(completion.token_ids)
            report(done, produced)
            if deadline is not None and time.monotonic() > deadline:
                raise PartitionTimeout(rank, partition, request.partition_timeout, len(pending))
    finally:
        if pending:
            engine.abort_request(list(pending))
    for i in pending.values():
        errors[i] = "the engine returned no output"
    report(done, produced, final=True)
    return {
        "generated_text": texts,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "finish_reason": finish,
        "error": errors,
        "started_at": np.full(n, started_at),
        "finished_at": finished_at,
        "time_to_first_token": first_token,
        "queue_seconds": queued,
    }


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
