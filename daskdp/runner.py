"""``daskdp run``: the run from input to summary, each step handed to its own module.

config -> inputs (read, survey) -> output directory (lock, checks, manifest) -> plan -> clusters
-> strategies (engines, the chunk loop on the workers, the monitor) -> output summary.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, TextIO

from daskdp import config
from daskdp.clusters import connect
from daskdp.clusters.ranks import cluster_gpu_workers, visible_gpus
from daskdp.engine.lora import checked_adapters
from daskdp.engine.plugin import EnginePlugin
from daskdp.engine.requests import GenerationRequest, check_sampling
from daskdp.engine.structured import run_wide_constraint
from daskdp.errors import RunError, UserError
from daskdp.inputs import openai
from daskdp.inputs.read import read_prompts
from daskdp.logs import silenced
from daskdp.output import manifest as manifests
from daskdp.output.chunks import verified_records
from daskdp.output.directory import (
    check_output,
    clear_output,
    default_output,
    has_results,
    output_error,
    output_lock,
)
from daskdp.output.schema import record_meta
from daskdp.output.summary import check_finished, summarize, write_summary
from daskdp.plan import Layout, Plan, chunk_layout
from daskdp.strategies import Generation
from daskdp.strategies.independent import Independent

if TYPE_CHECKING:
    from distributed import Client, SpecCluster

    from daskdp.inputs.survey import Survey
    from daskdp.strategies import Strategy

logger = logging.getLogger(__name__)


def run(
    source: str,
    output: str | None = None,
    *,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Generate for every row of ``source`` and write the results as Parquet chunks.

    Parameters
    ----------
    source
        Prompts: Parquet (file, directory or glob), JSON Lines or CSV; any fsspec URL.
    output
        The results directory; default ``<input stem>.out`` beside the input.
    config_file
        A YAML file with a ``daskdp:`` section (see ``conf/default.yaml``).
    overrides
        Dotted configuration keys, as the command line's flags give them.
    resume
        Continue the run whose manifest is in ``output``: its finished chunks are kept.
    overwrite
        Replace the results of an earlier run in ``output``.
    progress
        Where progress and the dashboard's address are shown (the CLI gives ``sys.stderr``);
        default: nowhere, the dashboard's address goes to the ``daskdp`` logger.

    Returns
    -------
    The run's summary, also written to ``_summary.json`` in ``output``.

    Raises
    ------
    UserError
        Bad input or settings, before anything is written.
    RunError
        The run could not finish (its ``resumable`` says whether ``resume=True`` continues it),
        or it finished with timed-out rows or more errors than ``run.max-error-rate``.

    Examples
    --------
    >>> daskdp.run("prompts.parquet", overrides={"sampling.max-tokens": 64})  # doctest: +SKIP
    """
    settings = config.load(config_file, overrides)
    check_sampling(settings["sampling"])
    settings["run"]["task"] = openai.batch_task(source, settings, overrides)
    task = config.task(settings)
    model, engine_args = config.engine_arguments(settings, gpu_host=bool(visible_gpus()))
    check_model(model)
    settings["sampling"] = run_wide_constraint(settings["sampling"])
    settings["lora"] = checked_adapters(settings["lora"])
    from daskdp.strategies import gang  # gang mode (MoE with expert parallelism)

    gang_mode = gang.resolve(settings["parallel"], model, engine_args)
    if gang_mode is not None and task != "generate":
        raise UserError(f"--task {task} runs with one engine per rank; set parallel.mode to independent")
    names = openai.model_names(settings["model"] or model, model, settings["served-model-name"] or [])
    prompts = read_prompts(source, settings["input"], task, names)
    # A row's estimated output, for balance: the run's max-tokens (an OpenAI Batch file's bodies
    # may leave it to the model's context, below), none when pooling.
    cost_tokens = int(settings["sampling"]["max-tokens"]) if task == "generate" else 0
    if prompts.format == openai.FORMAT:
        settings = openai.run_settings(settings, prompts.input_config, overrides or {})
    output = output or default_output(source)
    with output_lock(output):
        check_output(output, resume, overwrite)
        result_settings = manifests.result_settings(model, engine_args, settings)
        manifest = resumable_manifest(output, result_settings) if resume else None
        limits = settings["run"]
        started = time.time()
        tensor_parallel_size = int(engine_args.get("tensor_parallel_size", 1))
        client, cluster = connect(settings["cluster"], tensor_parallel_size)
        try:
            if progress is not None and client.dashboard_link:
                print(f"Dask dashboard: {client.dashboard_link}", file=progress)
            logger.info("Dask dashboard: %s", client.dashboard_link)
            # A bad input fails here, before any engine loads.
            survey = prompts.survey(cost_tokens, settings["sampling"]["n"] or 1)
            planned = max(1, len(cluster_gpu_workers(client)))
            layout, earlier = prepare_output(
                output,
                source,
                survey,
                result_settings,
                manifest,
                ranks=planned,
                chunk_size=limits["chunk-size"],
                prefix_locality=limits["prefix-locality"],
            )
            todo = [chunk for chunk in range(layout.chunks) if chunk not in earlier]
            request = GenerationRequest.from_settings(
                settings, run_id=uuid.uuid4().hex, chunk_rows=layout.chunk_rows
            )
            records = record_meta()
            if todo:
                plan = Plan(prompts, survey, layout, todo, limits["partitioning"])
                strategy: Strategy = gang_mode or Independent(planned_ranks=planned)
                records = strategy.run(
                    Generation(
                        client,
                        plan,
                        EnginePlugin(model, engine_args, task=task, pooling=config.pooling_options(settings)),
                        request,
                        output,
                        startup_timeout=settings["cluster"]["startup-timeout"],
                        deadline=started + limits["timeout"] if limits["timeout"] else None,
                        progress=progress,
                    )
                )
        except BaseException:
            # Stopped midway (Ctrl-C, SIGTERM, a failure): as its workers go, the scheduler still
            # reports their tasks to the closing client and logs each refused message with a
            # traceback, as asyncio does for its broadcasts. The user is told what stopped the run.
            with silenced("distributed", "tornado", "asyncio"):
                shut_down(client, cluster)
            raise
        shut_down(client, cluster)
        summary = summarize(records, earlier, output, layout, source, model, settings, started)
        try:
            write_summary(summary, output)
        except OSError as e:
            raise RunError(output_error(e, output), resumable=True) from None
        check_finished(summary, limits["max-error-rate"])
        return summary


