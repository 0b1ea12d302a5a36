"""daskdp with 2 ranks against vLLM's own data-parallel launcher with 2 ranks, on even and skewed work.

What it measures
----------------
It writes its own workloads (Parquet in a temporary directory), then alternates fresh processes
``--repeats`` times (a, b, a, b ... or a, b, c, a, b, c ...), each timed with
``time.perf_counter`` around the subprocess, from process start to exit:

(a) launcher: the shape of vLLM's ``examples/offline_inference/data_parallel.py``, run as its own
    script by the venv's python. The parent starts one ``multiprocessing.Process`` per rank
    (spawn context); each rank sets its environment before importing vLLM, reads the input,
    takes its contiguous, even slice of the rows (rank ``r`` of ``n``: ``rows // n`` rows, one
    more for the first ``rows % n`` ranks), builds ``vllm.LLM(model=<tiny model>, **<the engine
    arguments daskdp uses for it on a CPU host>)``, calls ``LLM.generate`` once on its slice
    (one ``SamplingParams`` per row when the input has a ``max_tokens`` column) and writes its
    own Parquet file. The parent joins each rank with a timeout and kills stragglers.
(b) ``daskdp run PROMPTS -o OUT --workers 2 --max-tokens 32 --ignore-eos --quiet --overwrite``,
    on the skewed workload once per partitioning mode: ``--partitioning balanced`` (b, one
    partition per rank balanced by estimated cost) and ``--partitioning dynamic`` (c, more,
    smaller partitions handed out longest first). A daskdp whose ``daskdp run --help`` does not
    list ``--partitioning`` runs once, with its own partitioning, and the report says so.

The workloads (``--workload uniform|skewed|both``, default both; greedy, ``ignore_eos``):

* uniform: ``--rows`` distinct short prompts (default 20,000, about 26 tokens each) x 32 tokens.
  Target daskdp/launcher <= 1.00: two ranks of daskdp as fast as the hand-written launcher.
* skewed: twice ``--rows`` prompts (default 40,000) with a per-row ``max_tokens`` column, heavy
  tailed from 6 to 200 (6 x a Pareto of shape 1.2, clipped to [6, 200], seed 4; median 11,
  mean about 21), the rows sorted by ``max_tokens`` ascending, as datasets often arrive grouped
  by length. The launcher's even split then gives one rank the short rows and the other the long
  ones. Target daskdp/launcher <= 0.85. Also reported: each rank's generation seconds, daskdp's
  busy seconds per rank from ``_summary.json`` (``summary["ranks"][r]["busy_seconds"]``) and the
  launcher's per-rank ``generate`` seconds, and the makespan over the ideal (the longest rank's
  seconds over the total spread evenly on the ranks), target <= 1.10 for daskdp.

Every run is checked to have produced every row exactly once with its number of tokens; the
first round also compares the texts of the two sides (greedy decoding is deterministic). The
report gives each time with where it went, the median and spread of each side, rows/s, the
ratio of the medians and per round, and the targets. The machine's speed drifts by a third from
minute to minute: only the alternated ratios mean much.

Environment of the launcher
---------------------------
The launcher's parent process starts with what a Dask nanny gives its worker
(``distributed.nanny.pre-spawn-environ``: ``OMP_NUM_THREADS=1`` ... and ``PYTHONHASHSEED``, but
glibc's defaults: not ``MALLOC_TRIM_THRESHOLD_``), and each rank sets, first thing, what daskdp's rank ``r`` of 2 sets before
it imports vLLM: ``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``, ``VLLM_CPU_OMP_THREADS_BIND`` its own
core (``0`` or ``1`` here), ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``VLLM_DP_RANK=0``,
``VLLM_DP_RANK_LOCAL=0``, ``VLLM_DP_SIZE=1`` (dense models refuse a data-parallel group, so each
rank is an independent engine, as in daskdp) and ``VLLM_LOGGING_LEVEL=ERROR``. Both sides
therefore compute with the same threads on the same cores.

Run it from the repository's root::

    .venv/bin/python benchmarks/launcher.py                      # both workloads, 3 rounds
    .venv/bin/python benchmarks/launcher.py --workload skewed --rows 2000 --repeats 1 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from common import (
    PYTHON,
    TIMEOUT,
    Sides,
    check_rows,
    daskdp_command,
    help_has,
    imbalance,
    make_prompts,
    nanny_environment,
    phase_lines,
    rank_variables,
    run_daskdp_checked,
    run_process,
    settings,
    shown,
    texts_differ,
    threads,
    verdict,
    work_directory,
)

RANKS = 2
MAX_TOKENS = 32
TARGETS = {"uniform": 1.00, "skewed": 0.85}
TARGET_MAKESPAN = 1.10
SKEW_SEED = 4
SKEW_RANGE = (6, 200)

# vLLM's data-parallel launcher shape, written to a file and run by the venv's python (spawn
# re-imports the main module in each rank, so it must be a file). Each rank prints its phase
# times as one JSON line.
LAUNCHER = r'''
"""One process per rank, as vLLM's examples/offline_inference/data_parallel.py launches them."""
import json
import os
import sys
import time
from multiprocessing import get_context


