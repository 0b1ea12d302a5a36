"""The output, declared once: the files of an output directory and the columns of its rows.

An output directory holds::

    _manifest.json               the run: input fingerprint, settings that change results, chunks
    _chunks/000012.done.json     one record per finished chunk: rows, ids, file size and SHA-256
    _chunks/000012.timed-out.json  a chunk stopped by --chunk-timeout, with its unfinished ids
    part-000012.parquet          the chunk's rows, renamed into place only when complete
    _summary.json, _report.html  the run's summary and report ("_": Parquet readers skip them)

Each result row is its input row with its task's `result_columns` added: for generation, one
row per input row, or per sample of it (``sample``; a request that failed is one row). The
writers, the lazy API's meta, the summary, the report and the readers take the names and types
from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

MANIFEST_FILE = "_manifest.json"
CHUNKS_DIR = "_chunks"
CHUNK_FILE = "part-{:06d}.parquet"
CHUNK_FILES = "part-*.parquet"  # the glob of CHUNK_FILE's names
SUMMARY_FILE = "_summary.json"
REPORT_FILE = "_report.html"
DONE, TIMED_OUT, SKIPPED = "done", "timed-out", "skipped"  # chunk record statuses

# The columns each task adds to every input row: (pandas dtype, Arrow type), declared once.
# Every task's rows carry the common columns; each task adds its own block. An Arrow type is an
# alias (`pyarrow.type_for_alias`) or one of the nested types named in `NESTED_TYPES`.
COMMON_COLUMNS = {
    # The row's place in the input (from 0). Chunk files follow prefix order when prefix
    # locality reorders rows; exports and readers restore input order by it.
    "position": ("int64", "int64"),
    "prompt_tokens": ("Int64", "int64"),
    "rank": ("Int64", "int64"),
    "worker": ("string", "string"),
    "error": ("string", "string"),
    "started_at": ("float64", "double"),
    "finished_at": ("Float64", "double"),
}
GENERATION_COLUMNS = {
    "generated_text": ("string", "string"),
    "output_tokens": ("Int64", "int64"),
    "finish_reason": ("string", "string"),
    "time_to_first_token": ("Float64", "double"),
    "queue_seconds": ("Float64", "double"),
    # n samples and logprobs: always present, null when not asked for.
    "sample": ("Int64", "int64"),  # 0..n-1; null for a request that failed (one row)
    "logprobs": (None, "token_logprobs"),  # per generated token; pandas: objects (result_dtypes)
    "cumulative_logprob": ("Float64", "double"),
    "prompt_logprobs": (None, "token_logprobs"),  # per prompt token (the first null); sample 0 only
}
LOGPROB_COLUMNS = ("logprobs", "prompt_logprobs")
# The pooling tasks (--task embed/classify/score). EMBEDDING is a fixed-size list whose size is
# the run's one embedding dimension, known once an engine has loaded (`pandas_dtype`).
EMBEDDING = "fixed_size_list<float>"
POOLING_COLUMNS = {
    "embed": {"embedding": (EMBEDDING, EMBEDDING)},
    "classify": {"probs": ("list<float>", "list<float>"), "label": ("string", "string")},
    "score": {"score": ("Float64", "double")},
}
GENERATE, TASKS = "generate", ("generate", *POOLING_COLUMNS)
# Where the common columns go among generation's own, as generation has always written them.
_GENERATION_ORDER = [
    "position",
    "generated_text",
    "prompt_tokens",
    "output_tokens",
    "finish_reason",
    "rank",
    "worker",
    "error",
    "started_at",
    "finished_at",
    "time_to_first_token",
    "queue_seconds",
    "sample",
    "logprobs",
    "cumulative_logprob",
    "prompt_logprobs",
]


def result_columns(task: str = GENERATE) -> dict[str, tuple[str, str]]:
    """The columns ``task`` adds to every input row, in the order they are written."""
    if task == GENERATE:
        columns = COMMON_COLUMNS | GENERATION_COLUMNS
        return {name: columns[name] for name in _GENERATION_ORDER}
    return POOLING_COLUMNS[task] | COMMON_COLUMNS


RESULT_COLUMNS = result_columns(GENERATE)  # generation's, the default task
RESULT_DTYPES = {name: dtype for name, (dtype, _) in RESULT_COLUMNS.items()}
# Every task's result columns: the names an input column must not have.
ALL_RESULT_COLUMNS = {name: spec for task in TASKS for name, spec in result_columns(task).items()}


def token_logprob_type(top: bool = True):
    """One token's logprob: its id, text, logprob and rank (1 = likeliest) and, with ``top``, the
    alternatives vLLM returned for its position (the top K, and the token itself when it is not
    among them), each without ``top``."""
    import pyarrow as pa

    fields = [
        ("token_id", pa.int32()),
        ("token", pa.string()),
        ("logprob", pa.float32()),
        ("rank", pa.int32()),
    ]
    if top:
        fields.append(("top", pa.list_(token_logprob_type(top=False))))
    return pa.struct(fields)


def token_logprobs_type():
    """A list of `token_logprob_type`: the ``logprobs`` and ``prompt_logprobs`` columns."""
    import pyarrow as pa

    return pa.list_(token_logprob_type())


NESTED_TYPES = {"token_logprobs": token_logprobs_type}


def arrow_type(name: str):
    """The Arrow type of generation's result column ``name``."""
    import pyarrow as pa

    arrow = ALL_RESULT_COLUMNS[name][1]
    return NESTED_TYPES[arrow]() if arrow in NESTED_TYPES else pa.type_for_alias(arrow)


