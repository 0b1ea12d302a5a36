"""The lazy Python API for notebooks and scripts: `generate`, and the readers of a run's output."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from daskdp import config
from daskdp.clusters.ranks import visible_gpus
from daskdp.engine.lora import checked_adapters
from daskdp.engine.requests import check_sampling
from daskdp.engine.structured import run_wide_constraint
from daskdp.errors import UserError
from daskdp.output.read import read_manifest, read_results, read_summary

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client

__all__ = ["classify", "embed", "generate", "read_manifest", "read_results", "read_summary", "score"]

SAMPLING_ARGUMENTS = {
    *("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos"),
    *("n", "logprobs", "prompt_logprobs"),
}


def generate(
    prompts: str | os.PathLike | pd.DataFrame | dd.DataFrame,
    model: str | None = None,
    *,
    client: Client | None = None,
    config_file: str | None = None,
    json_schema: dict | str | None = None,
    regex: str | None = None,
    choice: list[str] | None = None,
    grammar: str | None = None,
    lora: dict[str, str] | None = None,
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
    json_schema, regex, choice, grammar
        Structured output for every row (at most one): a JSON Schema (a mapping or its JSON
        text), a regular expression, a list of strings, or a grammar. A row's own
        ``json_schema``, ``regex``, ``choice`` or ``grammar`` column replaces it.
    lora
        LoRA adapters by name, ``{name: directory or URL}``, which rows name in their ``lora``
        column (null: the base model); replaces ``lora.adapters`` of the configuration.
    **sampling
        Sampling settings: ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``,
        ``stop``, ``ignore_eos``; ``n`` (samples per prompt, one row each, with ``sample``
        0..n-1), ``logprobs`` and ``prompt_logprobs`` (K alternatives per token). Columns of the
        prompts override them per row (docs/row-control.md).

    Examples
    --------
    >>> from distributed import Client
    >>> client = Client(daskdp.RankedLocalCluster(ranks=2))  # doctest: +SKIP
    >>> results = daskdp.generate("prompts.parquet", max_tokens=64)  # doctest: +SKIP
    >>> results.head()  # doctest: +SKIP
    >>> samples = daskdp.generate(frame, n=4, temperature=0.8, seed=0, logprobs=5)  # doctest: +SKIP
    """
    unknown = set(sampling) - SAMPLING_ARGUMENTS
    if unknown:
        raise TypeError(f"generate() got unknown sampling settings: {', '.join(sorted(unknown))}")
    structured = {"json_schema": json_schema, "regex": regex, "choice": choice, "grammar": grammar}
    overrides = {
        "model": model,
        **{f"sampling.{k.replace('_', '-')}": v for k, v in {**sampling, **structured}.items()},
        "lora.adapters": lora,
    }
    settings = config.load(config_file, overrides)
    check_sampling(settings["sampling"])
    settings["sampling"] = run_wide_constraint(settings["sampling"])
    settings["lora"] = checked_adapters(settings["lora"])
    return _lazy_results(prompts, settings, client, overrides)


def embed(
    texts: str | os.PathLike | pd.DataFrame | dd.DataFrame,
    model: str | None = None,
    *,
    client: Client | None = None,
    config_file: str | None = None,
    normalize: bool | None = None,
    dimensions: int | None = None,
    truncate_prompt_tokens: int | None = None,
) -> dd.DataFrame:
    """One embedding per row of ``texts`` (its ``prompt`` column), as a lazy Dask DataFrame.

    As :func:`generate`, with an ``embedding`` column (fixed-size list of float32, the engines'
    one dimension) in place of the generation columns. ``normalize``: L2-normalise (default:
    the model's, on); ``dimensions``: Matryoshka dimensions; ``truncate_prompt_tokens``: keep
    the first N tokens of longer texts (else they are error rows).

    Examples
    --------
    >>> vectors = daskdp.embed("corpus.parquet", "BAAI/bge-small-en-v1.5")  # doctest: +SKIP
    """
    options = {"dimensions": dimensions}
    return _pooled(texts, "embed", model, client, config_file, normalize, truncate_prompt_tokens, options)


