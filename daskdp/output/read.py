"""Read a run's output back: its results, manifest and summary."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from daskdp.output.schema import CHUNK_FILES, MANIFEST_FILE, SUMMARY_FILE

if TYPE_CHECKING:
    import dask.dataframe as dd
    from fsspec import AbstractFileSystem


def read_results(path: str | os.PathLike) -> dd.DataFrame:
    """The results of ``daskdp run`` in ``path``, as a Dask DataFrame, one partition per chunk.

    Only the chunk files (``part-*.parquet``, in chunk order) are read: not the records in
    ``_chunks/``, nor the hidden files of writes in progress, so the finished chunks of a run
    that is still going (or stopped) can be read too.

    The run's metadata is not attached to the frame: a Dask DataFrame has no ``attrs``, and
    setting them on its ``_meta`` would be shared by every frame read from the same files and
    lost on ``compute``. Read it beside the results with :func:`read_manifest` (input and
    settings) and :func:`read_summary` (timings and totals).

    Raises
    ------
    FileNotFoundError
        ``path`` holds no chunk file.

    Examples
    --------
    >>> results = daskdp.read_results("prompts.out")  # doctest: +SKIP
    >>> results[results.error.notnull()].compute()  # doctest: +SKIP
    >>> daskdp.read_manifest("prompts.out")["settings"]["sampling"]  # doctest: +SKIP
    """
    import dask.dataframe as dd

    fs, files = chunk_files(path)
    if not files:
        raise FileNotFoundError(f"no results in {os.fspath(path)}: it holds no {CHUNK_FILES} file")
    return dd.read_parquet(files, filesystem=fs)


def chunk_files(path: str | os.PathLike) -> tuple[AbstractFileSystem, list[str]]:
    """The filesystem of ``path`` and its finished chunk files, in chunk order."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(os.fspath(path))
    return fs, sorted(fs.glob(f"{root.rstrip('/')}/{CHUNK_FILES}"))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The run's manifest (``_manifest.json``): input, chunk layout and the settings behind the results.

    Examples
    --------
    >>> manifest = daskdp.read_manifest("prompts.out")  # doctest: +SKIP
    >>> manifest["rows"], manifest["chunk_rows"], manifest["settings"]["model"]  # doctest: +SKIP
    """
    return _read_json(path, MANIFEST_FILE)


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The run's summary (``_summary.json``): configuration, timings, totals, chunks and ranks."""
    return _read_json(path, SUMMARY_FILE)


def _read_json(path: str | os.PathLike, name: str) -> dict[str, Any]:
    import json

    import fsspec

    with fsspec.open(f"{os.fspath(path).rstrip('/')}/{name}") as f:
        return json.load(f)
