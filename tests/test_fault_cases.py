"""Faults a new user found on a fresh clone, each reproduced with the real CLI, engine and cluster.

One output directory under two names, ``--overwrite`` over a user's files, null and repeated
ids, text that is not UTF-8, malformed JSON Lines, an output that cannot be written, a
scheduler address where something else listens, a full disk and a stopped rank.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import daskdp_cli, error_line, read_results
from daskdp.output.directory import output_lock

pytestmark = pytest.mark.slow


@pytest.fixture
def good_input(tmp_path):
    source = tmp_path / "prompts.parquet"
    pd.DataFrame(
        {"id": [f"r{i}" for i in range(6)], "prompt": [f"Question {i}?" for i in range(6)]}
    ).to_parquet(source)
    return source


# One directory under two names -----------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["symlink", "dot"])
def test_one_directory_under_two_names_is_one_directory(tmp_path, good_input, spelling):
    """While a run holds ``conc2/``, a run into a symlink to it, or into ``conc2//.``, is refused."""
    out = tmp_path / "conc2"
    out.mkdir()
    if spelling == "symlink":
        other = tmp_path / "conc2link"
        other.symlink_to(out, target_is_directory=True)
    else:
        other = f"{out}//."
    with output_lock(str(out)):
        done = daskdp_cli("run", good_input, "-o", other)
    error_line(done, "another daskdp run", "-o/--output")
    assert list(out.iterdir()) == []


# --overwrite and a user's files ----------------------------------------------------------------

USERS_FILES = {
    "part-000099.parquet": b"the user's own shard",
    "part-00000-abc.snappy.parquet": b"a Spark shard",
    "part-000000.parquet.bak": b"a backup",
}


@pytest.mark.parametrize("flag", [None, "--overwrite", "--resume"])
def test_a_users_parquet_files_are_never_deleted(tmp_path, good_input, flag):
    """A directory with no daskdp manifest and the user's ``part-*`` files: refused with the
    files named, whatever the flag; it is not called the results of an earlier run."""
    out = tmp_path / "theirs"
    out.mkdir()
    for name, content in USERS_FILES.items():
        (out / name).write_bytes(content)
    done = daskdp_cli("run", good_input, "-o", out, *([flag] if flag else []))
    line = error_line(done, str(out), "no daskdp run wrote", *USERS_FILES)
    assert "earlier run" not in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == USERS_FILES


def test_overwrite_deletes_only_what_daskdp_wrote(tmp_path, good_input, cluster):
    """--overwrite over a finished run's directory replaces it; with a file of the user's beside
    the run's files it refuses, naming that file, and deletes nothing."""
    out = tmp_path / "out"
    done = daskdp_cli("run", good_input, "-o", out, "--max-tokens", "4", "--quiet", *warm(cluster))
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(p.name for p in out.iterdir())
    assert "_manifest.json" in written and "_summary.json" in written

    (out / "notes.txt").write_text("mine")
    (out / "part-000099.parquet").write_bytes(b"mine too")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    done = daskdp_cli("run", good_input, "-o", out, "--overwrite")
    error_line(done, str(out), "no daskdp run wrote", "notes.txt", "part-000099.parquet")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    (out / "notes.txt").unlink()
    (out / "part-000099.parquet").unlink()
    (out / "._manifest.json.tmp-0123456789abcdef0123456789abcdef").write_text("{")  # a stopped write
    done = daskdp_cli(
        "run", good_input, "-o", out, "--max-tokens", "4", "--quiet", "--overwrite", *warm(cluster)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == written
    rows = read_results(out)
    assert sorted(rows["id"]) == [f"r{i}" for i in range(6)]
    assert json.loads((out / "_summary.json").read_text())["rows"] == 6


def warm(cluster) -> list[str]:
    """Where a test is not about starting a cluster: the shared warm one (tests/conftest.py)."""
    return ["--scheduler-address", cluster[1].scheduler.address]


# Ids -------------------------------------------------------------------------------------------


def test_null_ids_are_refused_before_anything_is_written(tmp_path, cluster):
    source = tmp_path / "prompts.jsonl"
    rows = [{"id": f"r{i}", "prompt": f"Question {i}?"} for i in range(20)]
    rows[10]["id"] = None
    rows[14]["id"] = None
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = daskdp_cli("run", source, "-o", tmp_path / "out", *warm(cluster))
    error_line(done, "column 'id'", "null in row 10, 14", "give every row an id", cluster_started=True)
    assert not (tmp_path / "out").exists()
    assert "continue with" not in done.stderr


def test_repeated_ids_are_refused_before_anything_is_written(tmp_path, cluster):
    source = tmp_path / "prompts.parquet"
    ids = [f"r{i}" for i in range(200)]
    ids[150] = "r7"
    pd.DataFrame({"id": ids, "prompt": [f"Question {i}?" for i in range(200)]}).to_parquet(source)
    done = daskdp_cli("run", source, "-o", tmp_path / "out", *warm(cluster))
    error_line(done, "repeats the id 'r7' in rows 7, 150", "unique", cluster_started=True)
    assert not (tmp_path / "out").exists()


# Text that is not UTF-8, JSON that is not JSON -------------------------------------------------


def test_text_that_is_not_utf8_is_named_by_its_row(tmp_path, cluster):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "prompts.parquet"
    texts = [f"Question {i}?".encode() for i in range(12)]
    texts[9] = b"caf\xe9 au lait"  # Latin-1, not UTF-8
    prompts = pa.array(texts, type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(12)], "prompt": prompts}), source)
    done = daskdp_cli("run", source, "-o", tmp_path / "out", *warm(cluster))
    line = error_line(done, "row 9", "not valid UTF-8", "'prompt'", cluster_started=True)
    assert "Parquet" not in line  # not "check that the file is what its name says"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("compressed", [False, True])