def rank_main(spec, rank):
    started = time.time()
    t0 = time.perf_counter()
    # The rank's environment, before vLLM (and torch) are imported.
    os.environ.update(spec["environments"][rank])
    import pandas as pd

    t_pandas = time.perf_counter()
    from vllm import LLM, SamplingParams

    t_import = time.perf_counter()
    frame = pd.read_parquet(spec["input"])
    size = len(spec["environments"])
    floor, remainder = divmod(len(frame), size)
    start = rank * floor + min(rank, remainder)
    end = start + floor + (1 if rank < remainder else 0)
    frame = frame.iloc[start:end]
    t_read = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["engine"])
    t_load = time.perf_counter()
    if "max_tokens" in frame:
        params = [SamplingParams(**{**spec["sampling"], "max_tokens": int(n)}) for n in frame["max_tokens"]]
    else:
        params = SamplingParams(**spec["sampling"])
    outputs = llm.generate(frame["prompt"].tolist(), params, use_tqdm=False)
    t_generate = time.perf_counter()
    frame = frame.assign(
        generated_text=[o.outputs[0].text for o in outputs],
        prompt_tokens=[len(o.prompt_token_ids) for o in outputs],
        output_tokens=[len(o.outputs[0].token_ids) for o in outputs],
        finish_reason=[o.outputs[0].finish_reason for o in outputs],
        rank=rank,
    )
    frame.to_parquet(os.path.join(spec["output"], f"rank-{rank}.parquet"), index=False)
    t_write = time.perf_counter()
    phases = {
        "spawn": started - spec["launched"],
        "import pandas": t_pandas - t0,
        "import vllm": t_import - t_pandas,
        "read input": t_read - t_import,
        "LLM(...)": t_load - t_read,
        "generate": t_generate - t_load,
        "write": t_write - t_generate,
    }
    report = {"rank": rank, "rows": len(frame), "phases": phases, "written": time.time()}
    print("PHASES" + json.dumps(report), flush=True)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    spec["launched"] = time.time()
    context = get_context("spawn")
    procs = []
    for rank in range(len(spec["environments"])):
        proc = context.Process(target=rank_main, args=(spec, rank))
        proc.start()
        procs.append(proc)
    exit_code = 0
    deadline = time.monotonic() + spec["timeout"]
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            print(f"rank process {proc.pid} still running after {spec['timeout']} s: killed", file=sys.stderr)
            proc.kill()
            proc.join()
            exit_code = 1
        elif proc.exitcode:
            exit_code = proc.exitcode
    sys.exit(exit_code)
