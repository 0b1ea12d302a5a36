"""daskdp's overhead against the lightest baseline: one plain ``vllm.LLM`` in one process.

What it measures
----------------
It writes its own workload (``--rows`` distinct short prompts, default 20,000, as Parquet in a
temporary directory), then alternates two fresh processes ``--repeats`` times (a, b, a, b ...),
each timed with ``time.perf_counter`` around the subprocess, from process start to exit:

(a) baseline: the venv's python reads the Parquet with pandas, builds
    ``vllm.LLM(model=<tiny model>, **<the engine arguments daskdp uses for it on a CPU host>)``,
    calls ``LLM.generate`` once on all prompts and writes the generated text and token counts
    to Parquet.
(b) ``daskdp run PROMPTS -o OUT --workers 1 --max-tokens 32 --ignore-eos --quiet --overwrite``.

Both generate 32 tokens per prompt with ``ignore_eos`` and greedy decoding (the sampling settings
and engine arguments are taken from daskdp's own configuration, so both sides get the same).
Every run is checked to have produced all rows; the first round also compares the texts
(greedy decoding is deterministic). The report gives each time, the median and spread of each
side, the ratio b/a of the medians and per round, rows/s, and the target b/a <= 1.10. The
machine's speed drifts by a third from minute to minute: only the alternated ratios mean much.

Environment of the baseline
---------------------------
The baseline process gets exactly the environment that daskdp's one rank (a Dask worker started
by a nanny) has when it builds its engine, on top of this process's environment:

* ``distributed.nanny.pre-spawn-environ`` (``MALLOC_TRIM_THRESHOLD_=65536``,
  ``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``, ``OPENBLAS_NUM_THREADS=1``, each unless already
  set in the environment) and ``PYTHONHASHSEED=6640``, which the nanny puts in the worker's
  environment before spawning it;
* then ``daskdp.cluster.rank_environments(1, 1)[0]``, which the worker applies to ``os.environ``
  first thing in the new process, before torch is imported: one compute thread
  (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``) on the rank's cores
  (``VLLM_CPU_OMP_THREADS_BIND=0,1`` for the single rank of this 2-core host);
* then what daskdp's engine plugin sets before ``LLM(...)``: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
  (the engine core runs in-process, as in a worker) and the ``VLLM_DP_*`` variables of an
  independent rank (rank 0 of size 1).

Both sides therefore compute with the same threads on the same cores.

Under each time, in brackets, where its seconds went. Baseline: its own phases (interpreter
start and ``import pandas``, ``from vllm import LLM``, read input, ``LLM(...)``, ``generate``,
write) and ``exit``, from the Parquet written to the process gone (vLLM's atexit clean-up
and the interpreter's finalization). daskdp, from its ``_summary.json``: ``start`` (process
start to the cluster's start: imports, configuration, the input's schema), ``run()`` (cluster
start, engine load, generation and writing, cluster shutdown), the rank's busy time inside it
(generation and writing of its partitions), and ``exit``. ``cpu`` is the CPU time of the run's
processes, children included.

Run it from the repository's root::

    .venv/bin/python benchmarks/overhead.py               # 20,000 prompts, 3 rounds
    .venv/bin/python benchmarks/overhead.py --rows 2000 --repeats 1 --keep
    .venv/bin/python benchmarks/overhead.py --chunk-size 128   # the cost of small checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
DASKDP = [str(VENV_BIN / "daskdp")] if (VENV_BIN / "daskdp").exists() else [PYTHON, "-m", "daskdp"]
MAX_TOKENS = 32
TARGET = 1.10
TIMEOUT = 3600

# The baseline: one plain vLLM engine in one process. Phase times go to stdout as one JSON line.
BASELINE = r"""
import time
t0 = time.perf_counter()
import json, sys
import pandas as pd
spec = json.loads(sys.argv[1])
t_pandas = time.perf_counter()
from vllm import LLM, SamplingParams
t_import = time.perf_counter()
frame = pd.read_parquet(spec["input"])
t_read = time.perf_counter()
llm = LLM(model=spec["model"], **spec["engine"])
t_load = time.perf_counter()
outputs = llm.generate(frame["prompt"].tolist(), SamplingParams(**spec["sampling"]), use_tqdm=False)
t_generate = time.perf_counter()
frame = frame.assign(
    generated_text=[o.outputs[0].text for o in outputs],
    prompt_tokens=[len(o.prompt_token_ids) for o in outputs],
    output_tokens=[len(o.outputs[0].token_ids) for o in outputs],
    finish_reason=[o.outputs[0].finish_reason for o in outputs],
)
frame.to_parquet(spec["output"], index=False)
t_write = time.perf_counter()
phases = {
    "import pandas": t_pandas - t0,
    "import vllm": t_import - t_pandas,
    "read input": t_read - t_import,
    "LLM(...)": t_load - t_read,
    "generate": t_generate - t_load,
    "write": t_write - t_generate,
}
print("PHASES" + json.dumps({"phases": phases, "written": time.time()}), flush=True)
"""


def make_prompts(rows: int) -> pd.DataFrame:
    """``rows`` distinct short prompts (about 26 tokens each for the tiny model) with ids ``0 .. rows-1``."""
    subjects = ["rivers", "bees", "the moon", "prime numbers", "volcanoes", "tea", "glaciers", "owls"]
    asks = ["Write a short note about", "List three facts on", "Explain to a child:", "Describe"]
    prompts = [
        f"{asks[i % len(asks)]} {subjects[i // len(asks) % len(subjects)]}, item {i} of topic {i * 7919 % 997}."
        for i in range(rows)
    ]
    return pd.DataFrame({"id": range(rows), "prompt": prompts})


def settings() -> tuple[str, dict, dict]:
    """Model, engine arguments and sampling settings as ``daskdp run`` resolves them here."""
    from daskdp import config
    from daskdp.cluster import visible_gpus

    resolved = config.load(overrides={"sampling.max-tokens": MAX_TOKENS, "sampling.ignore-eos": True})
    model, engine_args = config.engine_arguments(resolved, gpu_host=bool(visible_gpus()))
    sampling = {key.replace("-", "_"): value for key, value in resolved["sampling"].items()}
    sampling["stop"] = list(sampling["stop"] or []) or None
    return model, engine_args, sampling


def worker_environment() -> dict[str, str]:
    """The environment a daskdp rank has when it builds its engine, with 1 rank on this host."""
    import dask.config

    import daskdp.config  # noqa: F401  (daskdp's defaults join Dask's configuration)
    from daskdp.cluster import rank_environments
    from daskdp.plugin import DataParallelEnv

    # distributed.nanny._get_env_variables: the configured values unless the environment has them.
    pre_spawn = {
        key: os.environ.get(key, str(value))
        for key, value in dask.config.get("distributed.nanny.pre-spawn-environ").items()
        if value is not None
    }
    if pre_spawn.get("PYTHONHASHSEED") in (None, "0"):
        pre_spawn["PYTHONHASHSEED"] = "6640"
    nanny_environ = {k: str(v) for k, v in (dask.config.get("distributed.nanny.environ") or {}).items()}
    return {
        **os.environ,
        **pre_spawn,
        **nanny_environ,
        **rank_environments(1, 1)[0],
        **DataParallelEnv().environ(),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def cpu_seconds() -> float:
    """CPU time of this process's finished children, their own children included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_baseline(source: Path, output: Path, model: str, engine_args: dict, sampling: dict, env) -> dict:
    spec = {
        "input": str(source),
        "output": str(output),
        "model": model,
        "engine": engine_args,
        "sampling": sampling,
    }
    cpu = cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run(
        [PYTHON, "-c", BASELINE, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=TIMEOUT
    )
    seconds = time.perf_counter() - started
    exited = time.time()
    if done.returncode != 0:
        raise SystemExit(f"baseline failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("PHASES"))
    report = json.loads(line.removeprefix("PHASES"))
    phases = {**report["phases"], "exit": exited - report["written"]}
    return {"seconds": seconds, "cpu": cpu_seconds() - cpu, "phases": phases}


def run_daskdp(source: Path, output: Path, chunk_size: int | None) -> dict:
    command = [
        *DASKDP,
        "run",
        str(source),
        "-o",
        str(output),
        "--workers",
        "1",
        "--max-tokens",
        str(MAX_TOKENS),
    ]
    command += ["--ignore-eos", "--quiet", "--overwrite"]
    if chunk_size is not None:
        command += ["--chunk-size", str(chunk_size)]
    cpu = cpu_seconds()
    launched = time.time()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    seconds = time.perf_counter() - started
    exited = time.time()
    if done.returncode != 0:
        raise SystemExit(f"daskdp failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    summary = json.loads((output / "_summary.json").read_text())
    phases = {
        # up to the cluster's start: imports, configuration, the input's schema
        "start": summary["started"] - launched,
        # cluster start, engine load, generation and writing, cluster shutdown
        "run()": summary["wall_seconds"],
        "of which rank busy": sum(rank["busy_seconds"] for rank in summary["ranks"].values()),
        "exit": exited - summary["finished"],
    }
    return {"seconds": seconds, "cpu": cpu_seconds() - cpu, "phases": phases}


def read_baseline(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output)


def read_daskdp(output: Path) -> pd.DataFrame:
    shards = sorted(output.glob("part-*.parquet"))
    if not shards:
        raise SystemExit(f"daskdp wrote no shards in {output}")
    return pd.concat([pd.read_parquet(shard) for shard in shards], ignore_index=True)


def check_rows(name: str, results: pd.DataFrame, rows: int) -> pd.DataFrame:
    """Every input row exactly once, generated, with MAX_TOKENS tokens; sorted by id."""
    problems = []
    if len(results) != rows or sorted(results["id"]) != list(range(rows)):
        problems.append(f"{len(results)} rows with {results['id'].nunique()} distinct ids, expected {rows}")
    if "error" in results and results["error"].notna().any():
        problems.append(f"{int(results['error'].notna().sum())} rows with an error")
    if results["generated_text"].isna().any():
        problems.append(f"{int(results['generated_text'].isna().sum())} rows without text")
    if (results["output_tokens"] != MAX_TOKENS).any():
        problems.append(
            f"{int((results['output_tokens'] != MAX_TOKENS).sum())} rows not of {MAX_TOKENS} tokens"
        )
    if problems:
        raise SystemExit(f"{name} did not produce all rows: " + "; ".join(problems))
    return results.sort_values("id", ignore_index=True)


def spread(times: list[float]) -> str:
    return f"median {statistics.median(times):7.2f} s   spread {min(times):.2f}-{max(times):.2f} s"


def details(run: dict) -> str:
    phases = ", ".join(f"{name} {seconds:.2f}" for name, seconds in run["phases"].items())
    return f"cpu {run['cpu']:6.2f} s   [{phases}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="prompts to generate (default 20,000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of baseline then daskdp (default 3)")
    parser.add_argument(
        "--chunk-size", type=int, help="daskdp's --chunk-size (default: daskdp's own default)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        parser.error("--rows and --repeats must be at least 1")

    model, engine_args, sampling = settings()
    env = worker_environment()
    workdir = Path(tempfile.mkdtemp(prefix="daskdp-overhead-"))
    try:
        source = workdir / "prompts.parquet"
        make_prompts(args.rows).to_parquet(source, index=False)
        print(f"workload      {args.rows:,} prompts x {MAX_TOKENS} tokens, ignore_eos, greedy; {source}")
        print(f"model         {model}")
        print(f"engine        {json.dumps(engine_args)}")
        threads = {
            k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND") if k in env
        }
        print(f"baseline env  {threads} (as daskdp's single rank)")
        print(f"(a) baseline  {PYTHON} -c <plain vllm.LLM.generate>")
        print(
            f"(b) daskdp    {' '.join(DASKDP)} run PROMPTS -o OUT --workers 1 --max-tokens {MAX_TOKENS} "
            "--ignore-eos --quiet --overwrite"
            + (f" --chunk-size {args.chunk_size}" if args.chunk_size else "")
        )
        print()

        times: dict[str, list[float]] = {"a": [], "b": []}
        for round_ in range(1, args.repeats + 1):
            out_a = workdir / f"baseline-{round_}.parquet"
            a = run_baseline(source, out_a, model, engine_args, sampling, env)
            baseline = check_rows("baseline", read_baseline(out_a), args.rows)
            times["a"].append(a["seconds"])
            print(f"round {round_}  (a) baseline {a['seconds']:7.2f} s   {details(a)}", flush=True)

            out_b = workdir / "daskdp.out"
            b = run_daskdp(source, out_b, args.chunk_size)
            ours = check_rows("daskdp", read_daskdp(out_b), args.rows)
            times["b"].append(b["seconds"])
            print(f"round {round_}  (b) daskdp   {b['seconds']:7.2f} s   {details(b)}", flush=True)
            if round_ == 1:
                differ = int((baseline["generated_text"] != ours["generated_text"]).sum())
                print(f"round {round_}  texts: {'identical' if not differ else f'{differ} rows differ'}")
            if args.keep:
                shutil.copytree(out_b, workdir / f"daskdp-{round_}.out")
            else:
                out_a.unlink()

        median_a, median_b = statistics.median(times["a"]), statistics.median(times["b"])
        ratio = median_b / median_a
        per_round = "  ".join(f"{b / a:.3f}" for a, b in zip(times["a"], times["b"], strict=True))
        print()
        print(f"(a) baseline  {spread(times['a'])}   {args.rows / median_a:8,.0f} rows/s")
        print(f"(b) daskdp    {spread(times['b'])}   {args.rows / median_b:8,.0f} rows/s")
        print(f"ratio b/a     {ratio:.3f} (medians)   per round: {per_round}")
        verdict = "met" if ratio <= TARGET else "NOT met"
        print(f"target        b/a <= {TARGET:.2f}: {verdict} ({(ratio - 1) * 100:+.1f}% overhead)")
    finally:
        if args.keep:
            print(f"kept          {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
