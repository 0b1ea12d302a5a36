"""``daskdp run``: checkpointed output, futures watched with timeouts, progress, the summary."""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import dask
import numpy as np
import pandas as pd

from daskdp import checkpoint, config, io
from daskdp.cluster import GPU, connect, silenced, visible_gpus
from daskdp.errors import RunError, UserError
from daskdp.generation import (
    GIVEN_AWAY,
    PROGRESS_TOPIC,
    GenerationRequest,
    generate_and_write,
    give_away,
    queued_rows,
    record_meta,
)
from daskdp.plugin import EnginePlugin, ensure_engines

if TYPE_CHECKING:
    import dask.dataframe as dd
    from dask.typing import Key
    from distributed import Client, Future, SpecCluster

    from daskdp.gang import GangMode

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
    from daskdp import gang  # gang mode (MoE with expert parallelism): daskdp/gang.py

    gang_mode = gang.resolve(settings["parallel"], model, engine_args)
    prompts = io.read_prompts(source, settings["input"])
    output = output or io.default_output(source)
    with io.output_lock(output):
        io.check_output(output, resume, overwrite)
        result_settings = checkpoint.result_settings(model, engine_args, settings)
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
            survey = prompts.survey(int(settings["sampling"]["max-tokens"]))
            planned = max(1, len(gpu_workers(client)))
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
            request = GenerationRequest(
                sampling=settings["sampling"],
                prompt_column=settings["input"]["prompt-column"],
                messages_column=settings["input"]["messages-column"],
                id_column=settings["input"]["id-column"],
                run_id=uuid.uuid4().hex,
                chunk_rows=layout.chunk_rows,
                chunk_timeout=limits["chunk-timeout"],
                stall_timeout=stall_timeout(limits),
                retries=int(limits["retries"]),
                progress_interval=limits["progress-interval"],
            )
            records = record_meta()
            if todo:
                plan = Plan(prompts, survey, layout, todo, limits["partitioning"])
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
                    gang_mode=gang_mode,
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
            io.write_summary(summary, output)
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
    manifest = checkpoint.read_manifest(output)
    if manifest is None:
        if io.has_results(output):
            raise UserError(
                f"output directory {output} has no daskdp manifest to resume from; "
                "pass --overwrite to replace it, or choose another -o/--output"
            )
        return None
    refuse_differences(output, checkpoint.differences(manifest, settings))
    return manifest


def prepare_output(
    output: str,
    source: str,
    survey: io.Survey,
    settings: dict[str, Any],
    manifest: dict[str, Any] | None,
    *,
    ranks: int,
    chunk_size: int,
    prefix_locality: bool,
) -> tuple[checkpoint.Layout, dict[int, dict[str, Any]]]:
    """The chunk layout, and the verified records of chunks an earlier run finished.

    Without the ``manifest`` of a run to resume, the output is cleared and a fresh manifest
    written; with it, this input must be the one that run read, and its layout is kept.
    """
    if manifest is None:
        io.clear_output(output)
        by_prefix = prefix_locality and survey.shares_prefixes()
        _, costs = survey.arrangement(by_prefix)
        layout = checkpoint.layout(costs, ranks, int(chunk_size), by_prefix)
        manifest = checkpoint.new_manifest(source, survey.fingerprint, layout, settings)
        try:
            checkpoint.write_manifest(manifest, output)
        except OSError as e:
            io.clear_output(output)  # without a manifest, only what this run made
            raise RunError(output_error(e, output)) from None
        return layout, {}
    refuse_differences(output, checkpoint.input_differs(manifest, survey.fingerprint, survey.rows))
    layout = checkpoint.Layout(survey.rows, manifest["chunk_rows"], manifest.get("row_order") == "prefix")
    return layout, checkpoint.verified_records(output, layout)


