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
SAMPLE_COLUMNS = ["sample", "logprobs"]  # per-row control's columns (n, top_logprobs), when present


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
    counts = {"requests": 0, "errors": 0}

    def lines() -> Iterator[tuple[int, str, bool]]:
        for path in files:
            yield from chunk_lines(read_chunk(fs, path), model, key)

    ordered = lines() if manifest.get("row_order") == "input" else sorted_lines(lines(), manifest["rows"])
    with _atomic(target) as out, _atomic(errors) if errors else contextlib.nullcontext() as failed:
        for _, line, error in ordered:
            counts["requests"] += 1
            counts["errors"] += error
            (failed if error and failed is not None else out).write(line + "\n")
        if counts["requests"] != manifest["rows"]:  # a chunk file changed since it was written
            raise UserError(
                f"the chunk files of {results} hold {counts['requests']:,} requests, not the "
                f"{manifest['rows']:,} of its input; resume the run to check and redo its chunks"
            )
    return counts


def read_chunk(fs, path: str) -> pd.DataFrame:
    """The columns of one chunk file that the export needs (``sample`` and ``logprobs`` when
    the run has them)."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = [name for name in COLUMNS + SAMPLE_COLUMNS if name in parquet.schema_arrow.names]
        return parquet.read(columns=names).to_pandas()


def chunk_lines(chunk: pd.DataFrame, model: str, key: bytes) -> Iterator[tuple[int, str, bool]]:
    """Each request of one chunk file: its position, its output line and whether it failed.
    A request's samples (rows of one position, n > 1) are one line, with a choice each."""
    order = ["position", "sample"] if "sample" in chunk else ["position"]
    rows = chunk.sort_values(order, kind="stable").to_dict("records")
    for position, samples in itertools.groupby(rows, key=lambda row: row["position"]):
        line = output_line(list(samples), model, key)
        yield int(position), ENCODER.encode(line), line["error"] is not None


def output_line(samples: list[dict[str, Any]], model: str, key: bytes) -> dict[str, Any]:
    """One request's output line, from its rows (one per sample). Its ids are vLLM's shape
    (16 hex digits) and stay the same on every export of the run."""
    first = samples[0]
    custom_id = first[openai.ID_COLUMN]
    # Three ids of 16 hex digits, as vllm.utils.random_uuid makes them, but repeatable.
    digest = hashlib.blake2b(f"{first['position']}:{custom_id}".encode(), digest_size=24, key=key).hexdigest()
    line_id, request_id, body_id = digest[:16], digest[16:32], digest[32:]
    line = {"id": f"vllm-{line_id}", "custom_id": custom_id}
    request_id = f"vllm-batch-{request_id}"
    if not pd.isna(first["error"]):  # a failed request is one row
        response = {"status_code": 400, "request_id": request_id, "body": None}
        return line | {
            "response": response,
            "error": {"code": error_code(first["error"]), "message": first["error"]},
        }
    body = response_body(samples, model, body_id)
    return line | {"response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


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
        common["logprobs"] = {"content": [chat_logprob(entry) for entry in logprobs]}
    return {"index": index, "message": message, **common, "routed_experts": None}


def chat_logprob(entry: dict[str, Any]) -> dict[str, Any]:
    """A ``logprobs`` entry (token, logprob, top) as a chat choice's logprobs content."""

    def token(item: dict[str, Any]) -> dict[str, Any]:
        text = str(item["token"])
        return {"token": text, "logprob": float(item["logprob"]), "bytes": list(text.encode())}

    return token(entry) | {"top_logprobs": [token(item) for item in _top(entry)]}


def completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """``logprobs`` entries as a text_completion choice's logprobs."""
    tokens = [str(entry["token"]) for entry in entries]
    offsets = [0, *itertools.accumulate(len(token) for token in tokens)][:-1]
    return {
        "text_offset": offsets,
        "token_logprobs": [float(entry["logprob"]) for entry in entries],
        "tokens": tokens,
        "top_logprobs": [
            {str(item["token"]): float(item["logprob"]) for item in entry.get("top") or []}
            for entry in entries
        ],
    }


def _top(entry: dict[str, Any]) -> list:
    top = entry.get("top")  # read from Parquet: an array, or None
    return [] if top is None else list(top)


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
