"""``daskdp run``: futures with timeouts, progress from the ranks, and the summary."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TextIO

import pandas as pd

from daskdp import config, io
from daskdp.cluster import GPU, connect, visible_gpus
from daskdp.errors import PartitionTimeout, RunError, UserError
from daskdp.generation import PROGRESS_TOPIC, GenerationRequest, generate_and_write, summary_meta
from daskdp.plugin import EnginePlugin, ensure_engines

if TYPE_CHECKING:
    import dask.dataframe as dd
    from distributed import Client, Future

logger = logging.getLogger(__name__)


def run(
    source: str,
    output: str | None = None,
    *,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Generate for every row of ``source`` and write the results as Parquet shards.

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
    overwrite
        Replace the results of an earlier run in ``output``.
    progress
        Where progress and the dashboard's address are shown (the CLI gives ``sys.stderr``);
        default: nowhere, the dashboard's address goes to the ``daskdp`` logger.

    Returns
    -------
    The run's summary, also written to ``_summary.json`` in ``output``.

    Examples
    --------
    >>> daskdp.run("prompts.parquet", overrides={"sampling.max-tokens": 64})  # doctest: +SKIP
    """
    settings = config.load(config_file, overrides)
    model, engine_args = config.engine_arguments(settings, gpu_host=bool(visible_gpus()))
    check_model(model)
    prompts = io.read_prompts(source, settings["input"])
    output = output or io.default_output(source)
    io.check_output(output, overwrite)
    request = GenerationRequest(
        sampling=settings["sampling"],
        prompt_column=settings["input"]["prompt-column"],
        messages_column=settings["input"]["messages-column"],
        run_id=uuid.uuid4().hex,
        partition_timeout=settings["run"]["partition-timeout"],
        progress_interval=settings["run"]["progress-interval"],
    )
    started = time.time()
    tensor_parallel_size = int(engine_args.get("tensor_parallel_size", 1))
    client, cluster = connect(settings["cluster"], tensor_parallel_size)
    try:
        if progress is not None and client.dashboard_link:
            print(f"Dask dashboard: {client.dashboard_link}", file=progress)
        logger.info("Dask dashboard: %s", client.dashboard_link)
        lengths = prompts.row_counts()  # an unreadable or empty input fails before any engine loads
        io.clear_output(output)
        # The engines load on the workers while they read the input and split it over the ranks.
        id_column = settings["input"]["id-column"]
        loader = ThreadPoolExecutor(1, thread_name_prefix="daskdp-load")
        try:
            plugin = EnginePlugin(model, engine_args)
            startup_timeout = settings["cluster"]["startup-timeout"]
            loading = loader.submit(ensure_engines, client, plugin, startup_timeout)
            planned = max(1, len(gpu_workers(client)))
            balanced = client.persist(io.balance(prompts.frame, lengths, planned, id_column))
            try:
                ranks = loading.result(timeout=startup_timeout)
            except TimeoutError:
                raise RunError(
                    f"the engines did not load within {startup_timeout:g} s; "
                    "raise cluster.startup-timeout for a large model"
                ) from None
        finally:
            loader.shutdown(wait=False)
        if len(ranks) != planned:  # workers joined or left while the engines loaded
            balanced = io.balance(prompts.frame, lengths, len(ranks), id_column)
        results = balanced.map_partitions(generate_and_write, request, output, meta=summary_meta())
        monitor = Monitor(client, request.run_id, sum(lengths), progress, started)
        partitions = monitor.wait(
            submit(client, results, ranks, tensor_parallel_size),
            partition_timeout=request.partition_timeout,
            deadline=started + settings["run"]["timeout"] if settings["run"]["timeout"] else None,
        )
    finally:
        client.close()
        if cluster is not None:
            cluster.stop_ranks()  # every shard written is complete; nothing in the workers is kept
            cluster.close()
    summary = summarize(partitions, source, output, model, settings, started)
    io.write_summary(summary, output)
    return summary


def gpu_workers(client: Client) -> list[str]:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return [address for address, info in workers.items() if info.get("resources", {}).get(GPU)]


def check_model(model: str) -> None:
    """A model given as a local path must exist; hub names are checked by the engine."""
    if model.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(model)):
        raise UserError(f"model directory {model} does not exist; check --model")


def submit(client: Client, results: dd.DataFrame, ranks: list[str], tensor_parallel_size: int) -> dict:
    """One future per partition, partition ``i`` preferring rank ``i``'s worker."""
    futures = {}
    for i, part in enumerate(results.to_delayed()):
        future = client.compute(
            part,
            resources={GPU: tensor_parallel_size},
            workers=[ranks[i % len(ranks)]],
            allow_other_workers=True,
        )
        futures[future] = i
    return futures