def output_error(error: OSError, output: str | None = None) -> str:
    """One line for a write to the output directory (``output``, else the directory of the
    file that failed) that failed: a full disk above all."""
    if output is None:
        output = os.path.dirname(str(error.filename or "")).removesuffix(f"/{checkpoint.CHUNKS_DIR}")
    if error.errno == errno.ENOSPC:
        return f"no space left on the device of {output or 'the output directory'}; free some space"
    return f"cannot write to {output or 'the output directory'} ({error.strerror or error})"


def refuse_differences(output: str, differences: list[str]) -> None:
    """Refuse to resume ``output`` from a run that differs from this one."""
    if differences:
        raise UserError(
            f"cannot resume {output}: this run differs from it in "
            + "; ".join(differences)
            + "; run with the same input and settings, or pass --overwrite to start again"
        )


BALANCED, DYNAMIC = "balanced", "dynamic"
DYNAMIC_PARTITIONS_PER_RANK = 8
IN_FLIGHT_PER_RANK = 2  # a rank's next partition waits on its worker, not on the client
FOLLOW_INTERVAL = 5.0  # seconds between looks for workers that joined or left, or work to share
SILENT_AFTER = 5.0  # seconds without progress after which a rank is not asked to share work
ASK_TIMEOUT = 10.0  # seconds to wait for the workers' answers about their queues and engines


@dataclass
class Plan:
    """What is left to generate: the input, its chunks, the chunks not yet done, and how
    they are spread: ``balanced`` (one partition per rank, of about equal estimated cost) or
    ``dynamic`` (more, smaller partitions, handed out costliest first as ranks free up)."""

    prompts: io.Prompts
    survey: io.Survey
    layout: checkpoint.Layout
    todo: list[int]
    mode: str = BALANCED

    def __post_init__(self):
        if self.mode not in (BALANCED, DYNAMIC):
            raise UserError(f"--partitioning must be {BALANCED} or {DYNAMIC}, got {self.mode!r}")

    @property
    def rows(self) -> int:
        return sum(self.layout.chunk_size(chunk) for chunk in self.todo)

    def partitions(self, ranks: int, id_column: str) -> dd.DataFrame:
        """The chunks left to do, in partitions of about equal cost, costliest first.

        With the rows put together by prefix, each partition is a run of neighbouring chunks,
        so that rows sharing a prefix meet on one rank.
        """
        parts = ranks if self.mode == BALANCED else ranks * DYNAMIC_PARTITIONS_PER_RANK
        slots, costs = self.survey.arrangement(self.layout.by_prefix)
        chunk_costs = io.chunk_costs(costs, self.layout)
        groups = io.assign(chunk_costs, self.todo, parts, contiguous=self.layout.by_prefix)
        return io.partition(self.prompts.frame, self.survey.lengths, self.layout, groups, id_column, slots)


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
    gang_mode: GangMode | None = None,
) -> pd.DataFrame:
    """Load the engines while the input is read and split, then generate the plan's chunks.

    Returns the chunk records of every partition.
    """
    if gang_mode is not None:  # gang mode: the ranks run as one vLLM group, by daskdp/gang.py
        from daskdp import gang

        return gang.generate(
            client, plan, plugin, request, output, mode=gang_mode,
            startup_timeout=startup_timeout, deadline=deadline, progress=progress,
        )  # fmt: skip
    from distributed import wait

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
        partitions = client.persist(plan.partitions(len(ranks), request.id_column))
    # Before any rank starts generating: a worker runs one task at a time, and a partition's
    # input task queued behind another partition's generation would leave its rank waiting.
    try:
        wait(partitions, timeout=startup_timeout)
    except TimeoutError:
        raise RunError(
            f"the input was not read and split within {startup_timeout:g} s (cluster.startup-timeout)",
            resumable=True,
        ) from None
    tensor_parallel_size = int(plugin.engine_args.get("tensor_parallel_size", 1))
    dispatcher = Dispatcher(
        client, partitions, request, output, ranks, tensor_parallel_size, plan.mode, plugin.fingerprint
    )
    monitor = Monitor(
        client, request.run_id, plan.rows, progress, startup_timeout, request.stall_timeout, output
    )
    return monitor.wait(dispatcher, deadline)


