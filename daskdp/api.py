"""The lazy Python API for notebooks and scripts."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from daskdp import config, io
from daskdp.checkpoint import MANIFEST_FILE
from daskdp.cluster import visible_gpus
from daskdp.errors import UserError
from daskdp.generation import GenerationRequest, generate_partition, result_meta
from daskdp.plugin import EnginePlugin, ensure_engines

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client
    from fsspec import AbstractFileSystem

CHUNK_FILES = "part-*.parquet"  # the names checkpoint.CHUNK_FILE gives


def generate(
    prompts: str | os.PathLike | pd.DataFrame | dd.DataFrame,
    model: str | None = None,
    *,
    client: Client | None = None,
    config_file: str | None = None,
    **sampling: Any,
) -> dd.DataFrame:
    """Generations for ``prompts`` as a lazy Dask DataFrame.

    The engines are loaded on the client's ``GPU`` workers now (and kept: a second call with
    the same model loads nothing); no prompt is generated until the result is computed.
    A path or pandas DataFrame is split into one partition per rank; a Dask DataFrame keeps
    its partitions. Compute with ``resources={"GPU": 1}`` on a cluster that also has workers
    without GPUs, and watch it with ``distributed.progress``.

    Parameters
    ----------
    prompts
        A path or URL (Parquet, JSON Lines, CSV), or a pandas or Dask DataFrame with a
        ``prompt`` or ``messages`` column.
    model
        Model directory or Hugging Face name; default from configuration.
    client
        The Dask client; default: the current one.
    **sampling
        Sampling settings: ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``,
        ``stop``, ``ignore_eos``.

    Examples
    --------
    >>> from distributed import Client
    >>> client = Client(daskdp.RankedLocalCluster(ranks=2))  # doctest: +SKIP
    >>> results = daskdp.generate("prompts.parquet", max_tokens=64)  # doctest: +SKIP
    >>> results.head()  # doctest: +SKIP
    """
    import dask.dataframe as dd
    import pandas as pd
    from distributed import get_client

    unknown = set(sampling) - {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos"}
    if unknown:
        raise TypeError(f"generate() got unknown sampling settings: {', '.join(sorted(unknown))}")
    overrides = {"model": model, **{f"sampling.{k.replace('_', '-')}": v for k, v in sampling.items()}}
    settings = config.load(config_file, overrides)
    input_settings = settings["input"]
    if client is None:
        try:
            client = get_client()
        except ValueError:
            raise UserError(
                "no Dask client; create one first, for example "
                "client = distributed.Client(daskdp.RankedLocalCluster(ranks=1))"
            ) from None

    model_path, engine_args = config.engine_arguments(settings, gpu_host=bool(visible_gpus()))
    from daskdp import gang

    if gang.resolve(settings["parallel"], model_path, engine_args) is not None:
        raise UserError(
            f"{model_path} runs in gang mode (parallel.mode, README: Gang mode), which a lazy "
            "DataFrame cannot give (one partition per rank, all ranks at once): use daskdp.run, "
            "or set parallel.mode to independent for one engine per rank"
        )
    ranks = ensure_engines(
        client, EnginePlugin(model_path, engine_args), settings["cluster"]["startup-timeout"]
    )

    if isinstance(prompts, (str, os.PathLike)):
        frame = io.read_prompts(os.fspath(prompts), input_settings).frame
    elif isinstance(prompts, pd.DataFrame):
        io.check_columns(prompts, "the DataFrame", input_settings)
        frame = dd.from_pandas(prompts, npartitions=1, sort=False)
    else:
        io.check_columns(prompts._meta, "the DataFrame", input_settings)
        frame = prompts
    id_column = input_settings["id-column"]
    if id_column not in frame.columns:
        positions = frame.assign(**{id_column: 1})[id_column].cumsum() - 1
        frame = frame.assign(**{id_column: positions})
    if not isinstance(prompts, dd.DataFrame):  # a Dask DataFrame keeps the partitions it was given
        frame = frame.repartition(npartitions=len(ranks))
    request = GenerationRequest(
        sampling=settings["sampling"],
        prompt_column=input_settings["prompt-column"],
        messages_column=input_settings["messages-column"],
        id_column=id_column,
        chunk_rows=int(settings["run"]["chunk-size"]),
        chunk_timeout=settings["run"]["chunk-timeout"],
        progress_interval=settings["run"]["progress-interval"],
    )
    return frame.map_partitions(generate_partition, request, meta=result_meta(frame._meta))


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
    return _read_json(path, io.SUMMARY_FILE)


def _read_json(path: str | os.PathLike, name: str) -> dict[str, Any]:
    import json

    import fsspec

    with fsspec.open(f"{os.fspath(path).rstrip('/')}/{name}") as f:
        return json.load(f)
