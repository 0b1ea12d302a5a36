"""The worker plugin that owns one long-lived vLLM engine per worker.

The engine is built and used on one dedicated thread: vLLM's CPU backend binds OpenMP threads
to cores on the thread that builds it, and a model load of minutes must not block the
worker's event loop (heartbeats go on while it loads).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
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
# glibc's mallopt parameters, and the largest thresholds its own dynamic tuning reaches on
# 64-bit hosts (DEFAULT_MMAP_THRESHOLD_MAX, and twice that for trimming).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


@dataclass(frozen=True)
class DataParallelEnv:
    """vLLM's data-parallel variables for one rank.

    In the default independent mode every rank is its own engine of data-parallel size 1
    (vLLM refuses a data-parallel group for dense models); the values are still set
    explicitly, so a stray ``VLLM_DP_SIZE`` inherited by a worker cannot break the engine.
    In gang mode (`daskdp.gang`) the ranks form one group of size N that steps together.
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
    """Import vLLM's ``LLM`` without the import-time messages vLLM prints before configuring its logger.

    ``import vllm`` alone loads about half of it: ``LLM`` is imported lazily, and its engine
    modules take as long again.
    """
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    from vllm import LLM  # noqa: F401


def dask_setup(worker: Worker) -> None:
    """Worker preload (``preload=["daskdp.plugin"]``): start importing vLLM at once.

    The import takes seconds; it then overlaps the worker's start, the client's reading of the
    input, and the plugin's registration, instead of preceding the model load.
    """
    tempfile.tempdir = None  # a forkserver that imported vLLM chose it, before TMPDIR was set
    threading.Thread(target=import_vllm_ahead, name="daskdp-import-vllm", daemon=True).start()
    logging.getLogger("distributed.worker").addFilter(_heartbeat_without_traceback)
    logging.getLogger("distributed.worker").addFilter(_no_compute_failed_block)
    logging.getLogger("distributed.worker.state_machine").addFilter(_not_a_task_stopped_by_close)


def _heartbeat_without_traceback(record: logging.LogRecord) -> bool:
    """Keep a failed heartbeat to one line.

    At the end of a run, or on Ctrl-C, the scheduler (in the ``daskdp run`` process) may close
    while a worker's heartbeat is on its way; the worker logs that with a traceback, which
    would land in the user's terminal.
    """
    if record.getMessage().startswith("Failed to communicate with scheduler during heartbeat"):
        record.exc_info = record.exc_text = None
    return True


def _no_compute_failed_block(record: logging.LogRecord) -> bool:
    """Drop the worker's ``Compute Failed`` block, traceback and all.

    Every task on a rank is daskdp's, and the client reports each failure in one line (bad
    input, or the partition that failed); the block would land in the user's terminal first.
    """
    return not record.getMessage().startswith("Compute Failed")


def _not_a_task_stopped_by_close(record: logging.LogRecord) -> bool:
    """Drop the warning for a task the worker's close stopped.

    Ranks close mid-task only when their run is stopped (Ctrl-C, SIGTERM, ``--timeout``), and
    ``daskdp run`` says so in its own message; each rank's warning would land beside it.
    """
    return not record.getMessage().endswith("ended with CancelledError")