def classify(
    texts: str | os.PathLike | pd.DataFrame | dd.DataFrame,
    model: str | None = None,
    *,
    client: Client | None = None,
    config_file: str | None = None,
    normalize: bool | None = None,
    truncate_prompt_tokens: int | None = None,
) -> dd.DataFrame:
    """Class probabilities (``probs``) and the argmax's name (``label``, from the model's
    ``id2label``) per row of ``texts``, as a lazy Dask DataFrame; see :func:`embed`.
    ``normalize=False`` gives the raw logits instead of the softmax."""
    return _pooled(texts, "classify", model, client, config_file, normalize, truncate_prompt_tokens)


def score(
    pairs: str | os.PathLike | pd.DataFrame | dd.DataFrame,
    model: str | None = None,
    *,
    client: Client | None = None,
    config_file: str | None = None,
    truncate_prompt_tokens: int | None = None,
) -> dd.DataFrame:
    """A ``score`` per row of ``pairs`` (columns ``text_1`` and ``text_2``, or
    ``input.text-1-column``/``text-2-column``), as a lazy Dask DataFrame: a cross-encoder's
    score, or the cosine of an embedding model's two embeddings, as ``vllm.LLM.score``."""
    return _pooled(pairs, "score", model, client, config_file, None, truncate_prompt_tokens)


def _pooled(
    texts, task, model, client, config_file, normalize, truncate_prompt_tokens, options=None
) -> dd.DataFrame:
    overrides = {
        "model": model,
        "run.task": task,
        "pooling.normalize": normalize,
        "pooling.truncate-prompt-tokens": truncate_prompt_tokens,
        **{f"pooling.{key}": value for key, value in (options or {}).items()},
    }
    return _lazy_results(texts, config.load(config_file, overrides), client, overrides)


def _lazy_results(
    prompts, settings: dict[str, Any], client: Client | None, overrides: dict[str, Any]
) -> dd.DataFrame:
    """The lazy results of the run ``settings`` describe, over ``prompts`` (``overrides``: the
    caller's own settings, which an OpenAI Batch file's bodies must not contradict)."""
    import dask
    import dask.dataframe as dd
    import pandas as pd
    from distributed import get_client

    from daskdp.inputs import openai

    settings["run"]["task"] = openai.batch_task(prompts, settings, overrides)
    task = config.task(settings)
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
        client,
        EnginePlugin(model_path, engine_args, task=task, pooling=config.pooling_options(settings)),
        settings["cluster"]["startup-timeout"],
    )
    dimension = None
    if task == "embed":  # the engines' one embedding dimension, for the frame's meta
        dimension = (
            settings["pooling"]["dimensions"] or client.run(embedding_size, workers=ranks[:1])[ranks[0]]
        )

    if isinstance(prompts, (str, os.PathLike)):
        names = openai.model_names(
            settings["model"] or model_path, model_path, settings["served-model-name"] or []
        )
        read = read_prompts(os.fspath(prompts), input_settings, task, names)
        if read.format == openai.FORMAT:
            settings = openai.run_settings(settings, read.input_config, overrides)
            input_settings = settings["input"]
        frame = read.frame
    elif isinstance(prompts, pd.DataFrame):
        check_columns(prompts, "the DataFrame", input_settings, task)
        # Dask's string conversion would turn chat messages, JSON Schemas and choices (lists
        # and dicts) into their repr.
        with dask.config.set({"dataframe.convert-string": False}):
            frame = dd.from_pandas(prompts, npartitions=1, sort=False)
    else:
        check_columns(prompts._meta, "the DataFrame", input_settings, task)
        frame = prompts
    id_column = input_settings["id-column"]
    positions = frame.assign(position=1)["position"].cumsum() - 1
    frame = frame.assign(position=positions.astype("int64"))
    if id_column not in frame.columns:
        frame = frame.assign(**{id_column: frame["position"]})
    if not isinstance(prompts, dd.DataFrame):  # a Dask DataFrame keeps the partitions it was given
        frame = frame.repartition(npartitions=len(ranks))
    request = GenerationRequest.from_settings(settings, dimension=dimension)
    # The rows' reasons found while reading (an OpenAI Batch file's) become their `error`.
    meta = result_meta(frame._meta.drop(columns=openai.REQUEST_ERROR, errors="ignore"), task, dimension)
    return frame.map_partitions(generate_partition, request, meta=meta)


def embedding_size(dask_worker) -> int:
    """Run on a worker (``client.run``): the embedding dimension of the engine it holds."""
    from daskdp.engine.plugin import PLUGIN_NAME

    return dask_worker.plugins[PLUGIN_NAME].engine.llm.model_config.embedding_size