def stall_timeout(limits: dict[str, Any]) -> float | None:
    """Seconds a rank may hold work without reporting progress: ``run.stall-timeout``, never
    more than ``run.chunk-timeout`` when that is given."""
    limit = limits.get("stall-timeout")
    if limits.get("chunk-timeout") is not None:
        limit = min(limit, limits["chunk-timeout"]) if limit is not None else limits["chunk-timeout"]
    return float(limit) if limit is not None else None


def gpu_workers(client: Client) -> list[str]:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return [address for address, info in workers.items() if info.get("resources", {}).get(GPU)]


def check_model(model: str) -> None:
    """A model given as a local path must exist; hub names are checked by the engine."""
    if model.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(model)):
        raise UserError(f"model directory {model} does not exist; check --model")


class Dispatcher:
    """Hands the partitions to the ranks as Dask futures; partition ``i`` prefers one rank.

    ``balanced``: every partition at once, partition ``i`` on rank ``i``. ``dynamic``: in
    order (costliest first), at most ``IN_FLIGHT_PER_RANK`` per rank, each to the rank with
    the fewest in flight, so a rank that finishes early takes more; a ``GPU`` worker that
    joins becomes a rank once it holds the run's engine (``fingerprint``), and one that leaves
    stops being one. Either way a partition may run on another ``GPU`` worker when its own is
    gone, and once no partition waits, a rank without work (one that finished first, or
    joined) takes half the unstarted chunks of the task with the most: a slower rank does
    not hold up the run.
    """

    def __init__(
        self,
        client: Client,
        partitions: dd.DataFrame,
        request: GenerationRequest,
        output: str,
        ranks: list[str],
        tensor_parallel_size: int,
        mode: str,
        fingerprint: str,
    ):
        self.client = client
        self.parts = partitions.to_delayed()
        results = partitions.map_partitions(generate_and_write, request, output, meta=record_meta())
        self.waiting = list(enumerate(results.to_delayed()))
        self.request = request
        self.output = output
        self.ranks = list(ranks)
        self.resources = {GPU: tensor_parallel_size}
        self.mode = mode
        self.fingerprint = fingerprint
        self.partition: dict[Future, int] = {}
        self.assigned: dict[Future, str] = {}
        self.given: dict[Key, list[int]] = {}  # chunks each task gave away
        self.looked = time.monotonic()
        self.shared: float | None = None  # when work was last shared; None: look at the next call
        self.questions = ThreadPoolExecutor(thread_name_prefix="daskdp-ask")

    @property
    def limit(self) -> int:
        return (
            len(self.waiting) + len(self.assigned)
            if self.mode == BALANCED
            else IN_FLIGHT_PER_RANK * len(self.ranks)
        )

    def submit(self, silent: Collection[str] = ()) -> set[Future]:
        """Submit partitions until the limit of those in flight is reached, then share out the
        work of busy ranks with idle ones, leaving out the ``silent`` ranks; the new futures."""
        self.follow_workers()
        submitted = set()
        while self.waiting and len(self.assigned) < self.limit:
            i, part = self.waiting.pop(0)
            if self.mode == BALANCED:
                rank = self.ranks[i % len(self.ranks)]
            else:
                load = dict.fromkeys(self.ranks, 0)
                for busy in self.assigned.values():
                    load[busy] += 1
                rank = min(load, key=load.get)
            submitted.add(self.compute(part, i, rank))
        if not self.waiting:
            submitted |= self.share_work(silent)
        return submitted

    def compute(self, task: Any, partition: int, rank: str) -> Future:
        future = self.client.compute(task, resources=self.resources, workers=[rank], allow_other_workers=True)
        self.partition[future], self.assigned[future] = partition, rank
        return future

    def finished(self, future: Future) -> None:
        del self.assigned[future]
        self.shared = None

    def share_work(self, silent: Collection[str]) -> set[Future]:
        """Give each idle rank half the unstarted chunks of the task with the most rows left.

        Looks when a task has finished, else every ``FOLLOW_INTERVAL`` seconds (for ranks that
        joined). The chunks leave the task's queue on its worker before they are given
        (`give_away`), and are recorded in its metadata, so that no chunk is generated twice,
        even when the task is run again after its worker died. The idle rank receives the
        task's whole partition through Dask and generates the chunks it was given.
        """
        idle = [rank for rank in self.ranks if rank not in self.assigned.values()]
        if not idle or not self.assigned:
            return set()
        if self.shared is not None and time.monotonic() - self.shared < FOLLOW_INTERVAL:
            return set()
        self.shared = time.monotonic()
        running = {future.key: future for future in self.assigned}
        # A rank silent for a while may be stopped, and would never answer.
        asked = [rank for rank in self.ranks if rank not in silent]
        queued = self.ask(queued_rows, list(running), workers=asked) if asked else {}
        offers = [
            (rows, worker, key)
            for worker, found in queued.items()
            if isinstance(found, dict)
            for key, rows in found.items()
            if rows
        ]
        offers.sort(key=lambda offer: offer[0], reverse=True)
        submitted = set()
        alive = (rank for rank in idle if isinstance(queued.get(rank), dict))
        for rank, (_, worker, key) in zip(alive, offers, strict=False):
            chunks = self.client.run(give_away, key, workers=[worker], on_error="return").get(worker)
            if not chunks or isinstance(chunks, BaseException):
                continue
            self.given[key] = self.given.get(key, []) + chunks
            self.client.set_metadata([key, GIVEN_AWAY], self.given[key])
            i = self.partition[running[key]]
            task = dask.delayed(generate_and_write, pure=False)(
                self.parts[i], self.request, self.output, partition_info={"number": i}, chunks=chunks
            )
            submitted.add(self.compute(task, i, rank))
        return submitted

    def ask(
        self, function: Callable, *args: Any, workers: list[str], on_error: str = "return"
    ) -> dict[str, Any]:
        """``client.run`` on ``workers`` for a question that may go unanswered: a rank stopped
        since it last reported, or a worker still loading its engine, would hold this loop, and
        with it the monitor (stalls, the deadline). No answer within ``ASK_TIMEOUT`` seconds
        counts as none; the question is harmless to leave running."""
        asking = self.questions.submit(self.client.run, function, *args, workers=workers, on_error=on_error)
        try:
            return asking.result(timeout=ASK_TIMEOUT)
        except TimeoutError:
            return {}

    def follow_workers(self) -> None:
        """Every few seconds: the ranks are the ``GPU`` workers that hold the run's engine."""
        from daskdp.plugin import engine_status

        if time.monotonic() - self.looked < FOLLOW_INTERVAL:
            return
        self.looked = time.monotonic()
        alive = gpu_workers(self.client)
        joined = [worker for worker in alive if worker not in self.ranks]
        held = self.ask(engine_status, workers=joined, on_error="ignore") if joined else {}
        ranks = [rank for rank in self.ranks if rank in alive]
        ranks += [worker for worker, status in held.items() if status and status[0] == self.fingerprint]
        if ranks and ranks != self.ranks:
            self.ranks = ranks
            self.shared = None