def test_a_malformed_json_line_is_named_by_its_number(tmp_path, compressed, cluster):
    import gzip

    lines = [json.dumps({"prompt": f"Question {i}?"}) for i in range(30)]
    lines[22] = '{"prompt": "unterminated}'
    text = "\n".join(lines) + "\n"
    source = tmp_path / ("prompts.jsonl.gz" if compressed else "prompts.jsonl")
    source.write_bytes(gzip.compress(text.encode()) if compressed else text.encode())
    done = daskdp_cli("run", source, "-o", tmp_path / "out", *warm(cluster))
    error_line(done, "as JSON Lines: line 23 is not valid JSON", cluster_started=True)


# An output that cannot be written --------------------------------------------------------------


def test_an_output_under_a_regular_file_is_refused_before_a_cluster_starts(tmp_path, good_input):
    (tmp_path / "plain.txt").write_text("a file")
    done = daskdp_cli("run", good_input, "-o", tmp_path / "plain.txt" / "out")
    error_line(done, "cannot create output", "is a file", "-o/--output")


def test_a_read_only_output_is_refused_before_a_cluster_starts(tmp_path, good_input):
    mount = read_only_mount(tmp_path / "ro")
    done = daskdp_cli("run", good_input, "-o", mount / "out")
    error_line(done, "cannot write output", "Read-only file system", "-o/--output")


def read_only_mount(path):
    return tmpfs(path, "ro,size=1m")


def tmpfs(path, options: str):
    import subprocess

    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    unmount_at_exit(path)
    return path


def fill(disk, leave: int) -> None:
    """Fill the tmpfs ``disk`` up to ``leave`` bytes."""
    import os

    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_a_disk_full_at_the_start(tmp_path, good_input, cluster):
    """No room even for the manifest: one line naming the directory, exit 1, no traceback, no
    resume line, nothing left behind."""
    disk = tmpfs(tmp_path / "disk", "size=1m")
    fill(disk, leave=0)
    done = daskdp_cli("run", good_input, "-o", disk / "out", *warm(cluster))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "--resume" not in output, output[-3000:]
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("daskdp: run failed: no space left") and str(disk / "out") in last, last
    assert not (disk / "out").exists() or list((disk / "out").iterdir()) == []


