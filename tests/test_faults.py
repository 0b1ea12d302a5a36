"""Nothing lost, nothing twice: killed workers, a killed run, signals, timeouts, resume.

Every test here kills or stops real processes (the client, the local cluster's workers) or
runs a real engine past a timeout, then checks the output a user would: every input row
exactly once, greedy texts equal to plain vLLM's, and a resume that redoes nothing finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pandas as pd
import psutil
import pytest

from conftest import DASKDP, daskdp_cli, plain_vllm, read_results

pytestmark = pytest.mark.slow

ROWS = 160


def staggered_prompts(path, rows=ROWS):
    """Prompts whose rows finish one after another (growing max_tokens), so chunks complete in turn."""
    pd.DataFrame(
        {
            "id": [f"r{i:03d}" for i in range(rows)],
            "prompt": [f"Story {i} about the sea." for i in range(rows)],
            "max_tokens": [24 + 3 * i for i in range(rows)],
        }
    ).to_parquet(path)
    return path


def start_run(*args, env=None) -> subprocess.Popen:
    """``daskdp run`` in its own process group, as a shell would start it."""
    return subprocess.Popen(
        [*DASKDP, "run", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def wait_for_chunks(output, count: int, process: subprocess.Popen, timeout: float = 300) -> list[dict]:
    """The chunk records once at least ``count`` chunks are done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [json.loads(p.read_text()) for p in sorted((output / "_chunks").glob("*.done.json"))]
        if len(records) >= count:
            return records
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} chunks done after {timeout} s")


def family(process: subprocess.Popen) -> list[psutil.Process]:
    return [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone meanwhile
        return ""


def assert_gone(processes: list[psutil.Process]) -> None:
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"processes left behind: {[p.cmdline() for p in alive]}"


def assert_exactly_once(output, rows=ROWS) -> pd.DataFrame:
    results = read_results(output)
    assert sorted(results["id"]) == [f"r{i:03d}" for i in range(rows)]
    return results


def assert_greedy_texts(results: pd.DataFrame, ids: list[str]) -> None:
    """Rows' texts equal plain vLLM's for the same prompt and max_tokens."""
    rows = results.set_index("id").loc[ids]
    oracle = plain_vllm(list(rows["prompt"]), max_tokens_per_prompt=rows["max_tokens"], temperature=0.0)
    assert [text for text, *_ in oracle["prompts"]] == list(rows["generated_text"])


def test_a_killed_worker_loses_nothing_and_redoes_no_finished_chunk(tmp_path):
    """SIGKILL a rank's worker process (found by pid) mid-generation: its partition reruns on a
    live worker, skips the chunks already written, and every row is there exactly once. The
    worker's nanny restarts it forked from the forkserver, as it started."""
    source = staggered_prompts(tmp_path / "prompts.parquet")
    output = tmp_path / "out"
    process = start_run(source, "-o", output, "--workers", 2, "--chunk-size", 20, "--quiet")
    records = wait_for_chunks(output, 2, process)
    victim = records[0]["worker"]
    port = int(victim.rsplit(":", 1)[1])
    workers = [p for p in family(process) if "dask worker" in " ".join(p.cmdline())]
    (target,) = [
        p for p in workers if any(c.laddr.port == port and c.status == "LISTEN" for c in p.net_connections())
    ]
    forkserver, known = target.ppid(), {p.pid for p in family(process)}
    target.kill()
    deadline = time.monotonic() + 60
    while not (
        new := [p for p in family(process) if p.pid not in known and "dask worker" in command_line(p)]
    ):
        assert process.poll() is None and time.monotonic() < deadline, "the killed worker was not restarted"
        time.sleep(0.1)
    assert new[0].ppid() == forkserver, f"restarted by {command_line(psutil.Process(new[0].ppid()))}"
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]

    results = assert_exactly_once(output).set_index("id")
    assert results["error"].isna().all()
    for record in records:  # chunks finished before the kill were not generated again
        rows = results.loc[record["first_id"] : record["last_id"]]
        assert len(rows) == record["rows"] and (rows["worker"] == record["worker"]).all()
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["rows_generated"] == ROWS and summary["rows_skipped"] == 0
    final = [json.loads(p.read_text()) for p in sorted((output / "_chunks").glob("*.done.json"))]
    rerun = [r for r in final if r["partition"] == records[0]["partition"] and r["worker"] != victim]
    assert rerun, "the killed rank's unfinished chunks were not rerun"
    assert_greedy_texts(results.reset_index(), [records[0]["first_id"], rerun[-1]["last_id"]])


