"""Structured output: one constraint per row (a JSON Schema, a regular expression, a list of
choices or a grammar), run-wide or in the row's own column, and the check of what came out.

A row's own non-null ``json_schema`` / ``regex`` / ``choice`` / ``grammar`` replaces the run-wide
constraint (``sampling.json-schema`` ...) entirely; a row with none inherits it. The engine is
the judge of a row's constraint (vLLM rejects a bad one when the request is added, and the row
becomes an error row); a run-wide constraint is checked here on the client, before any cluster
starts, with the same compilers vLLM tries (xgrammar, then llguidance).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pandas as pd

from daskdp.errors import UserError, first_line

# Input column -> (run-wide setting under `sampling:`, StructuredOutputsParams field).
CONSTRAINT_COLUMNS = {
    "json_schema": ("json-schema", "json"),
    "regex": ("regex", "regex"),
    "choice": ("choice", "choice"),
    "grammar": ("grammar", "grammar"),
}
Constraint = tuple[str, Any]  # (input column name, value vLLM takes), e.g. ("regex", "[a-z]+")


def run_wide_constraint(sampling: dict[str, Any]) -> dict[str, Any]:
    """``sampling`` with its structured constraint checked and in a canonical form.

    At most one of ``json-schema``, ``regex``, ``choice`` and ``grammar``; a JSON Schema given as
    text is parsed and kept as canonical JSON text (what the manifest compares on ``--resume``).
    Raises a `UserError` naming the setting and the problem, before any cluster starts.
    """
    given = {column: sampling.get(setting) for column, (setting, _) in CONSTRAINT_COLUMNS.items()}
    given = {column: value for column, value in given.items() if value is not None}
    if not given:
        return sampling
    if len(given) > 1:
        names = " and ".join(f"--{CONSTRAINT_COLUMNS[c][0]}" for c in given)
        raise UserError(
            f"{names} are both given; a run takes one structured constraint (give one; a row's own "
            "json_schema, regex, choice or grammar column replaces it)"
        )
    ((column, value),) = given.items()
    setting = CONSTRAINT_COLUMNS[column][0]
    try:
        value = normalized(column, value)
        check_compiles(column, value)
    except ValueError as e:
        raise UserError(f"--{setting} (sampling.{setting}) {e}; fix it") from None
    if column == "json_schema":
        value = json.dumps(value, sort_keys=True)
    return {**sampling, setting: value}


def normalized(column: str, value: Any) -> Any:
    """A constraint as vLLM takes it: a JSON Schema as a mapping, choices as a list of strings.

    Values read from Parquet come as numpy arrays (lists) and structs whose missing fields read
    back as nulls: arrays become lists and null fields are dropped. Raises ``ValueError``.
    """
    if column == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"is not valid JSON ({e})") from None
        value = _plain(value)
        if not isinstance(value, (dict, bool)):
            raise ValueError(f"is a JSON {type(value).__name__}, not a JSON Schema (an object)")
        _check_schema(value)
        return value
    if column == "choice":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("is text; give a list of strings") from None
        value = _plain(value)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"must be a non-empty list of strings, got {value!r:.80}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be text, got {type(value).__name__}")
    if column == "grammar" and not value.strip():
        raise ValueError("is empty")
    return value


def _plain(value: Any) -> Any:
    """Lists for arrays, dicts without null fields, recursively."""
    if isinstance(value, np.ndarray | list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not _missing(v)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _check_schema(schema: dict | bool) -> None:
    """Check ``schema`` against its JSON Schema meta-schema (jsonschema comes with vLLM)."""
    try:
        import jsonschema
    except ImportError:  # a client without vLLM: the engine still refuses a bad schema
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(map(str, e.absolute_path))
        raise ValueError(
            f"is not a valid JSON Schema ({e.message}{f' at {where}' if where else ''})"
        ) from None


def check_compiles(column: str, value: Any) -> None:
    """Compile a constraint as vLLM's ``auto`` structured-output backend would take it: with
    xgrammar, and where xgrammar refuses, with llguidance. Raises ``ValueError`` when both refuse.

    llguidance is tried first here: it imports in milliseconds, xgrammar imports torch (seconds
    on the client); xgrammar is asked only about what llguidance refuses. A client without
    either (no vLLM installed) checks regular expressions with Python's ``re`` only; the engine
    still refuses what is wrong, row by row.
    """
    if column == "choice":
        return
    refused = _llguidance_refuses(column, value)
    if refused is None:
        return
    try:
        import xgrammar
    except ImportError:
        xgrammar = None
    if xgrammar is not None:
        try:
            if column == "json_schema":
                xgrammar.Grammar.from_json_schema(json.dumps(value))
            elif column == "regex":
                xgrammar.Grammar.from_regex(value)
            else:
                try:
                    xgrammar.Grammar.from_ebnf(value)
                except Exception:
                    xgrammar.Grammar.from_lark(value)
            return
        except Exception as e:
            refused = refused or compile_reason(e)
    if refused:
        raise ValueError(f"does not compile ({refused})")
    if column == "regex":  # neither library is installed
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"does not compile ({e})") from None


def _llguidance_refuses(column: str, value: Any) -> str | None:
    """llguidance's reason for refusing a constraint; ``None`` when it compiles; ``""`` when
    llguidance is not installed."""
    try:
        import llguidance
    except ImportError:
        return ""
    kind = {"json_schema": "json", "regex": "regex", "grammar": "grammar"}[column]
    try:
        grammar = llguidance.grammar_from(kind, json.dumps(value) if kind == "json" else value)
        error = llguidance.LLMatcher.validate_grammar(grammar, None)
    except Exception as e:
        error = str(e) or type(e).__name__
    return compile_reason(error) if error else None


def compile_reason(error: BaseException | str) -> str:
    """The line of a grammar compiler's error that says what is wrong: llguidance puts it on
    a line of its own (``error: unclosed character class``) below a first line that does not."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line.removeprefix("error:").strip() for line in lines if line.startswith("error:")), None)
    first = first_line(error, 160).removesuffix(":")
    return f"{first}: {detail}" if detail else first


