"""The worker side of daskdp's engines: the Dask worker preload, the plugin that owns one
long-lived vLLM engine per worker, and the accessors tasks reach it through."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from distributed import WorkerPlugin, get_worker
from distributed.core import Status

from daskdp.clusters.ranks import GPU, DataParallelEnv, gpu_workers
from daskdp.engine.engine import Engine, import_vllm_ahead

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

PLUGIN_NAME = "daskdp-engine"


def dask_setup(worker: Worker) -> None:
    """Dask worker preload (``--preload daskdp.engine.plugin``): start importing vLLM at once.

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
    task
        ``generate``, or a pooling task (``embed``, ``classify``, ``score``; ``engine_args``
        then hold ``runner="pooling"``): the loaded model is checked to serve it, and an
        engine loaded for another task is replaced.
    pooling
        A pooling task's options (``pooling:`` of the configuration: ``normalize``,
        ``dimensions``): checked against the loaded model, so that a setting it refuses
        (Matryoshka dimensions on a model without them) fails the load in one line rather than
        every row.
    data_parallel
        Gang mode: each member worker's data-parallel variables, by worker address, as
        `daskdp.strategies.gang.data_parallel_layout` computes them. ``None`` (independent mode): every ``GPU`` worker
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
        task: str = "generate",
        pooling: dict[str, Any] | None = None,
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
        self.task = task
        self.pooling = dict(pooling or {})
        identity = task if not self.pooling else f"{task} {json.dumps(self.pooling, sort_keys=True)}"
        self.fingerprint = engine_fingerprint(model, self.engine_args, self.data_parallel, identity)
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
        try:
            check_task(engine.llm, self.task, self.model, self.pooling)
        except BaseException as refused:
            traceback.clear_frames(refused.__traceback__)  # they hold the engine (Engine.load)
            await asyncio.get_running_loop().run_in_executor(None, engine.close)
            raise
        self.engine = engine

    async def teardown(self, worker: Worker) -> None:
        engine, self.engine = self.engine, None
        if engine is None or worker.status in (Status.closing, Status.closing_gracefully, Status.closed):
            return  # a closing worker's process ends; freeing the engine first only delays it
        await asyncio.get_running_loop().run_in_executor(None, engine.close)


def check_task(llm: Any, task: str, model: str, pooling: dict[str, Any] | None = None) -> None:
    """Refuse a loaded model that cannot serve ``task`` (saying which model would), or the
    ``pooling`` options it refuses (vLLM's own reason)."""
    from daskdp.engine.requests import engine_pooling_params

    if task == "generate":
        return
    serves = set(llm.supported_tasks)
    if task == "score":
        one_label = getattr(llm.model_config.hf_config, "num_labels", 0) == 1
        served = "embed" in serves or ("classify" in serves and one_label)
        need = "an embedding model (scored by cosine) or a cross-encoder (a classifier with one label)"
    else:
        served = task in serves
        need = "an embedding model" if task == "embed" else "a sequence-classification model"
    if not served:
        raise ValueError(
            f"{model} cannot serve --task {task} (it serves {', '.join(sorted(serves)) or 'no pooling task'}); "
            f"give --model {need}"
        )
    engine_pooling_params(llm, task, pooling or {}).verify(llm.model_config)


def engine_fingerprint(
    model: str,
    engine_args: dict[str, Any],
    data_parallel: Mapping[str, DataParallelEnv] | None = None,
    task: str = "generate",
) -> str:
    """A short hash of what decides which engine a worker holds: the task and a gang's layout included."""
    spec: dict[str, Any] = {"model": model, "engine_args": engine_args, "task": task}
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
            "compute it with daskdp.strategies.gang.data_parallel_layout(client, addresses)"
        )
    return envs


async def _worker_rank(worker: Worker) -> int:
    """This worker's position among the scheduler's ``GPU`` workers, ordered by name."""
    identity = await worker.scheduler.identity()
    addresses = gpu_workers(identity["workers"])
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
