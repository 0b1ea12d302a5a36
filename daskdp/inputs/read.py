"""Read prompts: formats, columns, and the one pass over the rows (the survey) that checks them."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp.errors import UserError, exception_chain, first_line
from daskdp.inputs.survey import SURVEY_META, Survey, survey_partition

if TYPE_CHECKING:
    import dask.dataframe as dd

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
}

COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}


def input_format(source: str, is_dir: bool) -> str:
    """The format of ``source`` from its name: parquet, jsonl or csv."""
    if is_dir:
        return "parquet"
    stem, suffix = posixpath.splitext(posixpath.basename(source.rstrip("/")).lower())
    if suffix in COMPRESSIONS:
        suffix = posixpath.splitext(stem)[1]
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise UserError(
            f"cannot tell the format of {source} from its name; "
            "use .parquet (or a directory of them), .jsonl or .csv"
        )
    return fmt


@dataclass
class Prompts:
    """Prompts read lazily from ``source``: a Dask DataFrame and where it came from."""

    frame: dd.DataFrame
    source: str
    format: str
    input_config: dict[str, Any]

    def survey(self, max_tokens: int) -> Survey:
        """Read the input once on the workers: rows, fingerprint and the rows' estimated costs.

        ``max_tokens`` is the run's; a ``max_tokens`` column overrides it per row. Refuses an
        input that is empty or cannot be read.
        """
        columns = self.input_config["prompt-column"], self.input_config["messages-column"]
        try:
            surveyed = self.frame.map_partitions(
                survey_partition, columns, max_tokens, meta=SURVEY_META
            ).compute()
        except Exception as e:
            raise UserError(unreadable(self.source, self.format, e)) from None
        lengths = [int(n) for n in surveyed["rows"]]
        if not sum(lengths):
            raise UserError(f"{self.source} has no rows; there is nothing to generate")
        fingerprint = hashlib.sha256("\n".join(surveyed["digest"]).encode()).hexdigest()
        starts = np.cumsum([0, *lengths[:-1]])
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


def read_prompts(source: str, input_config: dict[str, Any]) -> Prompts:
    """Read prompts lazily from Parquet, JSON Lines or CSV (a path, directory, glob or URL).

    Only the schema is read here; it is checked for a prompt or messages column that can
    hold text. Rows are read on the workers.
    """
    import dask
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    matches = fs.glob(path) if fsspec.core.has_magic(path) else ([path] if fs.exists(path) else [])
    if not matches:
        raise UserError(f"input {source} does not exist; check the path")
    is_dir = len(matches) == 1 and fs.isdir(matches[0])
    fmt = input_format(source, is_dir)
    try:
        # Dask's string conversion would turn chat messages (lists of dicts) into their repr.
        with dask.config.set({"dataframe.convert-string": False}):
            df = _read(source, fmt, input_config)
    except UserError:
        raise
    except Exception as e:
        raise UserError(unreadable(source, fmt, e)) from None
    check_columns(df._meta, source, input_config)
    if len(matches) == 1 and fmt == "parquet" and not is_dir:
        check_rows(fs, matches[0], source)
    return Prompts(df, source, fmt, input_config)


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
    if fmt == "jsonl":
        compressed = posixpath.splitext(source)[1].lower() in COMPRESSIONS
        blocksize = None if compressed else 2**26
        # dtype=False: JSON strings that look like numbers ("007") stay strings.
        return dd.read_json(source, lines=True, orient="records", blocksize=blocksize, dtype=False)
    prompt = input_config["prompt-column"]
    return dd.read_csv(source, blocksize="64MB", dtype={prompt: "object"}, assume_missing=True)


def unreadable(source: str, fmt: str, error: BaseException) -> str:
    """The one-line message for input that cannot be read as its name says."""
    reason = first_line(exception_chain(error, context=False)[-1])  # Dask wraps the reader's own error
    names = {"parquet": "Parquet", "jsonl": "JSON Lines", "csv": "CSV"}
    return f"cannot read {source} as {names[fmt]} ({reason[:200]}); check that the file is what its name says"


def check_columns(meta: pd.DataFrame, source: str, input_config: dict[str, Any]) -> None:
    prompt, messages = input_config["prompt-column"], input_config["messages-column"]
    if len(meta.columns) == 0:
        raise UserError(f"{source} is empty (no rows, no columns); there is nothing to generate")
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
