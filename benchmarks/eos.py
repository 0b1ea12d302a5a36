"""daskdp with 2 ranks against vLLM's data-parallel launcher with 2 ranks, on chat answers that stop at EOS.

What it measures
----------------
The real model (daskdp's default, SmolLM2-135M-Instruct from ``scripts/setup.sh``) answers
``--rows`` chat questions, greedy, ``--max-tokens`` (default 96) at most, without
``ignore_eos``: each answer stops where the model ends it, so nobody knows the lengths up front.
The questions come grouped as datasets often arrive: short answers first (capitals, sums, yes or
no), then one-sentence explanations, then long-form writing (essays, stories) last. Every row has
about the same prompt length and the same ``max_tokens``, so daskdp's cost estimate (prompt +
max_tokens) cannot see which rows will be long; the launcher's even split gives one rank the long
answers.

Each question is rendered through the model's chat template here, into a ``prompt`` column, so
that both sides get the very same text (the launcher calls ``LLM.generate`` on it).

It alternates fresh processes ``--repeats`` times, timed from process start to exit:

(a) launcher: vLLM's ``examples/offline_inference/data_parallel.py`` shape, as in
    ``launcher.py`` (its code, reused): one process per rank, each its contiguous even slice.
(b) ``daskdp run PROMPTS -o OUT --workers 2 --max-tokens 96 --quiet --overwrite --partitioning balanced``
(c) the same with ``--partitioning dynamic``.
With ``--before DIR`` (a checkout of another daskdp commit, e.g. ``git worktree add DIR
integrate``), (d) and (e) run (b) and (c) with that checkout's daskdp (``PYTHONPATH=DIR``), in
the same rounds, so a change can be compared with its parent on the same minutes of the machine.

Reported per run and as medians: the seconds, daskdp/launcher (target <= 0.95), and
makespan/ideal (target <= 1.10) defined as in ``launcher.py``: each rank's busy seconds (daskdp:
``summary["ranks"][r]["busy_seconds"]``, generation and writing of its partitions; the launcher:
each rank's ``generate`` seconds), makespan = the longest rank's, ideal = their sum over the
ranks, both from that run. Every run is checked to have produced every row exactly once, without
error, within max-tokens; the share of answers that ended at EOS is printed.

Run it from the repository's root (the issue's full run is 2,000 questions, 3 rounds)::

    .venv/bin/python benchmarks/eos.py --rows 2000 --repeats 3
    .venv/bin/python benchmarks/eos.py --rows 600 --repeats 2 --before /tmp/eos-before
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import pandas as pd
from common import (
    DASKDP,
    Sides,
    imbalance,
    nanny_environment,
    rank_variables,
    read_shards,
    run_daskdp,
    shown,
    texts_differ,
    threads,
    verdict,
    work_directory,
)
from launcher import LAUNCHER, RANKS, read_launcher, run_launcher

MAX_TOKENS = 96
TARGET_RATIO = 0.95
TARGET_MAKESPAN = 1.10
SHARES = {"short": 0.5, "sentence": 0.25, "long": 0.25}  # of the rows, in this order

COUNTRIES = [
    "France", "Italy", "Spain", "Japan", "Egypt", "Canada", "Brazil", "Kenya", "Norway", "Peru",
    "Chile", "India", "China", "Greece", "Poland", "Mexico", "Sweden", "Turkey", "Ghana", "Cuba",
]  # fmt: skip
ANIMALS = ["a dolphin", "a sparrow", "a shark", "a bat", "a frog", "a whale", "a snake", "a horse"]
THINGS = [
    "photosynthesis", "gravity", "a rainbow", "an eclipse", "a volcano", "inflation", "a vaccine",
    "democracy", "a black hole", "the internet", "evaporation", "an atom", "a glacier", "DNA",
]  # fmt: skip
TOPICS = [
    "the history of the printing press", "why sleep matters", "life in a medieval village",
    "the future of space travel", "how rivers shape landscapes", "the importance of bees",
    "learning a second language", "the invention of the telephone", "a day in the life of a baker",
    "the ocean at night", "friendship between a robot and a child", "a lighthouse keeper's winter",
]  # fmt: skip
FORMS = ["Write a detailed essay about", "Write a long story about", "Write a long blog post on"]


def questions(rows: int) -> list[str]:
    """``rows`` distinct questions: short answers first, one-sentence explanations, long-form last."""
    short = int(rows * SHARES["short"])
    sentence = int(rows * SHARES["sentence"])
    out = []
    for i in range(rows):
        if i < short:
            kind = i % 3
            if kind == 0:
                out.append(f"What is the capital of {COUNTRIES[i // 3 % len(COUNTRIES)]}? (question {i})")
            elif kind == 1:
                out.append(f"What is {i % 97 + 3} plus {i * 7 % 89 + 2}? Answer with the number only.")
            else:
                out.append(f"Is {ANIMALS[i // 3 % len(ANIMALS)]} a mammal? Answer yes or no. (question {i})")
        elif i < short + sentence:
            out.append(f"In one sentence, what is {THINGS[i % len(THINGS)]}? (question {i})")
        else:
            out.append(f"{FORMS[i % len(FORMS)]} {TOPICS[i // len(FORMS) % len(TOPICS)]}. (request {i})")
    return out


def workload(rows: int, model: str) -> pd.DataFrame:
    """The questions rendered through ``model``'s chat template, as ``prompt``, with ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions(rows)
    ]
    return pd.DataFrame({"id": range(rows), "prompt": prompts})


