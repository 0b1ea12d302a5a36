"""Read and check prompts, fingerprint them, spread their chunks over ranks, check the output."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from daskdp import checkpoint
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


CHARS_PER_TOKEN = 4  # a prompt's length in tokens, roughly, for balancing only
# Rows whose prompts start with the same PREFIX_CHARS[0] characters share a long prefix; within
# them, the same PREFIX_CHARS[1] characters. Keys of both, hashed, put such rows together.
PREFIX_CHARS = (128, 1024)
SHARED_PREFIX_ROWS = 0.1  # the fraction of rows that must share a prefix for reordering to pay


@dataclass
class Survey:
    """What one pass over the input tells: rows per input partition, a fingerprint of their
    content, each row's estimated cost (prompt tokens + max_tokens, in input order), and the
    prefix keys of the rows that have a long prefix (``prefixed``: their input positions).

    Only rows with a long prefix carry keys, so that a large input of short prompts costs the
    client 4 bytes a row.
    """

    lengths: list[int]
    fingerprint: str
    costs: np.ndarray  # float32, one per row
    prefixed: np.ndarray  # input positions of the rows with a long prefix
    prefix_keys: np.ndarray  # len(prefixed) x len(PREFIX_CHARS), uint64

    @property
    def rows(self) -> int:
        return sum(self.lengths)

    def shares_prefixes(self) -> bool:
        """Whether enough rows share a long prefix with another row for prefix locality to pay."""
        _, counts = np.unique(self.prefix_keys[:, 0], return_counts=True)
        return counts[counts > 1].sum() >= SHARED_PREFIX_ROWS * self.rows

    @functools.cached_property
    def prefix_order(self) -> np.ndarray:
        """The rows, by input position, with rows sharing a prefix together (input order within);
        rows without a long prefix first, in input order."""
        keys = np.zeros((len(PREFIX_CHARS), self.rows), dtype=np.uint64)
        keys[:, self.prefixed] = self.prefix_keys.T
        return np.lexsort((np.arange(self.rows), *keys[::-1]))

    def arrangement(self, by_prefix: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """Each row's place (``None``: input order) and the rows' costs in that order."""
        if not by_prefix:
            return None, self.costs
        order = self.prefix_order
        slots = np.empty(self.rows, dtype=np.int64)
        slots[order] = np.arange(self.rows)
        return slots, self.costs[order]


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
        id_column = self.input_config["id-column"]
        try:
            surveyed = self.frame.map_partitions(
                _survey, columns, id_column, max_tokens, meta=_SURVEY_META
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
            raise UserError(
                f"column '{id_column}' of {self.source} repeats the id {value!r} in rows "
                + ", ".join(map(str, rows[:5]))
                + (f" (and {more:,} other ids repeat)" if more else "")
                + "; ids must be unique: fix them, or drop the column to number the rows by position"
            )

    def row(self, position: int, column: str, starts: np.ndarray) -> Any:
        """The value of ``column`` in the row at input ``position``, read from its partition."""
        partition = int(np.searchsorted(starts, position, side="right") - 1)
        values = self.frame.get_partition(partition)[column].compute()
        return values.iloc[position - int(starts[partition])]


_SURVEY_META = pd.DataFrame(
    {
        name: pd.Series(dtype="int64" if name == "rows" else object)
        for name in ("rows", "digest", "costs", "prefixed", "prefix_keys", "null_ids", "id_hashes")
    }
)


def _survey(part: pd.DataFrame, columns: tuple[str, str], id_column: str, max_tokens: int) -> pd.DataFrame:
    """One partition's row count, a digest of its rows (index ignored, order kept), its rows'
    costs, the positions and prefix keys of those with a long prefix, and its ids: the
    positions of null ones and a hash of each (as text: ``1`` and ``"1"`` are one id)."""
    hashable = part.assign(
        **{
            name: part[name].map(repr)  # chat messages are lists, which pandas cannot hash
            for name in part.columns
            if pd.api.types.is_object_dtype(part[name].dtype)
        }
    )
    hashes = pd.util.hash_pandas_object(hashable, index=False).to_numpy()
    digest = hashlib.sha256(",".join(map(str, part.columns)).encode() + hashes.tobytes()).hexdigest()
    prefixed, keys = prefix_keys(part, columns)
    null_ids, id_hashes = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    if id_column in part:
        ids = part[id_column]
        null_ids = np.flatnonzero(ids.isna().to_numpy())
        id_hashes = pd.util.hash_array(ids.map(str).to_numpy(dtype=object))
    return pd.DataFrame(
        {
            "rows": [len(part)],
            "digest": [digest],
            "costs": [row_costs(part, columns, max_tokens)],
            "prefixed": [prefixed],
            "prefix_keys": [keys],
            "null_ids": [null_ids],
            "id_hashes": [id_hashes],
        }
    )


def prompt_texts(part: pd.DataFrame, columns: tuple[str, str]) -> pd.Series:
    """Each row's prompt as text: the prompt, or its chat messages' contents; '' for neither."""
    prompt, messages = columns
    texts = pd.Series("", index=part.index, dtype=object)
    if messages in part:
        rendered = part[messages].map(_message_text, na_action="ignore")
        texts = rendered.where(rendered.notna(), texts)
    if prompt in part:
        given = part[prompt].map(lambda p: p if isinstance(p, str) else None, na_action="ignore")
        texts = given.where(given.notna(), texts)
    return texts


def prefix_keys(part: pd.DataFrame, columns: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the rows whose prompt is at least ``PREFIX_CHARS[0]`` characters long, and
    hashes of their first ``PREFIX_CHARS`` characters, one column per length."""
    texts = prompt_texts(part, columns).astype(str)
    prefixed = np.flatnonzero((texts.str.len() >= PREFIX_CHARS[0]).to_numpy())
    texts = texts.iloc[prefixed]
    keys = [pd.util.hash_array(texts.str.slice(0, n).to_numpy(dtype=object)) for n in PREFIX_CHARS]
    return prefixed, np.stack(keys, axis=1)


