"""Ranks: the ``GPU`` resource that marks them, their launch environments, their Dask settings,
vLLM's data-parallel variables, and the one listing of a cluster's ``GPU`` workers in rank order.

Each rank is one worker process carrying the Dask resource ``GPU`` (its tensor-parallel size).
Devices are pinned in the worker's launch environment, before CUDA or OpenMP start: rank ``i``
sees only its own GPUs (``CUDA_VISIBLE_DEVICES``) or, on a host without GPUs, its own cores
(``VLLM_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daskdp.errors import RunError, UserError

if TYPE_CHECKING:
    from distributed import Client

GPU = "GPU"
# Dask's periodic work that runs beside the engines, on the cores they keep busy: the worker's
# statistical profiler, the system monitor's host-wide disk counters, and the timers that wake
# every event loop dozens of times a second. Slower timers leave the engines those cores; the
# dashboard keeps its CPU, memory and network plots, updated every 2 s.
RANK_DASK_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.disk": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "500ms",
}


def visible_gpus() -> list[str]:
    """The GPUs this host offers: ``CUDA_VISIBLE_DEVICES`` when set, else the NVIDIA devices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device for device in visible.split(",") if device.strip()]
    devices = glob.glob("/dev/nvidia[0-9]*")
    return sorted((path.removeprefix("/dev/nvidia") for path in devices), key=int)


# vLLM's INFO and WARNING lines and its load bars from every rank drown the progress display.
QUIET = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}

# One compute thread per rank on a host without GPUs: with more, OpenMP's threads and the
# engine's Python thread fight over the rank's cores.
CPU_RANK_THREADS = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def quiet_environment() -> dict[str, str]:
    return {key: os.environ.get(key, value) for key, value in QUIET.items()}


def rank_environments(ranks: int, tensor_parallel_size: int) -> list[dict[str, str]]:
    """Launch environment of each rank: its own GPUs, or on a CPU host its own cores."""
    common = quiet_environment()
    gpus = visible_gpus()
    if gpus:
        needed = ranks * tensor_parallel_size
        if needed > len(gpus):
            raise UserError(
                f"{ranks} workers x tensor_parallel_size {tensor_parallel_size} need {needed} GPUs "
                f"but this host has {len(gpus)}; pass --workers {len(gpus) // tensor_parallel_size}"
            )
        return [
            {
                **common,
                "CUDA_VISIBLE_DEVICES": ",".join(
                    gpus[i * tensor_parallel_size : (i + 1) * tensor_parallel_size]
                ),
            }
            for i in range(ranks)
        ]
    cores = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cores) // ranks)
    environments = []
    for i in range(ranks):
        own = [cores[(i * per_rank + j) % len(cores)] for j in range(per_rank)]
        environments.append(
            {**common, "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, own)), **CPU_RANK_THREADS}
        )
    return environments


def default_ranks(tensor_parallel_size: int) -> int:
    """One rank per group of ``tensor_parallel_size`` GPUs; 1 on a host without GPUs."""
    gpus = visible_gpus()
    return max(1, len(gpus) // tensor_parallel_size) if gpus else 1


@dataclass(frozen=True)
class DataParallelEnv:
    """vLLM's data-parallel variables for one rank.

    In the default independent mode every rank is its own engine of data-parallel size 1
    (vLLM refuses a data-parallel group for dense models); the values are still set
    explicitly, so a stray ``VLLM_DP_SIZE`` inherited by a worker cannot break the engine.
    In gang mode (`daskdp.strategies.gang`) the ranks form one group of size N that steps together.
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


def rank_order(address: str, name: Any) -> tuple:
    """Sort key of the ranks: numeric worker names in number order, then other names."""
    return (0, int(name), address) if str(name).isdigit() else (1, str(name), address)


def gpu_workers(workers: dict[str, dict[str, Any]]) -> list[str]:
    """The addresses of the ``GPU`` workers among the scheduler's ``workers`` (its
    ``scheduler_info()["workers"]`` or ``identity()["workers"]``), in rank order."""
    ranked = [
        (address, info.get("name")) for address, info in workers.items() if info.get("resources", {}).get(GPU)
    ]
    return [address for address, _ in sorted(ranked, key=lambda item: rank_order(*item))]


def cluster_gpu_workers(client: Client) -> list[str]:
    """The client's cluster's ``GPU`` workers, in rank order."""
    return gpu_workers(client.scheduler_info(n_workers=-1)["workers"])


def wait_for_gpu_workers(client: Client, timeout: float) -> list[str]:
    """The cluster's ``GPU`` workers in rank order, once a worker has joined; refuses a cluster without."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise RunError(f"no Dask worker joined the scheduler within {timeout:g} s") from None
    workers = cluster_gpu_workers(client)
    if not workers:
        raise UserError(
            f"no worker of the cluster at {client.scheduler.address} has the {GPU} resource; "
            f"start workers with `dask worker ADDRESS --resources {GPU}=1`"
        )
    return workers
