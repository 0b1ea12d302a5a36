"""The local cluster: one pinned worker process per rank, listening on 127.0.0.1."""

from __future__ import annotations

import multiprocessing
import os

import dask.config
import psutil
import pytest
from distributed import Client

from conftest import daskdp_cli
from daskdp.clusters.local import RankedLocalCluster
from daskdp.clusters.ranks import (
    RANK_DASK_CONFIG,
    default_ranks,
    rank_environments,
    visible_gpus,
)
from daskdp.errors import UserError


def test_gpu_ranks_see_only_their_own_devices(monkeypatch):
    """On a GPU host rank i gets CUDA_VISIBLE_DEVICES for its own tensor-parallel group."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    environments = rank_environments(2, tensor_parallel_size=2)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in environments] == ["0,1", "2,3"]
    assert default_ranks(tensor_parallel_size=1) == 4 and default_ranks(tensor_parallel_size=2) == 2
    with pytest.raises(UserError, match="need 6 GPUs but this host has 4; pass --workers 2"):
        rank_environments(3, tensor_parallel_size=2)


def test_cpu_ranks_get_their_own_cores(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    binds = [env["VLLM_CPU_OMP_THREADS_BIND"] for env in rank_environments(2, 1)]
    assert binds == ["0,1", "2,3"]


def test_tensor_parallel_workers_may_have_children():
    """With tensor_parallel_size > 1 the workers are not daemons and carry GPU=K."""
    with RankedLocalCluster(ranks=1, tensor_parallel_size=2) as cluster, Client(cluster) as client:
        daemons = client.run(lambda: multiprocessing.current_process().daemon)
        resources = [w["resources"] for w in client.scheduler_info()["workers"].values()]
    assert list(daemons.values()) == [False]
    assert resources == [{"GPU": 2}]


def test_local_cluster_listens_on_loopback_only(cluster):
    cluster, client = cluster
    addresses = [cluster.scheduler_address, *client.scheduler_info()["workers"]]
    assert len(addresses) == 3
    assert all(address.startswith("tcp://127.0.0.1:") for address in addresses)
    assert "127.0.0.1" in client.dashboard_link


def test_cpu_ranks_are_forked_with_vllm_imported(cluster):
    """On a host without GPUs the ranks fork from one process that imported vLLM (and torch)."""
    if visible_gpus():
        pytest.skip("GPU hosts start their ranks with spawn")
    _, client = cluster

    def parent():
        process = psutil.Process().parent()
        libraries = {os.path.basename(mapping.path) for mapping in process.memory_maps()}
        return " ".join(process.cmdline()), "libtorch_cpu.so" in libraries

    parents = list(client.run(parent).values())
    assert len(parents) == 2 and parents[0] == parents[1]
    command, torch_loaded = parents[0]
    assert "multiprocessing.forkserver" in command and torch_loaded


def test_ranks_run_nothing_of_dask_beside_the_engine(cluster):
    """Dask's profiler and disk counters are off in the ranks, its timers slower, and only there."""
    _, client = cluster
    settings = client.run(
        lambda: (
            [dask.config.get(key) for key in RANK_DASK_CONFIG]
            + [dask.config.get("distributed.worker.daemon")]
        )
    )
    assert list(settings.values()) == [[*RANK_DASK_CONFIG.values(), True]] * 2
    # this process keeps Dask's defaults, its workers' start method among them
    assert all(dask.config.get(key) != value for key, value in RANK_DASK_CONFIG.items())
    assert dask.config.get("distributed.worker.multiprocessing-method") == "spawn"


@pytest.mark.gpu
def test_generation_on_real_gpus(tmp_path):
    """On a CUDA host, daskdp run with the configured GPU model (DASKDP_TEST_GPU_MODEL)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not os.environ.get("DASKDP_TEST_GPU_MODEL"):
        pytest.skip("needs CUDA GPUs and DASKDP_TEST_GPU_MODEL naming a local model directory")
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "Hello"}\n{"prompt": "World"}\n')
    done = daskdp_cli("run", source, "--model", os.environ["DASKDP_TEST_GPU_MODEL"], "--max-tokens", 8)
    assert done.returncode == 0, done.stderr[-3000:]
