"""Make or connect the Dask cluster whose workers are daskdp's ranks.

Each rank is one worker process carrying the Dask resource ``GPU`` (its tensor-parallel size).
Devices are pinned in the worker's launch environment, before CUDA or OpenMP start: rank ``i``
sees only its own GPUs (``CUDA_VISIBLE_DEVICES``) or, on a host without GPUs, its own cores
(``VLLM_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import asyncio
import copy
import glob
import os
from typing import Any

import dask.config
from distributed import Client, LocalCluster

from daskdp.errors import UserError

GPU = "GPU"


def visible_gpus() -> list[str]:
    """The GPUs this host offers: ``CUDA_VISIBLE_DEVICES`` when set, else the NVIDIA devices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device for device in visible.split(",") if device.strip()]
    devices = glob.glob("/dev/nvidia[0-9]*")
    return sorted((path.removeprefix("/dev/nvidia") for path in devices), key=int)


def rank_environments(ranks: int, tensor_parallel_size: int) -> list[dict[str, str]]:
    """Launch environment of each rank: its own GPUs, or on a CPU host its own cores."""
    # vLLM's INFO and WARNING lines and its load bars from every rank drown the progress display.
    quiet = {
        "VLLM_LOGGING_LEVEL": "ERROR",
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }
    common = {key: os.environ.get(key, value) for key, value in quiet.items()}
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
            {
                **common,
                "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, own)),
                # One compute thread per rank: with more, OpenMP's threads and the engine's Python
                # thread fight over the rank's cores (2 threads on 2 cores ran 2x slower here).
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
            }
        )
    return environments


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
        # vLLM spawns its tensor-parallel workers: a worker process must be able to have children.
        with dask.config.set({"distributed.worker.daemon": tensor_parallel_size == 1}):
            super().__init__(
                n_workers=0,
                threads_per_worker=1,
                processes=True,
                host=host,
                dashboard_address=dashboard_address,
                resources={GPU: tensor_parallel_size},
                preload=["daskdp.plugin"],  # starts importing vLLM as each worker starts
                **kwargs,
            )
            self.scale(ranks)
            self.sync(self._correct_state)

    def stop_ranks(self, grace: float = 0.5) -> None:
        """End the worker processes now, giving each ``grace`` seconds before SIGKILL.

        For the end of a run whose results are on disk: a worker holding an engine otherwise
        spends seconds freeing it and finalising torch before it exits.
        """

        async def stop() -> None:
            await asyncio.gather(*(nanny.close(timeout=grace) for nanny in self.workers.values()))

        self.sync(stop)

    def new_worker_spec(self):
        rank = min(set(range(len(self.rank_environments))) - set(self.worker_spec), default=None)
        if rank is None:
            raise ValueError(f"all {len(self.rank_environments)} ranks of this cluster are running")
        spec = copy.deepcopy(self.new_spec)
        spec["options"]["env"] = {**spec["options"].get("env", {}), **self.rank_environments[rank]}
        return {rank: spec}


def default_ranks(tensor_parallel_size: int) -> int:
    """One rank per group of ``tensor_parallel_size`` GPUs; 1 on a host without GPUs."""
    gpus = visible_gpus()
    return max(1, len(gpus) // tensor_parallel_size) if gpus else 1


def connect(cluster_config: dict[str, Any], tensor_parallel_size: int) -> tuple[Client, LocalCluster | None]:
    """A client on the configured scheduler, or on a new local cluster that the caller closes."""
    address = cluster_config["scheduler-address"]
    if address:
        try:
            client = Client(address, timeout=cluster_config["startup-timeout"])
        except OSError as e:
            raise UserError(
                f"cannot reach the Dask scheduler at {address} ({e}); "
                "check --scheduler-address and that `dask scheduler` is running"
            ) from None
        return client, None
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