'''


def skewed_workload(rows: int) -> pd.DataFrame:
    """``rows`` prompts with a heavy-tailed ``max_tokens`` column, sorted by it ascending."""
    low, high = SKEW_RANGE
    rng = np.random.default_rng(SKEW_SEED)
    max_tokens = np.clip(np.round(low * (1 + rng.pareto(1.2, rows))), low, high).astype("int64")
    frame = make_prompts(rows).assign(max_tokens=max_tokens)
    return frame.sort_values("max_tokens", kind="stable", ignore_index=True)


def run_launcher(script: Path, source: Path, output: Path, settings_: tuple, env: dict) -> dict:
    model, engine_args, sampling = settings_
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir()
    spec = {
        "input": str(source),
        "output": str(output),
        "model": model,
        "engine": engine_args,
        "sampling": sampling,
        "environments": [rank_variables(rank, RANKS) for rank in range(RANKS)],
        "timeout": TIMEOUT,
    }
    run, done = run_process([PYTHON, str(script), json.dumps(spec)], env, "launcher")
    reports = sorted(phase_lines(done.stdout), key=lambda report: report["rank"])
    if len(reports) != RANKS:
        raise SystemExit(
            f"launcher: {len(reports)} of {RANKS} ranks reported their phases:\n{done.stdout[-2000:]}"
        )
    phases = [report["phases"] for report in reports]
    run["rank_seconds"] = [p["generate"] for p in phases]
    run["phases"] = {
        # the slowest rank's, but each rank's own generation
        **{
            name: max(p[name] for p in phases)
            for name in ("spawn", "import pandas", "import vllm", "LLM(...)")
        },
        **{f"generate r{r}": p["generate"] for r, p in enumerate(phases)},
        "write": max(p["write"] for p in phases),
        "exit": run["exited"] - max(report["written"] for report in reports),
    }
    return run


def run_workload(name: str, frame: pd.DataFrame, args, workdir: Path, settings_: tuple, env: dict) -> None:
    rows = len(frame)
    source = workdir / f"{name}.parquet"
    frame.to_parquet(source, index=False)
    script = workdir / "dp_launcher.py"
    script.write_text(LAUNCHER)
    tokens: int | pd.Series = frame.set_index("id")["max_tokens"] if "max_tokens" in frame else MAX_TOKENS
    out_launcher = workdir / f"{name}-launcher.out"
    out_daskdp = workdir / f"{name}-daskdp.out"
    modes = ["balanced", "dynamic"] if name == "skewed" and args.partitioning else [None]
    commands = {
        mode: daskdp_command(
            source, out_daskdp, RANKS, MAX_TOKENS, *(["--partitioning", mode] if mode else [])
        )
        for mode in modes
    }
    labels = {"a": "launcher"} | {
        chr(ord("b") + i): f"daskdp {mode}" if mode else "daskdp" for i, mode in enumerate(modes)
    }
    keys = dict(zip(list(labels)[1:], modes, strict=True))
    sides = Sides(labels)

    if "max_tokens" in frame:
        counts = frame["max_tokens"]
        half = rows // RANKS + (rows % RANKS > 0)
        workload = (
            f"{rows:,} prompts, max_tokens per row {counts.min()}-{counts.max()} (median "
            f"{counts.median():.0f}, mean {counts.mean():.1f}; {counts.sum():,} tokens), sorted "
            f"ascending: the launcher's rank 0 gets {counts[:half].sum():,} tokens, rank 1 "
            f"{counts[half:].sum():,}"
        )
    else:
        workload = f"{rows:,} prompts x {MAX_TOKENS} tokens"
    print(f"== {name}: {workload}, ignore_eos, greedy")
    print(
        f"(a) {labels['a']:<{sides.width}}  {PYTHON} {script.name} <vLLM's data-parallel launcher shape, {RANKS} ranks>"
    )
    for key, mode in keys.items():
        print(
            f"({key}) {labels[key]:<{sides.width}}  {shown(commands[mode], {source: 'PROMPTS', out_daskdp: 'OUT'})}"
        )
    if name == "skewed" and not args.partitioning:
        print("note: this daskdp run has no --partitioning: daskdp ran once, with its own partitioning")
    print()

    for round_ in range(1, args.repeats + 1):
        a = run_launcher(script, source, out_launcher, settings_, env)
        theirs = check_rows("launcher", read_launcher(out_launcher), rows, tokens)
        sides.record(round_, "a", a)
        for key, mode in keys.items():
            b, ours = run_daskdp_checked(commands[mode], out_daskdp, labels[key], rows, tokens, RANKS)
            sides.record(round_, key, b)
            if round_ == 1:
                print(f"round {round_}  texts {labels['a']} vs {labels[key]}: {texts_differ(theirs, ours)}")
            if args.keep:
                shutil.copytree(out_daskdp, workdir / f"{name}-{labels[key].replace(' ', '-')}-{round_}.out")

    ratios = sides.report(rows)
    target = TARGETS[name]
    verdicts = [f"{key}/a {verdict(value, target)} ({value:.3f})" for key, value in ratios.items()]
    print(f"target        daskdp/launcher <= {target:.2f}: " + ", ".join(verdicts))
    if name == "skewed":
        what = {"a": "generate"} | dict.fromkeys(keys, "busy")
        spans = {
            key: [imbalance(run["rank_seconds"], RANKS) for run in runs] for key, runs in sides.runs.items()
        }
        for key, label in labels.items():
            rank_seconds = [run["rank_seconds"] for run in sides.runs[key]]
            per_rank = [statistics.median(seconds) for seconds in zip(*rank_seconds, strict=True)]
            shown_ranks = ", ".join(f"r{r} {s:.2f} s" for r, s in enumerate(per_rank))
            print(
                f"makespan/ideal ({key}) {label:<{sides.width}}  median {statistics.median(spans[key]):.3f}   "
                f"per round: {'  '.join(f'{s:.3f}' for s in spans[key])}   {what[key]} {shown_ranks}"
            )
        spans_daskdp = ", ".join(
            f"{key} {verdict(statistics.median(spans[key]), TARGET_MAKESPAN)} "
            f"({statistics.median(spans[key]):.3f})"
            for key in keys
        )
        print(f"target        daskdp makespan/ideal <= {TARGET_MAKESPAN:.2f}: {spans_daskdp}")
    print()


def read_launcher(output: Path) -> pd.DataFrame:
    files = sorted(output.glob("rank-*.parquet"))
    if len(files) != RANKS:
        raise SystemExit(f"launcher wrote {len(files)} of {RANKS} rank files in {output}")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload", choices=["uniform", "skewed", "both"], default="both", help="default both"
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=20_000,
        help="prompts of the uniform workload; the skewed one has twice as many (default 20,000)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each side (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        parser.error("--rows and --repeats must be at least 1")

    settings_ = settings(MAX_TOKENS)
    args.partitioning = args.workload != "uniform" and help_has("--partitioning")
    env = {**os.environ, **nanny_environment()}
    with work_directory("daskdp-launcher-", args.keep) as workdir:
        model, engine_args, _ = settings_
        print(f"model         {model}")
        print(f"engine        {json.dumps(engine_args)}")
        for rank in range(RANKS):
            print(f"rank {rank} env    {threads(rank_variables(rank, RANKS))} (as daskdp's rank {rank})")
        print()
        if args.workload in ("uniform", "both"):
            run_workload("uniform", make_prompts(args.rows), args, workdir, settings_, env)
        if args.workload in ("skewed", "both"):
            run_workload("skewed", skewed_workload(2 * args.rows), args, workdir, settings_, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
