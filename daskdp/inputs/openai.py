"""OpenAI Batch files -> rows: one request a line, ``{"custom_id", "method", "url", "body"}``.

The file is read like any JSON Lines input (lazily, in partitions, on the workers); each
partition's lines become rows here. A body's fields become daskdp's per-row columns through
one table, `FIELDS`; a field that is not in it changes what would be generated, so its line
becomes an error row naming it (``request_error``), never a silently different answer. A
field becomes supported by adding its entry once daskdp has the per-row column for it.

Fields a body leaves out take what ``python -m vllm.entrypoints.openai.run_batch`` would use:
the OpenAI API's defaults as vLLM applies them, over the model's generation config
(`SAMPLING`, and the engine side in `daskdp.engine.requests`), not daskdp's ``sampling:``.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

FORMAT = "openai"
REQUEST_ERROR = "request_error"  # the reason a line cannot be generated, found while reading it
ID_COLUMN = "custom_id"

# The endpoints daskdp serves, and the body field that holds each one's input.
ENDPOINTS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}
# Endpoints of engines that daskdp cannot load yet, and what a user would have to ask for.
UNSERVED = {
    "/v1/embeddings": "an embedding engine (--task embed)",
    "/v1/score": "a scoring engine (--task score)",
    "/v1/rerank": "a scoring engine (--task score)",
}


def positive_int(value: Any) -> int:
    number = integer(value)
    if number < 1:
        raise ValueError(f"must be at least 1, got {value!r}")
    return number


def integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"must be an integer, got {value!r}")
    return int(value)


def number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"must be a number, got {value!r}")
    return float(value)


class Field(NamedTuple):
    """Where a body field goes: its per-row column, the function that checks and converts its
    value (ValueError: the line becomes an error row), and the column's pandas type."""

    column: str
    convert: Callable[[Any], Any]
    dtype: str


# Body field -> Field. The one table: a field not here (nor in NEUTRAL) makes its line an
# error row that names it. The first field of a column wins when a body gives two
# (max_completion_tokens over the deprecated max_tokens, as vLLM reads them).
FIELDS = {
    "max_completion_tokens": Field("max_tokens", positive_int, "Int64"),
    "max_tokens": Field("max_tokens", positive_int, "Int64"),
    "temperature": Field("temperature", number, "float64"),
    "seed": Field("seed", integer, "Int64"),
}
# Fields that change nothing at these values (the OpenAI defaults), and fields that never do.
NEUTRAL = {"stream": False, "n": 1, "logprobs": False}
INERT = {"model", "user"}  # model: checked against the run's model names

# The run-wide sampling settings of an OpenAI Batch run: OpenAI's defaults as vLLM's server
# applies them (max-tokens null: up to the model's context); the model's generation config
# goes over them on the engine (`GenerationRequest.generation_config`).
SAMPLING = {
    "temperature": 1.0,
    "top-p": 1.0,
    "top-k": 0,
    "max-tokens": None,
    "seed": None,
    "stop": [],
    "ignore-eos": False,
    "n": 1,
    "logprobs": None,
    "prompt-logprobs": None,
    "json-schema": None,
    "regex": None,
    "choice": None,
    "grammar": None,
}


def run_settings(settings: dict[str, Any], input_config: dict[str, Any], overrides: dict[str, Any]):
    """The settings of a run over an OpenAI Batch file: its input columns, and `SAMPLING` for
    the sampling values each body leaves out. A sampling flag (in ``overrides``) would change
    nothing, so it is refused rather than ignored."""
    from daskdp.errors import UserError

    given = [key for key, value in overrides.items() if key.startswith("sampling.") and value is not None]
    if given:
        name = given[0].removeprefix("sampling.")
        raise UserError(
            f"--{name} does not apply to an OpenAI Batch file: each line's body sets its own "
            f"sampling values; set {name.replace('-', '_')} in the bodies instead"
        )
    return {**settings, "input": input_config, "sampling": dict(SAMPLING)}


def columns() -> dict[str, str]:
    """The rows' columns and pandas types, in order."""
    fixed = {ID_COLUMN: "object", "endpoint": "object", "messages": "object", "prompt": "object"}
    table = {field.column: field.dtype for field in FIELDS.values()}
    return {**fixed, **table, REQUEST_ERROR: "object"}


def meta() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns().items()})