def rejection(constraint: Constraint | None, error: BaseException) -> str:
    """A row's error when the engine refuses its request, naming the constraint it refused."""
    if constraint is None:
        return f"rejected by the engine: {first_line(error, 200)}"
    return f"{constraint[0]} rejected by the engine: {compile_reason(error)}"


def row_constraints(part: pd.DataFrame, sampling: dict[str, Any], errors: np.ndarray) -> list:
    """Each row's structured constraint, `Constraint` or ``None``: its own column's, else the run's.

    A row with more than one constraint column set, or one that cannot be read (a schema that
    is not JSON, choices that are not strings), gets its reason in ``errors``.
    """
    run_wide = next(
        (
            (column, json.loads(value) if column == "json_schema" else value)
            for column, (setting, _) in CONSTRAINT_COLUMNS.items()
            if (value := sampling.get(setting)) is not None
        ),
        None,
    )
    columns = [column for column in CONSTRAINT_COLUMNS if column in part]
    values = [part[column].to_numpy(dtype=object) for column in columns]
    constraints: list[Constraint | None] = [run_wide] * len(part)
    seen: dict[tuple[str, str], Constraint | str] = {}  # by text: rows often share a schema
    for i in range(len(part)):
        own = [(column, v[i]) for column, v in zip(columns, values, strict=True) if not _missing_value(v[i])]
        if not own or errors[i] is not None:
            continue
        if len(own) > 1:
            errors[i] = (
                f"{' and '.join(c for c, _ in own)} are both set; a row takes one structured constraint"
            )
            continue
        ((column, value),) = own
        key = (column, value) if isinstance(value, str) else None
        if key is None or key not in seen:
            try:
                found: Constraint | str = (column, normalized(column, value))
            except ValueError as e:
                found = f"{column} {e}"
            if key is not None:
                seen[key] = found
        else:
            found = seen[key]
        if isinstance(found, str):
            errors[i] = found
        else:
            constraints[i] = found
    return constraints


def _missing_value(value: Any) -> bool:
    """A null cell; a list cell (choices) is never null."""
    return not isinstance(value, np.ndarray | list | tuple | dict) and _missing(value)


def constraint_key(constraint: Constraint | None) -> Any:
    """A hashable key of a constraint, for sharing one ``SamplingParams`` between rows."""
    if constraint is None:
        return None
    column, value = constraint
    return column, json.dumps(value, sort_keys=True) if not isinstance(value, str) else value


def structured_outputs(constraint: Constraint | None):
    """vLLM's ``StructuredOutputsParams`` for a constraint (``None`` for none)."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    column, value = constraint
    return StructuredOutputsParams(**{CONSTRAINT_COLUMNS[column][1]: value})


def output_is_valid(constraint: Constraint, text: str, validators: dict | None = None) -> bool | None:
    """Whether ``text`` meets ``constraint``: a JSON Schema's text parses and validates, a regex
    matches all of it, a choice is one of the list. ``None`` for a grammar (not checked).

    ``validators``: JSON Schema validators already made, by `constraint_key`, to reuse.
    """
    column, value = constraint
    if column == "choice":
        return text in value
    if column == "regex":
        try:
            return re.fullmatch(value, text) is not None
        except re.error:  # syntax vLLM takes and Python's re does not
            return False
    if column == "json_schema":
        try:
            instance = json.loads(text)
        except ValueError:
            return False
        import jsonschema

        validators = {} if validators is None else validators
        key = constraint_key(constraint)
        try:
            if key not in validators:
                validators[key] = jsonschema.validators.validator_for(value)(value)
            return validators[key].is_valid(instance)
        except jsonschema.SchemaError:
            return False
    return None


def count_valid(constraints: list, texts: np.ndarray, errors: np.ndarray) -> tuple[int, int]:
    """Rows generated under a checked constraint (JSON Schema, regex, choice), and how many of
    their texts meet it."""
    checked = valid = 0
    validators: dict = {}
    for constraint, text, error in zip(constraints, texts, errors, strict=True):
        if constraint is None or error is not None or text is None:
            continue
        verdict = output_is_valid(constraint, text, validators)
        if verdict is not None:
            checked += 1
            valid += verdict
    return checked, valid
