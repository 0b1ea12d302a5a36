"""The output, declared once: the files of an output directory and the columns of its rows.

An output directory holds::

    _manifest.json               the run: input fingerprint, settings that change results, chunks
    _chunks/000012.done.json     one record per finished chunk: rows, ids, file size and SHA-256
    _chunks/000012.timed-out.json  a chunk stopped by --chunk-timeout, with its unfinished ids
    part-000012.parquet          the chunk's rows, renamed into place only when complete
    _summary.json, _report.html  the run's summary and report ("_": Parquet readers skip them)

Each result row is its input row with the `RESULT_COLUMNS` added. The writers, the summary, the
report and the readers take the names and types from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

MANIFEST_FILE = "_manifest.json"
CHUNKS_DIR = "_chunks"
CHUNK_FILE = "part-{:06d}.parquet"
CHUNK_FILES = "part-*.parquet"  # the glob of CHUNK_FILE's names
SUMMARY_FILE = "_summary.json"
REPORT_FILE = "_report.html"
DONE, TIMED_OUT, SKIPPED = "done", "timed-out", "skipped"  # chunk record statuses

# The columns generation adds to every input row: (pandas dtype, Arrow type), one place.
RESULT_COLUMNS = {
    # Common to every task: the row's place in the input (from 0). Chunk files follow prefix
    # order when prefix locality reorders rows; exports and readers restore input order by it.
    "position": ("int64", "int64"),
    "generated_text": ("string", "string"),
    "prompt_tokens": ("Int64", "int64"),
    "output_tokens": ("Int64", "int64"),
    "finish_reason": ("string", "string"),
    "rank": ("Int64", "int64"),
    "worker": ("string", "string"),
    "error": ("string", "string"),
    "started_at": ("float64", "double"),
    "finished_at": ("Float64", "double"),
    "time_to_first_token": ("Float64", "double"),
    "queue_seconds": ("Float64", "double"),
}
RESULT_DTYPES = {name: dtype for name, (dtype, _) in RESULT_COLUMNS.items()}

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


def result_arrow_schema():
    """The Arrow types of the result columns, as the chunk files store them."""
    import pyarrow as pa

    return pa.schema([(name, pa.type_for_alias(arrow)) for name, (_, arrow) in RESULT_COLUMNS.items()])


def result_meta(meta: pd.DataFrame) -> pd.DataFrame:
    """The empty frame that describes generated partitions of ``meta``."""
    import pandas as pd

    return meta.assign(**{name: pd.Series(dtype=dtype) for name, dtype in RESULT_DTYPES.items()})


def record_meta() -> pd.DataFrame:
    """The empty frame of chunk records that ``generate_and_write`` returns."""
    import pandas as pd

    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in RECORD_DTYPES.items()})
