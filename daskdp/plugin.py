"""The worker plugin that owns one long-lived vLLM engine per worker.

The engine is built and used on one dedicated thread: vLLM's CPU backend binds OpenMP threads
to cores on the thread that builds it, and a model load of minutes must not block the
worker's event loop (heartbeats go on while it loads).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from distributed import WorkerPlugin, get_worker
from distributed.core import Status

from daskdp.cluster import GPU
from daskdp.errors import RunError, UserError

if TYPE_CHECKING:
    from distributed import Client, Worker
    from vllm import LLM

logger = logging.getLogger(__name__)

PLUGIN_NAME = "daskdp-engine"
T = TypeVar("T")


@dataclass(frozen=True)
class DataParallelEnv:
    """vLLM's data-parallel variables for one rank.

    In the default independent mode every rank is its own engine of data-parallel size 1
    (vLLM refuses a data-parallel group for dense models); the values are still set
    explicitly, so a stray ``VLLM_DP_SIZE`` inherited by a worker cannot break the engine.
    """

    rank: int = 0
    rank_local: int = 0
    size: int = 1
    master_ip: str = "127.0.0.1"
    master_port: int = 0

    def environ(self) -> dict[str, str]:
        return {
            "VLLM_DP_RANK": str(self.rank),
            "VLLM_DP_RANK_LOCAL": str(self.rank_local),
            "VLLM_DP_SIZE": str(self.size),
            "VLLM_DP_MASTER_IP": self.master_ip,
            "VLLM_DP_MASTER_PORT": str(self.master_port),
        }


def import_vllm() -> None:
    """Import vLLM without the import-time messages it prints before configuring its logger."""
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    import vllm  # noqa: F401


def dask_setup(worker: Worker) -> None:
    """Worker preload (``preload=["daskdp.plugin"]``): start importing vLLM at once.

    The import takes seconds; it then overlaps the worker's start, the client's reading of the
    input, and the plugin's registration, instead of preceding the model load.
    """
    threading.Thread(target=import_vllm, name="daskdp-import-vllm", daemon=True).start()


class Engine:
    """One ``vllm.LLM`` and the thread it lives on; :meth:`call` runs work there."""

    def __init__(self, model: str, engine_args: dict[str, Any]):
        self.model = model
        self.engine_args = engine_args
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="daskdp-engine")
        self.llm: LLM | None = None
        self.calls = 0  # batches generated, for diagnostics

    def load(self) -> None:
        import_vllm()
        from vllm import LLM

        self.llm = LLM(model=self.model, **self.engine_args)

    def call(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(llm, *args)`` on the engine's thread and return its result."""
        self.calls += 1
        return self._thread.submit(func, self.llm, *args).result()

    def close(self) -> None:
        self._thread.submit(self._free).result()
        self._thread.shutdown()

    def _free(self) -> None:
        self.llm = None
        # vLLM freezes the objects alive after its start; frozen cycles are never collected.
        gc.unfreeze()
        gc.collect()
        try:
            import torch
        except ImportError:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class EnginePlugin(WorkerPlugin):
    """Load one vLLM engine on every worker that carries the ``GPU`` resource.

    Registering a plugin with the same ``name`` replaces the previous one: the old engine is
    freed before the new one loads, so a worker never holds two.

    Parameters
    ----------
    model
        A local model directory or a Hugging Face model name.
    engine_args
        Keyword arguments for ``vllm.LLM``.

    Examples
    --------
    >>> client.register_plugin(EnginePlugin("meta-llama/Llama-3.1-8B-Instruct", {}))  # doctest: +SKIP
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, model: str, engine_args: dict[str, Any] | None = None):
        if not isinstance(model, str) or not model:
            raise TypeError(f"model must be a path or a model name, got {model!r}")
        self.model = model
        self.engine_args = dict(engine_args or {})
        self.fingerprint = engine_fingerprint(model, self.engine_args)
        self.rank: int | None = None
        self.engine: Engine | None = None

    async def setup(self, worker: Worker) -> None:
        if not worker.state.total_resources.get(GPU):
            logger.info("worker %s has no %s resource: no engine loaded", worker.address, GPU)
            return
        self.rank = await _worker_rank(worker)
        os.environ.update(DataParallelEnv().environ())
        # A Dask worker is a daemon process and cannot spawn vLLM's engine-core process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        engine = Engine(self.model, self.engine_args)
        logger.info("rank %d loading %s", self.rank, self.model)
        await asyncio.get_running_loop().run_in_executor(engine._thread, engine.load)
        self.engine = engine

    async def teardown(self, worker: Worker) -> None:
        engine, self.engine = self.engine, None
        if engine is None or worker.status in (Status.closing, Status.closing_gracefully, Status.closed):
            return  # a closing worker's process ends; freeing the engine first only delays it
        await asyncio.get_running_loop().run_in_executor(None, engine.close)


def engine_fingerprint(model: str, engine_args: dict[str, Any]) -> str:
    """A short hash of what decides which engine a worker holds."""
    spec = json.dumps({"model": model, "engine_args": engine_args}, sort_keys=True, default=str)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


async def _worker_rank(worker: Worker) -> int:
    """This worker's position among the scheduler's ``GPU`` workers, ordered by name."""
    identity = await worker.scheduler.identity()
    workers = [
        (address, info.get("name"))
        for address, info in identity["workers"].items()
        if info.get("resources", {}).get(GPU)
    ]

    def order(item):
        address, name = item
        return (0, int(name), address) if str(name).isdigit() else (1, str(name), address)

    addresses = [address for address, _ in sorted(workers, key=order)]
    return addresses.index(worker.address) if worker.address in addresses else len(addresses)


def get_engine() -> tuple[Engine, int]:
    """The engine of the worker running this task, with the worker's rank.

    Raises a ``RuntimeError`` that says what to do when the worker has none.
    """
    worker = get_worker()
    try:
        plugin = worker.plugins[PLUGIN_NAME]
    except KeyError as e:
        raise RuntimeError(
            f"worker {worker.address} on {socket.gethostname()} has no daskdp engine; "
            "generate through daskdp.generate(...) or daskdp.run(...), or register "
            "daskdp.EnginePlugin(model, engine_args) with client.register_plugin"
        ) from e
    if plugin.engine is None:
        raise RuntimeError(
            f"worker {worker.address} holds no daskdp engine because it has no {GPU} resource; "
            f"compute generation with resources={{'{GPU}': 1}} "
            "(client.compute(results, resources=...)) so it runs only on GPU workers"
        )
    return plugin.engine, plugin.rank


def engine_status(dask_worker: Worker) -> tuple[str, int] | None:
    """Run on a worker (``client.run``): fingerprint and rank of the engine it holds, if any."""
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.engine is None:
        return None
    return plugin.fingerprint, plugin.rank


def ensure_engines(client: Client, plugin: EnginePlugin, timeout: float) -> list[str]:
    """Load ``plugin``'s engine on every ``GPU`` worker, unless they already hold it.

    Returns the addresses of the workers holding the engine, ordered by rank. A cluster kept
    warm between runs of the same model loads nothing.
    """
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise RunError(f"no Dask worker joined the scheduler within {timeout:g} s") from None
    workers = client.scheduler_info(n_workers=-1)["workers"]
    gpu_workers = [address for address, info in workers.items() if info.get("resources", {}).get(GPU)]
    if not gpu_workers:
        raise UserError(
            f"no worker of the cluster at {client.scheduler.address} has the {GPU} resource; "
            f"start workers with `dask worker ADDRESS --resources {GPU}=1`"
        )
    held = client.run(engine_status, workers=gpu_workers)
    if any(status is None or status[0] != plugin.fingerprint for status in held.values()):
        try:
            client.register_plugin(plugin)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunError(f"the engine for {plugin.model} did not load: {reason}") from None
        held = client.run(engine_status, workers=gpu_workers)
    ranked = sorted((status[1], address) for address, status in held.items() if status is not None)
    return [address for _, address in ranked]
