"""A run's results as the output file of an OpenAI Batch job: one line per request, in input
order, shaped as ``python -m vllm.entrypoints.openai.run_batch`` writes them.

Export streams: the chunk files are read one at a time, so the client holds one chunk and one
bucket of lines, whatever the number of requests. Chunk files in input order (the manifest's
``row_order`` is ``input``) are written as they come. Prefix locality puts rows sharing a
prompt prefix together, so a chunk may hold rows from anywhere in the input: then each chunk's
lines go to bucket files on local disk by position range (a distribution sort), and each
bucket is sorted and written in turn. That reads every chunk once and writes every line twice,
where merging the chunks directly would have to hold a row group of every chunk at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pandas as pd

from daskdp.errors import UserError
from daskdp.inputs import openai
from daskdp.output.manifest import read_manifest
from daskdp.output.read import chunk_files

BUCKET_ROWS = 1 << 16  # lines per bucket of the distribution sort, at least
MAX_BUCKETS = 256  # open files at once while the buckets fill

COLUMNS = [
    "position", openai.ID_COLUMN, "endpoint", "generated_text", "prompt_tokens", "output_tokens",
    "finish_reason", "error", "finished_at",
]  # fmt: skip
# Compact, and UTF-8 as it is: as pydantic's model_dump_json writes run_batch's lines.
ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
# Per-row control's columns (n samples, logprobs and the alternatives asked for), and the
# pooling endpoints' (a list input's element, rerank's top_n and document, the results), when present.
OPTIONAL_COLUMNS = [
    "sample",
    "logprobs",
    "top_logprobs",
    openai.ITEM_COLUMN,
    "top_n",
    "text_2",
    "embedding",
    "score",
]


def export(results: str, target: str, errors: str | None = None) -> dict[str, int]:
    """Write the OpenAI Batch output of the run in ``results`` to ``target``.

    Every request of the input is one line, in input order: a response with status 200, or a
    failed request with status 400, a null body and ``error`` ``{code, message}``. With
    ``errors``, failed requests go to that file only, as OpenAI's Batch API does.

    Returns the numbers of requests and of failed ones written.

    Raises
    ------
    UserError
        ``results`` holds no finished run over an OpenAI Batch file.

    Examples
    --------
    >>> daskdp.export("batch.out", "results.jsonl")  # doctest: +SKIP
    {'requests': 2, 'errors': 0}
    """
    manifest = read_manifest(results)
    if manifest is None:
        raise UserError(f"{results} holds no daskdp run (no _manifest.json); check the path")
    settings = manifest["settings"]
    if settings["input"].get("format") != openai.FORMAT:
        raise UserError(
            f"the run in {results} did not read an OpenAI Batch file ({manifest['input']}); "
            "export writes OpenAI Batch output: read other results with daskdp.read_results"
        )
    fs, files = chunk_files(results)
    if len(files) < manifest["chunks"]:
        raise UserError(
            f"the run in {results} is not finished: {len(files)} of {manifest['chunks']} chunks are "
            "written; continue it with `daskdp run ... --resume`, then export"
        )
    model = settings["input"]["model-names"][0]
    key = bytes.fromhex(manifest["input_fingerprint"])[:16]  # the ids' hash key: this input's
    counts = {"requests": 0, "errors": 0, "rows": 0}
    pooled = settings.get("task", "generate") != "generate"  # the manifest names pooling tasks only
    make = pooled_part if pooled else output_line

    def lines() -> Iterator[tuple[int, str, bool]]:
        for path in files:
            for entry in chunk_lines(read_chunk(fs, path), model, key, make):
                counts["rows"] += 1
                yield entry

    ordered = lines() if manifest.get("row_order") == "input" else sorted_lines(lines(), manifest["rows"])
    if pooled:  # a list input's rows, back together as one response
        ordered = regrouped(ordered, model, key)
    with _atomic(target) as out, _atomic(errors) if errors else contextlib.nullcontext() as failed:
        for _, line, error in ordered:
            counts["requests"] += 1
            counts["errors"] += error
            (failed if error and failed is not None else out).write(line + "\n")
        if counts["rows"] != manifest["rows"]:  # a chunk file changed since it was written
            raise UserError(
                f"the chunk files of {results} hold {counts['rows']:,} rows, not the "
                f"{manifest['rows']:,} of its input; resume the run to check and redo its chunks"
            )
    return {"requests": counts["requests"], "errors": counts["errors"]}


def read_chunk(fs, path: str) -> pd.DataFrame:
    """The columns of one chunk file that the export needs (those of `OPTIONAL_COLUMNS` the run
    has)."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = [name for name in COLUMNS + OPTIONAL_COLUMNS if name in parquet.schema_arrow.names]
        return parquet.read(columns=names).to_pandas()