def pandas_dtype(dtype: str | None, dimension: int | None = None):
    """The pandas dtype of a column declared as ``dtype``: Arrow-backed for lists of floats, with
    the run's embedding ``dimension`` for the fixed-size embedding.

    The nested logprobs (``None``) are objects, lists of dicts, as ``pd.read_parquet`` reads any
    nested column back: ``pd.ArrowDtype`` of a nested struct type is written into Parquet
    metadata by name, and pandas cannot parse that name when it reads the file. The writer gets
    them as Arrow data all the same (`daskdp.engine.rows`), without a Python object per token.
    """
    if dtype is None:
        return "object"
    if dtype not in (EMBEDDING, "list<float>"):
        return dtype
    import pandas as pd
    import pyarrow as pa

    if dtype == EMBEDDING:
        if dimension is None:
            raise ValueError("the embedding dimension is known once an engine has loaded")
        return pd.ArrowDtype(pa.list_(pa.float32(), dimension))
    return pd.ArrowDtype(pa.list_(pa.float32()))


def result_dtypes(task: str = GENERATE, dimension: int | None = None) -> dict[str, Any]:
    """The pandas dtype of each column ``task`` adds (``dimension``: the embedding's, for embed)."""
    return {name: pandas_dtype(dtype, dimension) for name, (dtype, _) in result_columns(task).items()}


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
    "output_rows": "int64",  # rows written: a row per sample, one per failed request
    "timed_out_rows": "int64",
    "timed_out_ids": "object",
    "prefix_cache_queries": "int64",
    "prefix_cache_hits": "int64",
    # Rows generated under a JSON Schema, regex or choice, and those whose text meets it.
    "structured_rows": "int64",
    "structured_valid": "int64",
    "rank": "int64",
    "worker": "object",
    "partition": "int64",
    "attempts": "int64",
    "started": "float64",
    "finished": "float64",
}


def result_meta(meta: pd.DataFrame, task: str = GENERATE, dimension: int | None = None) -> pd.DataFrame:
    """The empty frame that describes ``task``'s result partitions of ``meta``.

    The nested columns (logprobs) are declared with their Arrow type (``pd.ArrowDtype``), from
    which Dask's ``to_parquet`` takes their schema (it cannot infer one from an object column);
    their values are lists of dicts all the same (`result_dtypes`).
    """
    import pandas as pd

    dtypes = {
        name: pd.ArrowDtype(arrow_type(name)) if name in LOGPROB_COLUMNS else dtype
        for name, dtype in result_dtypes(task, dimension).items()
    }
    return meta.assign(**{name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})


def record_meta() -> pd.DataFrame:
    """The empty frame of chunk records that ``generate_and_write`` returns."""
    import pandas as pd

    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in RECORD_DTYPES.items()})
