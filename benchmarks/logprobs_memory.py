"""What logprobs cost in memory: peak memory of ``daskdp run`` with ``--logprobs K`` against the same run without.

What it measures
----------------
It writes ``--rows`` distinct short prompts (default 100,000) and alternates, ``--repeats``
times, two fresh runs of ``daskdp run PROMPTS -o OUT --model tiny --workers 1 --max-tokens 64
--ignore-eos --quiet --overwrite``: (a) as it is, (b) with ``--logprobs K`` (default 5). While each
runs, every 0.2 s it reads the high-water mark of resident memory (``VmHWM`` in
``/proc/PID/status``, the kernel's own peak, so no spike between two reads is missed) of

* the client: the ``daskdp run`` process itself (the CLI, its Dask client and the local
  cluster's scheduler), which must stay bounded whatever a chunk holds;
* the rank: the Dask worker process that runs the engine and builds and writes each chunk.

The report gives each peak, the ratios b/a (target for the client: at most 1.2, DECISIONS), the
bytes of the chunk files and the wall time of each run. The last reading of a process before it
exits is kept, so its peak is a lower bound by at most 0.2 s of growth.

Run it from the repository's root::

    .venv/bin/python benchmarks/logprobs_memory.py                    # 100,000 x 64 tokens x K=5
    .venv/bin/python benchmarks/logprobs_memory.py --rows 20000 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from common import TIMEOUT, daskdp_command, make_prompts, work_directory

MAX_TOKENS = 64
TARGET = 1.2


def high_water_mark(process: psutil.Process) -> int:
    """The process's peak resident memory so far, in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{process.pid}/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024


def watched_run(command: list[str]) -> dict:
    """Run ``command``, reading the peaks of it and of its Dask workers until it exits."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    peaks: dict[str, int] = {"client": 0, "rank": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peaks["client"] = max(peaks["client"], high_water_mark(root))
            try:
                children = root.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    worker = "dask worker" in " ".join(child.cmdline())  # as the rank names itself
                except psutil.Error:
                    continue
                if worker:
                    peaks["rank"] = max(peaks["rank"], high_water_mark(child))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, stderr = process.communicate(timeout=TIMEOUT)
    done.set()
    watcher.join()
    if process.returncode != 0:
        raise SystemExit(f"daskdp failed (exit {process.returncode}):\n{stderr[-4000:]}")
    return {**peaks, "seconds": time.perf_counter() - started}


def chunk_bytes(output: Path) -> int:
    return sum(path.stat().st_size for path in output.glob("part-*.parquet"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="prompts (default 100,000)")
    parser.add_argument(
        "--logprobs", type=int, default=5, metavar="K", help="alternatives per token (default 5)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of a then b (default 1)")
    parser.add_argument("--chunk-size", type=int, help="daskdp's --chunk-size (default: its own)")
    args = parser.parse_args(argv)

    with work_directory("daskdp-logprobs-memory-", keep=False) as workdir:
        source = workdir / "prompts.parquet"
        make_prompts(args.rows).to_parquet(source, index=False)
        extra = ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
        sides = {"a": [], "b": []}
        print(f"workload   {args.rows:,} prompts x {MAX_TOKENS} tokens (ignore_eos, greedy), 1 rank")
        print(f"(a)        daskdp run ... {' '.join(extra)}")
        print(f"(b)        daskdp run ... --logprobs {args.logprobs} {' '.join(extra)}")
        for round_ in range(1, args.repeats + 1):
            for side, more in (("a", []), ("b", ["--logprobs", str(args.logprobs)])):
                output = workdir / f"{side}.out"
                run = watched_run(daskdp_command(source, output, 1, MAX_TOKENS, *extra, *more))
                run["bytes"] = chunk_bytes(output)
                sides[side].append(run)
                print(
                    f"round {round_} ({side})  client peak {run['client'] / 2**20:8.1f} MiB   rank peak "
                    f"{run['rank'] / 2**20:8.1f} MiB   chunk files {run['bytes'] / 2**20:8.1f} MiB   "
                    f"{run['seconds']:7.1f} s",
                    flush=True,
                )

        def median(side: str, key: str) -> float:
            return statistics.median(run[key] for run in sides[side])

        print()
        for key, name in (
            ("client", "client peak"),
            ("rank", "rank peak"),
            ("bytes", "chunk files"),
            ("seconds", "wall time"),
        ):
            print(f"ratio b/a  {name:<12} {median('b', key) / max(median('a', key), 1):6.2f}")
        value = median("b", "client") / median("a", "client")
        verdict = "met" if value <= TARGET else "NOT met"
        print(f"target     client peak b/a <= {TARGET}: {verdict} ({value:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
