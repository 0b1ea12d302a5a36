"""Load: a million short prompts complete, and the client's memory stays flat as rows grow.

What it measures
----------------
For each size in ``--rows`` (default 100,000 and 1,000,000) it writes its own input in a
temporary directory, ``--format`` JSON Lines (default) or Parquet, of short distinct prompts
(``"Prompt 123: say a word."``) with an ``id`` column ``0 .. rows-1``, then runs, as a fresh
process, from the repository's root::

    .venv/bin/python -m daskdp run INPUT -o OUT --workers 2 --max-tokens 2 --quiet --overwrite

While it runs, the process is sampled every 0.2 s with psutil:

* ``client``: the resident set (RSS) of that ``daskdp run`` process alone, the client that
  reads the input's schema, plans the partitions, submits them and collects their summaries.
  Its peak is the larger of the highest sample and the kernel's own high-water mark
  (``VmHWM`` in ``/proc/PID/status``, read at each sample), so a spike between two samples
  still counts (up to the last sample before the process exits).
* ``children``: for information, the highest sum of the RSS of all its descendants (the Dask
  scheduler's and nannies' processes, the workers holding the engines) in one sample, and the
  highest single descendant.

Each run's wall time (process start to exit) and rows/s are reported, and its output is
checked: the ``id`` column of every ``OUT/part-*.parquet`` file, read alone, holds each input id
exactly once (no row missing, none duplicated), and no row has ``error`` set. A failed run or a
missing or duplicated row ends the benchmark with exit code 1. The 1-minute load average before
and after each run is printed too: the machine is shared, and above its core count other work
ran beside the benchmark and slowed it (memory is not affected; times are).

The result is a table, the client's RSS over each run (at 10%, 25%, 50%, 75% and 90% of its wall
time and its peak, with when it peaked), the client's sampled peak in each phase of the run
(``start``: imports, configuration and the input's schema, up to the cluster's start; ``run()``:
cluster, engines, generation and shutdown; ``after``: from the summary written to the process
gone, the end-of-run report included; the bounds come from ``OUT/_summary.json``), and the ratio
peak client RSS at the largest size over the smallest, against the target <= 1.2: the client's
memory should not grow with the input.

Run it from the repository's root::

    .venv/bin/python benchmarks/load.py                        # 100,000 and 1,000,000 rows
    .venv/bin/python benchmarks/load.py --rows 2000 20000 --keep
    .venv/bin/python benchmarks/load.py --rows 100000 --format parquet --workers 1

The million rows take a while on a 2-core machine: run the smallest size first and scale its
wall time to estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from common import PYTHON, REPO, verdict, work_directory

TARGET = 1.2
INTERVAL = 0.2
TIMEOUT = 4 * 3600
MIB = 1 << 20


def write_prompts(path: Path, rows: int, fmt: str) -> None:
    """``rows`` short distinct prompts with ids ``0 .. rows-1``, written in batches."""
    batch = 100_000
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for start in range(0, rows, batch):
                f.write(
                    "".join(
                        json.dumps({"id": i, "prompt": f"Prompt {i}: say a word."}) + "\n"
                        for i in range(start, min(rows, start + batch))
                    )
                )
        return
    schema = pa.schema([("id", pa.int64()), ("prompt", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, batch):
            ids = range(start, min(rows, start + batch))
            writer.write_table(
                pa.table(
                    {"id": list(ids), "prompt": [f"Prompt {i}: say a word." for i in ids]}, schema=schema
                )
            )


def high_water_mark(pid: int) -> int:
    """The kernel's peak RSS of ``pid`` in bytes (``VmHWM``), 0 when unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_daskdp(source: Path, output: Path, workers: int, max_tokens: int, log: Path) -> dict:
    """Run ``daskdp run`` as a subprocess, sampling the RSS of it and of its descendants."""
    command = [PYTHON, "-m", "daskdp", "run", str(source), "-o", str(output), "--model", "tiny"]
    command += ["--workers", str(workers), "--max-tokens", str(max_tokens), "--quiet", "--overwrite"]
    samples: list[tuple[float, int, int]] = []  # (seconds since start, client RSS, children RSS)
    peak_hwm = peak_child = 0
    with open(log, "w") as stream:
        launched = time.time()
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT)
        client = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                rss = client.memory_info().rss
                hwm = high_water_mark(process.pid)
                children = client.children(recursive=True)
            except psutil.NoSuchProcess:  # exited between poll() and the sample
                break
            child_total = 0
            for child in children:
                try:
                    child_rss = child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                child_total += child_rss
                peak_child = max(peak_child, child_rss)
            peak_hwm = max(peak_hwm, hwm)
            samples.append((time.perf_counter() - started, rss, child_total))
            if time.perf_counter() - started > TIMEOUT:
                process.kill()
                process.wait()
                raise SystemExit(f"daskdp did not finish within {TIMEOUT} s; its output is in {log}")
            time.sleep(INTERVAL)
        seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"daskdp failed (exit {process.returncode}) on {source}:\n{tail}")
    if not samples:
        raise SystemExit(f"daskdp exited before its memory could be sampled ({seconds:.2f} s)")
    times = np.array([s[0] for s in samples])
    client_rss = np.array([s[1] for s in samples])
    children_rss = np.array([s[2] for s in samples])
    at_peak = int(client_rss.argmax())
    # The phases, from the run's _summary.json: up to the cluster's start (imports, configuration,
    # the input's schema), run() (cluster, engines, generation, shutdown), then what follows the
    # summary (the end-of-run report read from the results, and the interpreter's exit).
    phases = {}
    summary_file = output / "_summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        bounds = [0.0, summary["started"] - launched, summary["finished"] - launched, np.inf]
        for name, low, high in zip(("start", "run()", "after"), bounds, bounds[1:], strict=False):
            inside = client_rss[(times >= low) & (times < high)]
            phases[name] = {
                "seconds": min(high, seconds) - low,
                "peak": int(inside.max()) if len(inside) else 0,
            }
    return {
        "seconds": seconds,
        "client_peak": max(int(client_rss.max()), peak_hwm),
        "client_peak_sampled": int(client_rss.max()),
        "client_hwm": peak_hwm,
        "client_peak_at": float(times[at_peak]),
        "client_profile": {
            q: int(client_rss[min(len(times) - 1, int(np.searchsorted(times, q * seconds)))])
            for q in (0.1, 0.25, 0.5, 0.75, 0.9)
        },
        "children_peak": int(children_rss.max()),
        "child_peak": peak_child,
        "phases": phases,
        "samples": len(samples),
        "trace": samples,
    }


