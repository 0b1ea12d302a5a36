"""``daskdp run``: checkpointed output, futures watched with timeouts, progress, the summary."""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import dask
import pandas as pd

from daskdp import checkpoint, config, io
from daskdp.cluster import GPU, connect, visible_gpus
from daskdp.errors import RunError, UserError
from daskdp.generation import PROGRESS_TOPIC, GenerationRequest, generate_and_write, record_meta
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
    model, engine_args = config.engine_arguments(settings, gpu_host=bool(visible_gpus()))
    check_model(model)
    prompts = io.read_prompts(source, settings["input"])
    output = output or io.default_output(source)
    io.check_output(output, resume, overwrite)
    limits = settings["run"]
    started = time.time()
    tensor_parallel_size = int(engine_args.get("tensor_parallel_size", 1))
    client, cluster = connect(settings["cluster"], tensor_parallel_size)
    try:
        if progress is not None and client.dashboard_link:
            print(f"Dask dashboard: {client.dashboard_link}", file=progress)
        logger.info("Dask dashboard: %s", client.dashboard_link)
        lengths, fingerprint = prompts.survey()  # a bad input fails before any engine loads
        planned = max(1, len(gpu_workers(client)))
        layout, earlier = prepare_output(
            output,
            source,
            lengths,
            fingerprint,
            checkpoint.result_settings(model, engine_args, settings),
            resume=resume,
            ranks=planned,
            chunk_size=limits["chunk-size"],
        )
        todo = [chunk for chunk in range(layout.chunks) if chunk not in earlier]
        request = GenerationRequest(
            sampling=settings["sampling"],
            prompt_column=settings["input"]["prompt-column"],
            messages_column=settings["input"]["messages-column"],
            id_column=settings["input"]["id-column"],
            run_id=uuid.uuid4().hex,
            chunk_rows=layout.chunk_rows,
            chunk_timeout=limits["chunk-timeout"],
            retries=int(limits["retries"]),
            progress_interval=limits["progress-interval"],
        )
        records = record_meta()
        if todo:
            plan = Plan(prompts, lengths, layout, todo)
            deadline = started + limits["timeout"] if limits["timeout"] else None
            records = generate(
                client,
                plan,
                EnginePlugin(model, engine_args),
                request,
                output,
                planned_ranks=planned,
                startup_timeout=settings["cluster"]["startup-timeout"],
                deadline=deadline,
                progress=progress,
            )
    finally:
        client.close()
        if cluster is not None:
            cluster.stop_ranks()  # every chunk written is complete; nothing in the workers is kept
            cluster.close()
    summary = summarize(records, earlier, output, layout, source, model, settings, started)
    io.write_summary(summary, output)
    check_finished(summary, limits["max-error-rate"])
    return summary


def prepare_output(
    output: str,
    source: str,
    lengths: list[int],
    fingerprint: str,
    settings: dict[str, Any],
    *,
    resume: bool,
    ranks: int,
    chunk_size: int,
) -> tuple[checkpoint.Layout, dict[int, dict[str, Any]]]:
    """The chunk layout, and the verified records of chunks an earlier run finished.

    A new run (or ``--overwrite``) clears the output and writes a fresh manifest; ``--resume``
    checks the manifest against this input and these settings first.
    """
    rows = sum(lengths)
    manifest = checkpoint.read_manifest(output) if resume else None
    if manifest is None:
        if resume and io.has_results(output):
            raise UserError(
                f"output directory {output} has no daskdp manifest to resume from; "
                "pass --overwrite to replace it, or choose another -o/--output"
            )
        io.clear_output(output)
        layout = checkpoint.layout(rows, ranks, int(chunk_size))
        checkpoint.write_manifest(checkpoint.new_manifest(source, fingerprint, layout, settings), output)
        return layout, {}
    differences = checkpoint.differences(manifest, fingerprint, rows, settings)
    if differences:
        raise UserError(
            f"cannot resume {output}: this run differs from it in "
            + "; ".join(differences)
            + "; run with the same input and settings, or pass --overwrite to start again"
        )
    layout = checkpoint.Layout(rows, manifest["chunk_rows"])
    return layout, checkpoint.verified_records(output, layout)


@dataclass
class Plan:
    """What is left to generate: the input, its chunks, and the chunks not yet done."""

    prompts: io.Prompts
    lengths: list[int]
    layout: checkpoint.Layout
    todo: list[int]

    @property
    def rows(self) -> int:
        return sum(self.layout.chunk_size(chunk) for chunk in self.todo)

    def partitions(self, ranks: int, id_column: str) -> dd.DataFrame:
        """The chunks left to do, in one partition per rank."""
        return io.balance(self.prompts.frame, self.lengths, self.layout, self.todo, ranks, id_column)


