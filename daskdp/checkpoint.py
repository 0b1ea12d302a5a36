"""Checkpoints: chunk files, the run's manifest, and what a resumed run has left to do.

An output directory holds::

    _manifest.json               the run: input fingerprint, settings that change results, chunks
    _chunks/000012.done.json     one record per finished chunk: rows, ids, file size and SHA-256
    _chunks/000012.timed-out.json  a chunk stopped by --chunk-timeout, with its unfinished ids
    part-000012.parquet          the chunk's rows, renamed into place only when complete

Chunk ``c`` is rows ``[c * chunk_rows, (c + 1) * chunk_rows)`` of the input, in input order or,
with prefix locality, in the order that puts rows sharing a prompt prefix together (a function
of the input alone), whatever the number of ranks, so a resumed run can skip exactly the
chunks that are done. A chunk's data
file is written first and its record second: a chunk without a record is redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import posixpath
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from daskdp.errors import UserError

MANIFEST_FILE = "_manifest.json"
CHUNKS_DIR = "_chunks"
CHUNK_FILE = "part-{:06d}.parquet"
DONE, TIMED_OUT = "done", "timed-out"
MANIFEST_VERSION = 1
CHUNKS_PER_RANK = 8  # the fewest chunks per rank that costs may shrink the chunks to
MIN_CHUNK_ROWS = 64
SECRET_WORDS = {"token", "secret", "password", "passwd", "key", "apikey", "credential", "credentials", "auth"}


@dataclass(frozen=True)
class Layout:
    """How a run's ``rows`` input rows are cut into chunks: in input order, or ``by_prefix``."""

    rows: int
    chunk_rows: int
    by_prefix: bool = False

    @property
    def chunks(self) -> int:
        return math.ceil(self.rows / self.chunk_rows)

    def chunk_size(self, chunk: int) -> int:
        return min(self.chunk_rows, self.rows - chunk * self.chunk_rows)


def layout(costs: np.ndarray, ranks: int, chunk_size: int, by_prefix: bool = False) -> Layout:
    """Chunks of at most ``chunk_size`` rows, as many per rank, and small enough in estimated
    cost for a balanced spread over the ranks.

    ``costs`` holds each row's estimated cost, in the order chunks are cut. With costs that vary (long outputs grouped at
    the end of the input), chunks shrink until none costs more than 1/``CHUNKS_PER_RANK`` of a
    rank's share, but not below ``MIN_CHUNK_ROWS`` rows.
    """
    if chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {chunk_size}")
    rows = len(costs)
    chunks = ranks * math.ceil(rows / (ranks * chunk_size))
    chunk_rows = max(1, math.ceil(rows / chunks))
    cap = costs.sum() / (ranks * CHUNKS_PER_RANK)

    def fits(size: int) -> bool:
        return np.add.reduceat(costs, np.arange(0, rows, size)).max() <= cap

    smallest, largest = min(chunk_rows, MIN_CHUNK_ROWS), chunk_rows
    while smallest < largest:  # the largest size that fits, by bisection
        middle = (smallest + largest + 1) // 2
        smallest, largest = (middle, largest) if fits(middle) else (smallest, middle - 1)
    return Layout(rows, smallest, by_prefix)


def redacted(settings: Any) -> Any:
    """``settings`` with the values of secret-looking keys (tokens, passwords) replaced."""
    if isinstance(settings, dict):
        return {k: "***" if _is_secret(str(k)) else redacted(v) for k, v in settings.items()}
    return settings


def _is_secret(key: str) -> bool:
    """``hf-token``, ``api_key``, ``password``: yes; ``max-tokens``, ``tokenizer``: no."""
    return bool(SECRET_WORDS & set(re.split(r"[-_.]", key.lower())))


def without_secrets(settings: Any) -> Any:
    """``settings`` without secret-looking keys: they change nothing generated."""
    if isinstance(settings, dict):
        return {k: without_secrets(v) for k, v in settings.items() if not _is_secret(str(k))}
    return settings


def result_settings(model: str, engine_args: dict, settings: dict) -> dict[str, Any]:
    """The settings that change what is generated, as the manifest records them."""
    return without_secrets(
        {
            "model": model,
            "sampling": settings["sampling"],
            "engine": engine_args,
            "input": settings["input"],
        }
    )