RATE_WINDOW = 5.0  # seconds over which the ranks' rates are shown


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
        stall_timeout: float | None = None,
        output: str | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.output = output
        self.stall_timeout = stall_timeout
        self.heard: dict[str, float] = {}  # when each unfinished task last reported, by its key
        self.hung: set[int] = set()  # ranks restarted for a stall, until their work reports again
        self.total_rows = total_rows
        self.stream = stream
        self.worker_wait = worker_wait
        self.lock = threading.Lock()
        self.tasks: dict[str, dict[str, Any]] = {}  # the progress of each task, by its key
        self.started = time.monotonic()
        self.last_line = self.started
        self.workers_seen = self.started
        self.waiting_for_workers = False
        self.history: collections.deque = collections.deque([(self.started, {})])
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
            self.tasks.setdefault(message["task"], {}).update(message)
            if message.get("final"):
                self.heard.pop(message["task"], None)
            else:
                self.heard[message["task"]] = time.monotonic()
                self.hung.discard(message["rank"])

    def wait(self, dispatcher: Dispatcher, deadline: float | None) -> pd.DataFrame:
        """The chunk records of every partition; raises ``RunError`` when the run cannot finish."""
        from distributed import wait

        pending = dispatcher.submit()
        records = [record_meta()]
        try:
            while pending:
                try:
                    done, pending = wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                for future in done:
                    records.append(self.result(future, dispatcher.partition[future]))
                    dispatcher.finished(future)
                pending |= dispatcher.submit(self.silent_workers())
                if pending:
                    self.check(pending, dispatcher.partition, deadline)
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
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES):
            raise RunError(output_error(error, self.output), resumable=True)
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
        self.check_stalls(pending)
        if deadline is not None and time.time() > deadline:
            running: dict[int, set[int]] = collections.defaultdict(set)
            with self.lock:
                for state in self.tasks.values():
                    if not state.get("final"):
                        running[state["partition"]].add(state["rank"])
            where = ", ".join(
                f"partition {i} on rank {', '.join(map(str, sorted(running[i])))}"
                if running[i]
                else f"partition {i} (not started)"
                for i in sorted({futures[f] for f in pending})
            )
            raise RunError(
                f"the run passed its --timeout; unfinished: {where}",
                resumable=True,
            )

    def silent_workers(self) -> set[str]:
        """The workers of unfinished tasks that have not reported for ``SILENT_AFTER`` seconds."""
        now = time.monotonic()
        with self.lock:
            return {
                self.tasks[key]["worker"] for key, heard in self.heard.items() if now - heard > SILENT_AFTER
            }

    def check_stalls(self, pending: set[Future]) -> None:
        """Find ranks whose task has sent no progress for ``stall_timeout`` seconds; stop them.

        A rank reports about every second while its engine steps, so silence means a process
        that is stopped, or stuck in the engine. The clock runs only for tasks that have
        reported (an engine that loads holds no task), and restarts when a rank is stopped.
        """
        if self.stall_timeout is None:
            return
        running = {str(future.key) for future in pending}
        now = time.monotonic()
        with self.lock:
            stalled = [
                (key, self.tasks[key])
                for key, heard in self.heard.items()
                if key in running and now - heard > self.stall_timeout
            ]
        for key, state in stalled:
            self.heard[key] = now
            self.hung.add(state["rank"])
            self.stop_hung(state, now - self.stall_timeout)

    def stop_hung(self, state: dict[str, Any], since: float) -> None:
        """Kill the hung rank's worker through its nanny, as if it had died: the scheduler then
        gives its task to another rank, which skips the chunks already written. A worker that
        has no nanny to restart it fails the run."""
        worker = state["worker"]
        info = self.client.scheduler_info(n_workers=-1)["workers"].get(worker)
        silence = (
            f"no progress for {time.monotonic() - since:.0f} s (run.stall-timeout {self.stall_timeout:g} s)"
        )
        if info is None:
            return  # already gone: the scheduler moves its task on
        if not info.get("nanny"):
            raise RunError(
                f"rank {state['rank']} (worker {worker}) is hung: {silence}, and it has no nanny "
                "that could restart it",
                resumable=True,
            )
        if self.stream is not None:
            print(
                f"rank {state['rank']} (worker {worker}) is hung: {silence}; restarting it, "
                "its unfinished chunks go to the other ranks",
                file=self.stream,
                flush=True,
            )
        self.client.run(kill_worker_process, workers=[worker], nanny=True, on_error="return")

    def show(self, final: bool = False) -> None:
        """Rows done, and rows/s and output tokens/s of each rank over the last few seconds."""
        with self.lock:
            by_rank: dict[int, np.ndarray] = {}
            for state in self.tasks.values():
                counts = np.array([state.get("done", 0), state.get("output_tokens", 0)], dtype=float)
                by_rank[state["rank"]] = by_rank.get(state["rank"], 0) + counts
        now = time.monotonic()
        self.history.append((now, by_rank))
        while len(self.history) > 2 and now - self.history[1][0] >= RATE_WINDOW:
            self.history.popleft()
        then, before = self.history[0]
        elapsed = max(now - then, 1e-9)
        rates = {rank: (counts - before.get(rank, 0)) / elapsed for rank, counts in sorted(by_rank.items())}
        done = min(int(sum(counts[0] for counts in by_rank.values())), self.total_rows)
        per_rank = "; ".join(
            f"rank {rank} hung"
            if rank in self.hung
            else f"rank {rank} {rows:,.0f} rows/s {tokens:,.0f} tok/s"
            for rank, (rows, tokens) in rates.items()
        )
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(per_rank, refresh=True)
        elif self.stream is not None and (final or now - self.last_line >= RATE_WINDOW):
            self.last_line = now
            total = sum(tokens for _, tokens in rates.values())
            print(
                f"{done:,}/{self.total_rows:,} rows, {total:,.0f} output tokens/s"
                + (f" ({per_rank})" if per_rank else ""),
                file=self.stream,
                flush=True,
            )