def chunk_lines(chunk: pd.DataFrame, model: str, key: bytes, make=None) -> Iterator[tuple[int, str, bool]]:
    """Each input row of one chunk file: its position, its output line (``make``: `output_line`,
    or `pooled_part` for a pooling run) and whether it failed. A request's samples (rows of one
    position, n > 1) are one line, with a choice each."""
    make = make or output_line
    order = ["position", "sample"] if "sample" in chunk else ["position"]
    rows = chunk.sort_values(order, kind="stable").to_dict("records")
    for position, samples in itertools.groupby(rows, key=lambda row: row["position"]):
        line = make(list(samples), model, key)
        yield int(position), ENCODER.encode(line), line["error"] is not None


def line_ids(position: int, custom_id: str, key: bytes) -> tuple[str, str, str]:
    """A request's three ids of 16 hex digits (line, request, body), as vllm.utils.random_uuid
    makes them, but the same on every export of the run."""
    digest = hashlib.blake2b(f"{position}:{custom_id}".encode(), digest_size=24, key=key).hexdigest()
    return digest[:16], digest[16:32], digest[32:]


def output_line(samples: list[dict[str, Any]], model: str, key: bytes) -> dict[str, Any]:
    """One request's output line, from its rows (one per sample). Its ids are vLLM's shape
    (16 hex digits) and stay the same on every export of the run."""
    first = samples[0]
    if not pd.isna(first["error"]):  # a failed request is one row
        return failed_line(first["position"], first[openai.ID_COLUMN], first["error"], key)
    line_id, request_id, body_id = line_ids(first["position"], first[openai.ID_COLUMN], key)
    body = response_body(samples, model, body_id)
    return {
        "id": f"vllm-{line_id}",
        "custom_id": first[openai.ID_COLUMN],
        "response": {"status_code": 200, "request_id": f"vllm-batch-{request_id}", "body": body},
        "error": None,
    }


def failed_line(position: int, custom_id: str, message: str, key: bytes) -> dict[str, Any]:
    """A failed request's line: status 400, a null body, and ``error`` ``{code, message}``."""
    line_id, request_id, _ = line_ids(position, custom_id, key)
    return {
        "id": f"vllm-{line_id}",
        "custom_id": custom_id,
        "response": {"status_code": 400, "request_id": f"vllm-batch-{request_id}", "body": None},
        "error": {"code": error_code(message), "message": message},
    }


