"""Chunk files and their records: written atomically (data first, record second), verified on resume.

A chunk's data file is written first and its record second: a chunk without a record is redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from daskdp.output.schema import CHUNK_FILE, CHUNKS_DIR, DONE, TIMED_OUT

if TYPE_CHECKING:
    import pandas as pd

    from daskdp.plan import Layout


def record_path(path: str, chunk: int, status: str) -> str:
    return posixpath.join(path, CHUNKS_DIR, f"{chunk:06d}.{status}.json")


def done_chunks(output: str) -> set[int]:
    """Chunks with a done record (not verified: see ``verified_records``)."""
    fs, path = filesystem(output)
    directory = posixpath.join(path, CHUNKS_DIR)
    if not fs.exists(directory):
        return set()
    names = (posixpath.basename(p) for p in fs.ls(directory, detail=False))
    return {int(name.split(".")[0]) for name in names if name.endswith(f".{DONE}.json")}


def read_records(output: str, status: str = DONE) -> dict[int, dict[str, Any]]:
    """The chunk records with ``status`` in ``output``, by chunk."""
    fs, path = filesystem(output)
    files = fs.glob(posixpath.join(path, CHUNKS_DIR, f"*.{status}.json"))

    def read(file: str) -> dict[str, Any]:
        with fs.open(file, "r") as f:
            return json.load(f)

    with ThreadPoolExecutor(8) as pool:
        return {record["chunk"]: record for record in pool.map(read, files)}


def verified_records(output: str, layout: Layout) -> dict[int, dict[str, Any]]:
    """Done chunks whose file is whole: the size and SHA-256 its record holds.

    A chunk whose file is missing, truncated or corrupt loses its record and file, so it is
    generated again; leftovers of interrupted writes are removed.
    """
    fs, path = filesystem(output)
    for leftover in fs.glob(posixpath.join(path, ".*.tmp-*")) + fs.glob(
        posixpath.join(path, CHUNKS_DIR, ".*.tmp-*")
    ):
        fs.rm(leftover)

    def check(chunk: int) -> tuple[int, dict[str, Any] | None]:
        record_file = record_path(path, chunk, DONE)
        try:
            with fs.open(record_file, "r") as f:
                record = json.load(f)
            with fs.open(posixpath.join(path, record["file"]), "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            whole = digest == record["sha256"] and record["rows"] == layout.chunk_size(chunk)
        except (OSError, ValueError, KeyError):
            whole = False
        if whole:
            return chunk, record
        for stale in (record_file, posixpath.join(path, CHUNK_FILE.format(chunk))):
            if fs.exists(stale):
                fs.rm(stale)
        return chunk, None

    with ThreadPoolExecutor(8) as pool:
        checked = pool.map(check, sorted(done_chunks(output)))
        return {chunk: record for chunk, record in checked if record is not None}


def write_chunk(frame: pd.DataFrame, output: str, record: dict[str, Any], id_column: str) -> dict[str, Any]:
    """Write a finished chunk's rows, then its record; both appear whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem(output)
    name = CHUNK_FILE.format(record["chunk"])
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        table = pa.Table.from_pandas(_storable(frame), preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(_readable_lists(table), sink)
    data = sink.getvalue().to_pybytes()
    write_atomically(fs, posixpath.join(path, name), data)
    ids = frame[id_column].astype(str)
    record = record | {
        "status": DONE,
        "file": name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
    }
    write_atomically(fs, record_path(path, record["chunk"], DONE), to_json(record))
    timed_out = record_path(path, record["chunk"], TIMED_OUT)
    if fs.exists(timed_out):
        fs.rm(timed_out)
    return record


def write_timed_out(output: str, record: dict[str, Any]) -> dict[str, Any]:
    """Record a chunk that was stopped, with the ids it left unfinished."""
    fs, path = filesystem(output)
    record = record | {"status": TIMED_OUT}
    write_atomically(fs, record_path(path, record["chunk"], TIMED_OUT), to_json(record))
    return record


def _storable(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (a number among prompts) as strings, nulls kept."""
    import pandas as pd
    import pyarrow as pa

    columns = {}
    for name in frame.columns:
        if pd.api.types.is_object_dtype(frame[name].dtype):
            try:
                pa.array(frame[name], from_pandas=True)
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                columns[name] = frame[name].map(str, na_action="ignore").astype("string")
    return frame.assign(**columns)


def _readable_lists(table):
    """``table`` with its list columns (embeddings, class probabilities) noted as plain objects
    in its pandas metadata.

    pandas notes them as Arrow-backed dtypes whose names it cannot parse back
    (``fixed_size_list<item: float>[128][pyarrow]``), and every reader of the file would fail;
    as objects they read back as arrays, or as Arrow lists with ``dtype_backend="pyarrow"``.
    """
    import pyarrow as pa

    listed = {
        field.name
        for field in table.schema
        if pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type)
    }
    metadata = table.schema.metadata or {}
    if not listed or b"pandas" not in metadata:
        return table
    pandas = json.loads(metadata[b"pandas"])
    for column in pandas["columns"]:
        if column["name"] in listed:
            column.update(pandas_type="object", numpy_type="object", metadata=None)
    return table.replace_schema_metadata({**metadata, b"pandas": json.dumps(pandas).encode()})


TEMPORARY = re.compile(r"\.(.+)\.tmp-[0-9a-f]+")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a file that ``write_atomically`` was writing when its run stopped."""
    return TEMPORARY.fullmatch(name) is not None


def write_atomically(fs, target: str, data: bytes | str) -> None:
    """Write to a hidden temporary name beside ``target``, then rename it into place."""
    directory, name = posixpath.split(target)
    temporary = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open(temporary, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        fs.mv(temporary, target)
    except BaseException:  # a full disk, a stopped run: no half-written file is left behind
        with contextlib.suppress(OSError):
            fs.rm(temporary)
        raise


def to_json(value: Any) -> str:
    return json.dumps(value, indent=1, default=str) + "\n"


def filesystem(output: str):
    import fsspec

    return fsspec.core.url_to_fs(output)
