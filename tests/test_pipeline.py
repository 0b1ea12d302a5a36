"""End to end: `daskdp run` on a real local cluster against plain vLLM as the oracle."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import PARITY_PROMPTS, daskdp_cli, plain_vllm, read_results

GREEDY = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def oracle():
    messages = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Tell me about {topic}."}]
        for topic in ["rivers", "bees", "the moon", "日本"]
    ]
    return plain_vllm(PARITY_PROMPTS, messages, **GREEDY), messages


def test_two_ranks_match_plain_vllm(tmp_path, oracle):
    """Every row exactly once, with the text and token counts plain vLLM gives."""
    expected, _ = oracle
    source = tmp_path / "prompts.parquet"
    frame = pd.DataFrame(
        {
            "prompt": PARITY_PROMPTS,
            "label": [f"label-{i}" for i in range(len(PARITY_PROMPTS))],
            "score": [i * 0.5 for i in range(len(PARITY_PROMPTS))],
        }
    )
    frame.to_parquet(source)
    temporary = tmp_path / ("job-scratch-directory-" * 5)  # as long as an HPC job's TMPDIR
    temporary.mkdir()
    done = daskdp_cli(
        "run", source, "--workers", 2, "--max-tokens", 24, "--quiet", env={"TMPDIR": str(temporary)}
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # --quiet: no progress, and no warning from the stopped workers
    assert not list(temporary.rglob("vllm_*")) and not list(temporary.glob("daskdp-*"))  # nothing left

    results = read_results(tmp_path / "prompts.out")
    assert sorted(results["id"]) == list(range(len(frame)))  # ids added: each row's position
    assert results["rank"].nunique() == 2
    assert results["error"].isna().all()
    merged = frame.assign(id=range(len(frame))).merge(results, on="id", suffixes=("", "_out"))
    assert (merged["label"] == merged["label_out"]).all()
    assert (merged["score"] == merged["score_out"]).all()
    texts = [text for text, _, _ in expected["prompts"]]
    assert len(set(texts)) == len(texts)  # a mix-up of rows would show
    assert list(merged["generated_text"]) == texts
    assert list(merged["output_tokens"]) == [n for _, n, _ in expected["prompts"]]
    assert list(merged["prompt_tokens"]) == [n for _, _, n in expected["prompts"]]
    assert "rows" in done.stdout and f"{len(frame):,}" in done.stdout
    summary = json.loads((tmp_path / "prompts.out" / "_summary.json").read_text())
    assert summary["rows"] == len(frame) and set(summary["ranks"]) == {"0", "1"}


def test_ranks_get_whole_chunks_as_evenly_as_possible(tmp_path, cluster):
    """Rows are cut into equal chunks, a file each, in a multiple of the ranks: each rank gets
    as many chunks, and rows differ between ranks by less than a chunk."""
    _, client = cluster
    source = tmp_path / "prompts.jsonl"
    pd.DataFrame({"prompt": [f"p{i}" for i in range(7)]}).to_json(source, orient="records", lines=True)
    done = daskdp_cli(
        "run", source, "--scheduler-address", client.scheduler.address,
        "--max-tokens", 2, "--chunk-size", 2, "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    chunks = sorted((tmp_path / "prompts.out").glob("part-*.parquet"))
    assert [chunk.name for chunk in chunks] == [f"part-00000{i}.parquet" for i in range(4)]
    assert [len(pd.read_parquet(chunk)) for chunk in chunks] == [2, 2, 2, 1]
    results = read_results(tmp_path / "prompts.out")
    assert list(results["id"]) == list(range(7))
    assert results.groupby("rank").size().to_dict() == {0: 4, 1: 3}


def test_chat_messages_use_the_chat_template(tmp_path, oracle, cluster):
    """A messages column is rendered through the model's chat template, as LLM.chat does."""
    expected, messages = oracle
    _, client = cluster
    source = tmp_path / "chat.jsonl"
    pd.DataFrame({"id": [f"c{i}" for i in range(len(messages))], "messages": messages}).to_json(
        source, orient="records", lines=True
    )
    done = daskdp_cli(
        "run", source, "--scheduler-address", client.scheduler.address, "--max-tokens", 24, "--quiet"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "chat.out").sort_values("id")
    assert list(results["generated_text"]) == [text for text, _, _ in expected["messages"]]
    assert list(results["prompt_tokens"]) == [n for _, _, n in expected["messages"]]


