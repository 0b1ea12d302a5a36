"""Read and check prompts, fingerprint them, spread their chunks over ranks, check the output."""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp.checkpoint import CHUNKS_DIR, MANIFEST_FILE, Layout
from daskdp.errors import UserError

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
SUMMARY_FILE = "_summary.json"
REPORT_FILE = "_report.html"  # "_": Parquet readers skip it, as they skip the summary


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

    def survey(self) -> tuple[list[int], str]:
        """Rows in each input partition and a fingerprint of their content, read on the workers.

        Refuses an input that is empty or cannot be read.
        """
        try:
            surveyed = self.frame.map_partitions(_survey, meta=_SURVEY_META).compute()
        except Exception as e:
            raise UserError(unreadable(self.source, self.format, e)) from None
        lengths = [int(n) for n in surveyed["rows"]]
        if not sum(lengths):
            raise UserError(f"{self.source} has no rows; there is nothing to generate")
        fingerprint = hashlib.sha256("\n".join(surveyed["digest"]).encode()).hexdigest()
        return lengths, fingerprint


_SURVEY_META = pd.DataFrame({"rows": pd.Series(dtype="int64"), "digest": pd.Series(dtype=object)})


def _survey(part: pd.DataFrame) -> pd.DataFrame:
    """One partition's row count and a digest of its rows (index ignored, order kept)."""
    hashable = part.assign(
        **{
            name: part[name].map(repr)  # chat messages are lists, which pandas cannot hash
            for name in part.columns
            if pd.api.types.is_object_dtype(part[name].dtype)
        }
    )
    hashes = pd.util.hash_pandas_object(hashable, index=False).to_numpy()
    digest = hashlib.sha256(",".join(map(str, part.columns)).encode() + hashes.tobytes()).hexdigest()
    return pd.DataFrame({"rows": [len(part)], "digest": [digest]})


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
    fmt = input_format(source, len(matches) == 1 and fs.isdir(matches[0]))
    try:
        # Dask's string conversion would turn chat messages (lists of dicts) into their repr.
        with dask.config.set({"dataframe.convert-string": False}):
            df = _read(source, fmt, input_config)
    except UserError:
        raise
    except Exception as e:
        raise UserError(unreadable(source, fmt, e)) from None
    check_columns(df._meta, source, input_config)
    return Prompts(df, source, fmt)


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
    while error.__cause__ is not None:  # Dask wraps the reader's own error
        error = error.__cause__
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
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


def balance(
    df: dd.DataFrame, lengths: list[int], layout: Layout, chunks: list[int], parts: int, id_column: str
) -> dd.DataFrame:
    """The rows of ``chunks`` in ``parts`` partitions of whole chunks, as even as chunks allow.

    The index becomes ``row``, each row's position in the input; without an ``id_column``
    the position is also the row's id.
    """
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    total = int(offsets[-1])
    meta = df._meta.assign(row=np.int64(0))
    positioned = df.map_partitions(_add_positions, offsets, meta=meta)
    known = [int(offsets[i]) for i, n in enumerate(lengths) if n] + [total - 1]
    nonempty = positioned.partitions[[i for i, n in enumerate(lengths) if n]]
    indexed = nonempty.set_index("row", sorted=True, divisions=known)
    if id_column not in indexed.columns:
        indexed = indexed.assign(**{id_column: indexed.index})
    if len(chunks) < layout.chunks:
        indexed = indexed.map_partitions(_only_chunks, layout.chunk_rows, np.asarray(chunks))
    groups = np.array_split(np.asarray(sorted(chunks)), min(parts, len(chunks)))
    bounds = [0] + [int(group[0]) * layout.chunk_rows for group in groups[1:]] + [total - 1]
    return indexed.repartition(divisions=bounds)


def _only_chunks(part: pd.DataFrame, chunk_rows: int, chunks: np.ndarray) -> pd.DataFrame:
    return part[np.isin(part.index.to_numpy() // chunk_rows, chunks)]


def _add_positions(part: pd.DataFrame, offsets, partition_info=None) -> pd.DataFrame:
    start = int(offsets[partition_info["number"]])
    return part.assign(row=np.arange(start, start + len(part), dtype=np.int64))


def default_output(source: str) -> str:
    """``<input stem>.out`` beside the input; ``daskdp.out`` beside a glob's files."""
    import fsspec

    source = source.rstrip("/")
    if fsspec.core.has_magic(source):
        return posixpath.join(posixpath.dirname(source), "daskdp.out")
    directory, name = posixpath.split(source)
    stem = name
    while posixpath.splitext(stem)[1].lower() in set(FORMATS) | COMPRESSIONS:
        stem = posixpath.splitext(stem)[0]
    return posixpath.join(directory, f"{stem}.out")


def check_output(output: str, resume: bool, overwrite: bool) -> None:
    """Refuse an output that is a file, holds other files, or holds results without a flag."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise UserError(f"output {output} is a file, not a directory; choose another -o/--output")
    entries = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    foreign = [e for e in entries if not _is_daskdp_file(e)]
    if foreign:
        raise UserError(
            f"output directory {output} holds files daskdp did not write ({', '.join(foreign[:3])}); "
            "choose another -o/--output"
        )
    if entries and not (resume or overwrite):
        raise UserError(
            f"output directory {output} holds the results of an earlier run; pass --resume to "
            "continue it, --overwrite to replace it, or choose another -o/--output"
        )


def has_results(output: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    return fs.exists(path) and bool(fs.ls(path, detail=False))


def clear_output(output: str) -> None:
    """Remove the results of an earlier run (``check_output`` allowed them)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    if fs.exists(path):
        for entry in fs.ls(path, detail=False):
            fs.rm(entry, recursive=True)


def _is_daskdp_file(name: str) -> bool:
    if name in (SUMMARY_FILE, REPORT_FILE, MANIFEST_FILE, CHUNKS_DIR):
        return True
    return name.lstrip(".").startswith("part-") and ".parquet" in name


def write_summary(summary: dict[str, Any], output: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    with fs.open(posixpath.join(path, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
