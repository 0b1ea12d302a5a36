"""Clusters: make or connect the Dask cluster whose workers are daskdp's ranks.

`connect` picks the kind: a running scheduler (`remote`), batch jobs on SLURM or PBS
(`jobqueue`), or ranks on this host (`local`). Each is imported only when chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daskdp.errors import UserError

if TYPE_CHECKING:
    from distributed import Client, SpecCluster


def connect(cluster_config: dict[str, Any], tensor_parallel_size: int) -> tuple[Client, SpecCluster | None]:
    """A client on the configured scheduler, or on a new cluster that the caller closes.

    ``cluster.scheduler-address``: the running scheduler there (`daskdp.clusters.remote`).
    ``cluster.type`` slurm or pbs submits one job per rank (`daskdp.clusters.jobqueue`); local
    starts the ranks on this host (`daskdp.clusters.local`).
    """
    address = cluster_config["scheduler-address"]
    kind = cluster_config.get("type") or "local"
    if address and kind != "local":
        raise UserError(f"--scheduler-address and --cluster {kind} exclude each other; pass one")
    if kind != "local":
        from daskdp.clusters import jobqueue

        return jobqueue.start(cluster_config, tensor_parallel_size)
    if address:
        from daskdp.clusters.remote import connect_scheduler

        return connect_scheduler(cluster_config, address), None
    from daskdp.clusters.local import start_local

    return start_local(cluster_config, tensor_parallel_size)
