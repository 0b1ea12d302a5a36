"""Embedding throughput: daskdp's ``--task embed`` against one plain ``vllm.LLM.embed`` process.

What it measures
----------------
It writes ``--rows`` distinct short texts (default 100,000; about 26 tokens each for the tiny
model, as Parquet in a temporary directory) and alternates fresh processes ``--repeats`` times
(a, b, c, a, b, c ...), each timed from process start to exit:

(a) baseline: the venv's python reads the Parquet with pandas, builds
    ``vllm.LLM(model=<tiny model>, **<the engine arguments daskdp uses for --task embed here>)``
    (``runner="pooling"``), calls ``LLM.embed`` once on all texts and writes the embeddings to
    Parquet. Its environment is daskdp's single rank's (``common.worker_environment``).
(b) ``daskdp run TEXTS -o OUT --model tiny --task embed --workers 1 --quiet --overwrite``.
(c) the same with ``--workers 2``.
(d) Ray Data LLM's embed task with two replicas, when ray is installed (the ``bench`` extra);
    otherwise the line says so and is skipped.

Every run is checked to have written every row once without an error; the first round compares
daskdp's embeddings with the baseline's (cosine of each row). Targets: b/a <= 1.05; c/a is the
speed-up of two ranks on this host (2 cores shared with others: read the spread).

Run it from the repository's root::

    .venv/bin/python benchmarks/embed.py                     # 100,000 texts, 3 rounds
    .venv/bin/python benchmarks/embed.py --rows 20000 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from common import (
    DASKDP,
    MODEL,
    PYTHON,
    Sides,
    make_prompts,
    phase_lines,
    read_shards,
    run_daskdp,
    run_process,
    shown,
    threads,
    verdict,
    work_directory,
    worker_environment,
)

TARGET = 1.05

BASELINE = r"""
import time
t0 = time.perf_counter()
import json, sys
import numpy as np
import pandas as pd
import pyarrow as pa
spec = json.loads(sys.argv[1])
t_pandas = time.perf_counter()
from vllm import LLM
t_import = time.perf_counter()
frame = pd.read_parquet(spec["input"])
t_read = time.perf_counter()
llm = LLM(model=spec["model"], **spec["engine"])
t_load = time.perf_counter()
outputs = llm.embed(frame["prompt"].tolist(), use_tqdm=False)
t_embed = time.perf_counter()
vectors = np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)
embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
table = pa.Table.from_pandas(frame, preserve_index=False).append_column("embedding", embedding)
import pyarrow.parquet as pq
pq.write_table(table, spec["output"])
t_write = time.perf_counter()
phases = {
    "import pandas": t_pandas - t0,
    "import vllm": t_import - t_pandas,
    "read input": t_read - t_import,
    "LLM(...)": t_load - t_read,
    "embed": t_embed - t_load,
    "write": t_write - t_embed,
}
print("PHASES" + json.dumps({"phases": phases, "written": time.time()}), flush=True)
"""


def settings() -> tuple[str, dict]:
    """Model and engine arguments as ``daskdp run --model tiny --task embed`` resolves them here."""
    from daskdp import config
    from daskdp.clusters.ranks import visible_gpus

    resolved = config.load(overrides={"model": MODEL, "run.task": "embed"})
    return config.engine_arguments(resolved, gpu_host=bool(visible_gpus()))


def run_baseline(source: Path, output: Path, model: str, engine_args: dict, env: dict) -> dict:
    spec = {"input": str(source), "output": str(output), "model": model, "engine": engine_args}
    run, done = run_process([PYTHON, "-c", BASELINE, json.dumps(spec)], env, "baseline")
    (report,) = phase_lines(done.stdout)
    run["phases"] = {**report["phases"], "exit": run["exited"] - report["written"]}
    return run


def check_embeddings(name: str, results: pd.DataFrame, rows: int) -> pd.DataFrame:
    """Every row once, each with an embedding and no error; sorted by id."""
    ids = results["id"].astype("int64")
    if len(results) != rows or sorted(ids) != list(range(rows)):
        raise SystemExit(f"{name} did not write every row once: {len(results)} rows, {ids.nunique()} ids")
    if "error" in results and results["error"].notna().any():
        raise SystemExit(f"{name}: {int(results['error'].notna().sum())} rows with an error")
    if results["embedding"].isna().any():
        raise SystemExit(f"{name}: {int(results['embedding'].isna().sum())} rows without an embedding")
    return results.assign(id=ids).sort_values("id", ignore_index=True)


def lowest_cosine(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """The lowest cosine between two results' embeddings of the same row."""
    x, y = (np.stack(frame["embedding"].to_numpy()).astype(np.float64) for frame in (a, b))
    cosine = (x * y).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return float(cosine.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="texts to embed (default 100,000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of a, b, c (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        parser.error("--rows and --repeats must be at least 1")

    model, engine_args = settings()
    env = worker_environment(0, 1)
    with work_directory("daskdp-embed-", args.keep) as workdir:
        source = workdir / "texts.parquet"
        make_prompts(args.rows).to_parquet(source, index=False)
        outputs = {ranks: workdir / f"daskdp-{ranks}.out" for ranks in (1, 2)}
        commands = {
            ranks: [*DASKDP, "run", str(source), "-o", str(out), "--model", MODEL, "--task", "embed"]
            + ["--workers", str(ranks), "--quiet", "--overwrite"]
            for ranks, out in outputs.items()
        }
        names = {source: "TEXTS", **{out: "OUT" for out in outputs.values()}}
        print(f"workload      {args.rows:,} short texts, --task embed; {source}")
        print(f"model         {model}")
        print(f"engine        {json.dumps(engine_args)}")
        print(f"baseline env  {threads(env)} (as daskdp's single rank)")
        print(f"(a) baseline  {PYTHON} -c <plain vllm.LLM.embed>")
        print(f"(b) daskdp    {shown(commands[1], names)}")
        print(f"(c) daskdp    {shown(commands[2], names)}")
        if importlib.util.find_spec("ray") is None:
            print("(d) ray_data: ray is not installed (pip install -e '.[bench]'); this line is skipped")
        print()

        sides = Sides({"a": "baseline", "b": "daskdp 1 rank", "c": "daskdp 2 ranks"})
        for round_ in range(1, args.repeats + 1):
            out_a = workdir / f"baseline-{round_}.parquet"
            sides.record(round_, "a", run_baseline(source, out_a, model, engine_args, env))
            baseline = check_embeddings("baseline", pd.read_parquet(out_a), args.rows)
            for key, ranks in (("b", 1), ("c", 2)):
                run = run_daskdp(commands[ranks], outputs[ranks], ranks=ranks)
                ours = check_embeddings(f"daskdp {ranks}", read_shards(outputs[ranks]), args.rows)
                sides.record(round_, key, run)
                if round_ == 1:
                    print(
                        f"round {round_}  lowest cosine to the baseline's: {lowest_cosine(baseline, ours):.7f}"
                    )
            if not args.keep:
                out_a.unlink()

        ratios = sides.report(args.rows)
        print(
            f"target        b/a <= {TARGET:.2f}: {verdict(ratios['b'], TARGET)} "
            f"({(ratios['b'] - 1) * 100:+.1f}% overhead); c/a {ratios['c']:.3f} with 2 ranks"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