class Monitor:
    """Waits for the partitions' futures with timeouts, showing progress from the ranks."""

    def __init__(
        self, client: Client, run_id: str, total_rows: int, stream: TextIO | None, run_started: float
    ):
        self.client = client
        self.run_id = run_id
        self.run_started = run_started
        self.total_rows = total_rows
        self.stream = stream
        self.lock = threading.Lock()
        self.partitions: dict[int, dict[str, Any]] = {}
        self.started = time.monotonic()
        self.last_line = self.started
        self.bar = None
        if stream is not None and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_rows, unit="rows", file=stream, dynamic_ncols=True)
        client.subscribe_topic(PROGRESS_TOPIC, self.on_event)

    def on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        _, message = event
        if message.get("run") != self.run_id:
            return
        with self.lock:
            state = self.partitions.setdefault(message["partition"], {"since": time.monotonic()})
            state.update(message)

    def wait(self, futures: dict[Future, int], partition_timeout: float | None, deadline: float | None):
        from distributed import wait

        pending = set(futures)
        summaries = []
        try:
            while pending:
                try:
                    done, pending = wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                for future in done:
                    summaries.append(self.result(future, futures[future], partition_timeout))
                self.check_time(pending, futures, partition_timeout, deadline)
                self.show(final=not pending)
        except BaseException:
            self.client.cancel(list(pending))
            raise
        finally:
            self.client.unsubscribe_topic(PROGRESS_TOPIC)
            if self.bar is not None:
                self.bar.close()
        return pd.concat(summaries, ignore_index=True).sort_values("partition")

    def result(self, future: Future, partition: int, partition_timeout: float | None) -> pd.DataFrame:
        if future.status == "error":
            error = future.exception()
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RunError(f"partition {partition} failed: {reason}")
        summary = future.result()
        (timed_out,) = summary["timed_out_rows"]
        if timed_out:
            raise RunError(
                str(PartitionTimeout(summary["rank"].iloc[0], partition, partition_timeout, timed_out))
            )
        return summary

    def check_time(self, pending, futures, partition_timeout, deadline) -> None:
        now = time.monotonic()
        with self.lock:
            running = {i: dict(state) for i, state in self.partitions.items()}
        unfinished = sorted(futures[f] for f in pending)
        if partition_timeout is not None:
            grace = max(10.0, partition_timeout * 0.1)  # the rank aborts its own requests first
            for i in unfinished:
                state = running.get(i)
                if state and now - state["since"] > partition_timeout + grace:
                    raise RunError(
                        f"partition {i} on rank {state['rank']} did not finish: "
                        f"waited {now - state['since']:.0f} s, --partition-timeout is {partition_timeout:g} s"
                    )
        if deadline is not None and time.time() > deadline and unfinished:
            where = ", ".join(
                f"partition {i} on rank {running[i]['rank']}"
                if i in running
                else f"partition {i} (not started)"
                for i in unfinished
            )
            raise RunError(
                f"the run passed its --timeout after {time.time() - self.run_started:.0f} s; unfinished: {where}"
            )

    def show(self, final: bool = False) -> None:
        with self.lock:
            done = sum(state.get("done", 0) for state in self.partitions.values())
            tokens = sum(state.get("output_tokens", 0) for state in self.partitions.values())
        if final:
            done = self.total_rows  # the last events may still be on their way
        elapsed = max(time.monotonic() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(f"{tokens / elapsed:,.0f} out tok/s", refresh=True)
        elif self.stream is not None and (final or time.monotonic() - self.last_line >= 10):
            self.last_line = time.monotonic()
            print(
                f"{done:,}/{self.total_rows:,} rows, {tokens / elapsed:,.0f} output tokens/s",
                file=self.stream,
                flush=True,
            )


def summarize(partitions: pd.DataFrame, source, output, model, settings, started: float) -> dict[str, Any]:
    wall = time.time() - started
    busy = partitions.assign(busy=partitions["finished"] - partitions["started"])
    per_rank = busy.groupby("rank").agg(rows=("rows", "sum"), busy_seconds=("busy", "sum"))
    output_tokens = int(partitions["output_tokens"].sum())
    return {
        "input": source,
        "output": output,
        "model": model,
        "sampling": settings["sampling"],
        "engine": settings["engine"],
        "started": started,
        "finished": time.time(),
        "wall_seconds": round(wall, 3),
        "rows": int(partitions["rows"].sum()),
        "error_rows": int(partitions["error_rows"].sum()),
        "prompt_tokens": int(partitions["prompt_tokens"].sum()),
        "output_tokens": output_tokens,
        "output_tokens_per_second": round(output_tokens / wall, 1) if wall else 0.0,
        "partitions": [
            {key: row[key] for key in ("partition", "rank", "worker", "rows", "error_rows", "output_tokens")}
            | {"started": float(row["started"]), "finished": float(row["finished"])}
            for row in partitions.to_dict("records")
        ],
        "ranks": {
            int(rank): {"rows": int(row["rows"]), "busy_seconds": round(float(row["busy_seconds"]), 3)}
            for rank, row in per_rank.iterrows()
        },
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table ``daskdp run`` prints."""
    lines = [
        f"rows            {summary['rows']:>12,}",
        f"error rows      {summary['error_rows']:>12,}",
        f"prompt tokens   {summary['prompt_tokens']:>12,}",
        f"output tokens   {summary['output_tokens']:>12,}",
        f"wall time       {summary['wall_seconds']:>11.1f}s",
        f"output tok/s    {summary['output_tokens_per_second']:>12,.1f}",
        "rank        rows      busy",
    ]
    for rank, stats in summary["ranks"].items():
        lines.append(f"{rank:>4} {stats['rows']:>11,} {stats['busy_seconds']:>8.1f}s")
    lines.append(f"results in {summary['output']}")
    return "\n".join(lines)