def settings(max_tokens: int) -> tuple[str, dict, dict]:
    """Model, engine arguments and sampling as ``daskdp run --max-tokens N`` resolves them here."""
    from daskdp import config
    from daskdp.clusters.ranks import visible_gpus

    resolved = config.load(None, overrides={"sampling.max-tokens": max_tokens})
    model, engine_args = config.engine_arguments(resolved, gpu_host=bool(visible_gpus()))
    from daskdp.engine.requests import SAMPLING_KEYS

    # SamplingParams' own keywords: structured-output settings are built apart (a benchmark's own)
    sampling = {key.replace("-", "_"): resolved["sampling"][key] for key in SAMPLING_KEYS}
    sampling["stop"] = list(sampling["stop"] or []) or None
    return model, engine_args, sampling


def check(name: str, results: pd.DataFrame, rows: int, max_tokens: int) -> pd.DataFrame:
    """Every row exactly once, generated without error within ``max_tokens``; sorted by id."""
    ids = results["id"].astype("int64")
    if len(results) != rows or sorted(ids) != list(range(rows)):
        raise SystemExit(f"{name}: {len(results)} rows with {ids.nunique()} distinct ids, expected {rows}")
    results = results.assign(id=ids).sort_values("id", ignore_index=True)
    if "error" in results and results["error"].notna().any():
        raise SystemExit(f"{name}: {int(results['error'].notna().sum())} rows with an error")
    if results["generated_text"].isna().any() or (results["output_tokens"] > max_tokens).any():
        raise SystemExit(f"{name}: rows without text or longer than {max_tokens} tokens")
    return results


