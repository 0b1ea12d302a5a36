"""Prefix locality: daskdp with 2 ranks on prompts sharing long prefixes, with and without it.

What it measures
----------------
It writes its own workload (Parquet in a temporary directory): ``--rows`` prompts (default
8,000), each one of ``--prefixes`` long common headers (default 32; a system line and few-shot
examples of about 400 tokens, seeded) followed by a short question of its own, the rows shuffled
so that every header is scattered across the input. It then alternates two fresh processes
``--repeats`` times (a, b, a, b ...), each timed with ``time.perf_counter`` around the
subprocess, from process start to exit:

(a) ``daskdp run PROMPTS -o OUT --workers 2 --max-tokens 16 --ignore-eos --quiet --overwrite
    --config CONF --no-prefix-locality``: the rows in input order, each rank a contiguous run of
    them, so both ranks see every header, interleaved;
(b) the same with ``--prefix-locality``: rows sharing a long prefix go to the same rank and are
    ordered together.

``CONF`` gives each rank's engine a small KV cache (``daskdp: {engine: {kv-cache-memory-bytes:
...}}``, ``--kv-cache-mib``, default 8 MiB: about 8,000 tokens of the tiny model, fewer than
the headers' 32 x 400): vLLM's prefix cache then holds only some of the headers, and which ones
it still holds when a row arrives depends on the order of the rows. The config file's ``engine``
section is merged last into the engine arguments (``daskdp.config.engine_arguments``), so it
overrides the tiny model's 256 MiB.

Every run is checked to have produced every row exactly once with its 16 tokens. The report
gives each time with where it went, the median and spread of each side, rows/s, the ratio b/a of
the medians and per round, and vLLM's prefix-cache hit rate of each run (the fraction of prompt
tokens found in the cache, ``prefix_cache_hit_rate`` in ``_summary.json``; ``n/a`` from a
daskdp that does not report it). A daskdp whose ``daskdp run --help`` does not list
``--prefix-locality`` runs both sides without the flag, and the report says so. The machine's
speed drifts by a third from minute to minute: only the alternated ratios mean much.

Run it from the repository's root::

    .venv/bin/python benchmarks/prefix.py                       # 8,000 prompts, 3 rounds
    .venv/bin/python benchmarks/prefix.py --rows 1000 --repeats 1 --keep
    .venv/bin/python benchmarks/prefix.py --prefixes 8 --kv-cache-mib 4
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys

import pandas as pd
import yaml
from common import (
    Sides,
    daskdp_command,
    help_has,
    ratio,
    run_daskdp_checked,
    settings,
    shown,
    texts_differ,
    work_directory,
)

RANKS = 2
MAX_TOKENS = 16
SEED = 4
HEADER_WORDS = 130  # about 400 tokens of the tiny model's tokenizer
WORDS = (
    "the of and a to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do how "
    "their if will up other about out many then them these so some her would make like him into time "
    "has look two more write go see number no way could people my than first water been call who oil "
    "its now find long down day did get come made may part river stone cloud seven garden answer"
).split()


def header(k: int, rng: random.Random) -> str:
    """The ``k``-th long common prefix: a system line and few-shot examples, ``HEADER_WORDS`` words."""
    lines = [f"System {k:02d}: you are assistant number {k}; answer in the style of the examples."]
    words = 0
    while words < HEADER_WORDS:
        question = " ".join(rng.choice(WORDS) for _ in range(8))
        answer = " ".join(rng.choice(WORDS) for _ in range(14))
        lines.append(f"Q: {question}?\nA: {answer}.")
        words += 22
    return "\n".join(lines) + "\n"


def make_workload(rows: int, prefixes: int) -> pd.DataFrame:
    """``rows`` prompts, row ``i`` of header ``i % prefixes`` with its own question; shuffled."""
    rng = random.Random(SEED)
    headers = [header(k, rng) for k in range(prefixes)]
    prompts = [
        f"{headers[i % prefixes]}Q: question {i}, {' '.join(rng.choice(WORDS) for _ in range(6))}?\nA:"
        for i in range(rows)
    ]
    frame = pd.DataFrame(
        {"id": range(rows), "prompt": prompts, "prefix": [i % prefixes for i in range(rows)]}
    )
    return frame.sample(frac=1.0, random_state=SEED, ignore_index=True)


def hit_rate(summary: dict) -> float | None:
    value = summary.get("prefix_cache_hit_rate")
    return None if value is None else float(value)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8_000, help="prompts to generate (default 8,000)")
    parser.add_argument("--prefixes", type=int, default=32, help="distinct long headers (default 32)")
    parser.add_argument(
        "--kv-cache-mib", type=float, default=8, help="each rank's KV cache, in MiB (default 8)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each side (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1 or args.prefixes < 1 or args.kv_cache_mib <= 0:
        parser.error("--rows, --repeats, --prefixes and --kv-cache-mib must be positive")

    locality = help_has("--prefix-locality")
    with work_directory("daskdp-prefix-", args.keep) as workdir:
        source = workdir / "prompts.parquet"
        frame = make_workload(args.rows, args.prefixes)
        frame.to_parquet(source, index=False)
        conf = workdir / "engine.yaml"
        kv_bytes = int(args.kv_cache_mib * (1 << 20))
        layer = {"daskdp": {"engine": {"kv-cache-memory-bytes": kv_bytes}}}
        conf.write_text(yaml.safe_dump(layer))
        model, engine_args, _ = settings(MAX_TOKENS, conf)
        output = workdir / "daskdp.out"
        flags = (
            {"a": "--no-prefix-locality", "b": "--prefix-locality"} if locality else {"a": None, "b": None}
        )
        labels = {"a": "no locality", "b": "locality"}
        commands = {
            key: daskdp_command(
                source, output, RANKS, MAX_TOKENS, "--config", str(conf), *([flag] if flag else [])
            )
            for key, flag in flags.items()
        }
        chars = frame["prompt"].str.len()
        print(
            f"workload      {args.rows:,} prompts: {args.prefixes} headers of {HEADER_WORDS} words, each row "
            f"with its own question ({chars.mean():.0f} characters a prompt), shuffled; {MAX_TOKENS} tokens, "
            "ignore_eos, greedy"
        )
        print(f"model         {model}")
        print(f"engine        {json.dumps(engine_args)}")
        print(f"CONF          {conf}: {yaml.safe_dump(layer, default_flow_style=True).strip()}")
        for key, command in commands.items():
            print(
                f"({key}) {labels[key]:<11} {shown(command, {source: 'PROMPTS', output: 'OUT', conf: 'CONF'})}"
            )
        if not locality:
            print("note: this daskdp run has no --prefix-locality: both sides ran without the flag")
        print()

        sides = Sides(labels)
        rates: dict[str, list[float | None]] = {"a": [], "b": []}
        prompt_tokens = 0
        for round_ in range(1, args.repeats + 1):
            results = {}
            for key, command in commands.items():
                run, results[key] = run_daskdp_checked(
                    command, output, labels[key], args.rows, MAX_TOKENS, RANKS
                )
                rates[key].append(hit_rate(run["summary"]))
                prompt_tokens = run["summary"].get("prompt_tokens", 0)
                sides.record(round_, key, run, f"hit rate {percent(rates[key][-1]):>6}   ")
                if args.keep:
                    shutil.copytree(output, workdir / f"{labels[key].replace(' ', '-')}-{round_}.out")
            if round_ == 1:
                print(f"round {round_}  texts: {texts_differ(results['a'], results['b'])}")

        print()
        if prompt_tokens:
            print(f"prompts       {prompt_tokens / args.rows:.0f} tokens on average")
        medians = {}
        for key, label in labels.items():
            known = [rate for rate in rates[key] if rate is not None]
            medians[key] = statistics.median(known) if known else None
            print(
                f"({key}) {label:<11} {sides.speed(key, args.rows)}   hit rate median {percent(medians[key])}"
            )
        value, per_round = ratio(sides.times("a"), sides.times("b"))
        print(f"ratio b/a     {value:.3f} (medians)   per round: {per_round}   (rows/s b/a {1 / value:.3f})")
        if medians["a"] is not None and medians["b"] is not None:
            gain = f"{(medians['b'] - medians['a']) * 100:+.1f} points"
        else:
            gain = "n/a"
        print(f"hit rate      (a) {percent(medians['a'])}   (b) {percent(medians['b'])}   b-a {gain}")
        pays = value < 1 and gain != "n/a" and medians["b"] > medians["a"]
        print(
            "target        none set by issue 4; locality pays when b/a < 1.00 with a higher hit rate: "
            + ("yes" if pays else "no")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