def kill_worker_process(dask_worker) -> None:
    """Run on a nanny (``client.run(..., nanny=True)``): SIGKILL its worker process, which
    stops even a stopped process. The nanny starts a new one."""
    os.kill(dask_worker.process.process.pid, signal.SIGKILL)


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
        "prefix_cache_hit_rate": hit_rate(generated),
        "chunk_rows": layout.chunk_rows,
        "chunks": [
            {key: record[key] for key in CHUNK_SUMMARY_KEYS}
            for record in sorted(generated, key=lambda record: record["chunk"])
        ],
        "ranks": per_rank(generated),
    }


CHUNK_SUMMARY_KEYS = (
    "chunk",
    "partition",
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
        ranks[int(rank)] = {
            "rows": sum(r["rows"] for r in chunks),
            "busy_seconds": round(busy, 3),
            "output_tokens": sum(r["output_tokens"] for r in chunks),
            "prefix_cache_hit_rate": hit_rate(chunks),
        }
    return ranks


def hit_rate(records: list[dict[str, Any]]) -> float | None:
    """The fraction of prompt tokens found in the engines' prefix caches; None without lookups."""
    queries = sum(record.get("prefix_cache_queries", 0) for record in records)
    hits = sum(record.get("prefix_cache_hits", 0) for record in records)
    return round(hits / queries, 4) if queries else None


def check_finished(summary: dict[str, Any], max_error_rate: float | None) -> None:
    """Fail a run that left timed-out rows or rows without a result, or more error rows than
    ``max_error_rate`` allows."""
    if summary["timed_out_rows"]:
        ids = summary["timed_out_ids"]
        shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        raise RunError(
            f"{summary['timed_out_rows']} rows timed out after --chunk-timeout and its retries "
            f"(ids {shown}); raise --chunk-timeout",
            resumable=True,
            summary=summary,
        )
    if summary["rows_done"] < summary["rows"]:  # never expected: a chunk no rank wrote
        raise RunError(
            f"{summary['rows'] - summary['rows_done']:,} of {summary['rows']:,} rows have no result "
            "(their chunks were not written)",
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
    ]
    if summary.get("prefix_cache_hit_rate") is not None:
        lines.append(
            f"prefix cache    {summary['prefix_cache_hit_rate']:>12.1%}   (prompt tokens found cached)"
        )
    lines.append("rank        rows      busy")
    for rank, stats in summary["ranks"].items():
        lines.append(f"{rank:>4} {stats['rows']:>11,} {stats['busy_seconds']:>8.1f}s")
    lines.append(f"results in {summary['output']}")
    return "\n".join(lines)