def is_batch_line(line: bytes | str) -> bool:
    """Whether one line of JSON Lines is an OpenAI Batch request (by its fields)."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and {"custom_id", "url", "body"} <= row.keys()


def looks_like_batch(source: str) -> bool:
    """Whether the JSON Lines input ``source`` is an OpenAI Batch file: its first line says."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    paths = fs.glob(path) if fsspec.core.has_magic(path) else [path]
    if not paths:
        return False
    with fsspec.open(fs.unstrip_protocol(sorted(paths)[0]), "rb", compression="infer") as f:
        for line in f:
            if line.strip():
                return is_batch_line(line)
    return False


def to_rows(part: pd.DataFrame, model_names: Sequence[str]) -> pd.DataFrame:
    """A partition of an OpenAI Batch file (one column per top-level field) as daskdp rows."""
    names = set(model_names)
    get = {
        field: (part[field] if field in part else pd.Series(None, index=part.index, dtype=object))
        for field in ("custom_id", "method", "url", "body")
    }
    rows = {name: [None] * len(part) for name in columns()}
    for i, (custom_id, method, url, body) in enumerate(
        zip(*(get[f].to_numpy(dtype=object) for f in get), strict=True)
    ):
        rows[ID_COLUMN][i] = None if _missing(custom_id) else str(custom_id)
        rows["endpoint"][i] = None if _missing(url) else str(url)
        try:
            values = request_values(method, url, body, names, model_names)
        except ValueError as e:
            rows[REQUEST_ERROR][i] = str(e)
        else:
            for name, value in values.items():
                rows[name][i] = value
    return pd.DataFrame(
        {name: pd.Series(rows[name], index=part.index, dtype=dtype) for name, dtype in columns().items()},
        index=part.index,
    )


def request_values(
    method: Any, url: Any, body: Any, names: set[str], model_names: Sequence[str]
) -> dict[str, Any]:
    """One request's row values; ValueError with the reason when it cannot be generated."""
    if method != "POST":
        raise ValueError(f"method must be POST, got {method!r}")
    if url not in ENDPOINTS:
        if url in UNSERVED:
            raise ValueError(f"{url} needs {UNSERVED[url]}; this run loads a generating engine")
        raise ValueError(f"url {url!r} is not an endpoint daskdp serves ({', '.join(ENDPOINTS)})")
    if not isinstance(body, dict):
        raise ValueError(f"body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model not in names:
        raise ValueError(
            f"body.model {model!r} is not this run's model ({', '.join(model_names)}); "
            "name one of those, or add it with --served-model-name"
        )
    field = ENDPOINTS[url]
    values: dict[str, Any] = {field: _input(field, body.get(field))}
    for name, value in body.items():
        if name == field or name in INERT or value is None:
            continue
        if name in FIELDS:
            field = FIELDS[name]
            try:
                converted = field.convert(value)
            except ValueError as e:
                raise ValueError(f"body.{name} {e}") from None
            values.setdefault(field.column, converted)
        elif name in NEUTRAL and value == NEUTRAL[name] and type(value) is type(NEUTRAL[name]):
            continue
        else:
            raise ValueError(
                f"body.{name} is not supported by daskdp (docs/openai-batch.md lists the fields it honours)"
            )
    return values


def _input(field: str, value: Any) -> Any:
    """The body's prompt (a string) or chat messages (``[{role, content}]``, text content)."""
    if value is None:
        raise ValueError(f"body.{field} is missing")
    if field == "prompt":
        if not isinstance(value, str):
            raise ValueError(f"body.prompt must be a string, got {type(value).__name__}")
        return value
    if not isinstance(value, list) or not value:
        raise ValueError("body.messages must be a non-empty list of {role, content}")
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError("body.messages must be a non-empty list of {role, content}")
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise ValueError(f"body.messages[].{unknown[0]} is not supported by daskdp")
        messages.append({"role": message["role"], "content": _text(message.get("content"))})
    return messages


def _text(content: Any) -> str:
    """A message's content: a string, or a list of text parts (joined, as vLLM joins them)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"body.messages[].content of type {kind!r} is not supported by daskdp (text only)"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"body.messages[].content must be text, got {type(content).__name__}")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def model_names(given: str, path: str, served: Sequence[str]) -> list[str]:
    """The names a body may give as its model: each served name, the ``--model`` value as
    given, its path and its directory's name. The first is the one responses carry, as vLLM
    answers with the first served name (else the model as given)."""
    names = [*served, given, path, posixpath.basename(path.rstrip("/"))]
    return list(dict.fromkeys(str(name) for name in names))