def test_per_row_overrides(tmp_path, cluster):
    """Per-row max_tokens, temperature and seed columns override the run's settings."""
    _, client = cluster
    source = tmp_path / "rows.parquet"
    pd.DataFrame(
        {
            "prompt": ["Count to ten.", "Count to ten.", "Name a colour.", "Name a colour.", "Say hi."],
            "max_tokens": [3, 9, 12, 12, None],
            "temperature": [None, None, 1.0, 1.0, None],
            "seed": [None, None, 7, 7, None],
        }
    ).to_parquet(source)
    done = daskdp_cli(
        "run", source, "--scheduler-address", client.scheduler.address,
        "--max-tokens", 5, "--ignore-eos", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "rows.out").sort_values("id")
    assert list(results["output_tokens"]) == [3, 9, 12, 12, 5]
    seeded = results[results["seed"] == 7]["generated_text"]
    assert seeded.nunique() == 1  # same seed, same sample


@pytest.mark.parametrize("fmt", ["parquet", "directory", "glob", "jsonl", "csv"])
def test_input_formats_give_the_same_results(tmp_path, cluster, oracle, fmt):
    """Parquet (file, directory, glob), JSON Lines and CSV give the same rows and texts."""
    _, client = cluster
    expected, _ = oracle
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(12)], "prompt": PARITY_PROMPTS[10:22]})
    if fmt == "parquet":
        source = tmp_path / "in.parquet"
        frame.to_parquet(source)
    elif fmt in ("directory", "glob"):
        (tmp_path / "in").mkdir()
        frame.iloc[:5].to_parquet(tmp_path / "in" / "a.parquet")
        frame.iloc[5:].to_parquet(tmp_path / "in" / "b.parquet")
        source = tmp_path / "in" if fmt == "directory" else tmp_path / "in" / "*.parquet"
    elif fmt == "jsonl":
        source = tmp_path / "in.jsonl"
        frame.to_json(source, orient="records", lines=True)
    else:
        source = tmp_path / "in.csv"
        frame.to_csv(source, index=False)
    out = tmp_path / "out"
    done = daskdp_cli(
        "run",
        source,
        "-o",
        out,
        "--scheduler-address",
        client.scheduler.address,
        "--max-tokens",
        24,
        "--quiet",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(out).sort_values("id", key=lambda ids: ids.str[1:].astype(int))
    assert list(results["id"]) == list(frame["id"])
    assert list(results["prompt"]) == list(frame["prompt"])
    assert list(results["generated_text"]) == [text for text, _, _ in expected["prompts"][10:22]]


def test_import_and_help_do_not_load_the_engine():
    """`import daskdp` and `daskdp --help` import neither vllm nor torch."""
    code = "import sys, daskdp; assert not {'vllm', 'torch', 'distributed'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = (
        "import sys\nfrom daskdp.cli import main\ntry:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert not {'vllm', 'torch'} & set(sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--scheduler-address" in done.stdout and "--ignore-eos" in done.stdout


@pytest.mark.slow
def test_run_deadline_stops_the_run(tmp_path):
    """--timeout bounds the whole run; the message names what was unfinished and where."""
    source = tmp_path / "long.parquet"
    pd.DataFrame({"prompt": [f"Tell a long story number {i}." for i in range(200)]}).to_parquet(source)
    done = daskdp_cli(
        "run", source, "--max-tokens", 1500, "--ignore-eos", "--timeout", 20, "--quiet", timeout=300
    )
    assert done.returncode == 1, done.stderr[-3000:]
    # The ranks are killed mid-generation: Python's resource tracker may add a warning after it.
    failed, resume = [line for line in done.stderr.splitlines() if line.startswith("daskdp:")]
    assert "passed its --timeout; unfinished: " in failed and "partition 0 on rank 0" in failed, failed
    assert resume.endswith(
        f"continue with: daskdp run {source} --max-tokens 1500 --ignore-eos --timeout 20 --quiet --resume"
    ), resume
