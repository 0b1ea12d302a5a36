"""The independent strategy: every rank its own engine; partitions handed out as Dask futures,
and work stolen from a slower rank by one that ran dry."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask
import pandas as pd

from daskdp.clusters.ranks import GPU, cluster_gpu_workers
from daskdp.engine.loop import generate_and_write
from daskdp.engine.stealing import GIVEN_AWAY, give_away, queued_rows
from daskdp.errors import RunError
from daskdp.monitor import Monitor
from daskdp.output.schema import record_meta
from daskdp.plan import BALANCED
from daskdp.strategies.engines import load_engines

if TYPE_CHECKING:
    import dask.dataframe as dd
    from dask.typing import Key
    from distributed import Client, Future

    from daskdp.engine.requests import GenerationRequest
    from daskdp.strategies import Generation

IN_FLIGHT_PER_RANK = 2  # a rank's next partition waits on its worker, not on the client
FOLLOW_INTERVAL = 5.0  # seconds between looks for workers that joined or left, or work to share
ASK_TIMEOUT = 10.0  # seconds to wait for the workers' answers about their queues and engines


@dataclass(frozen=True)
class Independent:
    """Every rank its own engine of data-parallel size 1; ``planned_ranks``: the ``GPU`` workers
    when the run was planned."""

    planned_ranks: int

    def run(self, generation: Generation) -> pd.DataFrame:
        """Load the engines while the input is read and split, then generate the plan's chunks.

        Returns the chunk records of every partition.
        """
        from distributed import wait

        client, plan, plugin, request = (
            generation.client,
            generation.plan,
            generation.plugin,
            generation.request,
        )
        startup_timeout = generation.startup_timeout
        ranks, partitions = load_engines(
            client,
            plugin,
            startup_timeout,
            meanwhile=lambda: client.persist(plan.partitions(self.planned_ranks, request.id_column)),
        )
        if len(ranks) != self.planned_ranks:  # workers joined or left while the engines loaded
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
            client,
            partitions,
            request,
            generation.output,
            ranks,
            tensor_parallel_size,
            plan.mode,
            plugin.fingerprint,
        )
        monitor = Monitor(
            client,
            request.run_id,
            plan.rows,
            generation.progress,
            startup_timeout,
            request.stall_timeout,
            generation.output,
            tokens="prompt" if request.pooled else "output",
        )
        return monitor.wait(dispatcher, generation.deadline)


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
        from daskdp.engine.plugin import engine_status

        if time.monotonic() - self.looked < FOLLOW_INTERVAL:
            return
        self.looked = time.monotonic()
        alive = cluster_gpu_workers(self.client)
        joined = [worker for worker in alive if worker not in self.ranks]
        held = self.ask(engine_status, workers=joined, on_error="ignore") if joined else {}
        ranks = [rank for rank in self.ranks if rank in alive]
        ranks += [worker for worker, status in held.items() if status and status[0] == self.fingerprint]
        if ranks and ranks != self.ranks:
            self.ranks = ranks
            self.shared = None
