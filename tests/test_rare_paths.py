"""Paths no other test takes: a partition that keeps killing its workers (Dask's KilledWorker),
compressed JSON Lines input, and input read through fsspec from an HTTP server."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import threading

import pytest

from conftest import daskdp_cli, read_results

pytestmark = pytest.mark.slow


def test_a_partition_that_kills_its_workers_fails_the_run_in_one_line(tmp_path):
    """With no failures allowed, a worker killed mid-partition ends the run: exit 1, the line
    naming distributed.scheduler.allowed-failures, the --resume line, no traceback."""
    import signal

    from test_faults import family, staggered_prompts, start_run, wait_for_chunks

    source = staggered_prompts(tmp_path / "prompts.parquet")
    output = tmp_path / "out"
    process = start_run(
        source, "-o", output, "--workers", 2, "--chunk-size", 20, "--quiet",
        env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"},
    )  # fmt: skip
    wait_for_chunks(output, 1, process)
    workers = [p for p in family(process) if "dask worker" in " ".join(p.cmdline())]
    workers[0].send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "was running on a worker that died 1 times" in stderr, stderr[-3000:]
    assert "distributed.scheduler.allowed-failures" in stderr and "--resume" in stderr


def test_compressed_json_lines(tmp_path, cluster):
    _, client = cluster
    rows = [{"id": f"g{i}", "prompt": f"Compressed question {i}?"} for i in range(50)]
    source = tmp_path / "prompts.jsonl.gz"
    source.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
    done = daskdp_cli(
        "run", source, "--max-tokens", 4, "--quiet", "--scheduler-address", client.scheduler.address
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "prompts.out")  # the default output drops both suffixes
    assert sorted(results["id"]) == sorted(row["id"] for row in rows)
    assert results["error"].isna().all()


@pytest.fixture
def http_directory(tmp_path):
    """A local HTTP server for the files of a directory: an fsspec URL the ranks read too.
    (Python's server answers no range requests, which Parquet needs: JSON Lines is read whole.)"""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_input_from_an_http_url(tmp_path, cluster, http_directory):
    _, client = cluster
    served, url = http_directory
    rows = [{"id": f"h{i}", "prompt": f"Remote {i}"} for i in range(40)]
    (served / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    done = daskdp_cli(
        "run", f"{url}/prompts.jsonl", "-o", output, "--max-tokens", 4, "--quiet",
        "--scheduler-address", client.scheduler.address,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(output)
    assert sorted(results["id"]) == sorted(f"h{i}" for i in range(40))
    assert results["error"].isna().all()