def check_output(output: Path, rows: int) -> dict:
    """Every id ``0 .. rows-1`` exactly once in ``output/part-*.parquet``; no error rows."""
    shards = sorted(output.glob("part-*.parquet"))
    if not shards:
        raise SystemExit(f"daskdp wrote no part-*.parquet files in {output}")
    ids, errors = [], 0
    for shard in shards:
        names = pq.read_schema(shard).names
        table = pq.read_table(shard, columns=[c for c in ("id", "error") if c in names])
        if "id" not in table.column_names:
            raise SystemExit(f"{shard} has no id column")
        ids.append(table["id"].to_numpy())
        if "error" in table.column_names:
            errors += len(table) - table["error"].null_count
    found = np.concatenate(ids).astype(np.int64)
    counts = np.bincount(found[(found >= 0) & (found < rows)], minlength=rows)
    missing = int((counts == 0).sum())
    duplicated = int((counts > 1).sum())
    foreign = int(((found < 0) | (found >= rows)).sum())
    problems = []
    if missing or duplicated or foreign or len(found) != rows:
        problems.append(
            f"{len(found):,} rows for {rows:,} ids: {missing:,} missing, {duplicated:,} duplicated, "
            f"{foreign:,} not in the input"
        )
    if errors:
        problems.append(f"{errors:,} rows with an error")
    if problems:
        raise SystemExit(f"{output}: " + "; ".join(problems))
    return {"shards": len(shards), "rows": len(found)}


def mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000],
        help="input sizes (default 100000 1000000)",
    )
    parser.add_argument("--workers", type=int, default=2, help="daskdp ranks (default 2)")
    parser.add_argument("--max-tokens", type=int, default=2, help="output tokens per prompt (default 2)")
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl", help="input format")
    parser.add_argument(
        "--keep", action="store_true", help="keep inputs, outputs, logs and RSS traces; print their path"
    )
    args = parser.parse_args(argv)
    if min(args.rows) < 1 or args.workers < 1 or args.max_tokens < 1:
        parser.error("--rows, --workers and --max-tokens must be at least 1")
    sizes = sorted(set(args.rows))

    command = (
        f"{PYTHON} -m daskdp run INPUT -o OUT --workers {args.workers} --max-tokens {args.max_tokens} "
        "--quiet --overwrite"
    )
    print(
        f"workload      {', '.join(f'{n:,}' for n in sizes)} prompts like 'Prompt 123: say a word.' ({args.format})"
    )
    print(f"command       {command}")
    print(f"sampling      RSS every {INTERVAL} s (client: that process only; children: its descendants)")
    print(f"host          {os.cpu_count()} cores, {psutil.virtual_memory().total / (1 << 30):.1f} GiB")
    print(flush=True)
    results = {}
    with work_directory("daskdp-load-", args.keep) as workdir:
        for rows in sizes:
            source = workdir / f"prompts-{rows}.{args.format}"
            started = time.perf_counter()
            write_prompts(source, rows, args.format)
            written = time.perf_counter() - started
            output = workdir / f"out-{rows}"
            load_before = os.getloadavg()[0]
            run = run_daskdp(source, output, args.workers, args.max_tokens, workdir / f"daskdp-{rows}.log")
            checked = check_output(output, rows)
            run |= checked
            results[rows] = run
            profile = "  ".join(f"{int(q * 100)}% {mib(v)}" for q, v in run["client_profile"].items())
            print(
                f"{rows:>10,} rows  {run['seconds']:8.1f} s  {rows / run['seconds']:8,.0f} rows/s  "
                f"client peak {mib(run['client_peak'])} at {run['client_peak_at']:.1f} s  "
                f"children peak {mib(run['children_peak'])}  "
                f"({checked['shards']} shards, every id once; input {source.stat().st_size / MIB:,.1f} MiB "
                f"written in {written:.1f} s)",
                flush=True,
            )
            print(f"{'':>16}client RSS over the run: {profile}", flush=True)
            print(
                f"{'':>16}load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
                f"(the machine is shared: more than {os.cpu_count()} means other work ran too)",
                flush=True,
            )
            if run["phases"]:
                phases = "  ".join(
                    f"{name} {phase['seconds']:.1f} s peak {mib(phase['peak'])}"
                    for name, phase in run["phases"].items()
                )
                print(f"{'':>16}client by phase: {phases}", flush=True)
            if args.keep:
                trace = workdir / f"rss-{rows}.csv"
                trace.write_text(
                    "seconds,client_rss,children_rss\n"
                    + "".join(f"{t:.2f},{c},{k}\n" for t, c, k in run["trace"])
                )
            else:
                source.unlink()
                shutil.rmtree(output, ignore_errors=True)

        print()
        print(
            f"{'rows':>10} {'wall s':>9} {'rows/s':>9} {'client peak':>12} {'(sampled/HWM)':>18} "
            f"{'children peak':>14} {'largest child':>14}"
        )
        for rows, run in results.items():
            detail = f"{run['client_peak_sampled'] / MIB:,.0f}/{run['client_hwm'] / MIB:,.0f}"
            print(
                f"{rows:>10,} {run['seconds']:>9.1f} {rows / run['seconds']:>9,.0f} {mib(run['client_peak']):>12} "
                f"{detail:>18} {mib(run['children_peak']):>14} {mib(run['child_peak']):>14}"
            )
        smallest, largest = results[sizes[0]], results[sizes[-1]]
        ratio = largest["client_peak"] / smallest["client_peak"]
        print()
        print(f"ratio         client peak RSS {sizes[-1]:,} / {sizes[0]:,} rows: {ratio:.3f}")
        print(f"target        ratio <= {TARGET:.1f}: {verdict(ratio, TARGET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