def _message_text(conversation: Any) -> str | None:
    if not isinstance(conversation, (list, tuple, np.ndarray)):
        return None
    return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else "" for m in conversation)


def row_costs(part: pd.DataFrame, columns: tuple[str, str], max_tokens: int) -> np.ndarray:
    """Each row's estimated cost in tokens: its prompt's (from its length in characters) plus
    its ``max_tokens`` (the column where given and valid, else the run's)."""
    chars = prompt_texts(part, columns).str.len().to_numpy(dtype=np.int64)
    limits = np.full(len(part), max_tokens, dtype=np.int64)
    if "max_tokens" in part:
        given = pd.to_numeric(part["max_tokens"], errors="coerce").to_numpy(dtype=float)
        usable = np.isfinite(given) & (given >= 1)
        limits[usable] = given[usable].astype(np.int64)
    return (chars // CHARS_PER_TOKEN + limits).astype(np.float32)


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
    """The one-line message for input that cannot be read as its name says.

    Readers name a byte offset or nothing at all; where the cause is one bad line of JSON
    Lines or one string that is not UTF-8, the message names its file and line or row.
    """
    while error.__cause__ is not None:  # Dask wraps the reader's own error
        error = error.__cause__
    found = None
    try:
        if fmt == "jsonl":
            found = first_bad_json_line(source)
        elif fmt == "parquet" and ("Wrapping" in str(error) or isinstance(error, UnicodeDecodeError)):
            found = first_invalid_utf8(source)
    except Exception:  # the diagnosis is a courtesy: the reader's own reason still stands
        found = None
    if found:
        return found
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    names = {"parquet": "Parquet", "jsonl": "JSON Lines", "csv": "CSV"}
    return f"cannot read {source} as {names[fmt]} ({reason[:200]}); check that the file is what its name says"


def _files(source: str) -> list[tuple[Any, str]]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    paths = fs.glob(path) if fsspec.core.has_magic(path) else [path]
    files = []
    for found in paths:
        files += [(fs, p) for p in (fs.find(found) if fs.isdir(found) else [found])]
    return files


def first_bad_json_line(source: str) -> str | None:
    """The first line of the JSON Lines input ``source`` that is not a JSON object, in words."""
    import fsspec

    for fs, path in _files(source):
        with fsspec.open(fs.unstrip_protocol(path), "rb", compression="infer") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except UnicodeDecodeError:
                    return f"cannot read {path} as JSON Lines: line {number} is not valid UTF-8; fix or remove it"
                except ValueError as e:
                    return f"cannot read {path} as JSON Lines: line {number} is not valid JSON ({e}); fix or remove it"
                if not isinstance(row, dict):
                    return (
                        f"cannot read {path} as JSON Lines: line {number} is a JSON {type(row).__name__}, "
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


def chunk_costs(costs: np.ndarray, layout: Layout) -> np.ndarray:
    """The estimated cost of each chunk of ``layout``, from the costs of its rows in order."""
    return np.add.reduceat(costs, np.arange(layout.chunks) * layout.chunk_rows).astype(float)


def assign(
    chunk_costs: np.ndarray, chunks: list[int], parts: int, contiguous: bool = False
) -> list[list[int]]:
    """Spread ``chunks`` over at most ``parts`` groups of about equal estimated cost.

    By default longest processing time first: each chunk, costliest first, joins the cheapest
    group so far. ``contiguous``: each group is a run of neighbouring chunks (rows that were
    put together stay together), cut where the running cost crosses a group's share. Groups
    are returned costliest first, each with its chunks in order.
    """
    chunks = sorted(chunks)
    costs = chunk_costs[chunks]
    parts = min(parts, len(chunks))
    if contiguous:
        middles = np.cumsum(costs) - costs / 2
        owner = np.minimum((middles * parts / max(costs.sum(), 1e-9)).astype(int), parts - 1)
    else:
        owner, totals = np.zeros(len(chunks), dtype=int), np.zeros(parts)
        for i in sorted(range(len(chunks)), key=lambda i: -costs[i]):
            owner[i] = int(np.argmin(totals))
            totals[owner[i]] += costs[i]
    groups = [[chunk for chunk, o in zip(chunks, owner, strict=True) if o == g] for g in range(parts)]
    totals = [costs[owner == g].sum() for g in range(parts)]
    return [groups[g] for g in sorted(range(parts), key=lambda g: (-totals[g], g)) if groups[g]]


def partition(
    df: dd.DataFrame,
    lengths: list[int],
    layout: Layout,
    groups: list[list[int]],
    id_column: str,
    slots: np.ndarray | None = None,
) -> dd.DataFrame:
    """A Dask DataFrame with one partition per group of chunks, holding those chunks' rows.

    Chunks are cut from the rows in input order, or in the order of ``slots`` (each input
    row's place). The index is each row's place; without an ``id_column`` the row's position
    in the input is its id.
    """
    import dask
    import dask.dataframe as dd
    from dask import delayed

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    total = int(offsets[-1])
    positioned = df.map_partitions(_add_positions, offsets, meta=df._meta.assign(row=np.int64(0)))
    if id_column not in positioned.columns:
        positioned = positioned.assign(**{id_column: positioned["row"]})
    bounds = [chunk * layout.chunk_rows for chunk in range(layout.chunks)] + [total - 1]
    if slots is None:
        known = [int(offsets[i]) for i, n in enumerate(lengths) if n] + [total - 1]
        nonempty = positioned.partitions[[i for i, n in enumerate(lengths) if n]]
        by_chunk = nonempty.set_index("row", sorted=True, divisions=known).repartition(divisions=bounds)
    else:  # a shuffle: rows move to their slot's chunk
        slotted = positioned.map_partitions(
            _to_slots, delayed(slots), meta=positioned._meta.drop(columns="row").assign(slot=np.int64(0))
        )
        # Tasks, not P2P: P2P goes through Arrow, which refuses columns of mixed types.
        by_chunk = slotted.set_index("slot", divisions=bounds, shuffle_method="tasks")
    pieces = by_chunk.to_delayed()
    parts = [delayed(pd.concat)([pieces[chunk] for chunk in group]) for group in groups]
    # As in read_prompts: Dask's string conversion would turn numbers among the prompts into
    # text and chat messages into their repr.
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_delayed(parts, meta=by_chunk._meta, verify_meta=False)


def _to_slots(part: pd.DataFrame, slots: np.ndarray) -> pd.DataFrame:
    return part.assign(slot=slots[part["row"].to_numpy()]).drop(columns="row")


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
    """Refuse an output that is a file, holds files daskdp did not write, or holds the results
    of an earlier run without ``--resume`` or ``--overwrite``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    check_writable(fs, path, output)
    if not fs.exists(path):
        return
    owned, foreign = daskdp_entries(fs, path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"output directory {output} holds files that no daskdp run wrote ({shown}); "
            "daskdp never deletes them: choose another -o/--output, or move them away"
        )
    if checkpoint.read_manifest(output) is not None and not (resume or overwrite):
        raise UserError(
            f"output directory {output} holds the results of an earlier run; pass --resume to "
            "continue it, --overwrite to replace it, or choose another -o/--output"
        )


def check_writable(fs, path: str, output: str) -> None:
    """Refuse a local output that cannot be made or written (a read-only mount, a path under
    a regular file), before a cluster starts for it; nothing is created here."""
    from fsspec.implementations.local import LocalFileSystem

    if fs.exists(path) and not fs.isdir(path):
        raise UserError(f"output {output} is a file, not a directory; choose another -o/--output")
    if not isinstance(fs, LocalFileSystem):
        return  # object stores: the first write tells
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(
            f"cannot create output {output}: {existing} is a file, not a directory; choose another -o/--output"
        )
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".daskdp-probe-"):
            pass
    except OSError as e:
        raise UserError(
            f"cannot write output {output} ({e.strerror or e} in {existing}); choose another -o/--output"
        ) from None


def daskdp_entries(fs, path: str) -> tuple[list[str], list[str]]:
    """The entries of the directory ``path``: those a daskdp run wrote, and all others.

    A run writes its manifest, the chunk files it names (by chunk record, or by their number
    below the manifest's chunk count: a chunk's file is written before its record), the
    summary, the report, ``_chunks/`` and hidden temporary files beside each of them. Without a
    manifest, only leftovers of a run that stopped before writing one are daskdp's.
    """
    entries = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    manifest = checkpoint.read_manifest(fs.unstrip_protocol(path))
    names = {CHUNKS_DIR}
    if manifest is not None:
        names |= {MANIFEST_FILE, SUMMARY_FILE, REPORT_FILE}
        names |= {checkpoint.CHUNK_FILE.format(c) for c in range(int(manifest.get("chunks", 0)))}
        names |= {record["file"] for record in checkpoint.read_records(fs.unstrip_protocol(path)).values()}
    owned = [e for e in entries if e in names or checkpoint.is_temporary(e)]
    return owned, [e for e in entries if e not in owned]


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """Hold ``output`` for this run; refuse it while another run on this host holds it.

    Two runs writing one directory would overwrite each other's chunks and manifest. The lock
    is a file in the temporary directory named after the output's resolved path (so a symlink,
    ``dir//.`` and ``dir`` are one directory), held with ``filelock``: the system releases it
    when its process ends, killed or not (a killed run leaves the empty file, which the next
    run takes). Runs on other hosts writing one shared directory are not seen.
    """
    import filelock

    key = hashlib.sha256(resolved(output).encode()).hexdigest()[:16]
    lock = filelock.FileLock(os.path.join(tempfile.gettempdir(), f"daskdp-output-{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UserError(
            f"output {output} is being written by another daskdp run on this host; wait for it "
            "to finish or choose another -o/--output"
        ) from None
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # nothing left behind; removed while still held
            os.unlink(lock.lock_file)
        lock.release()


def resolved(output: str) -> str:
    """One name for every spelling of the directory ``output``: symlinks and ``.`` resolved."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(output)
    if isinstance(fs, LocalFileSystem):
        return os.path.realpath(path)
    return fs.unstrip_protocol(posixpath.normpath(path))


def has_results(output: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    return fs.exists(path) and bool(fs.ls(path, detail=False))


def clear_output(output: str) -> None:
    """Remove what earlier daskdp runs wrote in ``output`` (``check_output`` refused the rest)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    if fs.exists(path):
        owned, _ = daskdp_entries(fs, path)
        for entry in owned:
            fs.rm(posixpath.join(path, entry), recursive=True)


def write_summary(summary: dict[str, Any], output: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    with fs.open(posixpath.join(path, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
