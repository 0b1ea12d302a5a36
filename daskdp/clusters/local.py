"""The local cluster: one worker process per rank on this host, each pinned to its own devices;
on a host without GPUs, forked from the forkserver."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import dask.config
from distributed import Client, LocalCluster, Nanny

from daskdp.clusters.forkserver import release_forkserver, start_forkserver
from daskdp.clusters.ranks import GPU, RANK_DASK_CONFIG, default_ranks, rank_environments, visible_gpus
from daskdp.errors import UserError
from daskdp.logs import silenced

# The Dask preload of every rank: starts importing vLLM as each worker starts.
WORKER_PRELOAD = "daskdp.engine.plugin"
START_METHOD = "distributed.worker.multiprocessing-method"

# ForkedNanny instances starting their worker now, and Dask's start method before the first.
_forking = 0

_start_method_before: str | None = None

_forking_lock = threading.Lock()


@contextlib.contextmanager
def _forking_workers() -> Iterator[None]:
    """Dask's start method is ``forkserver`` while any `ForkedNanny` starts its worker.

    Nannies start at the same time and finish in any order; nested ``dask.config.set`` blocks
    exited out of order would restore each other's value and leave ``forkserver`` set.
    """
    global _forking, _start_method_before
    with _forking_lock:
        if _forking == 0:
            _start_method_before = dask.config.get(START_METHOD)
            dask.config.set({START_METHOD: "forkserver"})
        _forking += 1
    try:
        yield
    finally:
        with _forking_lock:
            _forking -= 1
            if _forking == 0:
                dask.config.set({START_METHOD: _start_method_before})


class ForkedNanny(Nanny):
    """A nanny whose worker is forked from the forkserver, when it starts and when it restarts.

    Dask reads the start method from its configuration each time a nanny starts its worker: a
    worker restarted after it died (killed, out of memory) would otherwise be spawned, and
    import vLLM again before its engine could load.
    """

    async def instantiate(self):
        with _forking_workers():
            return await super().instantiate()


class RankedLocalCluster(LocalCluster):
    """A ``LocalCluster`` of one worker process per rank, each pinned to its own devices.

    Workers are named ``0 .. ranks-1`` and carry the resource ``GPU=tensor_parallel_size``.

    Examples
    --------
    >>> cluster = RankedLocalCluster(ranks=2)  # doctest: +SKIP
    >>> client = Client(cluster)  # doctest: +SKIP
    """

    def __init__(
        self,
        ranks: int,
        tensor_parallel_size: int = 1,
        host: str = "127.0.0.1",
        dashboard_address: str = "127.0.0.1:0",
        **kwargs: Any,
    ):
        self.rank_environments = rank_environments(ranks, tensor_parallel_size)
        # The ranks' temporary files (vLLM's rendezvous file among them) go here, removed when
        # the cluster closes: a rank stopped at the end of a run leaves its own behind.
        self.scratch = tempfile.TemporaryDirectory(prefix="daskdp-ranks-")
        config = {**RANK_DASK_CONFIG, "distributed.worker.daemon": tensor_parallel_size == 1}
        self.forked = not visible_gpus()
        if self.forked:
            start_forkserver()
            kwargs.setdefault("worker_class", ForkedNanny)
        # vLLM spawns its tensor-parallel workers: a worker process must be able to have children.
        try:
            with dask.config.set(config):
                super().__init__(
                    n_workers=0,
                    threads_per_worker=1,
                    processes=True,
                    host=host,
                    dashboard_address=dashboard_address,
                    resources={GPU: tensor_parallel_size},
                    preload=[WORKER_PRELOAD],
                    **kwargs,
                )
                self.scale(ranks)
                self.sync(self._correct_state)
        except BaseException:
            # Interrupted while its workers start (Ctrl-C): the forkserver goes first, so that
            # workers waiting for it fail at once (Dask logs each with a traceback: no news),
            # then the cluster. Its close fails on the cancelled start, and Dask's exit hook
            # would wait 10 s on it again: the process exits, and its workers with it.
            with silenced("distributed", "tornado"):
                self._release_forkserver()
                with contextlib.suppress(Exception):
                    self.close(timeout=10)
            self.shutdown_on_close = False
            raise

    def stop_ranks(self, grace: float = 0.1) -> None:
        """End the worker processes now, giving each ``grace`` seconds before SIGKILL.

        For the end of a run whose results are on disk: a worker holding an engine otherwise
        spends seconds freeing it and finalising torch before it exits.
        """

        async def stop() -> None:
            # On a loaded host a killed process may take longer than ``grace`` to be reaped;
            # ``close()`` then waits for it.
            closing = (nanny.close(timeout=grace) for nanny in self.workers.values())
            await asyncio.gather(*closing, return_exceptions=True)

        self.sync(stop)

    def new_worker_spec(self):
        rank = min(set(range(len(self.rank_environments))) - set(self.worker_spec), default=None)
        if rank is None:
            raise ValueError(f"all {len(self.rank_environments)} ranks of this cluster are running")
        spec = copy.deepcopy(self.new_spec)
        spec["options"]["env"] = {
            **spec["options"].get("env", {}),
            **self.rank_environments[rank],
            "TMPDIR": self.scratch.name,
        }
        return {rank: spec}

    async def _close(self) -> None:
        await super()._close()
        self.scratch.cleanup()
        self._release_forkserver()

    def _release_forkserver(self) -> None:
        if self.forked:
            self.forked = False
            release_forkserver()


def start_local(
    cluster_config: dict[str, Any], tensor_parallel_size: int
) -> tuple[Client, RankedLocalCluster]:
    """A new local cluster of ``cluster.workers`` ranks (default: one per GPU group) and its client."""
    ranks = cluster_config["workers"] or default_ranks(tensor_parallel_size)
    if int(ranks) < 1:
        raise UserError(f"--workers must be at least 1, got {ranks}")
    cluster = RankedLocalCluster(
        ranks=int(ranks),
        tensor_parallel_size=tensor_parallel_size,
        host=cluster_config["host"],
        dashboard_address=cluster_config["dashboard-address"],
    )
    return Client(cluster), cluster
