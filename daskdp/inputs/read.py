"""Read prompts: formats, columns, and the one pass over the rows (the survey) that checks them."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp.errors import UserError, exception_chain, first_line
from daskdp.inputs import openai
from daskdp.inputs.formats import COMPRESSIONS, input_format
from daskdp.inputs.survey import SURVEY_META, Survey, survey_partition
from daskdp.output.schema import result_columns

if TYPE_CHECKING:
    import dask.dataframe as dd

FORMAT_NAMES = {
    "parquet": "Parquet",
    "jsonl": "JSON Lines",
    "csv": "CSV",
    openai.FORMAT: "an OpenAI Batch file",
}


@dataclass
class Prompts:
    """Prompts read lazily from ``source``: a Dask DataFrame and where it came from."""

    frame: dd.DataFrame
    source: str
    format: str
    input_config: dict[str, Any]
    task: str = "generate"

    def survey(self, max_tokens: int, n: int = 1) -> Survey:
        """Read the input once on the workers: rows, fingerprint and the rows' estimated costs.

        ``max_tokens`` and ``n`` (samples) are the run's; columns of those names override them
        per row. Refuses an input that is empty or cannot be read. A pooling task's rows cost
        their texts' tokens alone: they have no output.
        """
        columns = self.input_config["prompt-column"], self.input_config["messages-column"]
        id_column = self.input_config["id-column"]
        texts = pooled_text_columns(self.input_config, self.task)
        try:
            surveyed = self.frame.map_partitions(
                survey_partition, columns, id_column, max_tokens, n, texts, meta=SURVEY_META
            ).compute()
        except Exception as e:
            raise UserError(unreadable(self.source, self.format, e)) from None
        lengths = [int(n) for n in surveyed["rows"]]
        if not sum(lengths):
            raise UserError(f"{self.source} has no rows; there is nothing to generate")
        starts = np.cumsum([0, *lengths[:-1]])
        if id_column in self.frame.columns:
            self.check_ids(starts, surveyed, id_column)
        fingerprint = hashlib.sha256("\n".join(surveyed["digest"]).encode()).hexdigest()
        prefixed = np.concatenate(
            [start + rows for start, rows in zip(starts, surveyed["prefixed"], strict=True)]
        )
        return Survey(
            lengths,
            fingerprint,
            np.concatenate(list(surveyed["costs"])),
            prefixed,
            np.concatenate(list(surveyed["prefix_keys"])),
        )

    def check_ids(self, starts: np.ndarray, surveyed: pd.DataFrame, id_column: str) -> None:
        """Refuse null or repeated ids, naming the first rows (by input position) that have them.

        Every output row must be found by its id exactly once; a null or a repeated id makes
        that impossible to check.
        """
        nulls = np.concatenate(
            [start + rows for start, rows in zip(starts, surveyed["null_ids"], strict=True)]
        )
        if len(nulls) and self.format == openai.FORMAT:
            raise UserError(
                f"request {self.request_numbers(nulls[:1])[0]} of {self.source} (counted "
                "from 1) has no custom_id; "
                "every line of an OpenAI Batch file needs its own"
            )
        if len(nulls):
            shown = ", ".join(map(str, nulls[:5])) + (
                f" and {len(nulls) - 5:,} more" if len(nulls) > 5 else ""
            )
            raise UserError(
                f"column '{id_column}' of {self.source} is null in row {shown} (rows counted from 0); "
                "give every row an id, or drop the column to number the rows by position"
            )
        hashes = np.concatenate(list(surveyed["id_hashes"]))
        _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
        if (counts > 1).any():
            repeated = hashes[np.sort(first[counts > 1])[0]]
            rows = np.flatnonzero(hashes == repeated)
            value = self.row(int(rows[0]), id_column, starts)
            more = len(first[counts > 1]) - 1
            if self.format == openai.FORMAT:
                raise UserError(
                    f"custom_id {value!r} appears more than once in {self.source}, in requests "
                    + ", ".join(map(str, self.request_numbers(rows[:5])))
                    + " (counted from 1)"
                    + (f"; {more:,} other custom_ids repeat too" if more else "")
                    + "; an OpenAI Batch file needs a unique custom_id on every line"
                )
            raise UserError(
                f"column '{id_column}' of {self.source} repeats the id {value!r} in rows "
                + ", ".join(map(str, rows[:5]))
                + (f" (and {more:,} other ids repeat)" if more else "")
                + "; ids must be unique: fix them, or drop the column to number the rows by position"
            )

    def request_numbers(self, positions: np.ndarray) -> list[int]:
        """The requests (lines, from 1) of an OpenAI Batch file's rows at input ``positions``:
        a list input's elements after the first are rows of their own (``item`` above 0). Read
        only on the way to an error: a byte per row."""
        continued = self.frame[openai.ITEM_COLUMN].fillna(0).gt(0).astype("int8").compute().to_numpy()
        before = np.cumsum(continued, dtype=np.int64)
        return [int(p) + 1 - int(before[p]) for p in positions]

    def row(self, position: int, column: str, starts: np.ndarray) -> Any:
        """The value of ``column`` in the row at input ``position``, read from its partition."""
        partition = int(np.searchsorted(starts, position, side="right") - 1)
        values = self.frame.get_partition(partition)[column].compute()
        return values.iloc[position - int(starts[partition])]


def read_prompts(
    source: str, input_config: dict[str, Any], task: str = "generate", model_names: Sequence[str] = ()
) -> Prompts:
    """Read prompts lazily from Parquet, JSON Lines, CSV or an OpenAI Batch file (a path,
    directory, glob or URL), for ``task``.

    Only the schema is read here; it is checked for a prompt or messages column that can
    hold text. Rows are read on the workers. The format is ``input.format``, else told from
    the name, and JSON Lines whose first line is a request ``{custom_id, url, body}`` is an
    OpenAI Batch file: its rows take their columns from `daskdp.inputs.openai`, and their
    ``body.model`` must be one of ``model_names``.
    """
    import dask
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    matches = fs.glob(path) if fsspec.core.has_magic(path) else ([path] if fs.exists(path) else [])
    if not matches:
        raise UserError(f"input {source} does not exist; check the path")
    is_dir = len(matches) == 1 and fs.isdir(matches[0])
    fmt = input_config.get("format") or input_format(source, is_dir)
    if fmt not in FORMAT_NAMES:
        raise UserError(f"input.format must be one of {', '.join(FORMAT_NAMES)}, got {fmt!r}")
    if fmt == "jsonl" and not input_config.get("format") and openai.looks_like_batch(source):
        fmt = openai.FORMAT
    if fmt == openai.FORMAT:
        input_config = {
            **input_config,
            "format": openai.FORMAT,
            "prompt-column": "prompt",
            "messages-column": "messages",
            "text-1-column": "text_1",
            "text-2-column": "text_2",
            "id-column": openai.ID_COLUMN,
            "model-names": list(model_names),
            "task": task,
        }
    try:
        # Dask's string conversion would turn chat messages (lists of dicts) into their repr.
        with dask.config.set({"dataframe.convert-string": False}):
            df = _read(source, fmt, input_config)
    except UserError:
        raise
    except Exception as e:
        raise UserError(unreadable(source, fmt, e)) from None
    check_columns(df._meta, source, input_config, task)
    if len(matches) == 1 and fmt == "parquet" and not is_dir:
        check_rows(fs, matches[0], source)
    return Prompts(df, source, fmt, input_config, task)


def check_rows(fs, path: str, source: str) -> None:
    """Refuse a Parquet file whose footer counts no rows, before a cluster starts for it.

    The survey refuses any input without rows; this only answers sooner, from one footer.
    """
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    if not rows:
        raise UserError(f"{source} has no rows; there is nothing to generate")


def _read(source: str, fmt: str, input_config: dict[str, Any]) -> dd.DataFrame:
    import dask.dataframe as dd

    if fmt == "parquet":
        return dd.read_parquet(source)
    if fmt == openai.FORMAT:
        batch = _read(source, "jsonl", input_config)
        return batch.map_partitions(
            openai.to_rows, input_config["model-names"], input_config["task"], meta=openai.meta()
        )
    if fmt == "jsonl":
        compressed = posixpath.splitext(source)[1].lower() in COMPRESSIONS
        blocksize = None if compressed else 2**26
        # dtype=False: JSON strings that look like numbers ("007") stay strings.
        return dd.read_json(source, lines=True, orient="records", blocksize=blocksize, dtype=False)
    prompt = input_config["prompt-column"]
    return dd.read_csv(source, blocksize="64MB", dtype={prompt: "object"}, assume_missing=True)


def unreadable(source: str, fmt: str, error: BaseException) -> str:
    """The one-line message for input that cannot be read as its name says.

    Readers name a byte offset or nothing at all; where the cause is one bad line of JSON
    Lines or one string that is not UTF-8, the message names its file and line or row.
    """
    error = exception_chain(error, context=False)[-1]  # Dask wraps the reader's own error
    found = None
    try:
        if fmt in ("jsonl", openai.FORMAT):
            found = first_bad_json_line(source, FORMAT_NAMES[fmt])
        elif fmt == "parquet" and ("Wrapping" in str(error) or isinstance(error, UnicodeDecodeError)):
            found = first_invalid_utf8(source)
    except Exception:  # the diagnosis is a courtesy: the reader's own reason still stands
        found = None
    if found:
        return found
    reason = first_line(error)
    return f"cannot read {source} as {FORMAT_NAMES[fmt]} ({reason[:200]}); check that the file is what its name says"


def _files(source: str) -> list[tuple[Any, str]]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    paths = fs.glob(path) if fsspec.core.has_magic(path) else [path]
    files = []
    for found in paths:
        files += [(fs, p) for p in (fs.find(found) if fs.isdir(found) else [found])]
    return files


def first_bad_json_line(source: str, name: str = "JSON Lines") -> str | None:
    """The first line of the JSON Lines input ``source`` that is not a JSON object, in words;
    ``name``: the format's, for the message."""
    import fsspec

    for fs, path in _files(source):
        with fsspec.open(fs.unstrip_protocol(path), "rb", compression="infer") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except UnicodeDecodeError:
                    return f"cannot read {path} as {name}: line {number} is not valid UTF-8; fix or remove it"
                except ValueError as e:
                    return f"cannot read {path} as {name}: line {number} is not valid JSON ({e}); fix or remove it"
                if not isinstance(row, dict):
                    return (
                        f"cannot read {path} as {name}: line {number} is a JSON {type(row).__name__}, "
                        'not an object {"prompt": ...}; fix or remove it'
                    )
    return None


