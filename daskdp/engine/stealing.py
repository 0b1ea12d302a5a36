"""Work stealing on the worker: the chunks of a running task that its engine has not started.

A rank that runs out of work is given half of them (`give_away`, run by
`daskdp.strategies.independent` through ``client.run``): still queued, or in the engine with
none of their requests started (`unstarted`), which the engine's loop (`daskdp.engine.loop`)
takes back between two steps.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from dask.typing import Key
    from vllm import LLM

GIVEN_AWAY = "daskdp-given-away"  # a task's metadata on the scheduler: chunks it gave away
ANSWER_TIMEOUT = 30.0  # seconds a request to give work away waits for the engine's loop


class ChunkQueue:
    """The chunks of a running task that its engine has not started.

    The engine takes them from the front; a rank that has run out of work is given the back
    half (`give_away`), so that each side keeps neighbouring chunks (rows sharing a prefix).
    The engine's loop takes chunks into the engine ahead of their start (`step_chunks`): while
    it runs (``stepping``), a request to give work away is answered by the loop itself, between
    two engine steps, after it has taken back the chunks none of whose requests the engine has
    started.
    """

    running: dict[Key, ChunkQueue] = {}  # the queues of the tasks running in this process

    def __init__(self, chunks: Iterable[tuple[int, pd.DataFrame]]):
        self.chunks = collections.deque(chunks)
        self.lock = threading.Lock()
        self.stepping = False  # an engine loop answers the requests below
        self.asked: list[Future] = []  # requests to give work away, for the loop
        self.unstarted_in_engine = 0  # rows of chunks in the engine that it has not started

    def __iter__(self):
        while (chunk := self.take()) is not None:
            yield chunk

    def take(self) -> tuple[int, pd.DataFrame] | None:
        """The front chunk, for the engine (None when there is none, for now: the engine's loop
        may put chunks back, `answer`)."""
        with self.lock:
            return self.chunks.popleft() if self.chunks else None

    @contextlib.contextmanager
    def shared(self, key: Key):
        """Let other ranks take chunks from this queue while task ``key`` runs."""
        ChunkQueue.running[key] = self
        try:
            yield self
        finally:
            ChunkQueue.running.pop(key, None)

    def rows(self) -> int:
        """Rows not started: in the queue, and in chunks of the engine none of whose rows started."""
        with self.lock:
            return self._queued() + (self.unstarted_in_engine if self.stepping else 0)

    def queued_rows(self) -> int:
        with self.lock:
            return self._queued()

    def _queued(self) -> int:
        return sum(len(rows) for _, rows in self.chunks)

    def give_away(self) -> list[int]:
        """Remove the back half of the queued chunks (rounded up); their numbers."""
        with self.lock:
            return self.split()

    def split(self) -> list[int]:
        """`give_away` with ``self.lock`` held."""
        given = [self.chunks.pop()[0] for _ in range((len(self.chunks) + 1) // 2)]
        return sorted(given)

    def ask(self) -> Future:
        """A request to give work away: answered now when no engine loop runs, else by the loop
        between two steps, or when it stops (`answer`)."""
        answer: Future = Future()
        with self.lock:
            if self.stepping:
                self.asked.append(answer)
                return answer
            answer.set_result(self.split())
        return answer

    def withdraw(self, answer: Future) -> None:
        """Give up waiting for ``answer``: answered here unless the loop has taken it."""
        with self.lock:
            if answer in self.asked:
                self.asked.remove(answer)
                answer.set_result(self.split())

    def start(self) -> None:
        with self.lock:
            self.stepping = True

    def answer(
        self, give_back: Callable[[], list[tuple[int, pd.DataFrame]]] | None, stop: bool = False
    ) -> None:
        """Runs on the engine's thread: answer the requests to give work away.

        ``give_back``: takes the unstarted chunks out of the engine, for the front of the queue,
        before the first request is answered. With ``stop``, the loop no longer answers.
        """
        with self.lock:
            asked, self.asked = self.asked, []
            if stop:
                self.stepping = False
                self.unstarted_in_engine = 0
            if not asked:
                return
            if give_back is not None:
                self.chunks.extendleft(reversed(give_back()))
            for answer in asked:
                answer.set_result(self.split())


def queued_rows(keys: list[Key]) -> dict[Key, int]:
    """Run on a worker (``client.run``): rows not yet started by those of ``keys`` running there."""
    return {key: queue.rows() for key in keys if (queue := ChunkQueue.running.get(key)) is not None}


async def give_away(key: Key) -> list[int]:
    """Run on a worker (``client.run``): take half the unstarted chunks of task ``key``, for
    another rank to generate; their numbers (none when the task has finished).

    Unstarted: still queued, or in the engine with none of their requests started (the engine's
    loop aborts those and takes them back first). The caller records them in the task's
    metadata under `GIVEN_AWAY`, so that the task, run again after its worker died, leaves
    them out.
    """
    queue = ChunkQueue.running.get(key)
    if queue is None:
        return []
    answer = queue.ask()
    try:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(answer)), ANSWER_TIMEOUT)
    except TimeoutError:
        queue.withdraw(answer)
        return await asyncio.wrap_future(answer)


def unstarted(llm: LLM, request_ids: Iterable[str]) -> bool:
    """Whether the engine has started none of ``request_ids`` (daskdp's ids): each still waits
    in the scheduler's queue, with no token computed (prefill included) and none generated.

    Looks into the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as daskdp
    runs it); anything it cannot see counts as started.
    """
    from vllm.v1.request import RequestStatus

    engine = llm.llm_engine
    try:
        scheduler = engine.engine_core.engine_core.scheduler
        internal_ids = engine.output_processor.external_req_ids
    except AttributeError:
        return False
    for request_id in request_ids:
        ids = internal_ids.get(request_id)
        if not ids:
            return False
        for internal_id in ids:
            state = scheduler.requests.get(internal_id)
            if (
                state is None
                or state.status != RequestStatus.WAITING
                or state.num_computed_tokens
                or state.num_output_tokens
            ):
                return False
    return True
