"""The worker plugin on real Dask workers: environment, one engine per worker, GPU resource."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import cloudpickle
import pandas as pd
import pytest
from distributed import Client

import daskdp
from conftest import PARITY_PROMPTS, count_engines, read_results
from daskdp import config
from daskdp.engine.loop import GenerationRequest, generate_partition
from daskdp.engine.plugin import PLUGIN_NAME, EnginePlugin
from daskdp.strategies.engines import ensure_engines

# Functions of this module run on workers started outside pytest, which cannot import it.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tiny_plugin() -> EnginePlugin:
    model, engine_args = config.engine_arguments(config.load(), gpu_host=False)
    return EnginePlugin(model, engine_args)


def engine_calls(dask_worker) -> int | None:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return None if plugin is None or plugin.engine is None else plugin.engine.calls


@pytest.fixture(scope="module")
def mixed_cluster():
    """A scheduler with one GPU worker and one without the GPU resource, both started as
    `dask worker` processes that inherit a stray VLLM_DP_SIZE=4."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0")
    client = Client(cluster)
    worker = [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        cluster.scheduler_address,
        "--nthreads",
        "1",
    ]
    worker += ["--host", "127.0.0.1", "--no-dashboard"]
    env = {**os.environ, "VLLM_DP_SIZE": "4"}
    workers = [
        subprocess.Popen(
            [*worker, "--name", "gpu", "--resources", "GPU=1", "--preload", "daskdp.engine.plugin"], env=env
        ),
        subprocess.Popen([*worker, "--name", "cpu-only"], env=env),
    ]
    client.wait_for_workers(2, timeout=120)
    yield cluster, client
    client.close()
    cluster.close()
    for process in workers:
        process.terminate()
        process.wait(timeout=30)


def test_environment_on_every_rank(cluster):
    """Each rank has its own cores, no engine-core subprocess, and explicit VLLM_DP_* values."""
    _, client = cluster
    ranks = ensure_engines(client, tiny_plugin(), timeout=300)
    keys = ["VLLM_DP_RANK", "VLLM_DP_RANK_LOCAL", "VLLM_DP_SIZE", "VLLM_ENABLE_V1_MULTIPROCESSING",
            "VLLM_CPU_OMP_THREADS_BIND"]  # fmt: skip
    seen = client.run(lambda: {key: os.environ.get(key) for key in keys}, workers=ranks)
    assert [env["VLLM_DP_SIZE"] for env in seen.values()] == ["1", "1"]
    assert all(env["VLLM_DP_RANK"] == "0" and env["VLLM_DP_RANK_LOCAL"] == "0" for env in seen.values())
    assert all(env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" for env in seen.values())
    assert sorted(env["VLLM_CPU_OMP_THREADS_BIND"] for env in seen.values()) == ["0", "1"]
    ranks_seen = client.run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].rank, workers=ranks)
    assert [ranks_seen[address] for address in ranks] == [0, 1]


def test_registering_twice_keeps_one_engine(cluster):
    """A second registration of the plugin replaces the first: still one LLM per worker."""
    _, client = cluster
    client.register_plugin(tiny_plugin())
    client.register_plugin(tiny_plugin())
    assert set(client.run(count_engines).values()) == {1}


def test_warm_engines_are_reused(cluster):
    """ensure_engines loads nothing when the workers already hold the same engine."""
    _, client = cluster
    ensure_engines(client, tiny_plugin(), timeout=300)
    before = client.run(lambda dask_worker: id(dask_worker.plugins[PLUGIN_NAME].engine))
    start = time.perf_counter()
    ensure_engines(client, tiny_plugin(), timeout=300)
    assert time.perf_counter() - start < 30  # a reload would go through vLLM's whole start
    assert client.run(lambda dask_worker: id(dask_worker.plugins[PLUGIN_NAME].engine)) == before


def test_stray_data_parallel_size_does_not_break_the_engine(mixed_cluster):
    """A worker that inherited VLLM_DP_SIZE=4 still starts its engine, with the value set to 1."""
    _, client = mixed_cluster
    launched = client.run(lambda: open("/proc/self/environ", "rb").read().split(b"\0"))
    assert all(b"VLLM_DP_SIZE=4" in environ for environ in launched.values())  # the stray value arrived
    (gpu_worker,) = ensure_engines(client, tiny_plugin(), timeout=300)
    assert client.run(lambda: os.environ["VLLM_DP_SIZE"], workers=[gpu_worker]) == {gpu_worker: "1"}


def test_worker_without_gpu_never_generates(mixed_cluster, tmp_path):
    """Generation runs only on the GPU worker; the other one loads no engine."""
    cluster, client = mixed_cluster
    source = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": PARITY_PROMPTS}).to_parquet(source)
    daskdp.run(
        str(source), str(tmp_path / "out"), overrides={"cluster.scheduler-address": cluster.scheduler_address,
                                                       "sampling.max-tokens": 4}, progress=None,
    )  # fmt: skip
    results = read_results(tmp_path / "out")
    calls = client.run(engine_calls)
    gpu_worker = next(address for address, n in calls.items() if n is not None)
    assert len(results) == len(PARITY_PROMPTS)
    assert set(results["worker"]) == {gpu_worker}
    assert [n for address, n in calls.items() if address != gpu_worker] == [None]


def test_task_on_a_worker_without_engine_says_what_to_do(mixed_cluster):
    """The engine accessor fails with a message naming the fix."""
    _, client = mixed_cluster
    ensure_engines(client, tiny_plugin(), timeout=300)
    calls = client.run(engine_calls)
    cpu_worker = next(address for address, n in calls.items() if n is None)
    request = GenerationRequest(sampling=config.load()["sampling"])
    future = client.submit(
        generate_partition, pd.DataFrame({"prompt": ["hi"]}), request, workers=[cpu_worker]
    )
    with pytest.raises(RuntimeError, match="no GPU resource.*resources="):
        future.result(timeout=60)


def test_generate_is_lazy(mixed_cluster):
    """daskdp.generate returns a lazy DataFrame: no engine call until it is computed."""
    _, client = mixed_cluster
    frame = pd.DataFrame({"prompt": PARITY_PROMPTS[:8]})
    results = daskdp.generate(frame, client=client, max_tokens=4)
    before = {a: n for a, n in client.run(engine_calls).items() if n is not None}
    time.sleep(1)
    assert {a: n for a, n in client.run(engine_calls).items() if n is not None} == before
    computed = client.compute(results, resources={"GPU": 1}).result()
    after = {a: n for a, n in client.run(engine_calls).items() if n is not None}
    assert sum(after.values()) > sum(before.values())
    assert list(computed["id"]) == list(range(8))
    assert computed["error"].isna().all() and (computed["output_tokens"] == 4).all()


def test_a_failed_heartbeat_is_one_line():
    """A worker whose scheduler closed first (Ctrl-C, end of run) says so without a traceback."""
    import io
    import logging

    from daskdp.engine.plugin import _heartbeat_without_traceback

    logger = logging.getLogger("daskdp-test-heartbeat")
    logger.addFilter(_heartbeat_without_traceback)
    stream = io.StringIO()
    logger.addHandler(logging.StreamHandler(stream))
    try:
        raise OSError("Stream is closed")
    except OSError:
        logger.exception("Failed to communicate with scheduler during heartbeat.")
        logger.exception("Unexpected exception during heartbeat. Closing worker.")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Failed to communicate with scheduler during heartbeat."
    assert lines[2] == "Traceback (most recent call last):"  # other errors keep theirs
