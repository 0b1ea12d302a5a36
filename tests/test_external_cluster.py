"""An existing cluster given by --scheduler-address: a real `dask scheduler` and `dask worker`.

The worker runs without a nanny, so nothing restarts it once it is killed. Every process a
test starts runs in its own session and is ended, with all of its session, by a finalizer
that then checks nothing of it is left.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pytest
from distributed import Client

from conftest import DASKDP, read_results
from daskdp.engine.plugin import PLUGIN_NAME, engine_status

pytestmark = pytest.mark.slow

DASK = [sys.executable, "-m", "dask"]
WORKER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
ROWS = 240
STARTUP_TIMEOUT = 15  # cluster.startup-timeout of the run whose worker is killed


def staggered_prompts(path: Path, rows: int = ROWS) -> Path:
    """Prompts whose rows finish one after another (growing max_tokens), so chunks complete in turn."""
    pd.DataFrame(
        {
            "id": [f"r{i:03d}" for i in range(rows)],
            "prompt": [f"Story {i} about the sea." for i in range(rows)],
            "max_tokens": [40 + 2 * i for i in range(rows)],
        }
    ).to_parquet(path)
    return path


def session_members(session: int) -> list[psutil.Process]:
    """The live (not zombie) processes of a session."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


class Sessions:
    """Processes started in their own sessions; :meth:`close` ends every one with its session."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.processes: list[subprocess.Popen] = []

    def start(self, command: list, log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``command`` with stdout in ``log``.out and stderr in ``log``.err."""
        with open(self.logs / f"{log}.out", "wb") as out, open(self.logs / f"{log}.err", "wb") as err:
            process = subprocess.Popen(
                [str(arg) for arg in command],
                stdout=out,
                stderr=err,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def log(self, log: str, stream: str = "err") -> str:
        return (self.logs / f"{log}.{stream}").read_text(errors="replace")

    def run(self, command: list, log: str, timeout: float = 1200) -> subprocess.Popen:
        """Run ``command`` to its end; checks it left no process of its session behind."""
        process = self.start(command, log)
        self.wait(process, log, timeout)
        return process

    def wait(self, process: subprocess.Popen, log: str, timeout: float) -> None:
        """Wait for ``process``; once it ends, no process of its session may be left."""
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{log} still runs after {timeout:g} s:\n{self.log(log)[-3000:]}") from None
        _, alive = psutil.wait_procs(session_members(process.pid), timeout=10)
        assert not alive, f"{log} left processes behind: {[p.cmdline() for p in alive]}"

    def close(self) -> None:
        for process in reversed(self.processes):
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(process.pid, sig)  # the session's group outlives its leader
                except ProcessLookupError:
                    pass
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    continue
                if not session_members(process.pid):
                    break
        left = {process.pid: session_members(process.pid) for process in self.processes}
        deadline = time.monotonic() + 30
        while any(left.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
            left = {pid: session_members(pid) for pid in left}
        assert not any(left.values()), f"processes left behind: {left}"


@pytest.fixture
def scheduler(tmp_path_factory):
    """A `dask scheduler` on tcp://127.0.0.1; yields its address.

    One per test: a scheduler keeps the worker plugins registered on it (the engine of an
    earlier run) and gives them to every worker that joins later.
    """
    logs = tmp_path_factory.mktemp("scheduler")
    sessions = Sessions(logs)
    scheduler_file = logs / "scheduler.json"
    try:
        process = sessions.start(
            [
                *DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                "--dashboard-address", "127.0.0.1:0", "--scheduler-file", scheduler_file,
            ],
            "scheduler",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # the scheduler writes its address once it listens
            try:
                address = json.loads(scheduler_file.read_text())["address"]
                break
            except (OSError, ValueError):
                assert process.poll() is None, sessions.log("scheduler")[-3000:]
                assert time.monotonic() < deadline, "the scheduler did not start in 60 s"
                time.sleep(0.1)
        assert address.startswith("tcp://127.0.0.1:")
        yield address
    finally:
        sessions.close()


@pytest.fixture
def sessions(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    sessions = Sessions(logs)
    try:
        yield sessions
    finally:
        sessions.close()


@pytest.fixture
def client(scheduler):
    with Client(scheduler, timeout=30) as client:
        yield client


@pytest.fixture
def worker(scheduler, sessions, client):
    """One GPU=1 `dask worker` without a nanny, in its own session, once it has joined: its process."""
    process = join_worker(scheduler, sessions, client, "worker")
    info = client.scheduler_info(n_workers=-1)["workers"]
    assert len(info) == 1 and next(iter(info.values()))["resources"] == {"GPU": 1}
    return process


def join_worker(scheduler: str, sessions: Sessions, client: Client, log: str) -> subprocess.Popen:
    """Start a GPU=1 `dask worker` without a nanny and wait until it has joined: its process."""
    process = sessions.start(
        [
            *DASK, "worker", scheduler, "--no-nanny", "--nthreads", "1", "--resources", "GPU=1",
            "--preload", "daskdp.engine.plugin", "--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "30",
        ],
        log,
        env=WORKER_ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while True:  # joined: the scheduler knows a worker whose process is this one
        assert process.poll() is None, sessions.log(log)[-3000:]
        # on_error: a worker that leaves meanwhile (one a test killed) is not the one joining
        pids = (
            client.run(os.getpid, on_error="ignore") if client.scheduler_info(n_workers=-1)["workers"] else {}
        )
        if process.pid in pids.values():
            return process
        assert time.monotonic() < deadline, f"{log} did not join in 120 s"
        time.sleep(0.2)


def wait_for_chunks(output: Path, process: subprocess.Popen, sessions: Sessions, timeout: float = 600):
    """The chunk records once at least one chunk is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [json.loads(p.read_text()) for p in sorted((output / "_chunks").glob("*.done.json"))]
        if records:
            return records
        assert process.poll() is None, sessions.log("run")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no chunk done after {timeout} s")


def test_no_worker_left_stops_the_run_with_a_message_and_resume_finishes_it(
    scheduler, worker, sessions, tmp_path
):
    """SIGKILL the only worker (no nanny restarts it) once a chunk is written: after
    cluster.startup-timeout seconds without a GPU worker the run exits 1, says why and how to
    continue; the printed command, on a local cluster instead, generates only what was left."""
    source = staggered_prompts(tmp_path / "prompts.parquet")
    output = tmp_path / "out"
    args = ["run", source, "-o", output, "--scheduler-address", scheduler, "--chunk-size", 20]
    run = sessions.start(
        [*DASKDP, *args], "run", env={"DASK_DASKDP__CLUSTER__STARTUP_TIMEOUT": str(STARTUP_TIMEOUT)}
    )
    wait_for_chunks(output, run, sessions)
    os.kill(worker.pid, signal.SIGKILL)
    killed = time.monotonic()
    worker.wait(timeout=30)
    sessions.wait(run, "run", timeout=STARTUP_TIMEOUT + 300)  # generous: the bound is asserted below
    elapsed = time.monotonic() - killed
    stderr = sessions.log("run")
    assert run.returncode == 1, stderr[-3000:]
    assert STARTUP_TIMEOUT - 10 < elapsed < STARTUP_TIMEOUT + 30, f"stopped {elapsed:.0f} s after the kill"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    failed = [line for line in lines if line.startswith("daskdp: run failed:")]
    assert len(failed) == 1, stderr[-3000:]
    assert f"no worker with the GPU resource has been left for {STARTUP_TIMEOUT} s" in failed[0], failed[0]
    continued = [line for line in lines if "continue with: daskdp run " in line]
    assert len(continued) == 1, stderr[-3000:]
    command = shlex.split(continued[0].split("continue with: ", 1)[1])
    assert command == ["daskdp", *map(str, args), "--resume"]
    assert (output / "_manifest.json").exists()
    done = {
        json.loads(p.read_text())["chunk"]: json.loads(p.read_text())
        for p in (output / "_chunks").glob("*.done.json")
    }
    assert 0 < len(done) < ROWS // 20, sorted(done)
    written = {record["file"]: (output / record["file"]).stat().st_mtime_ns for record in done.values()}

    flag = command.index("--scheduler-address")
    local = command[1:flag] + command[flag + 2 :]
    resumed = sessions.run([*DASKDP, *local, "--quiet"], "resumed")  # its local cluster ends with it
    assert resumed.returncode == 0, sessions.log("resumed")[-3000:]
    results = read_results(output)
    assert sorted(results["id"]) == [f"r{i:03d}" for i in range(ROWS)]
    assert results["error"].isna().all()
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["rows_skipped"] > 0
    assert summary["rows_skipped"] + summary["rows_generated"] == ROWS
    assert summary["rows_skipped"] == sum(record["rows"] for record in done.values())
    for name, mtime in written.items():  # the chunks written before the kill were kept as they were
        assert (output / name).stat().st_mtime_ns == mtime, name


def test_a_warm_external_cluster_is_reused(scheduler, worker, client, sessions, tmp_path):
    """Two runs on the same cluster: the first loads the engine, the second uses the same one.

    The engine object (and its vllm.LLM) is marked on the worker after the first run; a
    second load would make a new one, without the mark."""
    (address,) = client.scheduler_info(n_workers=-1)["workers"]
    assert client.run(engine_status) == {address: None}
    inputs = []
    for name in ("first", "second"):
        source = tmp_path / f"{name}.jsonl"
        rows = [{"id": f"{name}-{i}", "prompt": f"Short prompt {i} for the {name} run."} for i in range(6)]
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
        inputs.append((source, tmp_path / f"{name}.out", [row["id"] for row in rows]))

    def run(source, output, ids) -> None:
        command = [*DASKDP, "run", source, "-o", output, "--scheduler-address", scheduler]
        done = sessions.run([*command, "--max-tokens", 4, "--quiet"], output.name)
        assert done.returncode == 0, sessions.log(output.name)[-3000:]
        assert sorted(read_results(output)["id"]) == sorted(ids)

    def mark(token, dask_worker):
        engine = dask_worker.plugins[PLUGIN_NAME].engine
        engine.test_mark = engine.llm.test_mark = token
        return engine.calls

    def inspect(dask_worker):
        engine = dask_worker.plugins[PLUGIN_NAME].engine
        return getattr(engine, "test_mark", None), getattr(engine.llm, "test_mark", None), engine.calls

    run(*inputs[0])
    loaded = client.run(engine_status)
    assert list(loaded) == [address] and loaded[address] is not None and loaded[address][1] == 0
    token = uuid.uuid4().hex
    calls = client.run(mark, token)[address]
    assert calls > 0

    run(*inputs[1])
    assert client.run(engine_status) == loaded
    marked_engine, marked_llm, calls_after = client.run(inspect)[address]
    assert (marked_engine, marked_llm) == (token, token), "the second run loaded the engine again"
    assert calls_after > calls, "the second run did not generate on the engine the first one loaded"


@pytest.mark.parametrize("partitioning", ["balanced", "dynamic"])
def test_a_worker_that_joins_takes_work(scheduler, worker, client, sessions, tmp_path, partitioning):
    """A GPU worker started mid-run gets the engine from the scheduler's plugin and, once it has
    loaded it, takes partitions (dynamic) or half the unstarted chunks of the busy rank's
    partition (balanced: the run planned one partition); every row once."""
    rows = 6000  # outlasts the join: under load 3,000 rows were done before the joined rank loaded
    source = tmp_path / "prompts.parquet"
    pd.DataFrame(
        {"id": range(rows), "prompt": [f"Item {i}: describe it." for i in range(rows)], "max_tokens": 96}
    ).to_parquet(source)
    output = tmp_path / "out"
    command = [*DASKDP, "run", source, "-o", output, "--scheduler-address", scheduler, "--ignore-eos"]
    command += ["--chunk-size", 100, "--partitioning", partitioning, "--quiet"]
    run = sessions.start(command, "run")
    wait_for_chunks(output, run, sessions)
    join_worker(scheduler, sessions, client, "joined")
    sessions.wait(run, "run", timeout=900)
    assert run.returncode == 0, sessions.log("run")[-3000:]
    results = read_results(output)
    assert sorted(results["id"]) == list(range(rows)) and results["error"].isna().all()
    by_worker = results.groupby("worker").size()
    assert len(by_worker) == 2, f"the joined worker took no work: {by_worker.to_dict()}"