def generate(
    client: Client,
    plan: Plan,
    plugin: EnginePlugin,
    request: GenerationRequest,
    output: str,
    *,
    planned_ranks: int,
    startup_timeout: float,
    deadline: float | None,
    progress: TextIO | None,
) -> pd.DataFrame:
    """Load the engines while the input is read and split, then generate the plan's chunks.

    Returns the chunk records of every partition.
    """
    loader = ThreadPoolExecutor(1, thread_name_prefix="daskdp-load")
    try:
        loading = loader.submit(ensure_engines, client, plugin, startup_timeout)
        partitions = client.persist(plan.partitions(planned_ranks, request.id_column))
        try:
            ranks = loading.result(timeout=startup_timeout)
        except TimeoutError:
            raise RunError(
                f"the engines did not load within {startup_timeout:g} s; "
                "raise cluster.startup-timeout for a large model"
            ) from None
    finally:
        loader.shutdown(wait=False)
    if len(ranks) != planned_ranks:  # workers joined or left while the engines loaded
        partitions = plan.partitions(len(ranks), request.id_column)
    results = partitions.map_partitions(generate_and_write, request, output, meta=record_meta())
    monitor = Monitor(client, request.run_id, plan.rows, progress, startup_timeout)
    tensor_parallel_size = int(plugin.engine_args.get("tensor_parallel_size", 1))
    return monitor.wait(submit(client, results, ranks, tensor_parallel_size), deadline)


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
    """Waits for the partitions' futures, showing progress from the ranks.

    Stops the run at its deadline, when a partition keeps killing its workers, or when no
    worker with the ``GPU`` resource is left for ``worker_wait`` seconds.
    """

    def __init__(
        self,
        client: Client,
        run_id: str,
        total_rows: int,
        stream: TextIO | None,
        worker_wait: float,
    ):
        self.client = client
        self.run_id = run_id
        self.total_rows = total_rows
        self.stream = stream
        self.worker_wait = worker_wait
        self.lock = threading.Lock()
        self.partitions: dict[int, dict[str, Any]] = {}
        self.started = time.monotonic()
        self.last_line = self.started
        self.workers_seen = self.started
        self.waiting_for_workers = False
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
            self.partitions.setdefault(message["partition"], {}).update(message)

    def wait(self, futures: dict[Future, int], deadline: float | None) -> pd.DataFrame:
        """The chunk records of every partition; raises ``RunError`` when the run cannot finish."""
        from distributed import wait

        pending = set(futures)
        records = [record_meta()]
        try:
            while pending:
                try:
                    done, pending = wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                for future in done:
                    records.append(self.result(future, futures[future]))
                if pending:
                    self.check(pending, futures, deadline)
                self.show(final=not pending)
        except BaseException:
            self.client.cancel(list(pending))
            raise
        finally:
            self.client.unsubscribe_topic(PROGRESS_TOPIC)
            if self.bar is not None:
                self.bar.close()
        return pd.concat(records, ignore_index=True)

    def result(self, future: Future, partition: int) -> pd.DataFrame:
        from distributed.scheduler import KilledWorker

        if future.status != "error":
            return future.result()
        error = future.exception()
        if isinstance(error, KilledWorker):
            allowed = dask.config.get("distributed.scheduler.allowed-failures")
            raise RunError(
                f"partition {partition} was running on a worker that died {allowed + 1} times "
                "(out of memory, or killed); raise distributed.scheduler.allowed-failures "
                "if the workers were lost for another reason",
                resumable=True,
            )
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(f"partition {partition} failed: {reason}", resumable=True)

    def check(self, pending: set[Future], futures: dict[Future, int], deadline: float | None) -> None:
        now = time.monotonic()
        if gpu_workers(self.client):
            self.workers_seen = now
            self.waiting_for_workers = False
        elif not self.waiting_for_workers:
            self.waiting_for_workers = True
            if self.stream is not None:
                print(
                    f"no worker with the {GPU} resource; waiting up to {self.worker_wait:g} s",
                    file=self.stream,
                )
        if now - self.workers_seen > self.worker_wait:
            raise RunError(
                f"no worker with the {GPU} resource has been left for {self.worker_wait:g} s "
                "(cluster.startup-timeout)",
                resumable=True,
            )
        if deadline is not None and time.time() > deadline:
            with self.lock:
                running = {i: state["rank"] for i, state in self.partitions.items()}
            where = ", ".join(
                f"partition {i} on rank {running[i]}" if i in running else f"partition {i} (not started)"
                for i in sorted(futures[f] for f in pending)
            )
            raise RunError(
                f"the run passed its --timeout; unfinished: {where}",
                resumable=True,
            )

    def show(self, final: bool = False) -> None:
        with self.lock:
            done = sum(state.get("done", 0) for state in self.partitions.values())
            tokens = sum(state.get("output_tokens", 0) for state in self.partitions.values())
        done = min(done, self.total_rows)
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