def response_body(samples: list[dict[str, Any]], model: str, key: str) -> dict[str, Any]:
    """The body vLLM's server answers a request with, field for field: a ``chat.completion``
    or a ``text_completion``, with a choice per sample. ``system_fingerprint`` is null (vLLM's
    ``--fingerprint-mode none``): its hash is of the engine's configuration, which the export
    does not have."""
    first = samples[0]
    prompt_tokens = int(first["prompt_tokens"])
    completion_tokens = sum(int(row["output_tokens"]) for row in samples)
    usage = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }
    finished = max(row["finished_at"] for row in samples)
    head = {"created": int(finished) if not pd.isna(finished) else 0, "model": model}
    tail = {"service_tier": None, "system_fingerprint": None}
    chat = first["endpoint"] != "/v1/completions"
    choices = [choice(row, index, chat) for index, row in enumerate(samples)]
    if not chat:
        return {
            "id": f"cmpl-{key}",
            "object": "text_completion",
            **head,
            "choices": choices,
            **tail,
            "usage": usage,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    return {
        "id": f"chatcmpl-{key}",
        "object": "chat.completion",
        **head,
        "choices": choices,
        **tail,
        "usage": usage | {"completion_tokens_details": None},
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def choice(row: dict[str, Any], index: int, chat: bool) -> dict[str, Any]:
    """One sample as a choice of a chat.completion (``chat``) or a text_completion."""
    logprobs = row.get("logprobs")  # a list of entries, or None (not asked for)
    common = {"logprobs": None, "finish_reason": row["finish_reason"], "stop_reason": None, "token_ids": None}
    if not chat:
        if logprobs is not None:
            common["logprobs"] = completion_logprobs(logprobs)
        return {
            "index": index,
            "text": row["generated_text"],
            **common,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "routed_experts": None,
        }
    message = {
        "role": "assistant",
        "content": row["generated_text"],
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "reasoning": None,
    }
    if logprobs is not None:
        alternatives = row.get("top_logprobs")
        alternatives = None if pd.isna(alternatives) else int(alternatives)
        common["logprobs"] = {"content": [chat_logprob(entry, alternatives) for entry in logprobs]}
    return {"index": index, "message": message, **common, "routed_experts": None}


def chat_logprob(entry: dict[str, Any], alternatives: int | None) -> dict[str, Any]:
    """A ``logprobs`` entry (token, logprob, top) as a chat choice's logprobs content. Its
    ``top_logprobs`` are the first ``alternatives`` of ``top`` (the position's token, then the
    likeliest others), as vLLM's server takes them from the same list."""

    def token(item: dict[str, Any]) -> dict[str, Any]:
        text = str(item["token"])
        return {"token": text, "logprob": _logprob(item), "bytes": list(text.encode(errors="replace"))}

    return token(entry) | {"top_logprobs": [token(item) for item in _top(entry)[:alternatives]]}


def completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``logprobs`` entries as a text_completion choice's logprobs."""
    tokens = [str(entry["token"]) for entry in entries]
    offsets = [0, *itertools.accumulate(len(token) for token in tokens)][:-1]
    return {
        "text_offset": offsets,
        "token_logprobs": [_logprob(entry) for entry in entries],
        "tokens": tokens,
        "top_logprobs": [{str(item["token"]): _logprob(item) for item in _top(entry)} for entry in entries],
    }


def _logprob(item: dict[str, Any]) -> float:
    return max(float(item["logprob"]), -9999.0)  # -inf as vLLM's server writes it


def _top(entry: dict[str, Any]) -> list:
    top = entry.get("top")  # read from Parquet: an array, or None
    return [] if top is None else list(top)


def pooled_part(rows: list[dict[str, Any]], model: str, key: bytes) -> dict[str, Any]:
    """One row of a pooling run, as the part of its request's response that `regrouped` puts
    together: the request's custom_id, the row's element (``item``), its result, its tokens."""
    (row,) = rows
    item = row.get(openai.ITEM_COLUMN)
    item = None if item is None or pd.isna(item) else int(item)
    custom_id = row[openai.ID_COLUMN]
    if item:  # a list input's element after the first: its id is the request's with [item]
        custom_id = custom_id[: -len(f"[{item}]")]
    part = {
        "position": int(row["position"]),
        "custom_id": custom_id,
        "item": item,
        "endpoint": row["endpoint"],
        "error": None if pd.isna(row["error"]) else row["error"],
        "tokens": 0 if pd.isna(row["prompt_tokens"]) else int(row["prompt_tokens"]),
        "created": 0 if pd.isna(row["finished_at"]) else int(row["finished_at"]),
    }
    if part["error"] is None:
        if row["endpoint"] == "/v1/embeddings":
            part["embedding"] = [float(x) for x in row["embedding"]]
        else:
            part["score"] = float(row["score"])
            if row["endpoint"] == "/v1/rerank":
                top_n = row.get("top_n")
                part |= {"document": row["text_2"], "top_n": None if pd.isna(top_n) else int(top_n)}
    return part


def regrouped(
    parts: Iterator[tuple[int, str, bool]], model: str, key: bytes
) -> Iterator[tuple[int, str, bool]]:
    """A pooling run's rows (`pooled_part`, in input order) as one line per request: the rows
    of a list input's elements are consecutive, the first with ``item`` 0."""
    request: list[dict[str, Any]] = []
    for _, text, _ in parts:
        part = json.loads(text)
        if request and part["item"] in (None, 0):
            yield pooled_line(request, model, key)
            request = []
        request.append(part)
    if request:
        yield pooled_line(request, model, key)


def pooled_line(parts: list[dict[str, Any]], model: str, key: bytes) -> tuple[int, str, bool]:
    """One embeddings, score or rerank request's line, from its rows: failed when one of them
    failed, as vLLM fails the whole request."""
    first = parts[0]
    position, custom_id = first["position"], first["custom_id"]
    failed = next((part["error"] for part in parts if part["error"] is not None), None)
    if failed is not None:
        return position, ENCODER.encode(failed_line(position, custom_id, failed, key)), True
    line_id, request_id, body_id = line_ids(position, custom_id, key)
    body = pooled_body(parts, model, body_id)
    line = {
        "id": f"vllm-{line_id}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": f"vllm-batch-{request_id}", "body": body},
        "error": None,
    }
    return position, ENCODER.encode(line), False


def pooled_body(parts: list[dict[str, Any]], model: str, key: str) -> dict[str, Any]:
    """The body vLLM's server answers a pooling request with, field for field: an embedding
    list, a score list, or a rerank response (results by relevance, the first ``top_n``)."""
    endpoint = parts[0]["endpoint"]
    tokens = sum(part["tokens"] for part in parts)
    created = max(part["created"] for part in parts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
             "prompt_tokens_details": None, "completion_tokens_details": None}  # fmt: skip
    if endpoint == "/v1/embeddings":
        data = [{"index": i, "object": "embedding", "embedding": p["embedding"]} for i, p in enumerate(parts)]
        return {
            "id": f"embd-{key}",
            "object": "list",
            "created": created,
            "model": model,
            "data": data,
            "usage": usage,
        }
    if endpoint == "/v1/score":
        data = [{"index": i, "object": "score", "score": p["score"]} for i, p in enumerate(parts)]
        return {
            "id": f"score-{key}",
            "object": "list",
            "created": created,
            "model": model,
            "data": data,
            "usage": usage,
        }
    results = [
        {"index": i, "document": {"text": p["document"], "multi_modal": None}, "relevance_score": p["score"]}
        for i, p in enumerate(parts)
    ]
    results.sort(key=lambda result: result["relevance_score"], reverse=True)  # stable, as vLLM's
    top_n = parts[0]["top_n"] or len(results)
    return {
        "id": f"score-{key}",
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": results[:top_n],
    }


def error_code(message: str) -> str:
    """OpenAI's code for a failed request, from daskdp's reason."""
    if message.startswith("body.model "):
        return "model_not_found"
    if "not supported by daskdp" in message or " needs " in message:
        return "unsupported_value"
    if message.startswith("stopped by the chunk timeout"):
        return "timeout"
    return "invalid_request"


def sorted_lines(lines: Iterator[tuple[int, str, bool]], rows: int) -> Iterator[tuple[int, str, bool]]:
    """``lines`` (position, line, failed) in any order, back in position order, through bucket
    files on local disk: each bucket holds a range of positions and is sorted in memory."""
    width = max(BUCKET_ROWS, math.ceil(rows / MAX_BUCKETS))
    with tempfile.TemporaryDirectory(prefix="daskdp-export-") as spill:
        buckets = [
            open(os.path.join(spill, f"{b:05d}"), "w+", encoding="utf-8")
            for b in range(math.ceil(rows / width))
        ]
        try:
            for position, line, failed in lines:
                buckets[position // width].write(f"{position}\t{int(failed)}\t{line}\n")
            for bucket in buckets:
                bucket.seek(0)
                held = sorted((_split(text) for text in bucket), key=lambda entry: entry[0])
                bucket.close()
                yield from held
        finally:
            for bucket in buckets:
                bucket.close()


def _split(text: str) -> tuple[int, str, bool]:
    position, failed, line = text.rstrip("\n").split("\t", 2)
    return int(position), line, failed == "1"


class _atomic:
    """A text file written under a hidden temporary name, renamed into place when complete."""

    def __init__(self, target: str):
        import fsspec

        self.fs, self.path = fsspec.core.url_to_fs(target)
        directory, name = posixpath.split(self.path)
        self.temporary = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")

    def __enter__(self):
        try:
            self.file = self.fs.open(self.temporary, "w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {self.path} ({e.strerror or e}); check the path") from None
        return self.file

    def __exit__(self, kind, error, traceback):
        self.file.close()
        if kind is None:
            self.fs.mv(self.temporary, self.path)
        else:
            self.fs.rm(self.temporary)
        return False
