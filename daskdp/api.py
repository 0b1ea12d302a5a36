"""The lazy Python API for notebooks and scripts: `generate`, and the readers of a run's output."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from daskdp import config
from daskdp.clusters.ranks import visible_gpus
from daskdp.errors import UserError
from daskdp.output.read import read_manifest, read_results, read_summary

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client

__all__ = ["generate", "read_manifest", "read_results", "read_summary"]


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
    from daskdp.engine.loop import generate_partition
    from daskdp.engine.plugin import EnginePlugin
    from daskdp.engine.requests import GenerationRequest
    from daskdp.inputs import openai
    from daskdp.inputs.read import check_columns, read_prompts
    from daskdp.output.schema import result_meta
    from daskdp.strategies import gang
    from daskdp.strategies.engines import ensure_engines

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
        names = openai.model_names(
            settings["model"] or model_path, model_path, settings["served-model-name"] or []
        )
        read = read_prompts(os.fspath(prompts), input_settings, names)
        if read.format == openai.FORMAT:
            settings = openai.run_settings(settings, read.input_config, overrides)
            input_settings = settings["input"]
        frame = read.frame
    elif isinstance(prompts, pd.DataFrame):
        check_columns(prompts, "the DataFrame", input_settings)
        frame = dd.from_pandas(prompts, npartitions=1, sort=False)
    else:
        check_columns(prompts._meta, "the DataFrame", input_settings)
        frame = prompts
    id_column = input_settings["id-column"]
    positions = frame.assign(position=1)["position"].cumsum() - 1
    frame = frame.assign(position=positions.astype("int64"))
    if id_column not in frame.columns:
        frame = frame.assign(**{id_column: frame["position"]})
    if not isinstance(prompts, dd.DataFrame):  # a Dask DataFrame keeps the partitions it was given
        frame = frame.repartition(npartitions=len(ranks))
    request = GenerationRequest.from_settings(settings)
    return frame.map_partitions(generate_partition, request, meta=result_meta(frame._meta))