def summarize(
    records: pd.DataFrame,
    earlier: dict[int, dict[str, Any]],
    output: str,
    layout: checkpoint.Layout,
    source: str,
    model: str,
    settings: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """The run's summary: totals over the output, and this run's chunks, ranks and speed."""
    wall = time.time() - started
    finished = checkpoint.read_records(output)
    generated = [record for chunk, record in finished.items() if chunk not in earlier]
    timed_out = records[records["status"] == checkpoint.TIMED_OUT]
    output_tokens = sum(record["output_tokens"] for record in generated)
    return {
        "input": source,
        "output": output,
        "model": model,
        "sampling": settings["sampling"],
        "engine": checkpoint.redacted(settings["engine"]),
        "started": started,
        "finished": time.time(),
        "wall_seconds": round(wall, 3),
        "rows": layout.rows,
        "rows_done": sum(record["rows"] for record in finished.values()),
        "rows_generated": sum(record["rows"] for record in generated),
        "rows_skipped": sum(record["rows"] for record in earlier.values()),
        "error_rows": sum(record["error_rows"] for record in finished.values()),
        "timed_out_rows": int(timed_out["timed_out_rows"].sum()),
        "timed_out_ids": [i for ids in timed_out["timed_out_ids"] for i in ids],
        "prompt_tokens": sum(record["prompt_tokens"] for record in generated),
        "output_tokens": output_tokens,
        "output_tokens_per_second": round(output_tokens / wall, 1) if wall else 0.0,
        "chunk_rows": layout.chunk_rows,
        "chunks": [
            {key: record[key] for key in CHUNK_SUMMARY_KEYS}
            for record in sorted(generated, key=lambda record: record["chunk"])
        ],
        "ranks": per_rank(generated),
    }


CHUNK_SUMMARY_KEYS = (
    "chunk",
    "rank",
    "worker",
    "rows",
    "error_rows",
    "output_tokens",
    "started",
    "finished",
)


def per_rank(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Rows and busy seconds by rank; chunks that overlap in time count once."""
    ranks: dict[int, dict[str, Any]] = {}
    for rank, chunks in itertools.groupby(
        sorted(records, key=lambda r: (r["rank"], r["started"])), key=lambda r: r["rank"]
    ):
        chunks = list(chunks)
        busy, end = 0.0, -math.inf
        for record in chunks:
            busy += max(0.0, record["finished"] - max(record["started"], end))
            end = max(end, record["finished"])
        ranks[int(rank)] = {"rows": sum(r["rows"] for r in chunks), "busy_seconds": round(busy, 3)}
    return ranks


def check_finished(summary: dict[str, Any], max_error_rate: float | None) -> None:
    """Fail a run that left timed-out rows, or more error rows than ``max_error_rate`` allows."""
    if summary["timed_out_rows"]:
        ids = summary["timed_out_ids"]
        shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        raise RunError(
            f"{summary['timed_out_rows']} rows timed out after --chunk-timeout and its retries "
            f"(ids {shown}); raise --chunk-timeout",
            resumable=True,
            summary=summary,
        )
    if max_error_rate is not None and summary["error_rows"] > max_error_rate * summary["rows"]:
        raise RunError(
            f"{summary['error_rows']:,} of {summary['rows']:,} rows are errors, more than "
            f"--max-error-rate {max_error_rate:g} allows; their reasons are in the error column",
            summary=summary,
        )


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table ``daskdp run`` prints."""
    lines = [
        f"rows            {summary['rows']:>12,}",
        f"  generated     {summary['rows_generated']:>12,}",
        f"  skipped       {summary['rows_skipped']:>12,}   (finished by an earlier run)",
        f"  timed out     {summary['timed_out_rows']:>12,}",
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
