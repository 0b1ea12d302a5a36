"""Watching a run from the client: the partitions' futures, the ranks' progress events, the
progress display, and the run's deadline and lost workers."""

from __future__ import annotations

import collections
import errno
import os
import signal
import threading
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import dask
import numpy as np
import pandas as pd

from daskdp.clusters.ranks import GPU, cluster_gpu_workers
from daskdp.engine.loop import PROGRESS_TOPIC
from daskdp.errors import RunError, first_line
from daskdp.output.directory import output_error
from daskdp.output.schema import record_meta

if TYPE_CHECKING:
    from distributed import Client, Future

RATE_WINDOW = 5.0  # seconds over which the ranks' rates are shown
SILENT_AFTER = 5.0  # seconds without progress after which a rank is not asked to share work


class Dispatcher(Protocol):
    """What hands a strategy's tasks to the ranks (`daskdp.strategies`)."""

    partition: dict[Future, int]

    def submit(self, silent: Collection[str] = ()) -> set[Future]: ...

    def finished(self, future: Future) -> None: ...


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
        tokens: str = "output",
    ):
        self.client = client
        self.tokens = tokens  # which tokens the ranks count: output (generation) or prompt (pooling)
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
        raise RunError(f"partition {partition} failed: {first_line(error)}", resumable=True)

    def check(self, pending: set[Future], futures: dict[Future, int], deadline: float | None) -> None:
        now = time.monotonic()
        if cluster_gpu_workers(self.client):
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
        """Rows done, and rows/s and tokens/s (output tokens; prompt tokens when pooling) of each
        rank over the last few seconds."""
        with self.lock:
            by_rank: dict[int, np.ndarray] = {}
            for state in self.tasks.values():
                counts = np.array([state.get("done", 0), state.get("tokens", 0)], dtype=float)
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
        eta = eta_text(self.total_rows - done, sum(rows for rows, _ in rates.values()))
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(f"ETA {eta}; {per_rank}" if eta else per_rank, refresh=True)
        elif self.stream is not None and (final or now - self.last_line >= RATE_WINDOW):
            self.last_line = now
            total = sum(tokens for _, tokens in rates.values())
            print(
                f"{done:,}/{self.total_rows:,} rows, {total:,.0f} {self.tokens} tokens/s"
                + (f", ETA {eta}" if eta and not final else "")
                + (f" ({per_rank})" if per_rank else ""),
                file=self.stream,
                flush=True,
            )


def eta_text(rows_left: int, rows_per_second: float) -> str:
    """The time left at the recent rate, as ``1h02m``, ``4m05s`` or ``12s``; "" when unknown."""
    if rows_left <= 0 or rows_per_second <= 0:
        return ""
    seconds = round(rows_left / rows_per_second)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def kill_worker_process(dask_worker) -> None:
    """Run on a nanny (``client.run(..., nanny=True)``): SIGKILL its worker process, which
    stops even a stopped process. The nanny starts a new one."""
    os.kill(dask_worker.process.process.pid, signal.SIGKILL)
