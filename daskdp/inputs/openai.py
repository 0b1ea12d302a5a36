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
import os
import posixpath
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

FORMAT = "openai"
REQUEST_ERROR = "request_error"  # the reason a line cannot be generated, found while reading it
ID_COLUMN = "custom_id"
# A list input (embeddings, score, rerank) is one row per element: ``item`` is the element's
# index. The first element's id is the request's custom_id, so that the ids' check finds a
# custom_id given twice; the others' have ``[item]`` after it. The export regroups a request's
# rows into one response.
ITEM_COLUMN = "item"

# The endpoints daskdp serves: each one's input fields and the task (engine) that serves it.
ENDPOINTS = {
    "/v1/chat/completions": (("messages",), "generate"),
    "/v1/completions": (("prompt",), "generate"),
    "/v1/embeddings": (("input",), "embed"),
    "/v1/score": (("text_1", "text_2"), "score"),
    "/v1/rerank": (("query", "documents"), "score"),
}
GENERATION = ("/v1/chat/completions", "/v1/completions")


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
    """Where a body field goes: the per-row columns it can set, with their pandas types, and
    the function that reads its value into those columns' values (``read(value, body, url)``;
    ValueError: the line becomes an error row)."""

    columns: dict[str, str]
    read: Callable[[Any, dict, str], dict[str, Any]]


def to(column: str, dtype: str, convert: Callable[[Any], Any]) -> Field:
    """A field that sets one column to its converted value."""
    return Field({column: dtype}, lambda value, body, url: {column: convert(value)})


def stop_strings(value: Any) -> list[str]:
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
        raise ValueError(f"must be a string or a list of non-empty strings, got {value!r:.80}")
    return strings


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r:.80}")
    return value


def strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise ValueError(f"must be a non-empty list of strings, got {value!r:.80}")
    return value


def schema(value: Any) -> str:
    """A JSON Schema as JSON text: stored in the rows as text, whatever its fields
    (docs/row-control.md: Parquet input)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON Schema (an object, or its JSON text)") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON Schema (an object), got {type(value).__name__}")
    return json.dumps(value)


def logprobs(value: Any, body: dict, url: str) -> dict[str, Any]:
    """``logprobs``: on /v1/completions the number of alternatives per token; on chat a bool,
    with ``top_logprobs`` the number (0 when left out), as vLLM reads them."""
    if url == "/v1/completions":
        count = integer(value)
        if count < 0:
            raise ValueError(f"must be at least 0, got {value!r}")
        return {"top_logprobs": count}
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    count = body.get("top_logprobs")
    count = 0 if count is None else integer(count)
    if count < 0:
        raise ValueError(f"top_logprobs must be at least 0, got {count!r}")
    if not value:
        if count:
            raise ValueError("is false, but top_logprobs asks for alternatives; set logprobs true")
        return {}
    return {"top_logprobs": count}


def top_logprobs(value: Any, body: dict, url: str) -> dict[str, Any]:
    """Read with chat's ``logprobs`` (`logprobs`); on its own it asks for nothing."""
    if url != "/v1/chat/completions":
        raise ValueError("is a /v1/chat/completions field; /v1/completions takes logprobs: K")
    if not body.get("logprobs") and integer(value) != 0:
        raise ValueError("asks for alternatives, but logprobs is not true; set logprobs true")
    return {}


JSON_OBJECT = json.dumps({"type": "object"})  # response_format json_object: any JSON object
CONSTRAINTS = {"json_schema": "object", "regex": "object", "choice": "object", "grammar": "object"}