def import_vllm_ahead() -> None:
    """Import vLLM before an engine needs it; failures are left for the engine's load to report."""
    try:
        import_vllm()
    except BaseException:
        # The worker closed mid-import (a run that stopped early); an engine's load imports
        # vLLM again and reports what fails. A traceback here would land in the user's terminal.
        logger.debug("importing vLLM ahead of the engine stopped", exc_info=True)


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
        import vllm.envs
        from vllm import LLM

        # vLLM caches its environment variables once an engine has started in this process:
        # an engine loaded after another (independent, then a gang) must read the VLLM_DP_*
        # values set for it, not the first engine's.
        vllm.envs.disable_envs_cache()
        keep_buffers_on_heap()
        try:
            self.llm = LLM(model=self.model, **self.engine_args)
        except BaseException:
            _leave_distributed()  # a gang may have formed its world before the load failed
            raise

    def call(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(llm, *args)`` on the engine's thread and return its result."""
        self.calls += 1
        return self._thread.submit(func, self.llm, *args).result()

    def close(self) -> None:
        self._thread.submit(self._free).result()
        self._thread.shutdown()

    def _free(self) -> None:
        loaded, self.llm = self.llm is not None, None
        # vLLM freezes the objects alive after its start; frozen cycles are never collected.
        gc.unfreeze()
        gc.collect()
        if loaded:
            _leave_distributed()
        try:
            import torch
        except ImportError:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def keep_buffers_on_heap() -> None:
    """Let glibc keep the engine's buffers on the heap, as it does by default.

    Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``
    (``distributed.nanny.pre-spawn-environ``). Setting any malloc threshold also turns off
    glibc's dynamic thresholds: the mmap threshold stays at 128 KiB, so every larger buffer of
    the engine's step loop becomes a fresh ``mmap`` and ``munmap`` (generation measured 1.37x
    slower so), and the heap is given back to the system whenever 64 KiB are free at its top,
    to be faulted in again at the next step (3 times the page faults of a plain vLLM process,
    twice its system time). Both are set to where glibc's own tuning ends. Nothing on other C
    libraries.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def _leave_distributed() -> None:
    """Destroy vLLM's torch.distributed world in this process (size 1, or a gang's).

    It outlives the engine that formed it: the next engine in the process would join the old
    world instead of forming its own.
    """
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()


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
    data_parallel
        Gang mode: each member worker's data-parallel variables, by worker address, as
        `daskdp.gang.layout` computes them. ``None`` (independent mode): every ``GPU`` worker
        loads an engine of data-parallel size 1. A ``GPU`` worker missing from the mapping
        loads no engine.

    Examples
    --------
    >>> client.register_plugin(EnginePlugin("meta-llama/Llama-3.1-8B-Instruct", {}))  # doctest: +SKIP
    """

    name = PLUGIN_NAME
    idempotent = False

    def __init__(
        self,
        model: str,
        engine_args: dict[str, Any] | None = None,
        data_parallel: Mapping[str, DataParallelEnv] | None = None,
    ):
        if not isinstance(model, str) or not model:
            raise TypeError(f"model must be a path or a model name, got {model!r}")
        self.model = model
        self.engine_args = dict(engine_args or {})
        self.data_parallel = None if data_parallel is None else _checked_gang(data_parallel)
        devices = int(self.engine_args.get("tensor_parallel_size", 1)) * int(
            self.engine_args.get("pipeline_parallel_size", 1)
        )
        if self.data_parallel is not None and devices == 1:
            # For a data-parallel group vLLM picks its multiprocessing executor, which spawns
            # the model into a child process: a Dask worker (a daemon) cannot have one. The
            # in-process executor joins the group from the VLLM_DP_* variables all the same.
            self.engine_args.setdefault("distributed_executor_backend", "uni")
        self.fingerprint = engine_fingerprint(model, self.engine_args, self.data_parallel)
        self.rank: int | None = None
        self.engine: Engine | None = None

    async def setup(self, worker: Worker) -> None:
        if not worker.state.total_resources.get(GPU):
            logger.info("worker %s has no %s resource: no engine loaded", worker.address, GPU)
            return
        if self.data_parallel is None:
            self.rank = await _worker_rank(worker)
            environment = DataParallelEnv()
        elif worker.address in self.data_parallel:
            environment = self.data_parallel[worker.address]
            self.rank = environment.rank
        else:  # joined after the gang was formed, or a gang rank's restarted process
            logger.info("worker %s is not a rank of the gang: no engine loaded", worker.address)
            return
        os.environ.update(environment.environ())
        # A Dask worker is a daemon process and cannot spawn vLLM's engine-core process. In
        # process, vLLM's LLMEngine forms the data-parallel group of a gang itself.
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


def engine_fingerprint(
    model: str, engine_args: dict[str, Any], data_parallel: Mapping[str, DataParallelEnv] | None = None
) -> str:
    """A short hash of what decides which engine a worker holds: a gang's layout included."""
    spec: dict[str, Any] = {"model": model, "engine_args": engine_args}
    if data_parallel is not None:
        spec["gang"] = {address: env.environ() for address, env in data_parallel.items()}
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _checked_gang(data_parallel: Mapping[str, DataParallelEnv]) -> dict[str, DataParallelEnv]:
    envs = dict(data_parallel)
    if not envs or not all(isinstance(env, DataParallelEnv) for env in envs.values()):
        raise TypeError(f"data_parallel must map worker addresses to DataParallelEnv, got {data_parallel!r}")
    ranks = sorted(env.rank for env in envs.values())
    sizes = {env.size for env in envs.values()}
    masters = {(env.master_ip, env.master_port) for env in envs.values()}
    if ranks != list(range(len(envs))) or sizes != {len(envs)} or len(masters) != 1:
        raise ValueError(
            "data_parallel must give ranks 0..N-1, size N and one master to its N workers; "
            "compute it with daskdp.gang.layout(client, addresses)"
        )
    return envs


def rank_order(address: str, name: Any) -> tuple:
    """Sort key of the ranks: numeric worker names in number order, then other names."""
    return (0, int(name), address) if str(name).isdigit() else (1, str(name), address)


async def _worker_rank(worker: Worker) -> int:
    """This worker's position among the scheduler's ``GPU`` workers, ordered by name."""
    identity = await worker.scheduler.identity()
    workers = [
        (address, info.get("name"))
        for address, info in identity["workers"].items()
        if info.get("resources", {}).get(GPU)
    ]
    addresses = [address for address, _ in sorted(workers, key=lambda item: rank_order(*item))]
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


def gang_engine() -> Engine | None:
    """The engine of the worker running this task when it is a rank of a gang, else ``None``."""
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.data_parallel is None:
        return None
    return plugin.engine


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
    if plugin.data_parallel is not None:  # gang mode: the gang's members only
        gpu_workers = [address for address in gpu_workers if address in plugin.data_parallel]
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
            raise RunError(f"the engine for {plugin.model} did not load: {_reason(e)}") from None
        held = client.run(engine_status, workers=gpu_workers)
    ranked = sorted((status[1], address) for address, status in held.items() if status is not None)
    return [address for _, address in ranked]


def _reason(error: BaseException) -> str:
    """The line of an engine's error that says what is wrong.

    vLLM's configuration errors come from pydantic: ``1 validation error for ParallelConfig``,
    then ``  Value error, <the reason> [type=value_error, ...]``.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if re.match(r"\d+ validation errors? for ", lines[0]) and len(lines) > 1:
        return re.sub(r"^Value error, |\s*\[type=.*$", "", lines[1])
    return lines[0]