def test_a_disk_full_mid_run(tmp_path, cluster):
    """Room for the manifest and a few chunks: exit 1 with one line naming the directory and the
    --resume line, no traceback, no temporary file left; after space is freed, --resume
    finishes with every row once."""
    from test_faults import assert_exactly_once, staggered_prompts

    source = staggered_prompts(tmp_path / "prompts.parquet", rows=160)
    disk = tmpfs(tmp_path / "disk", "size=1m")
    fill(disk, leave=48 * 1024)
    output = disk / "out"
    done = daskdp_cli("run", source, "-o", output, *warm(cluster), "--chunk-size", 10, "--quiet")
    text = done.stdout + done.stderr
    assert done.returncode == 1, text[-3000:]
    assert "Traceback" not in text and "Compute Failed" not in text, text[-3000:]
    assert f"no space left on the device of {output}" in text, text[-3000:]
    assert "continue with:" in text and "--resume" in text, text[-3000:]
    assert not [p for p in output.rglob("*") if ".tmp-" in p.name]
    (disk / "filler").unlink()
    done = daskdp_cli("run", source, "-o", output, *warm(cluster), "--chunk-size", 10, "--quiet", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_exactly_once(output, rows=160)


def unmount_at_exit(path):
    import atexit
    import subprocess

    atexit.register(subprocess.run, ["umount", "-l", str(path)], capture_output=True)


# A scheduler address where something else listens ----------------------------------------------


@pytest.fixture
def http_server():
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def silent_server():
    import socket

    listener = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_an_http_server_is_not_a_dask_scheduler(tmp_path, good_input, http_server):
    """An HTTP server waits for a request, where a Dask scheduler speaks first."""
    env = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3"}
    done = daskdp_cli("run", good_input, "-o", tmp_path / "out", "--scheduler-address", http_server, env=env)
    line = error_line(done, http_server, "--scheduler-address")
    assert "did not answer within 3 s" in line or "is not a Dask scheduler" in line, line
    assert not (tmp_path / "out").exists()


def test_a_server_that_speaks_another_protocol_is_not_a_dask_scheduler(tmp_path, good_input):
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def greet():
        connection, _ = listener.accept()
        connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        connection.close()

    threading.Thread(target=greet, daemon=True).start()
    address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    done = daskdp_cli("run", good_input, "-o", tmp_path / "out", "--scheduler-address", address)
    error_line(done, address, "is not a Dask scheduler", "--scheduler-address")
    listener.close()


def test_a_silent_server_is_given_up_on(tmp_path, good_input, silent_server):
    env = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3"}
    done = daskdp_cli(
        "run", good_input, "-o", tmp_path / "out", "--scheduler-address", silent_server, env=env
    )
    error_line(done, silent_server, "did not answer within 3 s")


def test_sigterm_before_anything_is_written_prints_no_resume_line(tmp_path, good_input, silent_server):
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "daskdp", "run", str(good_input), "-o", str(tmp_path / "out")]
        + ["--scheduler-address", silent_server],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-3000:]
    assert "continue with" not in stderr and "--resume" not in stderr, stderr[-3000:]
    assert "before anything was written" in stderr
    assert not (tmp_path / "out").exists()


# A stopped rank ---------------------------------------------------------------------------------


def test_a_stopped_rank_is_restarted_and_its_chunks_move_on(tmp_path):
    """SIGSTOP one rank mid-run: after --stall-timeout without progress it is shown as hung, its
    worker is killed through its nanny, its unfinished chunks run on the other rank, and every
    row is there exactly once; the run does not wait for Dask's heartbeat to give up."""
    import signal
    import time

    from test_faults import assert_exactly_once, family, staggered_prompts, start_run, wait_for_chunks

    source = staggered_prompts(tmp_path / "prompts.parquet")
    output = tmp_path / "out"
    process = start_run(source, "-o", output, "--workers", 2, "--chunk-size", 20, "--stall-timeout", 4)
    records = wait_for_chunks(output, 1, process)
    port = int(records[0]["worker"].rsplit(":", 1)[1])
    workers = [p for p in family(process) if "dask worker" in " ".join(p.cmdline())]
    (victim,) = [
        p for p in workers if any(c.laddr.port == port and c.status == "LISTEN" for c in p.net_connections())
    ]
    victim.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        if victim.is_running():
            victim.send_signal(signal.SIGCONT)
    assert process.returncode == 0, stderr[-3000:]
    assert time.monotonic() - stopped < 120, "the run waited for the stopped rank"
    assert "is hung: no progress for" in stderr and "restarting it" in stderr, stderr[-3000:]
    assert "rank" in stderr and " hung" in stderr
    results = assert_exactly_once(output)
    assert results["error"].isna().all()
    assert "Traceback" not in stderr


def test_timeout_ends_the_run_whatever_a_stopped_rank_does(tmp_path):
    """A rank stopped, the stall limit far away: --timeout still ends the run within 10 s of
    its deadline, exit 1 with the --resume line, and no process is left."""
    import signal
    import time

    from test_faults import assert_gone, family, staggered_prompts, start_run, wait_for_chunks

    source = staggered_prompts(tmp_path / "prompts.parquet", rows=400)
    output = tmp_path / "out"
    started = time.monotonic()
    process = start_run(
        source, "-o", output, "--workers", 2, "--chunk-size", 20, "--timeout", 45, "--stall-timeout", 600
    )
    wait_for_chunks(output, 1, process)
    workers = [p for p in family(process) if "dask worker" in " ".join(p.cmdline())]
    workers[0].send_signal(signal.SIGSTOP)
    processes = family(process)
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        if workers[0].is_running():
            workers[0].send_signal(signal.SIGCONT)
    assert process.returncode == 1, stderr[-3000:]
    assert time.monotonic() - started < 45 + 10, stderr[-3000:]
    assert "passed its --timeout" in stderr and "--resume" in stderr, stderr[-3000:]
    assert_gone(processes)
