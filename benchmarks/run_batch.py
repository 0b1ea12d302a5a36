"""daskdp on an OpenAI Batch file against vLLM's own ``run_batch``, with 1 and 2 ranks.

What it measures
----------------
It writes its own workload, an OpenAI Batch file of ``--rows`` chat-completions requests
(default 20,000; distinct short user messages, every body ``"max_completion_tokens": 32`` and
``"temperature": 0``, model ``tiny``), then alternates fresh processes ``--repeats`` times, each
timed from process start to its output file written (the output file's modification time;
the process's whole time, and how long it took to exit after writing, are shown beside it):

(a) ``python -m vllm.entrypoints.openai.run_batch -i BATCH -o OUT --model <tiny model>
    --served-model-name tiny <the engine arguments daskdp uses for it>`` with
    ``OMP_NUM_THREADS=1``, and (a2) the same with ``OMP_NUM_THREADS=2``: the baseline is the
    faster of the two medians on this machine;
(b) ``daskdp run BATCH -o DIR --model tiny --workers 1 --export OUT --quiet --overwrite``;
(c) the same with ``--workers 2``.

Targets: b/baseline <= 1.05 and c/baseline <= 0.6. Every output file is checked to hold every
custom_id exactly once, each answered; the first round also compares the answers of (a) and
(b) (greedy decoding is deterministic). The machine's speed drifts by a third from minute to
minute: only the alternated ratios mean much.

Run it from the repository's root::

    .venv/bin/python benchmarks/run_batch.py                     # 20,000 requests, 3 rounds
    .venv/bin/python benchmarks/run_batch.py --rows 2000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import (
    DASKDP,
    PYTHON,
    Sides,
    make_prompts,
    run_process,
    settings,
    shown,
    verdict,
    work_directory,
)

MAX_TOKENS = 32
TARGETS = {"b": 1.05, "c": 0.6}


def write_batch(path: Path, rows: int) -> list[str]:
    """The OpenAI Batch file; its custom_ids in order."""
    ids = []
    with path.open("w") as f:
        for i, prompt in enumerate(make_prompts(rows)["prompt"]):
            ids.append(f"request-{i}")
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": prompt}],
                "max_completion_tokens": MAX_TOKENS,
                "temperature": 0,
            }
            f.write(
                json.dumps(
                    {"custom_id": ids[-1], "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
            )
            f.write("\n")
    return ids


def run_batch_command(source: Path, output: Path, model: str, engine_args: dict) -> list[str]:
    """vLLM's run_batch with the engine arguments daskdp resolves for the tiny model."""
    flags = []
    for key, value in engine_args.items():
        if key in ("tensor_parallel_size", "use_tqdm_on_load", "disable_log_stats"):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return [PYTHON, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(source), "-o", str(output),
            "--model", model, "--served-model-name", "tiny", *flags]  # fmt: skip


def answers(path: Path, ids: list[str], name: str) -> dict[str, str]:
    """Each custom_id's answer; ends the benchmark unless every id is there once, answered."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    got = [line["custom_id"] for line in lines]
    if sorted(got) != sorted(ids) or len(set(got)) != len(got):
        raise SystemExit(f"{name}: {len(got)} lines for {len(ids)} requests, or custom_ids repeat")
    failed = [line["custom_id"] for line in lines if line["response"]["status_code"] != 200]
    if failed:
        raise SystemExit(f"{name}: {len(failed)} requests failed, e.g. {failed[0]}: {lines[0]['error']}")
    return {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in lines}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="requests (default 20,000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of a, a2, b, c (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args = parser.parse_args(argv)

    model, engine_args, _ = settings(MAX_TOKENS)
    with work_directory("daskdp-run-batch-", args.keep) as workdir:
        source, results = workdir / "batch.jsonl", workdir / "results.jsonl"
        ids = write_batch(source, args.rows)
        baseline = run_batch_command(source, results, model, engine_args)
        envs = {"a": {**os.environ, "OMP_NUM_THREADS": "1"}, "a2": {**os.environ, "OMP_NUM_THREADS": "2"}}
        commands = {
            key: [*DASKDP, "run", str(source), "-o", str(workdir / "daskdp.out"), "--model", "tiny",
                  "--workers", str(workers), "--export", str(results), "--quiet", "--overwrite"]
            for key, workers in (("b", 1), ("c", 2))
        }  # fmt: skip
        names = {source: "BATCH", results: "OUT", workdir / "daskdp.out": "DIR"}
        print(f"workload      {args.rows:,} chat requests x {MAX_TOKENS} tokens, temperature 0; {source}")
        print(f"(a)  run_batch OMP_NUM_THREADS=1  {shown(baseline, names)}")
        print("(a2) run_batch OMP_NUM_THREADS=2  (the same)")
        for key in commands:
            print(f"({key})  daskdp  {shown(commands[key], names)}")
        print()

        labels = {
            "a": "run_batch OMP 1",
            "a2": "run_batch OMP 2",
            "b": "daskdp 1 rank",
            "c": "daskdp 2 ranks",
        }
        sides = Sides(labels)
        for round_ in range(1, args.repeats + 1):
            texts = {}
            for key in labels:
                results.unlink(missing_ok=True)
                launched = time.time()
                command, env = (baseline, envs[key]) if key in envs else (commands[key], dict(os.environ))
                run, _ = run_process(command, env, labels[key])
                written = results.stat().st_mtime  # both write it whole at their end
                run["phases"] = {"process": run["seconds"], "exit after output": run["exited"] - written}
                run["seconds"] = written - launched
                texts[key] = answers(results, ids, labels[key])
                sides.record(round_, key, run)
            if round_ == 1:
                differ = sum(texts["a"][i] != texts["b"][i] for i in ids)
                print(
                    f"round {round_}  answers of a and b: {'identical' if not differ else f'{differ} differ'}"
                )

        print()
        for key, label in labels.items():
            print(f"({key}) {label:<16} {sides.speed(key, args.rows)}")
        medians = {key: statistics.median(sides.times(key)) for key in labels}
        base = min(("a", "a2"), key=medians.get)
        print(f"baseline      {labels[base]} (the faster run_batch here)")
        for key, target in TARGETS.items():
            value = medians[key] / medians[base]
            rounds = "  ".join(
                f"{y / x:.3f}" for x, y in zip(sides.times(base), sides.times(key), strict=True)
            )
            print(f"ratio {key}/{base:<3}   {value:.3f} (medians)   per round: {rounds}   target <= {target}: "
                  f"{verdict(value, target)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