def new_manifest(source: str, fingerprint: str, layout: Layout, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": MANIFEST_VERSION,
        "input": source,
        "input_fingerprint": fingerprint,
        "rows": layout.rows,
        "chunk_rows": layout.chunk_rows,
        "chunks": layout.chunks,
        "row_order": "prefix" if layout.by_prefix else "input",
        "settings": settings,
        "created": time.time(),
    }


def read_manifest(output: str) -> dict[str, Any] | None:
    """The manifest in ``output``, or None when there is none (or it is unreadable)."""
    fs, path = _fs(output)
    target = posixpath.join(path, MANIFEST_FILE)
    if not fs.exists(target):
        return None
    try:
        with fs.open(target, "r") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_manifest(manifest: dict[str, Any], output: str) -> None:
    fs, path = _fs(output)
    fs.makedirs(posixpath.join(path, CHUNKS_DIR), exist_ok=True)
    _write_atomically(fs, posixpath.join(path, MANIFEST_FILE), _json(manifest))


def differences(manifest: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """What differs between a run's manifest and this run's settings, in words."""
    found = []
    if manifest.get("version") != MANIFEST_VERSION:
        found.append(f"manifest version {manifest.get('version')} (this daskdp writes {MANIFEST_VERSION})")
    before, now = _flatten(manifest.get("settings", {})), _flatten(settings)
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            found.append(f"{key}: {before.get(key)!r} then, {now.get(key)!r} now")
    return found


def input_differs(manifest: dict[str, Any], fingerprint: str, rows: int) -> list[str]:
    """How this run's input differs from the one of a run's manifest, in words, if it does."""
    if manifest.get("rows") == rows and manifest.get("input_fingerprint") == fingerprint:
        return []
    return [f"the input (it had {manifest.get('rows')} rows, now {rows}, or their content changed)"]


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{str(key).replace('_', '-')}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.loads(json.dumps(value, default=str))  # tuples and lists compare equal
    return flat


def record_path(path: str, chunk: int, status: str) -> str:
    return posixpath.join(path, CHUNKS_DIR, f"{chunk:06d}.{status}.json")


def done_chunks(output: str) -> set[int]:
    """Chunks with a done record (not verified: see ``verified_records``)."""
    fs, path = _fs(output)
    directory = posixpath.join(path, CHUNKS_DIR)
    if not fs.exists(directory):
        return set()
    names = (posixpath.basename(p) for p in fs.ls(directory, detail=False))
    return {int(name.split(".")[0]) for name in names if name.endswith(f".{DONE}.json")}


def read_records(output: str, status: str = DONE) -> dict[int, dict[str, Any]]:
    """The chunk records with ``status`` in ``output``, by chunk."""
    fs, path = _fs(output)
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
    fs, path = _fs(output)
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

    fs, path = _fs(output)
    name = CHUNK_FILE.format(record["chunk"])
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        table = pa.Table.from_pandas(_storable(frame), preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    _write_atomically(fs, posixpath.join(path, name), data)
    ids = frame[id_column].astype(str)
    record = record | {
        "status": DONE,
        "file": name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
    }
    _write_atomically(fs, record_path(path, record["chunk"], DONE), _json(record))
    timed_out = record_path(path, record["chunk"], TIMED_OUT)
    if fs.exists(timed_out):
        fs.rm(timed_out)
    return record


def write_timed_out(output: str, record: dict[str, Any]) -> dict[str, Any]:
    """Record a chunk that was stopped, with the ids it left unfinished."""
    fs, path = _fs(output)
    record = record | {"status": TIMED_OUT}
    _write_atomically(fs, record_path(path, record["chunk"], TIMED_OUT), _json(record))
    return record


def _storable(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (a number among prompts) as strings, nulls kept."""
    import pyarrow as pa

    columns = {}
    for name in frame.columns:
        if pd.api.types.is_object_dtype(frame[name].dtype):
            try:
                pa.array(frame[name], from_pandas=True)
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                columns[name] = frame[name].map(str, na_action="ignore").astype("string")
    return frame.assign(**columns)


TEMPORARY = re.compile(r"\.(.+)\.tmp-[0-9a-f]{32}")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a file that ``_write_atomically`` was writing when its run stopped."""
    return TEMPORARY.fullmatch(name) is not None


def _write_atomically(fs, target: str, data: bytes | str) -> None:
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


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, default=str) + "\n"


def _fs(output: str):
    import fsspec

    return fsspec.core.url_to_fs(output)