def shut_down(client: Client, cluster: SpecCluster | None) -> None:
    """Close the run's client, and the cluster when the run started it."""
    client.close()
    if cluster is not None:
        cluster.stop_ranks()  # every chunk written is complete; nothing in the workers is kept
        cluster.close()


def resumable_manifest(output: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the run that ``--resume`` continues, ``None`` when ``output`` is empty.

    Refused before a cluster starts: results without a manifest, or a run whose settings
    differ from this one's (a changed input is found by the survey, `prepare_output`).
    """
    manifest = manifests.read_manifest(output)
    if manifest is None:
        if has_results(output):
            raise UserError(
                f"output directory {output} has no daskdp manifest to resume from; "
                "pass --overwrite to replace it, or choose another -o/--output"
            )
        return None
    then, now = (given.get("task", "generate") for given in (manifest.get("settings", {}), settings))
    if then != now:  # the one difference that matters: every other setting differs with it
        refuse_differences(output, [f"its task (--task {then} then, --task {now} now)"])
    refuse_differences(output, manifests.differences(manifest, settings))
    return manifest


def prepare_output(
    output: str,
    source: str,
    survey: Survey,
    settings: dict[str, Any],
    manifest: dict[str, Any] | None,
    *,
    ranks: int,
    chunk_size: int,
    prefix_locality: bool,
) -> tuple[Layout, dict[int, dict[str, Any]]]:
    """The chunk layout, and the verified records of chunks an earlier run finished.

    Without the ``manifest`` of a run to resume, the output is cleared and a fresh manifest
    written; with it, this input must be the one that run read, and its layout is kept.
    """
    if manifest is None:
        clear_output(output)
        by_prefix = prefix_locality and survey.shares_prefixes()
        _, costs = survey.arrangement(by_prefix)
        layout = chunk_layout(costs, ranks, int(chunk_size), by_prefix)
        manifest = manifests.new_manifest(source, survey.fingerprint, layout, settings)
        try:
            manifests.write_manifest(manifest, output)
        except OSError as e:
            clear_output(output)  # without a manifest, only what this run made
            raise RunError(output_error(e, output)) from None
        return layout, {}
    refuse_differences(output, manifests.input_differs(manifest, survey.fingerprint, survey.rows))
    layout = Layout(survey.rows, manifest["chunk_rows"], manifest.get("row_order") == "prefix")
    return layout, verified_records(output, layout)


def refuse_differences(output: str, differences: list[str]) -> None:
    """Refuse to resume ``output`` from a run that differs from this one."""
    if differences:
        raise UserError(
            f"cannot resume {output}: this run differs from it in "
            + "; ".join(differences)
            + "; run with the same input and settings, or pass --overwrite to start again"
        )


def check_model(model: str) -> None:
    """A model given as a local path must exist; hub names are checked by the engine."""
    if model.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(model)):
        raise UserError(f"model directory {model} does not exist; check --model")