def check_checkout(checkout: str, env: dict[str, str]) -> None:
    """``python -m daskdp`` run in ``checkout`` with ``env`` imports that checkout's daskdp."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", "import daskdp; print(daskdp.__file__)"],
        capture_output=True, text=True, env=env, cwd=checkout, check=True,
    )  # fmt: skip
    if not done.stdout.strip().startswith(checkout):
        raise SystemExit(f"--before {checkout}: daskdp imported from {done.stdout.strip()}")


def stopped(results: pd.DataFrame) -> str:
    tokens = results["output_tokens"].astype("int64")
    eos = (results["finish_reason"] == "stop").mean()
    return f"{eos:.0%} ended at EOS, {tokens.sum():,} output tokens (median {tokens.median():.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The issue's full run: .venv/bin/python benchmarks/eos.py --rows 2000 --repeats 3",
    )
    parser.add_argument("--rows", type=int, default=2000, help="chat questions (default 2,000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each side (default 3)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=f"default {MAX_TOKENS}")
    parser.add_argument(
        "--before",
        metavar="DIR",
        help="also run daskdp from this checkout (PYTHONPATH=DIR) in the same rounds, for a before/after",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args = parser.parse_args(argv)
    if args.rows < 4 or args.repeats < 1:
        parser.error("--rows must be at least 4 and --repeats at least 1")

    settings_ = settings(args.max_tokens)
    model, engine_args, _ = settings_
    env = {**os.environ, **nanny_environment()}
    modes = ["balanced", "dynamic"]
    checkouts = {"": None} | ({" before": str(Path(args.before).resolve())} if args.before else {})
    with work_directory("daskdp-eos-", args.keep) as workdir:
        frame = workload(args.rows, model)
        source = workdir / "questions.parquet"
        frame.to_parquet(source, index=False)
        script = workdir / "dp_launcher.py"
        script.write_text(LAUNCHER)
        out_launcher, out_daskdp = workdir / "launcher.out", workdir / "daskdp.out"
        command = {
            mode: [
                *DASKDP,
                "run",
                str(source),
                "-o",
                str(out_daskdp),
                "--workers",
                str(RANKS),
                "--max-tokens",
                str(args.max_tokens),
                "--quiet",
                "--overwrite",
                "--partitioning",
                mode,
            ]  # fmt: skip
            for mode in modes
        }
        sides_ = [(suffix, checkout, mode) for suffix, checkout in checkouts.items() for mode in modes]
        labels = {"a": "launcher"} | {
            chr(ord("b") + i): f"daskdp {mode}{suffix}" for i, (suffix, _, mode) in enumerate(sides_)
        }
        keys = dict(zip(list(labels)[1:], sides_, strict=True))
        sides = Sides(labels)
        print(f"model         {model}")
        print(f"engine        {json.dumps(engine_args)}")
        for rank in range(RANKS):
            print(f"rank {rank} env    {threads(rank_variables(rank, RANKS))} (as daskdp's rank {rank})")
        print(
            f"== {args.rows:,} chat questions (short answers {SHARES['short']:.0%}, one sentence "
            f"{SHARES['sentence']:.0%}, long-form writing {SHARES['long']:.0%}, in that order), "
            f"max-tokens {args.max_tokens}, greedy, stopping at EOS"
        )
        print(
            f"(a) {labels['a']:<{sides.width}}  {script.name} <vLLM's data-parallel launcher shape, {RANKS} ranks>"
        )
        for key, (_, checkout, mode) in keys.items():
            where = f"PYTHONPATH={checkout} " if checkout else ""
            print(
                f"({key}) {labels[key]:<{sides.width}}  {where}{shown(command[mode], {source: 'PROMPTS', out_daskdp: 'OUT'})}"
            )
        print()
        for round_ in range(1, args.repeats + 1):
            a = run_launcher(script, source, out_launcher, settings_, env)
            theirs = check("launcher", read_launcher(out_launcher), args.rows, args.max_tokens)
            sides.record(round_, "a", a, note=f"{imbalance(a['rank_seconds'], RANKS):.3f} makespan/ideal   ")
            if round_ == 1:
                print(f"              launcher: {stopped(theirs)}")
            for key, (_, checkout, mode) in keys.items():
                side_env = {**os.environ, "PYTHONPATH": checkout} if checkout else None
                if checkout:  # this checkout's daskdp, and the version it reports
                    check_checkout(checkout, side_env)
                run = run_daskdp(command[mode], out_daskdp, env=side_env, ranks=RANKS, cwd=checkout)
                ours = check(labels[key], read_shards(out_daskdp), args.rows, args.max_tokens)
                note = f"{imbalance(run['rank_seconds'], RANKS):.3f} makespan/ideal   "
                sides.record(round_, key, run, note=note)
                if round_ == 1:
                    print(f"              {stopped(ours)}; texts vs launcher: {texts_differ(theirs, ours)}")
                if args.keep:
                    shutil.copytree(out_daskdp, workdir / f"{labels[key].replace(' ', '-')}-{round_}.out")

        ratios = sides.report(args.rows)
        print(
            f"target        daskdp/launcher <= {TARGET_RATIO:.2f}: "
            + ", ".join(
                f"{key}/a {verdict(value, TARGET_RATIO)} ({value:.3f})" for key, value in ratios.items()
            )
        )
        spans = {
            key: [imbalance(run["rank_seconds"], RANKS) for run in runs] for key, runs in sides.runs.items()
        }
        for key, label in labels.items():
            per_rank = [
                statistics.median(s) for s in zip(*(r["rank_seconds"] for r in sides.runs[key]), strict=True)
            ]
            busy = "generate" if key == "a" else "busy"
            print(
                f"makespan/ideal ({key}) {label:<{sides.width}}  median {statistics.median(spans[key]):.3f}   "
                f"per round: {'  '.join(f'{s:.3f}' for s in spans[key])}   {busy} "
                + ", ".join(f"r{r} {s:.2f} s" for r, s in enumerate(per_rank))
            )
        print(
            f"target        daskdp makespan/ideal <= {TARGET_MAKESPAN:.2f}: "
            + ", ".join(
                f"{key} {verdict(statistics.median(spans[key]), TARGET_MAKESPAN)} ({statistics.median(spans[key]):.3f})"
                for key in keys
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