def test_a_killed_run_resumes_where_it_stopped(tmp_path, cluster):
    """SIGKILL the whole process group (client and local cluster): nothing written is corrupt,
    no process is left, and --resume finishes with every row once and no finished chunk redone."""
    _, client = cluster
    source = staggered_prompts(tmp_path / "prompts.parquet")
    output = tmp_path / "out"
    process = start_run(source, "-o", output, "--workers", 2, "--chunk-size", 20, "--quiet")
    wait_for_chunks(output, 3, process)
    processes = family(process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert_gone(processes)
    before = {p.name: p.stat().st_mtime_ns for p in output.glob("part-*.parquet")}
    for part in before:  # every file a reader can see is complete Parquet
        pd.read_parquet(output / part)

    address = client.scheduler.address  # resumed on a warm cluster
    done = daskdp_cli(
        "run", source, "-o", output, "--chunk-size", 20, "--scheduler-address", address, "--resume", "--quiet"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_exactly_once(output)
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["rows_skipped"] > 0
    assert summary["rows_skipped"] + summary["rows_generated"] == ROWS
    unchanged = {name for name, mtime in before.items() if (output / name).stat().st_mtime_ns == mtime}
    assert len(unchanged) * 20 >= summary["rows_skipped"], "finished chunks were rewritten"


@pytest.mark.parametrize(
    ("signum", "code", "to_group"),
    [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_stops_cleanly_and_says_how_to_resume(tmp_path, signum, code, to_group, cluster):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM to the run (as a
    batch system sends it): exit 130 or 143, no process left, no traceback, and the message
    gives the command that resumes, which finishes the run."""
    source = staggered_prompts(tmp_path / "prompts.parquet")
    output = tmp_path / "out"
    process = start_run(source, "-o", output, "--workers", 2, "--chunk-size", 20)
    wait_for_chunks(output, 1, process)
    processes = family(process)
    if to_group:
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-3000:]
    assert_gone(processes)
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("daskdp:")]
    command = line.split("continue with: ", 1)[1]
    assert command.startswith("daskdp run ") and command.endswith(" --resume")

    address = cluster[1].scheduler.address  # the printed command, resumed on a warm cluster
    done = daskdp_cli(*command.split()[1:], "--quiet", "--scheduler-address", address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_exactly_once(output)


def test_ctrl_c_while_vllm_imports_stops_at_once_with_one_line(tmp_path):
    """Ctrl-C in the first seconds, while the forkserver of the ranks still imports vLLM: exit
    130 with the one line saying how to continue, no traceback from the workers that were
    starting, and no process left."""
    source = staggered_prompts(tmp_path / "prompts.parquet")
    process = start_run(source, "-o", tmp_path / "out", "--workers", 2)
    deadline = time.monotonic() + 60
    while not any("forkserver" in command_line(p) for p in family(process)[1:]):
        assert process.poll() is None and time.monotonic() < deadline, "no forkserver started"
        time.sleep(0.1)
    processes = family(process)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert_gone(processes)
    lines = [line for line in stderr.splitlines() if not line.startswith("Dask dashboard: ")]
    assert len(lines) == 1 and lines[0].startswith("daskdp: stopped by SIGINT"), stderr[-3000:]


def test_a_chunk_past_its_timeout_is_stopped_and_the_rank_moves_on(tmp_path, cluster):
    """Rows that would run far past --chunk-timeout: their chunk is aborted (and retried), the
    rank generates the other chunks, the run exits 1 naming the ids, and --resume with a larger
    timeout finishes the job."""
    rows = 60
    slow = ["r003", "r007"]
    frame = pd.DataFrame(
        {
            "id": [f"r{i:03d}" for i in range(rows)],
            "prompt": [f"Story {i}" for i in range(rows)],
            "max_tokens": [1900 if f"r{i:03d}" in slow else 4 for i in range(rows)],
        }
    )
    source = tmp_path / "prompts.parquet"
    frame.to_parquet(source)
    output = tmp_path / "out"
    _, client = cluster
    address = client.scheduler.address
    common = ["-o", output, "--scheduler-address", address, "--chunk-size", 10, "--ignore-eos", "--quiet"]
    done = daskdp_cli("run", source, *common, "--chunk-timeout", 1, "--retries", 1)
    assert done.returncode == 1, done.stderr[-3000:]
    failed = [line for line in done.stderr.splitlines() if line.startswith("daskdp: run failed")]
    assert failed and "2 rows timed out" in failed[0] and "r003, r007" in failed[0], done.stderr[-3000:]
    assert "--resume" in done.stderr
    record = json.loads((output / "_chunks" / "000000.timed-out.json").read_text())
    assert record["timed_out_ids"] == slow and record["attempts"] == 2
    results = read_results(output)  # the rank went on to every other chunk
    assert sorted(results["id"]) == [f"r{i:03d}" for i in range(10, rows)]
    assert (results["output_tokens"] == 4).all()

    done = daskdp_cli("run", source, *common, "--chunk-timeout", 600, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    results = assert_exactly_once(output, rows)
    assert set(results.loc[results["output_tokens"] == 1900, "id"]) == set(slow)
    assert not list((output / "_chunks").glob("*.timed-out.json"))
    summary = json.loads((output / "_summary.json").read_text())
    assert (summary["rows_skipped"], summary["rows_generated"]) == (rows - 10, 10)


@pytest.fixture
def finished_run(tmp_path):
    """A small finished run with two null prompts, failed by --max-error-rate after writing all;
    a token in the engine's settings appears in no file and no log line."""
    source = tmp_path / "prompts.jsonl"
    rows = [{"id": f"r{i:03d}", "prompt": None if i in (4, 11) else f"Say {i}"} for i in range(20)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    args = [source, "-o", output, "--workers", 2, "--chunk-size", 5, "--max-tokens", 4, "--quiet"]
    secret = "hf_do_not_leak_0123456789"
    done = daskdp_cli("run", *args, "--max-error-rate", 0.05, env={"DASK_DASKDP__ENGINE__HF_TOKEN": secret})
    assert done.returncode == 1, done.stderr[-3000:]
    assert "2 of 20 rows are errors, more than --max-error-rate 0.05" in done.stderr
    results = assert_exactly_once(output, 20)
    assert results["error"].notna().sum() == 2
    assert secret not in done.stdout + done.stderr
    for path in output.rglob("*"):
        assert path.is_dir() or secret.encode() not in path.read_bytes(), path
    return source, output, args


def test_resume_refuses_another_run_and_redoes_a_corrupt_chunk(finished_run, tmp_path, cluster):
    source, output, args = finished_run
    _, client = cluster
    args = [*args, "--scheduler-address", client.scheduler.address]  # resumed on a warm cluster

    done = daskdp_cli("run", *args)
    assert done.returncode == 2
    assert "--resume" in done.stderr and "--overwrite" in done.stderr and str(output) in done.stderr

    done = daskdp_cli("run", *args, "--resume", "--max-tokens", 8)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    (line,) = lines
    assert line.startswith("daskdp: error: cannot resume") and "sampling.max-tokens: 4 then, 8 now" in line

    changed = tmp_path / "changed.jsonl"
    changed.write_text(source.read_text().replace("Say 7", "Say seven"))
    done = daskdp_cli("run", changed, *args[1:], "--resume")
    assert done.returncode == 2, done.stderr
    assert "the input" in done.stderr and "--overwrite" in done.stderr

    # A crash-truncated chunk file, and a leftover temporary file: found, removed, redone.
    damaged = output / "part-000001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    (output / ".part-000002.parquet.tmp-0123").write_bytes(b"half")
    done = daskdp_cli("run", *args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_exactly_once(output, 20)
    summary = json.loads((output / "_summary.json").read_text())
    assert (summary["rows_skipped"], summary["rows_generated"]) == (15, 5)
    assert not list(output.glob(".*tmp*"))

    done = daskdp_cli("run", *args, "--resume")  # nothing left: no engine is loaded
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "_summary.json").read_text())
    assert (summary["rows_skipped"], summary["rows_generated"]) == (20, 0)