def first_invalid_utf8(source: str) -> str | None:
    """The first string of the Parquet input ``source`` that is not valid UTF-8, in words."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for fs, path in _files(source):
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = [field.name for field in parquet.schema_arrow if pa.types.is_string(field.type)]
            offset = 0
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=names)
                for name in names:
                    for position, value in enumerate(table.column(name).cast(pa.binary()).to_pylist()):
                        try:
                            value is None or value.decode("utf-8")
                        except UnicodeDecodeError:
                            return (
                                f"row {offset + position} of {path} (counted from 0) holds text that is "
                                f"not valid UTF-8 in column '{name}'; fix that row, or store the column "
                                "as binary"
                            )
                offset += table.num_rows
    return None


def pooled_text_columns(input_config: dict[str, Any], task: str) -> tuple[str, ...] | None:
    """The text columns a pooling task reads (``None`` when generating): the prompt column, or
    for score the two texts of each pair."""
    if task == "generate":
        return None
    if task == "score":
        return input_config["text-1-column"], input_config["text-2-column"]
    return (input_config["prompt-column"],)


def check_columns(
    meta: pd.DataFrame, source: str, input_config: dict[str, Any], task: str = "generate"
) -> None:
    prompt, messages = input_config["prompt-column"], input_config["messages-column"]
    if len(meta.columns) == 0:
        raise UserError(f"{source} is empty (no rows, no columns); there is nothing to generate")
    taken = [str(name) for name in meta.columns if name in result_columns(task)]
    if taken:
        raise UserError(
            f"column '{taken[0]}' of {source} has the name of a result column daskdp adds "
            f"({', '.join(result_columns(task))}); rename or drop it"
        )
    if task != "generate":
        check_pooling_columns(meta, source, input_config, task)
        return
    if prompt not in meta.columns and messages not in meta.columns:
        columns = ", ".join(map(str, meta.columns)) or "none"
        raise UserError(
            f"{source} has no '{prompt}' or '{messages}' column (columns: {columns}); "
            "name the prompt column with --prompt-column"
        )
    if prompt in meta.columns:
        dtype = meta[prompt].dtype
        if not (pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype)):
            raise UserError(
                f"column '{prompt}' of {source} holds {dtype}, not text; "
                "give a column of strings with --prompt-column"
            )


def check_pooling_columns(meta: pd.DataFrame, source: str, input_config: dict[str, Any], task: str) -> None:
    """A pooling task's input: its text columns present and textual."""
    flags = {
        input_config["prompt-column"]: "--prompt-column",
        input_config["text-1-column"]: "input.text-1-column",
        input_config["text-2-column"]: "input.text-2-column",
    }
    for column in pooled_text_columns(input_config, task):
        if column not in meta.columns:
            columns = ", ".join(map(str, meta.columns))
            raise UserError(
                f"{source} has no '{column}' column for --task {task} (columns: {columns}); "
                f"name it with {flags[column]}"
            )
        dtype = meta[column].dtype
        if not (pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype)):
            raise UserError(
                f"column '{column}' of {source} holds {dtype}, not text; give a column of strings with {flags[column]}"
            )