def response_format(value: Any, body: dict, url: str) -> dict[str, Any]:
    """OpenAI's ``response_format``: ``json_schema`` (its ``json_schema.schema``), ``json_object``
    (a JSON object, any), ``text`` (no constraint)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": JSON_OBJECT}
    if kind == "json_schema":
        given = value.get("json_schema")
        if not isinstance(given, dict) or given.get("schema") is None:
            raise ValueError(".json_schema.schema is missing: give the JSON Schema there")
        return {"json_schema": schema(given["schema"])}
    raise ValueError(f".type {kind!r} is not supported by daskdp (json_schema, json_object or text)")


# vLLM's structured_outputs keys -> daskdp's constraint columns
STRUCTURED = {"json": ("json_schema", schema), "regex": ("regex", text), "choice": ("choice", strings),
              "grammar": ("grammar", text)}  # fmt: skip


def structured(value: Any, body: dict, url: str) -> dict[str, Any]:
    """vLLM's ``structured_outputs``: one of ``json``, ``regex``, ``choice``, ``grammar`` (or
    ``json_object``)."""
    if not isinstance(value, dict):
        raise ValueError(f"must be an object, got {type(value).__name__}")
    given = {key: item for key, item in value.items() if item not in (None, False)}
    values = {}
    for key, item in given.items():
        if key == "json_object":
            values["json_schema"] = JSON_OBJECT
        elif key in STRUCTURED:
            column, convert = STRUCTURED[key]
            try:
                values[column] = convert(item)
            except ValueError as e:
                raise ValueError(f".{key} {e}") from None
        else:
            raise ValueError(f".{key} is not supported by daskdp (json, regex, choice, grammar)")
    return values


# Body field -> Field. The one table: a field not here (nor in NEUTRAL) makes its line an
# error row that names it. The first field of a column wins when a body gives two
# (max_completion_tokens over the deprecated max_tokens, as vLLM reads them); two fields that
# each constrain the output make an error row. These are the generation endpoints' fields.
FIELDS = {
    "max_completion_tokens": to("max_tokens", "Int64", positive_int),
    "max_tokens": to("max_tokens", "Int64", positive_int),
    "temperature": to("temperature", "float64", number),
    "top_p": to("top_p", "float64", number),
    "top_k": to("top_k", "Int64", integer),
    "seed": to("seed", "Int64", integer),
    "stop": to("stop", "object", stop_strings),
    "n": to("n", "Int64", positive_int),
    "logprobs": Field({"top_logprobs": "Int64"}, logprobs),
    "top_logprobs": Field({}, top_logprobs),
    "response_format": Field(CONSTRAINTS, response_format),
    "structured_outputs": Field(CONSTRAINTS, structured),
    # vLLM's older names for structured_outputs' keys, which it no longer reads
    **{f"guided_{key}": to(column, "object", convert) for key, (column, convert) in STRUCTURED.items()},
}
# Fields that change nothing at these values (the OpenAI defaults), and fields that never do.
NEUTRAL = {"stream": False, "encoding_format": "float"}
INERT = {"model", "user"}  # model: checked against the run's model names
ROW_COLUMNS = {ITEM_COLUMN: "Int64", "top_n": "Int64"}  # list inputs' elements; rerank's top_n

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
    fixed = {ID_COLUMN: "object", "endpoint": "object", "messages": "object", "prompt": "object",
             "text_1": "object", "text_2": "object"}  # fmt: skip
    table = {column: dtype for field in FIELDS.values() for column, dtype in field.columns.items()}
    return {**fixed, **ROW_COLUMNS, **table, REQUEST_ERROR: "object"}


def meta() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns().items()})


def is_batch_line(line: bytes | str) -> bool:
    """Whether one line of JSON Lines is an OpenAI Batch request (by its fields)."""
    return first_request(line) is not None


def first_request(line: bytes | str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and {"custom_id", "url", "body"} <= row.keys() else None


def first_line(source: str) -> dict | None:
    """The first request of the JSON Lines input ``source``, ``None`` when it is no OpenAI
    Batch file (its first line says)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    paths = fs.glob(path) if fsspec.core.has_magic(path) else [path]
    if not paths or fs.isdir(sorted(paths)[0]):
        return None
    with fsspec.open(fs.unstrip_protocol(sorted(paths)[0]), "rb", compression="infer") as f:
        for line in f:
            if line.strip():
                return first_request(line)
    return None


def looks_like_batch(source: str) -> bool:
    """Whether the JSON Lines input ``source`` is an OpenAI Batch file: its first line says."""
    return first_line(source) is not None


def batch_task(source: str, settings: dict[str, Any], overrides: dict[str, Any] | None) -> str:
    """The run's task: ``run.task`` when given, else, for an OpenAI Batch file, the task of
    its first line's endpoint (the engine that serves it; lines for another engine become
    error lines naming the flag that serves them)."""
    task = settings["run"]["task"]
    given = (overrides or {}).get("run.task") is not None or task != "generate"
    if given or not isinstance(source, (str, os.PathLike)):
        return task
    from daskdp.errors import UserError
    from daskdp.inputs.formats import input_format

    try:
        fmt = settings["input"].get("format") or input_format(os.fspath(source), False)
        first = first_line(os.fspath(source)) if fmt in ("jsonl", FORMAT) else None
    except (OSError, ValueError, UserError):  # read_prompts names what is wrong with the input
        return task
    return ENDPOINTS.get(first.get("url"), (None, task))[1] if first else task


def to_rows(part: pd.DataFrame, model_names: Sequence[str], task: str = "generate") -> pd.DataFrame:
    """A partition of an OpenAI Batch file (one column per top-level field) as daskdp rows,
    for a run of ``task``: a row per request, or per element of its list input."""
    names = set(model_names)
    get = {
        field: (part[field] if field in part else pd.Series(None, index=part.index, dtype=object))
        for field in ("custom_id", "method", "url", "body")
    }
    rows: dict[str, list] = {name: [] for name in columns()}
    for custom_id, method, url, body in zip(*(get[f].to_numpy(dtype=object) for f in get), strict=True):
        custom_id = None if _missing(custom_id) else str(custom_id)
        try:
            elements = request_values(method, url, body, names, model_names, task)
        except ValueError as e:
            elements = [{REQUEST_ERROR: str(e)}]
        for element in elements:
            item = element.get(ITEM_COLUMN)
            identity = {
                ID_COLUMN: custom_id if not item or custom_id is None else f"{custom_id}[{item}]",
                "endpoint": None if _missing(url) else str(url),
            }
            for name, column in rows.items():
                column.append({**element, **identity}.get(name))
    return pd.DataFrame({name: pd.Series(rows[name], dtype=dtype) for name, dtype in columns().items()})


