"""Input formats, told from a source's name: no I/O and nothing heavy imported, so that the
output's default name can be found even while a run stops."""

from __future__ import annotations

import posixpath

from daskdp.errors import UserError

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