def request_values(
    method: Any, url: Any, body: Any, names: set[str], model_names: Sequence[str], task: str = "generate"
) -> list[dict[str, Any]]:
    """One request's rows' values (one row, or one per element of a list input); ValueError
    with the reason when it cannot be served."""
    if method != "POST":
        raise ValueError(f"method must be POST, got {method!r}")
    if url not in ENDPOINTS:
        raise ValueError(f"url {url!r} is not an endpoint daskdp serves ({', '.join(ENDPOINTS)})")
    inputs, needs = ENDPOINTS[url]
    if needs != task:
        raise ValueError(
            f"{url} needs {ENGINES[needs]} (--task {needs}); this run loads {ENGINES[task]}: "
            f"run such lines with --task {needs}"
        )
    if not isinstance(body, dict):
        raise ValueError(f"body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model not in names:
        raise ValueError(
            f"body.model {model!r} is not this run's model ({', '.join(model_names)}); "
            "name one of those, or add it with --served-model-name"
        )
    if url not in GENERATION:
        return pooling_values(url, body)
    (field,) = inputs
    values: dict[str, Any] = {field: _input(field, body.get(field))}
    constrained = []  # the fields that constrain the output
    for name, value in body.items():
        if name == field or name in INERT or value is None:
            continue
        if name in FIELDS:
            try:
                found = FIELDS[name].read(value, body, url)
            except ValueError as e:
                raise ValueError(f"body.{name}{'' if str(e).startswith('.') else ' '}{e}") from None
            if found.keys() & CONSTRAINTS.keys():
                constrained.append(name)
            for column, converted in found.items():
                values.setdefault(column, converted)
        elif _neutral(name, value):
            continue
        else:
            raise _unsupported(name)
    if len(constrained) > 1:
        raise ValueError(
            f"body.{constrained[0]} and body.{constrained[1]} both constrain the output; give one"
        )
    return [values]


ENGINES = {
    "generate": "a generating engine",
    "embed": "an embedding engine",
    "score": "a scoring engine",
    "classify": "a classifying engine",
}
# The pooling endpoints' fields besides their inputs (rerank's top_n: the results kept).
POOLING_FIELDS = {"/v1/rerank": {"top_n"}}


def pooling_values(url: str, body: dict) -> list[dict[str, Any]]:
    """The rows of an embeddings, score or rerank request: one per text, pair or document."""
    inputs, _ = ENDPOINTS[url]
    for name, value in body.items():
        allowed = {*inputs, *INERT, *POOLING_FIELDS.get(url, ())}
        if name not in allowed and value is not None and not _neutral(name, value):
            raise _unsupported(name)
    if url == "/v1/embeddings":
        texts = _texts("input", body.get("input"))
        return (
            [{"prompt": t, ITEM_COLUMN: i} for i, t in enumerate(texts)]
            if isinstance(texts, list)
            else [{"prompt": texts}]
        )
    first, second = (_texts(name, body.get(name)) for name in inputs)
    if url == "/v1/rerank":
        if isinstance(first, list):
            raise ValueError("body.query must be a string")
        top_n = body.get("top_n")
        top_n = None if top_n is None else integer(top_n)
        if top_n is not None and top_n < 0:
            raise ValueError(f"body.top_n must be at least 0, got {top_n}")
        listed = isinstance(second, list)
        documents = second if listed else [second]
        rows = [
            {"text_1": first, "text_2": d, ITEM_COLUMN: i if listed else None}
            for i, d in enumerate(documents)
        ]
        rows[0]["top_n"] = top_n
        return rows
    if not isinstance(first, list) and not isinstance(second, list):
        return [{"text_1": first, "text_2": second}]
    # vLLM's pairing: 1:1, 1:N (the one first text with each second), or N:N (in order)
    firsts, seconds = (t if isinstance(t, list) else [t] for t in (first, second))
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ValueError(
            f"body.text_1 has {len(firsts)} texts and body.text_2 {len(seconds)}: give 1:1, 1:N or N:N texts"
        )
    return [
        {"text_1": a, "text_2": b, ITEM_COLUMN: i}
        for i, (a, b) in enumerate(zip(firsts, seconds, strict=True))
    ]


def _texts(name: str, value: Any) -> str | list[str]:
    """A pooling input: a string or a non-empty list of strings."""
    if isinstance(value, str):
        return value
    if value is None:
        raise ValueError(f"body.{name} is missing")
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return value
    raise ValueError(
        f"body.{name} must be a string or a non-empty list of strings "
        "(token ids and multimodal inputs are not supported by daskdp)"
    )


def _neutral(name: str, value: Any) -> bool:
    return name in NEUTRAL and value == NEUTRAL[name] and type(value) is type(NEUTRAL[name])


def _unsupported(name: str) -> ValueError:
    return ValueError(
        f"body.{name} is not supported by daskdp (docs/openai-batch.md lists the fields it honours)"
    )


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
